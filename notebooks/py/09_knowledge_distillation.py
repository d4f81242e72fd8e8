# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py//py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 09 · Knowledge distillation
#
# A fine-tuned MiniLM has six 384-wide blocks and over twenty million parameters (section
# 4 prints the count). A model that answers millions of requests, or runs on a phone, wants
# something far smaller. **Knowledge distillation** (知识蒸馏) trains such a small **student model**
# (学生模型) to imitate a large **teacher model** (教师模型) instead of learning from the
# labels alone. 004 §4.3 names three ways to do it - **soft label distillation**
# (软标签蒸馏), **attention distillation** (注意力蒸馏) and **intermediate layer
# distillation** (中间层蒸馏) - but gives only the headings: no formula and no code. This
# chapter writes each one down (Hinton et al. 2015; TinyBERT, Jiao et al. 2020; MiniLM,
# Wang et al. 2020), checks it against PyTorch, and measures what each buys on a task of
# the Shapes world: accuracy, parameters and latency.

# %% tags=["parameters"]
# Parameters: papermill and `mmcourse run 09 -p name value` can change these.
seed = 0  # random seed: data, teacher head and the first student seed
device = "auto"  # "auto" picks cuda, then mps, then cpu
max_length = 16  # tokens per caption after truncation ([CLS] and [SEP] included; full: 32)
num_teacher_labels = 400  # labelled captions the teacher is fine-tuned on (full: 4000)
num_labelled = 50  # of those, the captions whose label the student may use too (full: 50)
num_transfer = 400  # unlabelled captions the teacher labels for the student (the transfer set; full: 4000)
num_test = 300  # test captions (full: 2000)
teacher_steps = 40  # fine-tuning steps of the teacher's last layer and head (full: 300)
student_steps = 120  # training steps per student (full: 1000)
student_dim = 64  # D_s: width of the student (full: 128)
student_layers = 2  # blocks of the student (full: 4)
num_seeds = 3  # student seeds per main method (full: 5)
transfer_sweep = "25,100"  # smaller transfer sets, to see when soft labels win (full: 25,100,1000)
temperatures = "1,2,4,8"  # T of the soft-label sweep
cpu_threads = 1  # torch threads on a CPU; the latency table is measured with this many (0: torch's default)

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

import mmcourse
from mmcourse import utils
from mmcourse.plotting import setup_notebook

utils.positive_int(max_length=max_length, num_transfer=num_transfer, num_labelled=num_labelled,
                   num_teacher_labels=num_teacher_labels,
                   num_test=num_test, teacher_steps=teacher_steps, student_steps=student_steps,
                   student_dim=student_dim, student_layers=student_layers, num_seeds=num_seeds)
utils.non_negative_int(cpu_threads=cpu_threads)
if num_labelled > num_teacher_labels:
    raise ValueError(f"num_labelled must be <= num_teacher_labels={num_teacher_labels}, got {num_labelled}")
if max_length < 10:
    raise ValueError(f"max_length must be >= 10 so that the first object always fits, got {max_length}")
if student_dim % 4:
    raise ValueError(f"student_dim must be a multiple of 4 (the student has 4 heads), got {student_dim}")
sweep = [float(t) for t in temperatures.split(",")]
for t in sweep:
    utils.positive_float(**{"a temperature in temperatures": t})
mmcourse.seed_everything(seed)
device = mmcourse.get_device(device)
if device.type == "cpu" and cpu_threads:
    torch.set_num_threads(cpu_threads)  # tiny students: threads mostly wait on each other
setup_notebook()
print("computing on", device, f"({torch.get_num_threads()} thread(s))" if device.type == "cpu" else "")

# %% [markdown]
# ## 1. The idea: learn from the teacher's whole distribution
#
# A label says "this caption shows a **red circle**". A trained teacher says more: its
# probabilities over the 24 classes also say which *wrong* answers are almost right - a
# red square more than a green triangle. Hinton called this **dark knowledge** (暗知识) in
# his talks, and the 2015 paper with Vinyals and Dean made the term widely known. At the
# usual softmax a confident teacher leaves the wrong classes tiny probabilities (section 4
# measures how tiny for our teacher), which barely move a loss. A **temperature** (温度)
# $T$ divides the logits $z$ before the softmax; a $T > 1$ makes them smaller, closer
# together, so the softmax comes out flatter (softer):
#
# $$p_i^T = \frac{\exp(z_i / T)}{\sum_j \exp(z_j / T)}.$$
#
# $T = 1$ is the ordinary softmax; $T \to \infty$ tends to the uniform distribution. The
# student is trained to match the teacher's softened distribution, the **soft labels**
# (软标签), as well as (or instead of) the true **hard labels** (硬标签).

# %%
from mmcourse import distill

z = torch.tensor([6.0, 4.0, 3.5, 1.0, 0.0, -1.0])  # a teacher's logits over six classes
fig, axes = plt.subplots(1, len(sweep), figsize=(9, 2.4), sharey=True, squeeze=False)
for ax, T in zip(axes[0], sweep, strict=True):
    p = distill.softmax_with_temperature(z, T)  # p^T
    ax.bar(range(len(z)), p.numpy(), color="tab:blue")
    ax.set_title(f"T = {T:g}")
    ax.set_xlabel("class i")
axes[0, 0].set_ylabel("$p_i^T$")
fig.suptitle("The same logits, softened by the temperature")
plt.show()

# %% [markdown]
# ## 2. The soft-label loss, and why it carries a $T^2$
#
# With the teacher's logits $z^t$, the student's $z^s$ and a true label $y$ (one-hot),
# the distillation loss for one example is
#
# $$\mathcal{L}_{KD} = \alpha\, T^2\, \mathrm{KL}\!\left(p^{t,T} \,\|\, p^{s,T}\right)
#   + (1 - \alpha)\, \mathrm{CE}\!\left(y, p^{s,1}\right),
# \qquad \mathrm{KL}(p \,\|\, q) = \sum_i p_i \log \frac{p_i}{q_i},$$
#
# averaged over the $B$ examples of a batch. The KL divergence is taken *from* the teacher
# (the target distribution comes first) and summed over the classes. Its gradient with
# respect to a student logit is
#
# $$\frac{\partial\, \mathrm{KL}(p^{t,T} \| p^{s,T})}{\partial z^s_i} = \frac{1}{T}\left(p^{s,T}_i - p^{t,T}_i\right)
#   \approx \frac{1}{C\,T^2}\left(z^s_i - z^t_i\right) \quad (T \gg |z|,\ \text{logits of mean } 0),$$
#
# so it shrinks like $1/T^2$: without the factor $T^2$, raising the temperature would
# silently turn the soft term off next to the hard one. The code, with the same symbols
# (`z_s`, `z_t`, `T`, `alpha`, `y`), written as explicit sums:

# %%
B, C = 4, 24
gen = torch.Generator().manual_seed(seed)
z_s = torch.randn(B, C, generator=gen, requires_grad=True)  # student logits z^s
z_t = 3 * torch.randn(B, C, generator=gen)  # teacher logits z^t
y = torch.randint(0, C, (B,), generator=gen)  # hard labels
T, alpha = 4.0, 0.7

p_t = torch.exp(z_t / T) / torch.exp(z_t / T).sum(-1, keepdim=True)  # p^{t,T}, (B, C)
p_s = torch.exp(z_s / T) / torch.exp(z_s / T).sum(-1, keepdim=True)  # p^{s,T}, (B, C)
kl = (p_t * torch.log(p_t / p_s)).sum(-1)  # KL per example, (B,)
p_s1 = torch.softmax(z_s, -1)  # p^{s,1}, (B, C)
ce = -torch.log(p_s1[torch.arange(B), y])  # CE per example, (B,)
loss_by_hand = (alpha * T**2 * kl + (1 - alpha) * ce).mean()

loss = distill.kd_loss(z_s, z_t, temperature=T, alpha=alpha, labels=y)
torch_kl = nn.KLDivLoss(reduction="batchmean")(F.log_softmax(z_s / T, -1), F.softmax(z_t / T, -1))
torch.testing.assert_close(loss, loss_by_hand)
torch.testing.assert_close(loss, alpha * T**2 * torch_kl + (1 - alpha) * F.cross_entropy(z_s, y))
g_hand, = torch.autograd.grad(loss_by_hand, z_s)
g_pkg, = torch.autograd.grad(loss, z_s)
torch.testing.assert_close(g_pkg, g_hand)
print(f"kd_loss = {loss.item():.4f}: the explicit sums, nn.KLDivLoss(batchmean) * T^2 + CE, and the gradients agree")

# %% [markdown]
# Now the $T^2$ claim, measured: the size of the soft term's gradient for the same logits
# at each temperature, with and without the factor.

# %%
# NBVAL_CHECK_OUTPUT
rows = []
for T_ in [1, 2, 4, 8, 16]:
    zs = z_s.detach().clone().requires_grad_(True)
    for scaled in (True, False):
        g, = torch.autograd.grad(distill.soft_label_loss(zs, z_t, temperature=T_, t_squared=scaled), zs)
        rows.append({"T": T_, "with T^2" if scaled else "without T^2": round(g.norm().item(), 3)})
grad_table = pd.DataFrame(rows).groupby("T").first()
print(grad_table.to_string())

# %% [markdown]
# With $T^2$ the gradient settles at a constant size as $T$ grows; without it the size
# falls by about 4 for each doubling of $T$.
#
# > **Common pitfall: `reduction="mean"`, a missing $T^2$, and probabilities where
# > log-probabilities belong.** Code found online often writes
# > `nn.KLDivLoss()(F.log_softmax(z_s / T), F.softmax(z_t / T))`. Three mistakes hide
# > there. (1) The default, `reduction="mean"`, averages over *all* $B \cdot C$
# > entries, so the loss is $C$ times too small (PyTorch warns that `"batchmean"` is the
# > mathematically correct choice). (2) Without `* T**2` the soft term fades as $1/T^2$
# > (table above). (3) `F.kl_div(input, target)` expects `input` as **log**-probabilities
# > and computes $\mathrm{KL}(\text{target} \,\|\, \exp(\text{input}))$; passing the
# > student's probabilities, or swapping the two, computes something else. 004 §4.3 names
# > soft-label distillation without a formula, so none of this is visible there.

# %%
# NBVAL_CHECK_OUTPUT
import warnings

log_q, p = F.log_softmax(z_s.detach() / T, -1), F.softmax(z_t / T, -1)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    mean_kl = F.kl_div(log_q, p, reduction="mean")  # the pitfall
batchmean_kl = F.kl_div(log_q, p, reduction="batchmean")  # the KL per example
print(f"batchmean / mean = {(batchmean_kl / mean_kl).item():.2f} = C = {C}")
print("PyTorch's own warning:", str(caught[0].message).split(".")[0] if caught else "(none)")

# %% [markdown]
# ## 3. The task: captions of the Shapes world, and few labels
#
# Each Shapes-world scene comes with a caption drawn from templates and synonyms ("a
# picture of a big crimson disk on the left and a cobalt box"). The task: read the caption
# and name the colour and shape of the **first** object, one of 24 classes (20 occur in
# these splits; chapter 00 explains the held-out pairs). The words are a closed, generated
# vocabulary, and the data are procedurally generated from the seed. The task is text only
# because distillation needs a large pretrained teacher and many inputs to ask it about;
# chapter 08's questions come from a small closed grammar and are answered from cached
# image features, so its model has no large text teacher worth compressing.
#
# The setting of distillation with a **transfer set** (迁移集): the teacher was
# fine-tuned on `num_teacher_labels` labelled captions that the student may not use (think
# of a model trained on someone else's data), except for `num_labelled` of them. Besides
# those few labels, the student may ask the teacher about `num_transfer` **unlabelled**
# captions of its own, the transfer set. The teacher never saw those, so it is not always
# right on them.

# %%
from mmcourse.data import shapes
from mmcourse.pretrained import load_text_encoder

tokenizer, minilm = load_text_encoder()
labelled = shapes.generate_shapes(num_teacher_labels, split="validation")  # the teacher's labelled captions
unlabelled = shapes.generate_shapes(num_transfer, split="train")  # the transfer set
# rows: [the student's num_labelled labelled | the transfer set | the teacher's other labelled]
transfer = {k: labelled[k][:num_labelled] + unlabelled[k] + labelled[k][num_labelled:]
            for k in ("caption", "objects")}
transfer["label"] = np.concatenate([labelled["label"][:num_labelled], unlabelled["label"],
                                    labelled["label"][num_labelled:]])
n_pool = num_labelled + num_transfer  # the captions the student trains on: rows [0, n_pool)
test = shapes.generate_shapes(num_test, split="test")


def tokenize(captions):
    enc = tokenizer(captions, padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


ids_tr, mask_tr = tokenize(transfer["caption"])
ids_te, mask_te = tokenize(test["caption"])
y_tr, y_te = torch.from_numpy(transfer["label"]), torch.from_numpy(test["label"])
student_labels = y_tr[:n_pool].clone()
student_labels[num_labelled:] = -100  # ignore_index: nobody sees the transfer set's labels
num_classes = len(shapes.CLASS_NAMES)
for i in range(3):
    print(f"{shapes.CLASS_NAMES[y_tr[i]]:>16} <- {transfer['caption'][i]!r}")
print("tokens:", tokenizer.convert_ids_to_tokens(ids_tr[0]))
print(f"teacher: {num_teacher_labels} labelled captions; student: {num_labelled} of them + a transfer set of "
      f"{num_transfer} unlabelled ones; test {len(y_te)}; "
      f"chance = {1 / len(set(y_te.tolist())):.3f}")

# %% [markdown]
# ## 4. The teacher: MiniLM, fine-tuned cheaply
#
# The teacher is the real pretrained MiniLM (`all-MiniLM-L6-v2`) with a linear head on the
# mean of its token vectors. We copy its weights into the course's `TextEncoder`
# (chapter 04 showed both give the same numbers; we check once more), wrapped in
# `distill.TextClassifier`, which also returns every layer's hidden states and attention
# maps. To keep the chapter fast, blocks 1-5 stay frozen: their outputs are computed
# **once** for every caption, and only block 6 and the head are fine-tuned, on the
# `num_teacher_labels` labelled captions, with `mmcourse.train.fit`.
#
# Blocks are counted **from 1** in this chapter, as in the papers (the teacher has blocks
# 1-6). Python's lists count from 0: block $m$'s attention map is `attentions[m - 1]`,
# its output is `hidden_states[m]`, and `hidden_states[0]` is the embeddings' output.

# %%
from mmcourse.encoders import TextEncoder, TextEncoderConfig, count_parameters, load_from_bert
from mmcourse.train import TrainConfig, fit

teacher_config = TextEncoderConfig.from_bert_config(minilm.config, add_pooling_layer=False)
teacher = distill.TextClassifier(TextEncoder(teacher_config), num_classes=num_classes)
load_from_bert(teacher.encoder, minilm)
teacher.eval()
with torch.no_grad():
    theirs = minilm(input_ids=ids_tr[:4], attention_mask=mask_tr[:4]).last_hidden_state
    ours = teacher(ids_tr[:4], mask_tr[:4], output_hidden_states=True).hidden_states[-1]
torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
teacher.to(device)


@torch.no_grad()
def teacher_cache(ids, mask, batch=128):
    """What the frozen blocks 1-5 give: hidden_states[0..5] and attentions of blocks 1-5."""
    hidden, attn = [], []
    for i in range(0, len(ids), batch):
        out = teacher(ids[i:i + batch].to(device), mask[i:i + batch].to(device),
                      output_hidden_states=True, output_attentions=True)
        hidden.append(torch.stack(out.hidden_states[:6]))  # (6, b, N, 384): embeddings, blocks 1-5
        attn.append(torch.stack(out.attentions[:5]))  # (5, b, 12, N, N): blocks 1-5
    return {"hidden": torch.cat(hidden, 1), "attention": torch.cat(attn, 1)}


start = time.perf_counter()
cache_tr, cache_te = teacher_cache(ids_tr, mask_tr), teacher_cache(ids_te, mask_te)
h5_tr, h5_te = cache_tr["hidden"][5], cache_te["hidden"][5]  # (n, N, 384): block 6's input
print(f"frozen blocks run once over {len(ids_tr) + len(ids_te)} captions in {time.perf_counter() - start:.1f} s")

# %%
for p in teacher.parameters():
    p.requires_grad_(False)
for p in [*teacher.encoder.blocks[5].parameters(), *teacher.head.parameters()]:
    p.requires_grad_(True)
mask_tr, mask_te, y_tr_d, y_te_d = mask_tr.to(device), mask_te.to(device), y_tr.to(device), y_te.to(device)


def teacher_accuracy(model):
    logits = model.forward_from(h5_te, mask_te, start_layer=5).logits
    return {"accuracy": (logits.argmax(-1) == y_te_d).float().mean().item()}


teacher_rows = torch.cat([torch.arange(num_labelled), torch.arange(n_pool, len(y_tr))])  # labelled rows only
order = teacher_rows[torch.randperm(len(teacher_rows), generator=torch.Generator().manual_seed(seed))]
teacher_batches = [order[i:i + 32] for i in range(0, len(order), 32)]
teacher_fit = fit(
    teacher,
    teacher_batches,
    loss_fn=lambda m, idx: F.cross_entropy(
        m.forward_from(h5_tr[idx], mask_tr[idx], start_layer=5).logits, y_tr_d[idx]),
    config=TrainConfig(max_steps=teacher_steps, lr=2e-3, warmup_steps=5, device=str(device), progress=False),
    optimizer=torch.optim.AdamW([p for p in teacher.parameters() if p.requires_grad], lr=2e-3),
)
teacher.eval()
teacher_acc = teacher_accuracy(teacher)["accuracy"]
print(f"teacher: {count_parameters(teacher) / 1e6:.1f} M parameters, {count_parameters(teacher, trainable_only=True) / 1e6:.2f} M "
      f"fine-tuned on {num_teacher_labels} labelled captions in {teacher_fit.seconds:.1f} s; test accuracy {teacher_acc:.3f}")
mmcourse.record("teacher_accuracy", teacher_acc, at_least=0.85)

# %% [markdown]
# Now the teacher is frozen for good. Everything the students may copy is computed once,
# for the student's labelled captions and the transfer set: the logits, every hidden state and every
# attention map (blocks 1-5 did not change, so their part of the cache stands; block 6 is
# run again). How often is the teacher right on the transfer set, which it never saw?

# %%
with torch.no_grad():
    top = teacher.forward_from(h5_tr[:n_pool], mask_tr[:n_pool], start_layer=5, output_hidden_states=True,
                               output_attentions=True)
targets = {
    "logits": top.logits,  # (n_pool, C)
    "hidden": [*cache_tr["hidden"][:, :n_pool], top.hidden_states[-1]],  # 7 x (n_pool, N, 384): embeddings, blocks 1-6
    "attention": [*cache_tr["attention"][:, :n_pool], top.attentions[-1]],  # 6 x (n_pool, 12, N, N): blocks 1-6
}
teacher_right = top.logits.argmax(-1) == y_tr_d[:n_pool]
transfer_acc = teacher_right[num_labelled:].float().mean().item()
print(f"teacher's arg-max = true label on {teacher_right[:num_labelled].float().mean().item():.3f} of the student's "
      f"labelled captions (which it was fine-tuned on) and on {transfer_acc:.3f} of the transfer set (never seen)")

# %% [markdown]
# ### What the soft labels say
#
# The teacher's distribution for three captions of the transfer set, at rising
# temperatures: two where it is right and the first where it is wrong. The dark knowledge
# is *structured*: the mass that the true class does not take goes first to the classes
# that share its colour or its shape, or to the class of another object the caption
# mentions.

# %%
names = shapes.CLASS_NAMES
wrong_rows = [num_labelled + k for k in range(num_transfer) if not teacher_right[num_labelled + k]]
shown = [num_labelled, num_labelled + 1] + wrong_rows[:1]
fig = plt.figure(figsize=(11, 2.6 * len(shown)))
for row, (subfig, i) in enumerate(zip(fig.subfigures(len(shown), 1), shown, strict=True)):
    subfig.suptitle(f'"{transfer["caption"][i]}"', fontsize=8)
    axes = subfig.subplots(1, len(sweep), sharey=True, squeeze=False)[0]
    for ax, T_ in zip(axes, sweep, strict=True):
        p = distill.softmax_with_temperature(targets["logits"][i].cpu(), T_)
        bars = ax.bar(range(num_classes), p.numpy(), color="lightgray")
        bars[int(p.argmax())].set_color("tab:orange")  # the teacher's arg-max (hidden by red if right)
        bars[int(y_tr[i])].set_color("tab:red")
        ax.set_ylim(0, 1)
        ax.set_title(f"T = {T_:g}", fontsize=8)
        ax.set_xticks(range(num_classes), names if row == len(shown) - 1 else [], rotation=90, fontsize=7)
    axes[0].set_ylabel("$p_k^T$")
fig.suptitle("Teacher soft labels on the transfer set (red: the true class; orange: the teacher's wrong arg-max)",
             y=1.03)
plt.show()

# %% [markdown]
# Measured over the student's training captions: how much probability does a wrong class
# get at $T = 1$, and where does the mass that misses the true class go at $T = 4$? Per
# wrong class, on average:

# %%
p1 = distill.softmax_with_temperature(targets["logits"].cpu(), 1.0)
is_wrong = torch.ones_like(p1, dtype=torch.bool)
is_wrong[torch.arange(n_pool), y_tr[:n_pool]] = False
wrong_p1 = p1[is_wrong].mean().item()
print(f"T = 1: mean probability of a wrong class {wrong_p1:.4f} (median {p1[is_wrong].median().item():.1e}); "
      f"of the true class {p1[~is_wrong].mean().item():.3f}")
p4 = distill.softmax_with_temperature(targets["logits"].cpu(), 4.0)
groups = {"same colour": [], "same shape": [], "another object in the caption": [], "unrelated": []}
for i, objects in enumerate(transfer["objects"][:n_pool]):
    true = int(y_tr[i])
    others = {shapes.class_id(shape=o["shape"], colour=o["colour"]) for o in objects[1:]}
    for k in range(num_classes):
        if k == true:
            continue
        if k in others:
            groups["another object in the caption"].append(p4[i, k].item())
        elif k // len(shapes.SHAPES) == true // len(shapes.SHAPES):
            groups["same colour"].append(p4[i, k].item())
        elif k % len(shapes.SHAPES) == true % len(shapes.SHAPES):
            groups["same shape"].append(p4[i, k].item())
        else:
            groups["unrelated"].append(p4[i, k].item())
dark = {name: float(np.mean(v)) for name, v in groups.items()}
print("T = 4:\n" + pd.Series(dark, name="mean p_k^4 per wrong class").round(4).to_string())
dark_ratio = min(dark["same colour"], dark["same shape"]) / dark["unrelated"]
mmcourse.record("dark_knowledge_ratio", dark_ratio, at_least=1.3)

# %% [markdown]
# ## 5. The student: a tiny tower on the teacher's tokens
#
# The student is the same kind of encoder - `TextEncoder` - at a tiny size: `student_layers`
# blocks of width $D_s$ = `student_dim` with 4 heads. It reads exactly the teacher's
# WordPiece tokens, so that token $i$ of the student is token $i$ of the teacher and
# their attention maps can be compared entry by entry. It only needs embedding rows for
# the tokens that occur in this world: `distill.compact_vocabulary` maps MiniLM's 30,522
# ids onto those (ids never seen become `[UNK]`). Dropout is off: it only slows a model this
# small.

# %%
lookup = distill.compact_vocabulary(ids_tr, vocab_size=teacher_config.vocab_size)
sids_tr, sids_te = lookup[ids_tr].to(device), lookup[ids_te].to(device)
student_config = TextEncoderConfig(
    vocab_size=int(lookup.max()) + 1, max_position_embeddings=max_length, dim=student_dim,
    num_layers=student_layers, num_heads=4, hidden_dim=4 * student_dim, dropout=0.0,
    attention_dropout=0.0, add_pooling_layer=False)


def make_student(seed_):
    torch.manual_seed(seed_)
    return distill.TextClassifier(TextEncoder(student_config), num_classes=num_classes).to(device)


n_teacher, n_student = count_parameters(teacher), count_parameters(make_student(seed))
# the word-embedding table is a lookup, no compute: compare the rest too
n_teacher_body = n_teacher - teacher.encoder.embeddings.word_embeddings.weight.numel()
n_student_body = n_student - make_student(seed).encoder.embeddings.word_embeddings.weight.numel()
print(f"student vocabulary {student_config.vocab_size} tokens (teacher {teacher_config.vocab_size:,})")
print(f"parameters: teacher {n_teacher:,}, student {n_student:,} ({n_teacher / n_student:.0f}x fewer)")
print(f"without the word-embedding tables: teacher {n_teacher_body:,}, student {n_student_body:,} "
      f"({n_teacher_body / n_student_body:.0f}x fewer)")

# %% [markdown]
# ## 6. Attention and hidden-state distillation
#
# Soft labels only say what the teacher *concludes*. TinyBERT and MiniLM also copy *how*
# it gets there. TinyBERT pairs each student block $m = 1, \dots, L_s$ with a teacher
# block through the uniform map $g(m) = \lceil m \cdot L_t / L_s \rceil$
# (`distill.uniform_layer_map`; the ceiling only matters when $L_s$ does not divide
# $L_t$). The cell below prints the map for this run's `student_layers`.
#
# **Attention distillation.** With $A^{s}_{m}, A^{t}_{g(m)} \in \mathbb{R}^{N \times N}$ the
# attention distributions (each row sums to one), the loss used here is
#
# $$\mathcal{L}_{attn} = \frac{1}{|g|} \sum_m \frac{1}{N} \sum_{i} \mathrm{KL}\!\left(A^{t}_{g(m), i} \,\|\, A^{s}_{m, i}\right),$$
#
# a blend of the two papers: the per-row KL is MiniLM's, but MiniLM applies it to the
# **last** block only (no layer map; it also matches the value vectors' relations, left
# out here); the sum over mapped blocks is TinyBERT's, but TinyBERT takes the **squared
# error of the scores before the softmax**. Our encoder returns only the probabilities,
# so `loss="mse"` is the squared error of those. Both papers compare head $h$ with head
# $h$, which needs as many student heads as teacher heads. Our student has 4 heads and
# the teacher 12, so we compare the **head-averaged** maps (`heads="mean"`): the student
# copies the consensus of the teacher's heads, not each head.
#
# **Hidden-state distillation.** The student's token vectors $H^s_m \in \mathbb{R}^{N \times D_s}$
# are narrower than the teacher's $H^t_{g(m)} \in \mathbb{R}^{N \times D_t}$; TinyBERT
# learns one projection $W_h \in \mathbb{R}^{D_s \times D_t}$, shared by all layers,
# with the student. We learn one $W_h^{(m)}, b_h^{(m)}$ per mapped layer instead (a few
# more weights, and each layer keeps its own basis):
#
# $$\mathcal{L}_{hidn} = \frac{1}{|g|} \sum_m \mathrm{MSE}\!\left(H^s_m W_h^{(m)} + b_h^{(m)},\; H^t_{g(m)}\right).$$
#
# Padding tokens are left out of both. First by hand for one pair of blocks, the
# student's last and the teacher's block 6, then the package:

# %%
g_map = distill.uniform_layer_map(student_layers, teacher.num_layers)  # {student block: teacher block}, from 1
print("layer map g (blocks counted from 1):", g_map)
idx = torch.arange(8, device=device)
probe = make_student(seed)
out = probe(sids_tr[idx], mask_tr[idx], output_hidden_states=True, output_attentions=True)
w = mask_tr[idx].float()  # (B, N): 1 = real token
A_s = out.attentions[-1].mean(1)  # (B, N, N): student's last block, heads averaged
A_t = targets["attention"][5][idx].mean(1)  # (B, N, N): teacher block 6 (list index 5)
kl_rows = torch.where(A_t > 0, A_t * (torch.log(A_t) - torch.log(A_s)), 0.0).sum(-1)  # (B, N); 0 log 0 = 0
attn_by_hand = (kl_rows * w).sum() / w.sum()
attn_pkg = distill.attention_map_loss(out.attentions[-1], targets["attention"][5][idx], attention_mask=mask_tr[idx])
torch.testing.assert_close(attn_pkg, attn_by_hand)

W_h = nn.Linear(student_dim, 384).to(device)  # the learned projection W_h^(m), b_h^(m)
err = ((W_h(out.hidden_states[-1]) - targets["hidden"][6][idx]) ** 2).mean(-1)  # (B, N)
hid_by_hand = (err * w).sum() / w.sum()
torch.testing.assert_close(distill.hidden_state_loss(out.hidden_states[-1], targets["hidden"][6][idx],
                                                     projection=W_h, attention_mask=mask_tr[idx]), hid_by_hand)
print(f"attention KL {attn_pkg.item():.3f}, hidden MSE {hid_by_hand.item():.3f} for an untrained student: "
      "the package agrees with the formulas")

# %% [markdown]
# `distill.DistillConfig` holds one weight per term and `distill.Distiller` adds them up
# (and holds the projections $W_h$, trained with the student):
#
# $$\mathcal{L} = w_{soft}\, T^2\, \mathrm{KL} + w_{hard}\, \mathrm{CE} + w_{attn}\, \mathcal{L}_{attn} + w_{hidn}\, \mathcal{L}_{hidn}.$$
#
# ## 7. The experiment
#
# Every student trains for `student_steps` AdamW steps on batches of its `num_labelled`
# labelled captions and the `num_transfer` captions of the transfer set (the hard-label
# students on the labelled captions only). The weights are not the $\alpha$ and
# $1 - \alpha$ of section 2: every run below uses `DistillConfig`'s defaults,
# $w_{soft} = w_{hard} = 1$, and $w_{attn} = w_{hidn} = 1$ where those terms are on. The
# methods:
#
# * **hard labels**: the labelled captions only - no teacher;
# * **teacher's hard labels**: the true label on the labelled captions and the teacher's
#   arg-max on the transfer set, as **pseudo-labels** (伪标签): cross-entropy on every
#   caption, no soft term;
# * **soft labels (KD)**: $T^2\,\mathrm{KL}$ on every caption + CE on the labelled ones only, over the temperatures;
# * **+ attention**, **+ attention + hidden**: the KD loss plus the two inner terms, on the
#   blocks paired by $g$.

# %%
A_MAP = {m - 1: t - 1 for m, t in g_map.items()}  # list indices of attentions: block m is attentions[m - 1]
H_MAP = dict(g_map)  # indices of hidden_states: hidden_states[m] is block m's output
pseudo = targets["logits"].argmax(-1)
pseudo_labels = torch.where(student_labels.to(device) >= 0, student_labels.to(device), pseudo)


def train_student(config, seed_, *, labelled_only=False, labels=None, transfer_size=None):
    """Train one student with a DistillConfig; returns its test accuracy and the model.

    transfer_size: use only the first this many captions of the transfer set (None: all).
    """
    student = make_student(seed_)
    distiller = distill.Distiller(config, student_dim=student_dim, teacher_dim=384)
    model = nn.ModuleDict({"student": student, "distiller": distiller})
    labels = student_labels.to(device) if labels is None else labels
    n = num_labelled if labelled_only else n_pool if transfer_size is None else num_labelled + transfer_size
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed_))
    batches = [perm[i:i + 32] for i in range(0, n, 32)]
    need_attn, need_hidden = config.attention_weight > 0, config.hidden_weight > 0

    def loss_fn(m, i):
        o = m["student"](sids_tr[i], mask_tr[i], output_hidden_states=need_hidden, output_attentions=need_attn)
        t_attn = [a[i] for a in targets["attention"]] if need_attn else None  # 6 x (b, 12, N, N)
        t_hid = [h[i] for h in targets["hidden"]] if need_hidden else None  # 7 x (b, N, 384)
        return m["distiller"](o.logits, targets["logits"][i], labels=labels[i],
                              student_attentions=o.attentions, teacher_attentions=t_attn,
                              student_hidden=o.hidden_states, teacher_hidden=t_hid,
                              attention_mask=mask_tr[i]).loss

    fit(model, batches, loss_fn=loss_fn, optimizer=torch.optim.AdamW(model.parameters(), lr=5e-3),
        config=TrainConfig(max_steps=student_steps, lr=5e-3, warmup_steps=10, device=str(device), progress=False))
    with torch.no_grad():
        acc = (student(sids_te, mask_te).logits.argmax(-1) == y_te_d).float().mean().item()
    return acc, student


T_main = 4.0 if 4.0 in sweep else sweep[-1]  # fixed before any run; the sweep shows the others
kd_name, PSEUDO = f"soft labels (T={T_main:g})", "teacher's hard labels"
methods = {
    "hard labels": dict(config=distill.DistillConfig(soft_weight=0.0), labelled_only=True),
    "teacher's hard labels": dict(config=distill.DistillConfig(soft_weight=0.0), labels=pseudo_labels),
    f"soft labels (T={T_main:g})": dict(config=distill.DistillConfig(temperature=T_main)),
    "+ attention": dict(config=distill.DistillConfig(temperature=T_main, attention_weight=1.0,
                                                     attention_layer_map=A_MAP)),
    "+ attention + hidden": dict(config=distill.DistillConfig(temperature=T_main, attention_weight=1.0,
                                                              attention_layer_map=A_MAP, hidden_weight=1.0,
                                                              hidden_layer_map=H_MAP)),
}
start = time.perf_counter()
results, students = {}, {}
trained = 0  # students actually trained (two sweep entries reuse runs above)
for name, kwargs in methods.items():
    for s in range(seed, seed + num_seeds):
        results[(name, s)], students[(name, s)] = train_student(seed_=s, **kwargs)
        trained += 1
sweep_rows = []
for T_ in sweep:
    for scaled in (True, False):
        if scaled and T_ == T_main:
            acc = results[(f"soft labels (T={T_main:g})", seed)]
        elif not scaled and T_ == 1:
            acc = results.get(("sweep", 1.0, True))
        else:
            acc, _ = train_student(distill.DistillConfig(temperature=T_, t_squared=scaled), seed)
            trained += 1
        results[("sweep", T_, scaled)] = acc
        sweep_rows.append({"T": T_, "T^2": "with" if scaled else "without", "accuracy": acc})
print(f"{len(results)} results from {trained} students trained in {time.perf_counter() - start:.0f} s")

# %%
table = pd.DataFrame(
    [{"method": name, "seed": s, "accuracy": results[(name, s)]} for name in methods
     for s in range(seed, seed + num_seeds)]
).pivot(index="method", columns="seed", values="accuracy").loc[list(methods)]
table["mean"] = table.mean(axis=1)
print(f"test accuracy (teacher: {teacher_acc:.3f}; chance {1 / len(set(y_te.tolist())):.3f})")
print(table.round(3).to_string())
sweep_table = pd.DataFrame(sweep_rows).pivot(index="T", columns="T^2", values="accuracy")
print("\nsoft labels, seed", seed, "- accuracy over the temperature, with and without T^2")
print(sweep_table.round(3).to_string())
soft_methods = [kd_name, "+ attention", "+ attention + hidden"]
asking = [PSEUDO, *soft_methods]  # the methods of the table whose student learns from the teacher
gap_to_teacher = table.loc[asking, "mean"] - teacher_acc
print(f"\nstudents that ask the teacher (means): {gap_to_teacher.min():+.3f} .. {gap_to_teacher.max():+.3f} from the "
      f"teacher's accuracy; without T^2 at T = {max(sweep):g}: {sweep_table.loc[max(sweep), 'without']:.3f}, "
      f"the hard-label student (seed {seed}) {results[('hard labels', seed)]:.3f}")
print(f"teacher's hard labels {table.loc[PSEUDO, 'mean']:.3f} vs the best soft-label method "
      f"{table.loc[soft_methods, 'mean'].max():.3f} (means); seed {seed}: {results[(PSEUDO, seed)]:.3f} vs the best "
      f"temperature of the sweep {sweep_table['with'].max():.3f}")

# %%
fig, ax = plt.subplots(figsize=(6, 3))
for col, style in (("with", "o-"), ("without", "s--")):
    ax.plot(sweep_table.index, sweep_table[col], style, label=f"{col} $T^2$")
ax.axhline(table.loc["hard labels", "mean"], color="gray", ls=":", label="hard labels only (mean)")
ax.axhline(results[("teacher's hard labels", seed)], color="tab:green", ls="-.",
           label=f"teacher's hard labels (seed {seed})")
ax.axhline(teacher_acc, color="tab:red", ls=":", label="teacher")
ax.set_xscale("log", base=2)
ax.set_xlabel("temperature T")
ax.set_ylabel("test accuracy")
ax.set_title(f"Soft-label distillation (seed {seed}), {num_labelled} labelled + {num_transfer} unlabelled captions",
             fontsize=9)
ax.legend(fontsize=7)
plt.show()

# %% [markdown]
# ### Explore: the distillation temperature
#
# Pick a temperature $T$ and a caption of the transfer set: left, the teacher's soft label
# $p^T$ for it (red: the true class; orange: the teacher's arg-max where it is wrong);
# right, the test accuracy of the soft-label student ($T^2$ on), **measured** only at the
# temperatures of the sweep above - a student per $T$ takes seconds to train, so the curve is
# not filled in between. Watch the entropy grow with $T$ while the ranking of the classes
# stays the same.

# %%
import ipywidgets as widgets

from mmcourse.plotting import draw_soft_labels
from mmcourse.widgets import explore

teacher_logits = targets["logits"].cpu()
measured_T = {float(T_): float(acc) for T_, acc in sweep_table["with"].items()}


def draw_temperature(fig, temperature, caption):
    draw_soft_labels(fig, logits=teacher_logits[caption], true=int(y_tr[caption]), names=names,
                     temperature=temperature, measured=measured_T, caption=transfer["caption"][caption])


explore(
    draw_temperature,
    figsize=(11, 3.8),
    temperature=widgets.FloatLogSlider(value=4.0, base=2, min=-1, max=5, step=0.25, description="T"),
    caption=widgets.IntSlider(value=shown[-1], min=0, max=len(teacher_logits) - 1, description="caption"),
);

# %% [markdown]
# The numbers are printed above, not typed here; read them with these questions. The
# hard-label student, with only `num_labelled` labels, never meets many of the synonyms
# and stays far below the teacher. Every method of the table that asks the teacher about
# the transfer set lands within a few points of the teacher's accuracy, some of them above
# it (the range is printed). That needs the $T^2$: in the sweep without it, the soft term
# fades as $T$ grows and the student slides back towards the hard-label one (at the
# largest $T$ it is about as bad as the hard-label student, printed); with $T^2$ the
# temperature matters much less.
#
# Now the comparison the chapter is about: the teacher's **soft** labels against its
# **hard** labels on captions it never saw, where it is sometimes wrong. The last printed
# line sets the pseudo-label student beside the best soft-label method and the best
# temperature of the sweep (the green line in the figure): on this task the teacher's
# arg-max teaches the student at least as well as its softened distribution. Whether the
# inner terms help on top of the soft labels is read from the table as well.
#
# So is the dark knowledge of section 4 useless here? The cell below looks where it should
# matter: the transfer captions on which the teacher's arg-max is wrong. What do the
# students answer there, and how sure was the teacher?

# %%
t_wrong = torch.nonzero(~teacher_right[num_labelled:]).squeeze(1) + num_labelled  # rows of the transfer set
check_rows = []
for name in (PSEUDO, kd_name):
    with torch.no_grad():
        pred = students[(name, seed)](sids_tr[t_wrong], mask_tr[t_wrong]).logits.argmax(-1)
    check_rows.append({f"student (seed {seed})": name,
                       "= true label": (pred == y_tr_d[t_wrong]).float().mean().item(),
                       "= teacher's wrong arg-max": (pred == pseudo[t_wrong]).float().mean().item()})
print(f"the {len(t_wrong)} transfer captions the teacher gets wrong; what the students answer there:")
print(pd.DataFrame(check_rows).set_index(f"student (seed {seed})").round(3).to_string())
confidence = p1[:n_pool].max(-1).values  # the teacher's top probability at T = 1
sure_wrong = confidence[t_wrong.cpu()].mean().item()
sure_right = confidence[num_labelled:][teacher_right[num_labelled:].cpu()].mean().item()
print(f"teacher's top probability at T = 1: {sure_wrong:.3f} on those captions, {sure_right:.3f} on the "
      "transfer captions it gets right")
copied = {r[f"student (seed {seed})"]: r["= teacher's wrong arg-max"] for r in check_rows}
mmcourse.record("mistakes_copied_pseudo_minus_soft", copied[PSEUDO] - copied[kd_name], at_least=0.15)
mmcourse.record("teacher_confidence_right_minus_wrong", sure_right - sure_wrong, at_least=0.1)

# %% [markdown]
# Read the two rows. The pseudo-label student was told the teacher's wrong answers as if
# they were true, and it repeats a share of them. The soft-label student mostly gives the
# true class there: where the teacher errs it is less sure (last line), so its soft label
# still gives the true class real mass, and the student follows the pattern of the other
# captions. That is the dark knowledge at work, measured. On the test set it did not pay
# off with this transfer set: the wrong pseudo-labels are few, and the soft-label student is
# less accurate elsewhere. The next experiment shows when it does pay off.
#
# The same table gives one measured reason why students can match or beat their teacher:
# neither student reproduces all of the teacher's mistakes, so the teacher's accuracy is
# not a ceiling. It does not rule out other reasons (the teacher fine-tuned only its last
# block; the student trains all of itself, on a vocabulary of this world alone).

# %% [markdown]
# ### When soft labels win: a small transfer set
#
# A hard label says one thing about a caption: its class. A soft label also says how much
# the caption looks like every other class - "purple cross, but a bit like a purple plus
# and a turquoise cross". With many transfer captions, the student can learn those
# resemblances from the data themselves and the extra information adds little; with few,
# it is much of what the student gets (Hinton et al. 2015 distilled an MNIST net from a
# transfer set that lacked a whole digit). So we shrink the transfer set to the sizes in
# `transfer_sweep` and train both students again, over the same seeds.

# %%
transfer_sizes = sorted({int(k) for k in transfer_sweep.split(",")} - {num_transfer})
utils.positive_int(**{f"transfer_size_{k}": k for k in transfer_sizes})
if transfer_sizes and transfer_sizes[-1] > num_transfer:
    raise ValueError(f"transfer_sweep sizes must be at most num_transfer={num_transfer}, got {transfer_sizes}")
size_rows = [dict(transfer=num_transfer, method=name, seed=s, accuracy=results[(name, s)])
             for name in (PSEUDO, kd_name) for s in range(seed, seed + num_seeds)]
started_sizes = time.perf_counter()
for k in transfer_sizes:
    for s in range(seed, seed + num_seeds):
        for name in (PSEUDO, kd_name):
            acc, _ = train_student(seed_=s, transfer_size=k, **methods[name])
            size_rows.append(dict(transfer=k, method=name, seed=s, accuracy=acc))
sizes = pd.DataFrame(size_rows)
by_size = sizes.pivot_table(index="transfer", columns="method", values="accuracy", aggfunc=["mean", "std"])
print(f"{len(transfer_sizes) * num_seeds * 2} more students in {time.perf_counter() - started_sizes:.0f} s; "
      f"test accuracy over the transfer-set size ({num_labelled} labelled captions besides), {num_seeds} seeds:")
print(by_size.round(3).to_string())
per_seed = sizes.pivot_table(index=["transfer", "seed"], columns="method", values="accuracy")
soft_gain = (per_seed[kd_name] - per_seed[PSEUDO]).groupby("transfer")  # soft minus hard, per seed
gain_mean, gain_se = soft_gain.mean(), soft_gain.std() / np.sqrt(num_seeds)
for k in gain_mean.index:
    print(f"transfer {k:4d}: soft minus teacher's hard labels {gain_mean[k]:+.3f} (standard error {gain_se[k]:.3f})")

fig, ax = plt.subplots(figsize=(6, 3.2))
for name, colour in ((PSEUDO, "tab:green"), (kd_name, "tab:blue")):
    m, sd = by_size["mean"][name], by_size["std"][name]
    ax.errorbar(m.index, m, yerr=sd, fmt="o-", color=colour, capsize=3, label=name)
    pts = sizes[sizes.method == name]
    ax.plot(pts.transfer, pts.accuracy, ".", color=colour, alpha=0.5)
ax.axhline(table.loc["hard labels", "mean"], color="gray", ls=":", label="no transfer set (hard labels only)")
ax.set(xscale="log", xlabel="unlabelled captions in the transfer set", ylabel="test accuracy",
       title=f"Soft vs hard teacher labels over the transfer-set size, {num_seeds} seeds")
ax.set_xticks(sorted(sizes.transfer.unique()), [str(k) for k in sorted(sizes.transfer.unique())])
ax.minorticks_off()
ax.legend(fontsize=7)
plt.show()
smallest = min(gain_mean.index)
gap_floor = max(0.05, 2 * float(gain_se[smallest]))  # two standard errors of the per-seed differences
mmcourse.record("soft_minus_hard_labels_smallest_transfer", float(gain_mean[smallest]), at_least=gap_floor)
mmcourse.record("hard_minus_soft_labels_full_transfer", float(-gain_mean[num_transfer]), at_least=0.0)

# %% [markdown]
# With a small transfer set the soft-label student is far ahead of the pseudo-label one,
# seed after seed; as the transfer set grows the pseudo-label student catches up and, at
# `num_transfer` captions, passes it. Both differences are printed above with their
# standard errors and checked. This is the practical rule: distil with soft labels when
# unlabelled data are scarce; with plenty of them, the teacher's arg-max (self-training)
# is a strong, simpler baseline, and the soft labels' edge is on the captions where the
# teacher is unsure.

# %%
margins = np.array([results[(kd_name, s)] - results[("hard labels", s)] for s in range(seed, seed + num_seeds)])
best_kd = max(table.loc[[kd_name, "+ attention", "+ attention + hidden"], "mean"])
chance = 1 / len(set(y_te.tolist()))
# the claim is a ceiling: with only the labelled captions the student stays far below the teacher (and above chance)
mmcourse.record("hard_label_student_accuracy", float(table.loc["hard labels", "mean"]), at_least=round(chance, 3),
                at_most=round(teacher_acc - 0.3, 3))
# every method of the table that asks the teacher lands within a few points of it, some above it
mmcourse.record("asking_students_min_minus_teacher", float(gap_to_teacher.min()), at_least=-0.06)
mmcourse.record("asking_students_max_minus_teacher", float(gap_to_teacher.max()), at_least=0.0)
# without T^2, at the largest T the student is back near the hard-label one
mmcourse.record("no_t2_at_max_T_minus_hard_label", float(sweep_table.loc[max(sweep), "without"] - results[("hard labels", seed)]),
                at_most=0.15)
mmcourse.record("kd_student_accuracy", float(table.loc[kd_name, "mean"]), at_least=0.8)
mmcourse.record("pseudo_label_student_accuracy", float(table.loc[PSEUDO, "mean"]), at_least=0.9)
mmcourse.record("teacher_transfer_accuracy", transfer_acc, at_least=0.85, at_most=0.995)  # right, but not always
mmcourse.record("kd_margin_worst_seed", float(margins.min()), at_least=0.5)
mmcourse.record("best_distilled_accuracy", float(best_kd), at_least=0.85)
no_t2_drop = float(sweep_table.loc[max(sweep), "with"] - sweep_table.loc[max(sweep), "without"])
mmcourse.record("t_squared_gain_at_max_T", no_t2_drop, at_least=0.4)

# %% [markdown]
# ## 8. Accuracy, size and latency
#
# Latency is measured, not estimated: each model classifies the same batch of test
# captions, under `torch.no_grad()`, with `torch.get_num_threads()` threads on this
# machine; `mmcourse.bench.time_candidates` times them in turn and reports the median.
# The teacher runs all six blocks from the token ids (the cache was a training trick). The
# teacher's word-embedding table (one row per token of its 30,522-token vocabulary) holds
# about half its parameters (section 5 prints both counts) and costs no compute, being a
# lookup; the column without it is the fairer size comparison.

# %%
from mmcourse.bench import time_candidates

timing = {}
kd_student_s0 = students[(kd_name, seed)].eval()  # the KD student of the first seed
for batch in (1, 32):
    ids_b, mask_b = ids_te[:batch].to(device), mask_te[:batch]
    sids_b = sids_te[:batch]
    with torch.no_grad():
        timing[batch] = time_candidates(
            {"teacher": lambda ids_b=ids_b, mask_b=mask_b: teacher(ids_b, mask_b),
             "student": lambda sids_b=sids_b, mask_b=mask_b: kd_student_s0(sids_b, mask_b)},
            repeats=5, warmup=2)
latency = pd.DataFrame({
    "parameters": [n_teacher, n_student],
    "without word embeddings": [n_teacher_body, n_student_body],
    "test accuracy": [teacher_acc, results[(kd_name, seed)]],
    "ms, batch 1": [timing[1]["teacher"] * 1e3, timing[1]["student"] * 1e3],
    "ms, batch 32": [timing[32]["teacher"] * 1e3, timing[32]["student"] * 1e3],
}, index=["teacher (MiniLM)", f"student ({kd_name}, seed {seed})"])
threads = torch.get_num_threads() if device.type == "cpu" else "n/a"
print(f"device {device}, {threads} thread(s), {max_length} tokens per caption")
print(latency.round({"test accuracy": 3, "ms, batch 1": 2, "ms, batch 32": 2}).to_string())
speedup = timing[32]["teacher"] / timing[32]["student"]
# Floors that hold at the "full" student sizes too (128 wide, 4 blocks: ratios near 28 and 14);
# the speed-up floor is for a CPU, where compute dominates (a GPU is bound by kernel launches).
mmcourse.record("student_speedup_batch32", speedup, at_least=10.0 if device.type == "cpu" else None)
mmcourse.record("parameter_ratio", n_teacher / n_student, at_least=10.0)
mmcourse.record("parameter_ratio_without_word_embeddings", n_teacher_body / n_student_body, at_least=10.0)

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.4))
accs = [teacher_acc] + [table.loc[name, "mean"] for name in methods]
labels_ = [f"teacher ({n_teacher / 1e6:.1f} M)"] + [f"{name} ({n_student / 1e3:.0f} k)" for name in methods]
ax1.barh(range(len(accs)), accs, color=["tab:red"] + ["tab:blue"] * len(methods))
ax1.set_yticks(range(len(accs)), labels_, fontsize=7)
ax1.invert_yaxis()
ax1.set_xlabel("test accuracy")
ax1.set_title("Accuracy (parameters in brackets)")
x = np.arange(2)
for k, (model_name, colour) in enumerate((("teacher", "tab:red"), ("student", "tab:blue"))):
    ax2.bar(x + (k - 0.5) * 0.35, [timing[1][model_name] * 1e3, timing[32][model_name] * 1e3], 0.35,
            label=model_name, color=colour)
ax2.set_xticks(x, ["batch 1", "batch 32"])
ax2.set_yscale("log")
ax2.set_ylabel(f"ms per call ({threads} thread(s), log scale)")
ax2.set_title("Latency, median of timed blocks")
ax2.legend(fontsize=7)
plt.show()

# %% [markdown]
# ## 9. What the student's attention learned
#
# Head-averaged attention of the teacher's block 6 (the one the student's last block is
# mapped to) next to the last block of a student trained with and without attention
# distillation, for one test caption.

# %%
i = 0
n_tok = int(mask_te[i].sum())
tokens = tokenizer.convert_ids_to_tokens(ids_te[i][:n_tok])
with torch.no_grad():
    t_map = teacher(ids_te[i:i + 1].to(device), mask_te[i:i + 1], output_attentions=True).attentions[5]
    maps = {"teacher, block 6": t_map}
    for name in (kd_name, "+ attention"):
        maps[f"student: {name}"] = students[(name, seed)](sids_te[i:i + 1], mask_te[i:i + 1],
                                                          output_attentions=True).attentions[-1]
fig, axes = plt.subplots(1, 3, figsize=(12, 3.8), layout="constrained")
shown_maps = {title: a[0].mean(0)[:n_tok, :n_tok].cpu().numpy() for title, a in maps.items()}
vmax = max(m.max() for m in shown_maps.values())  # one colour scale for the three panels
for ax, (title, a) in zip(axes, shown_maps.items(), strict=True):
    im = ax.imshow(a, cmap="viridis", vmin=0, vmax=vmax)
    ax.set_title(title, fontsize=9)
    ax.set_xticks(range(n_tok), tokens, rotation=90, fontsize=7)
    ax.set_yticks(range(n_tok), tokens, fontsize=7)
    ax.set_xlabel("key")
axes[0].set_ylabel("query")
fig.colorbar(im, ax=axes, shrink=0.8, label="attention weight (heads averaged)")
plt.show()
with torch.no_grad():
    t_attn_te = teacher.forward_from(h5_te, mask_te, start_layer=5, output_attentions=True).attentions[-1]
    gap = {name: distill.attention_map_loss(students[(name, seed)](sids_te, mask_te, output_attentions=True).attentions[-1],
                                            t_attn_te, attention_mask=mask_te).item()
           for name in (kd_name, "+ attention")}
print("attention KL to the teacher's block 6 on the test set:", {k: round(v, 3) for k, v in gap.items()})
mmcourse.record("attention_kl_ratio", gap[kd_name] / gap["+ attention"], at_least=4.0)

# %% [markdown]
# ## Summary
#
# * Distillation trains a small student on the teacher's outputs. The soft-label loss is
#   $T^2\,\mathrm{KL}(p^{t,T}\,\|\,p^{s,T})$, summed over classes and averaged over the batch
#   (`reduction="batchmean"`, not `"mean"`, which is $C$ times smaller); the $T^2$ keeps the
#   soft term's gradient the same size at every temperature.
# * Soft labels carry structure: the mass a teacher does not give the true class goes to
#   classes that share a colour or a shape, or to another object of the caption.
# * The largest gain here comes from the transfer set: the teacher labels captions the
#   student has no label for. Soft labels win when that set is small (25 captions: far
#   ahead of the teacher's hard labels, over seeds); with the full transfer set the hard
#   labels (pseudo-labels) teach at least as well, although the teacher is wrong on some
#   of it. The soft-label student did not copy most of those mistakes, which is one
#   measured reason students can match or beat the teacher. Attention and hidden-state
#   distillation make the student's inner workings look like the teacher's (the attention
#   KL above); whether that buys accuracy on top of the soft labels is for the table to say.
# * The student has many times fewer parameters (section 5 prints the ratio, with and
#   without the teacher's large word-embedding table) and answers many times faster
#   (section 8 gives the latencies measured on this machine).
#
# Next, chapter 10 puts a text decoder on an image encoder: captioning and VQA.
#
# ## Exercises
#
# Replace each `raise NotImplementedError` (or `...`) with your answer and run the cell;
# `check()` tells you what is right or wrong. `hint()` and `solution()` help if you are stuck.

# %%
from mmcourse.exercises.ch09 import q1, q2, q3, q4


# Exercise 1: the softened softmax p_i = exp(z_i / T) / sum_j exp(z_j / T) over the last
# axis of `logits` (any shape (..., C)). Keep it numerically stable for large logits.
def my_softmax_with_temperature(logits, temperature):
    raise NotImplementedError  # your code here


q1.check(my_softmax_with_temperature)


# %%
# Exercise 2: Hinton's loss for a batch: alpha * T^2 * KL(p_t^T || p_s^T) + (1 - alpha) * CE(labels, z_s),
# the KL summed over classes and averaged over the batch. student_logits, teacher_logits: (B, C); labels: (B,).
def my_kd_loss(student_logits, teacher_logits, labels, temperature, alpha):
    raise NotImplementedError  # your code here


q2.check(my_kd_loss)


# %%
# Exercise 3: TinyBERT's hidden-state loss: project the student's states (B, N, Ds) with
# W (Ds, Dt) and b (Dt,), then the squared error to the teacher's (B, N, Dt), averaged over
# the Dt features and over the real tokens only (mask (B, N): 1 = real token, 0 = padding).
def my_hidden_state_loss(student_hidden, teacher_hidden, W, b, mask):
    raise NotImplementedError  # your code here


q3.check(my_hidden_state_loss)

# %%
# Exercise 4: predict before you try. A student is trained with the soft term ALONE
# (no hard labels), with AdamW, at T = 8. Someone removes the T^2 factor. What happens?
#   "a": training barely changes: Adam divides each step by the gradient's own scale
#   "b": the student learns 64 times more slowly
#   "c": the student now ignores the teacher and fits the labels
answer = ...  # "a", "b" or "c"
q4.check(answer)

# %%
# q1.hint(); q1.solution()
