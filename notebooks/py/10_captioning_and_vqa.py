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
# # 10 · Captioning and VQA
#
# Every model so far *read* images and text and returned a label or an embedding. This
# chapter adds the other half: a model that **writes**. **Image captioning** (图像描述生成)
# turns an image into a sentence; **visual question answering** (视觉问答, VQA) answers a
# question about an image. Both need a text **decoder** (解码器) that produces one token at a
# time while it looks at the image through **cross-attention** (交叉注意力), and both need a
# way to choose the tokens - the **decoding** (解码) algorithms that every LLM uses. The
# chapter follows 003 §4.2 and §5 (the caption loss, its gradient and a fine-tuning recipe)
# and 004 §3.2 (multimodal generation and VQA), corrects the loss's notation and the
# source's code, and measures what each choice buys on the Shapes world:
#
# 1. the caption loss and **teacher forcing** (教师强制), and the price it hides, **exposure
#    bias** (暴露偏差);
# 2. a ViT encoder with a Transformer decoder, trained with `mmcourse.train.fit`; greedy
#    decoding, beam search and sampling compared with BLEU, CIDEr-D and an attribute
#    accuracy that reads the facts out of each caption;
# 3. baselines run here: a blind decoder, shuffled images, nearest-neighbour retrieval;
# 4. VQA as classification and as generation, against question-only and image-only models,
#    per question type and on unseen shape-colour compositions;
# 5. where the decoder looks for each word, and an explorer.
#
# Everything is trained from scratch in this notebook on procedurally generated scenes
# (no pretrained vision model exists offline); at the default sizes it runs in about a
# minute and a half on two CPU cores.

# %% tags=["parameters"]
# Parameters: papermill and `mmcourse run 10 -p name value` can change these.
seed = 0  # random seed: data order, initialisations, sampling
device = "auto"  # "auto" picks cuda, then mps, then cpu
num_train = 2000  # training scenes, each with 5 captions and up to 5 questions (full: 20000)
num_test = 250  # test scenes for BLEU, CIDEr-D and VQA; at least 200 for CIDEr's idf (full: 1000)
num_heldout = 200  # scenes with held-out shape-colour pairs, for VQA (full: 1000)
num_references = 5  # reference captions per scene
dim = 64  # D: width of encoder and decoder (full: 256)
decoder_layers = 2  # decoder blocks (full: 4)
encoder_steps = 150  # steps of the ViT's region pre-training (full: 1500)
caption_steps = 400  # steps of the captioner and of the blind captioner (full: 6000)
vqa_steps = 150  # steps of each VQA classifier, 96 questions each (full: 3000)
num_seeds = 3  # seeds of every VQA classifier and of sampling (full: 5)
batch_size = 64  # sequences per step (full: 256)
beam_widths = "1,2,4,8"  # K of the beam sweep (1 is greedy)
length_penalties = "0,1,2"  # alpha of the beam sweep
max_new_tokens = 32  # longest caption generated, [SEP] included
cpu_threads = 1  # torch threads on a CPU: tiny models, two threads mostly wait on each other (0: torch's default)

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

import mmcourse
from mmcourse import plotting, utils
from mmcourse.plotting import setup_notebook

utils.positive_int(num_train=num_train, num_test=num_test, num_heldout=num_heldout,
                   num_references=num_references, dim=dim, decoder_layers=decoder_layers,
                   encoder_steps=encoder_steps, caption_steps=caption_steps, vqa_steps=vqa_steps,
                   num_seeds=num_seeds, batch_size=batch_size, max_new_tokens=max_new_tokens)
utils.non_negative_int(cpu_threads=cpu_threads)
if num_test < 200:
    raise ValueError(f"num_test must be >= 200 so that CIDEr's document frequencies mean something, got {num_test}")
if num_references < 2:
    raise ValueError(f"num_references must be >= 2 (BLEU and CIDEr compare with several references), got {num_references}")
if dim % 4:
    raise ValueError(f"dim must be a multiple of 4 (4 heads, 2-D sin-cos positions), got {dim}")
if max_new_tokens < 8:
    raise ValueError(f"max_new_tokens must be >= 8 to fit one object's caption, got {max_new_tokens}")
widths = [int(k) for k in beam_widths.split(",")]
alphas = [float(a) for a in length_penalties.split(",")]
for k in widths:
    utils.positive_int(**{"a beam width in beam_widths": k})
mmcourse.seed_everything(seed)
device = mmcourse.get_device(device)
if device.type == "cpu" and cpu_threads:
    torch.set_num_threads(cpu_threads)
setup_notebook()
started = time.perf_counter()
print("computing on", device)
cpu_started = time.process_time()

# %% [markdown]
# ## 1. The task and the data
#
# Each Shapes scene now comes with **five reference captions** (参考描述), drawn from
# templates and synonyms ("a crimson disk on the left", "there is a big red circle"), and
# one question of each type that the scene can answer: colour, shape, count, exists and
# where. Five different captions of one image is what captioning data sets look like (COCO
# has five per image): there is no single right sentence, which is why the metrics below
# compare with all references at once.

# %%
from mmcourse import caption_metrics as cm
from mmcourse.captioning import (Captioner, CaptionerConfig, DecoderBlock, RegionProbe, answer_loss, caption_loss,
                                 encode_prompts, encode_sequences, generate_text, load_from_torch_decoder_layer,
                                 region_accuracy, region_loss, region_targets, sequence_batches, sequence_loss)
from mmcourse.clip import WordTokenizer
from mmcourse.data.shapes import ANSWERS, QUESTION_TYPES, captioning_data
from mmcourse.generation import GenerationConfig
from mmcourse.train import TrainConfig, fit

t0 = time.perf_counter()
train = captioning_data(num_train, split="train", num_references=num_references)
test = captioning_data(num_test, split="test", num_references=num_references)
heldout = captioning_data(num_heldout, split="heldout", num_references=num_references)
print(f"generated {num_train} + {num_test} + {num_heldout} scenes in {time.perf_counter() - t0:.1f} s")

fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
for ax, i in zip(axes, range(3), strict=True):
    ax.imshow(test["images"][i].permute(1, 2, 0))
    ax.set_xticks([])
    ax.set_yticks([])
    lines = [r if len(r) < 52 else r[:50] + "..." for r in test["references"][i][:3]]
    lines += [f'Q: {q["question"]}  A: {q["answer"]}' for q in test["qa"][i][:2]]
    ax.set_title("\n".join(lines), fontsize=7, loc="left")
fig.suptitle("Test scenes with three of their five references and two of their questions")
plt.show()

# %% [markdown]
# ## 2. The caption loss, and teacher forcing
#
# 003 §4.2 writes the captioning loss as $\ell = -\log \mathbb{P}(M_\theta(x) \mid y)$: the
# probability of the model's *output* given the *label*. That conditions the wrong way
# round. A captioner models the caption $y = (y_1, \dots, y_T)$ given the image $x$, token by
# token (the chain rule of probability):
#
# $$\mathbb{P}_\theta(y \mid x) = \prod_{t=1}^{T} \mathbb{P}_\theta(y_t \mid y_{<t}, x),
# \qquad \ell(\theta) = -\log \mathbb{P}_\theta(y \mid x) = -\sum_{t=1}^{T} \log \mathbb{P}_\theta(y_t \mid y_{<t}, x),$$
#
# the sum of **next-token cross-entropies** (交叉熵); $y_T$ is the end token `[SEP]`, so the
# model also learns when to stop. With logits $z_t$ at step $t$, the gradient of one term is
# $\partial \ell_t / \partial z_t = \operatorname{softmax}(z_t) - \mathrm{onehot}(y_t)$, and
# back-propagation carries it into every weight (003 §4.2's chain rule). During training the
# model reads the **true** prefix $y_{<t}$ at every position - teacher forcing - so one
# forward pass of a causal decoder gives all $T$ terms at once. Below: the loss written as a
# loop over $t$, then `captioning.caption_loss`, which shifts by one (position $t$'s logits
# predict token $t+1$) and ignores padding.

# %%
torch.manual_seed(seed)
V_demo, T_demo = 7, 5
z = torch.randn(1, T_demo, V_demo, requires_grad=True)  # z_t: logits at positions 0..T-1
y = torch.tensor([[2, 5, 6, 4, 3]])  # [CLS] y_1 y_2 y_3 [SEP]
loss_mask = torch.tensor([[0, 1, 1, 1, 1]])  # every token after [CLS] is a target
ell = sum(-torch.log_softmax(z[0, t], -1)[y[0, t + 1]] for t in range(T_demo - 1))  # -sum_t log P(y_t | y_<t, x)
ours = caption_loss(z, y, loss_mask, reduction="sum")
torch.testing.assert_close(ours, ell)
(grad,) = torch.autograd.grad(ell, z)
torch.testing.assert_close(grad[0, 1], torch.softmax(z[0, 1], -1).detach() - F.one_hot(y[0, 2], V_demo).float())
print(f"loop {ell.item():.4f} = caption_loss {ours.item():.4f}; gradient at t=1 = softmax - one-hot")  # NBVAL_CHECK_OUTPUT

# %% [markdown]
# ## 3. The model: an image encoder and a decoder with cross-attention
#
# The image encoder is chapter 04's ViT: a 32 x 32 image in 8 x 8 patches gives $N = 16$
# patch tokens, the **memory** the decoder reads. Each decoder block has three sublayers,
# each with a residual and a LayerNorm (pre-norm here):
#
# $$h \leftarrow h + \mathrm{SelfAttn}_{\text{causal}}(\mathrm{LN}_1 h), \qquad
# h \leftarrow h + \mathrm{CrossAttn}(\mathrm{LN}_2 h,\ \text{memory}), \qquad
# h \leftarrow h + \mathrm{FFN}(\mathrm{LN}_3 h).$$
#
# In the cross-attention the queries are the words, the keys and values the image
# patches: each word picks the patches it needs. `DecoderBlock` computes exactly what
# `nn.TransformerDecoderLayer` computes; we copy the weights of one into the other and
# compare outputs and gradients.

# %%
torch.manual_seed(seed)
layer = nn.TransformerDecoderLayer(32, 4, 128, dropout=0.0, batch_first=True, norm_first=True, activation="gelu")
block = DecoderBlock(dim=32, num_heads=4, hidden_dim=128, norm_first=True)
load_from_torch_decoder_layer(block, layer)
h = torch.randn(2, 6, 32, requires_grad=True)  # (B, T, D) word states
memory_demo = torch.randn(2, 16, 32, requires_grad=True)  # (B, N, D) image patches
theirs = layer(h, memory_demo, tgt_mask=nn.Transformer.generate_square_subsequent_mask(6), tgt_is_causal=True)
ours, _, _ = block(h, memory=memory_demo)
torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
g = torch.randn_like(ours)
for a, b in zip(torch.autograd.grad(ours, [h, memory_demo], g), torch.autograd.grad(theirs, [h, memory_demo], g), strict=True):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
print("DecoderBlock = nn.TransformerDecoderLayer in value and gradient (words and image memory)")

# %% [markdown]
# **The KV cache.** At generation time the decoder runs once per new token. Recomputing
# the whole prefix every step repeats work: the keys and values of earlier tokens never
# change (causal attention), and the image's cross-attention keys and values do not depend
# on the words at all. `Captioner.init_state` computes the image's $K, V$ once per layer;
# `Captioner.step` takes only the new token, appends its keys and values to the **KV
# cache** (键值缓存) and returns the next logits. That is the step function that
# `mmcourse.generation` drives. Cached steps must give the logits of a full recomputation:

# %%
texts = [r for rs in train["references"] for r in rs] + [q["question"] for qa in train["qa"] for q in qa]
tokenizer = WordTokenizer.from_texts([*texts, *ANSWERS])
config = CaptionerConfig(vocab_size=tokenizer.vocab_size, num_answers=len(ANSWERS), dim=dim,
                         decoder_layers=decoder_layers, max_length=max_new_tokens + 16)
demo = Captioner(config).eval()
seq = encode_sequences(tokenizer, test["references"][0][:2])
with torch.no_grad():
    full = demo.decode(seq["input_ids"], demo.encode(test["images"][:2]), seq["attention_mask"]).logits  # (B, T, V)
    state = demo.init_state(test["images"][:2])
    steps = []
    for t in range(seq["input_ids"].shape[1]):
        logits, state = demo.step(seq["input_ids"][:, t : t + 1], state, seq["attention_mask"][:, : t + 1])
        steps.append(logits)
real = seq["attention_mask"].bool()
torch.testing.assert_close(torch.cat(steps, 1)[real], full[real], atol=1e-5, rtol=1e-5)
print(f"vocabulary V = {tokenizer.vocab_size}; {seq['input_ids'].shape[1]} cached steps = one full pass; "
      f"cache after them: {tuple(state['self_k'].shape)} (B, layers, H, T, Dh)")

# %% [markdown]
# ## 4. Training: the vision tower first, then the decoder
#
# No pretrained vision model is available offline, and a decoder that must also discover
# what a "circle" looks like through the caption loss alone learns slowly on a CPU. So we
# do what captioners usually do with a pretrained CNN or ViT, in miniature: first train the
# ViT for a few seconds to say *what is where* (a linear read-out of every region's colour,
# shape and size from the patch tokens, `RegionProbe`), then **freeze** it, compute the
# memory of every image once, and train only the decoder. The read-out sees per-region
# attribute labels of the training scenes only, never a caption or a question.

# %%
torch.manual_seed(seed)
captioner = Captioner(config)
probe = RegionProbe(captioner.encoder)
regions = region_targets(train["objects"])
gen = torch.Generator().manual_seed(seed)
region_batches = []
while len(region_batches) < encoder_steps:
    order = torch.randperm(num_train, generator=gen)
    region_batches += [{"images": train["images"][order[i : i + 128]], "regions": regions[order[i : i + 128]]}
                       for i in range(0, num_train - 127, 128)]
t0 = time.perf_counter()
fit(probe, region_batches[:encoder_steps], loss_fn=region_loss,
    config=TrainConfig(max_steps=encoder_steps, lr=3e-3, warmup_steps=10, eval_every=encoder_steps,
                       progress=False, device=str(device)))
probe_acc = region_accuracy(probe, test["images"].to(device), region_targets(test["objects"]))
print(f"region read-out on test scenes after {time.perf_counter() - t0:.1f} s: "
      + ", ".join(f"{k} {v:.3f}" for k, v in probe_acc.items()))
for p in captioner.encoder.parameters():
    p.requires_grad_(False)
with torch.no_grad():
    memory = {name: captioner.encode(d["images"].to(device)).cpu() for name, d in
              (("train", train), ("test", test), ("heldout", heldout))}  # (N_scenes, 16, D)
print("memory per image:", tuple(memory["test"].shape[1:]), "(N patches, D)")

# %% [markdown]
# The decoder learns two tasks at once: writing captions (`[CLS] caption [SEP]`, loss on
# every caption token) and answering questions generatively (`[CLS] question answer
# [SEP]`, loss on the answer only: the question is a **prefix** (前缀) the decoder reads,
# not a target). The **blind decoder** (盲解码器) is the same model trained on the same
# sequences with the image memory replaced by zeros: it learns the **language prior**
# (语言先验) - what captions and answers look like - and nothing about the image. Both go
# through `mmcourse.train.fit` with `captioning.sequence_loss`.

# %%
captions = [r for rs in train["references"] for r in rs]
caption_image = torch.arange(num_train).repeat_interleave(num_references)
qa_train = [q for qa in train["qa"] for q in qa]
qa_image = torch.tensor([i for i, qa in enumerate(train["qa"]) for _ in qa])
enc_c = encode_sequences(tokenizer, captions)
enc_q = encode_sequences(tokenizer, [q["answer"] for q in qa_train], [q["question"] for q in qa_train])
width = max(enc_c["input_ids"].shape[1], enc_q["input_ids"].shape[1])
encoded = {k: torch.cat([F.pad(enc_c[k], (0, width - enc_c[k].shape[1])), F.pad(enc_q[k], (0, width - enc_q[k].shape[1]))])
           for k in enc_c}
rows_memory = torch.cat([memory["train"][caption_image], memory["train"][qa_image]])  # (M, N, D)
print(f"{len(captions)} caption sequences + {len(qa_train)} question-answer sequences, longest {width} tokens")


def caption_batches(inputs, seed_):  # shuffled each epoch, each batch cut to its longest sequence
    return sequence_batches(inputs, encoded, batch_size=batch_size, num_batches=caption_steps, seed=seed_, key="memory")


caption_config = TrainConfig(max_steps=caption_steps, lr=3e-3, warmup_steps=caption_steps // 20,
                             eval_every=caption_steps, progress=False, device=str(device))
t0 = time.perf_counter()
fit_caption = fit(captioner, caption_batches(rows_memory, seed), loss_fn=sequence_loss, config=caption_config)
caption_seconds = time.perf_counter() - t0
torch.manual_seed(seed)
blind = Captioner(config)
blind.encoder.requires_grad_(False)
fit_blind = fit(blind, caption_batches(torch.zeros_like(rows_memory), seed), loss_fn=sequence_loss, config=caption_config)
blind_seconds = time.perf_counter() - t0 - caption_seconds

fig, ax = plt.subplots(figsize=(6.5, 3))
for name, result in (("captioner", fit_caption), ("blind decoder (memory = 0)", fit_blind)):
    losses = pd.Series([r["loss"] for r in result.history]).rolling(20, min_periods=1).mean()
    ax.plot(np.arange(1, len(losses) + 1), losses, label=name)
ax.set_xlabel("step")
ax.set_ylabel("caption loss (nats per target token)")
ax.set_title("Teacher-forced training (running mean of 20 steps)")
ax.legend()
plt.show()
print(f"captioner: {caption_seconds:.1f} s, final loss {fit_caption.history[-1]['loss']:.3f}; "
      f"blind: {blind_seconds:.1f} s, final loss {fit_blind.history[-1]['loss']:.3f}")

# %% [markdown]
# ## 5. Decoding: greedy, beam search, sampling
#
# The model gives $\mathbb{P}(y_t \mid y_{<t}, x)$; a **decoding strategy** picks the tokens:
#
# * **greedy decoding** (贪心解码): $y_t = \arg\max_v \mathbb{P}(v \mid y_{<t}, x)$;
# * **beam search** (束搜索): keep the $K$ prefixes with the highest
#   $\sum_t \log \mathbb{P}(y_t \mid y_{<t}, x)$; rank finished captions by
#   $\sum_t \log \mathbb{P} / L^{\alpha}$ with a **length penalty** (长度惩罚) $\alpha$
#   ($\alpha = 0$: total log-probability, which favours short captions; $\alpha = 1$: the
#   mean per token);
# * **sampling** (采样): draw $y_t \sim \operatorname{softmax}(z_t / \tau)$ at a temperature
#   $\tau$, optionally from the smallest set of tokens whose probability reaches $p$
#   (**nucleus sampling** (核采样), top-p).
#
# All three come from `mmcourse.generation` (checked against `transformers`' `generate` in
# its tests), driving `Captioner.step`.
#
# The metrics. **BLEU** (双语评估替补) is the geometric mean of the clipped n-gram
# precisions $p_1..p_4$ times a brevity penalty, over the corpus; it comes from
# `sacrebleu`. **CIDEr-D** weights every n-gram by tf-idf (frequent n-grams like "a picture
# of" count little), compares a caption with each reference by a cosine, clips the
# candidate's counts and damps length differences by $e^{-(l_c - l_s)^2 / 2\sigma^2}$,
# $\sigma = 6$; `caption_metrics.cider_d` writes it from the formula and equals
# `pycocoevalcap` in the tests. Neither metric knows whether "a red circle" is *true* of
# the image: **attribute accuracy** (属性准确率) parses colour, shape, size and position of
# each object, and the object count, out of the caption (every synonym) and compares them
# with the scene; a fact left unsaid counts as wrong.

# %%
test_refs = [[cm.normalize(r) for r in rs] for rs in test["references"]]
eos = config.eos_token_id


def score(hyps, refs=test_refs, objects=test["objects"]):
    """BLEU-4, CIDEr-D, attribute accuracy and mean length of a list of captions."""
    hyps = [cm.normalize(h) for h in hyps]
    attrs = cm.attribute_accuracy(hyps, objects)
    return {"BLEU-4": cm.corpus_bleu(hyps, refs).score, "CIDEr-D": cm.cider_d(hyps, refs)[0],
            "attribute acc": attrs["overall"], "position acc": attrs["position"], "count acc": attrs["count"],
            "words": float(np.mean([len(h.split()) for h in hyps]))}


def decode(model, mem, **kw):
    """Captions of the images whose memory is ``mem`` (greedy unless ``kw`` says otherwise)."""
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=config.pad_token_id, **kw)
    return generate_text(model.to(device), tokenizer, memory=mem.to(device), config=cfg)


t0 = time.perf_counter()
greedy, greedy_out = decode(captioner, memory["test"])
results = {"greedy": score(greedy)}
beam = {}
for k in widths:
    for a in alphas if k > 1 else [1.0]:
        name = "greedy" if k == 1 else f"beam K={k}, alpha={a:g}"
        if k > 1:
            beam[(k, a)] = decode(captioner, memory["test"], num_beams=k, length_penalty=a, early_stopping=True)[0]
            results[name] = score(beam[(k, a)])
sampled = {}
for tau in (1.0,):  # the model's own distribution; the explorer below tries other temperatures
    runs = []
    for s in range(num_seeds):
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=True, temperature=tau, eos_token_id=eos,
                               pad_token_id=config.pad_token_id)
        runs.append(score(generate_text(captioner, tokenizer, memory=memory["test"].to(device), config=cfg,
                                        generator=torch.Generator(device=device).manual_seed(seed + s))[0]))
    sampled[tau] = pd.DataFrame(runs)
    results[f"sampling tau={tau:g} (mean of {num_seeds})"] = sampled[tau].mean().to_dict()
decode_seconds = time.perf_counter() - t0

# the baselines: blind decoder, shuffled images, nearest-neighbour retrieval, and the references themselves
blind_captions = decode(blind, memory["test"])[0]
results["blind decoder (no image)"] = score(blind_captions)
perm = torch.randperm(num_test, generator=torch.Generator().manual_seed(seed + 1))
shuffled = decode(captioner, memory["test"][perm])[0]
results["captioner, shuffled images"] = score(shuffled)
train_pixels = train["images"].flatten(1)
nearest = torch.cdist(test["images"].flatten(1), train_pixels).argmin(1)  # closest training image in pixels
results["nearest-neighbour retrieval"] = score([train["references"][int(j)][0] for j in nearest])
held_refs = [[cm.normalize(r) for r in rs[1:]] for rs in test["references"]]
results["a held-out reference (vs the other 4)"] = score([rs[0] for rs in test["references"]], refs=held_refs)
table = pd.DataFrame(results).T
print(f"decoded {len(results) - 2} settings in {decode_seconds:.1f} s")
for tau, runs in sampled.items():
    print(f"sampling tau={tau:g} over {num_seeds} seeds: " + ", ".join(
        f"{m} {runs[m].mean():.3f} +- {runs[m].std():.3f}" for m in ("BLEU-4", "CIDEr-D", "attribute acc")))
table.round(3)

# %%
default_beam = (4, 1.0) if (4, 1.0) in beam else next(iter(beam))
rows = ["greedy", f"beam K={default_beam[0]}, alpha={default_beam[1]:g}"]
for i in range(3):
    print(f"scene {i}: greedy: {greedy[i]}\n         beam:   {beam[default_beam][i]}\n         blind:  {blind_captions[i]}")

# %%
fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
for a in alphas:
    xs = [1] + [k for k in widths if k > 1]
    for ax, metric in zip(axes, ("CIDEr-D", "attribute acc", "words"), strict=True):
        ys = [results["greedy"][metric]] + [results[f"beam K={k}, alpha={a:g}"][metric] for k in widths if k > 1]
        ax.plot(xs, ys, marker="o", label=f"alpha = {a:g}")
for ax, metric in zip(axes, ("CIDEr-D", "attribute acc", "words"), strict=True):
    for name, style in (("blind decoder (no image)", ":"), ("a held-out reference (vs the other 4)", "--")):
        ax.axhline(results[name][metric], color="grey", linestyle=style, label=name.split(" (")[0])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("beam width K (1 = greedy)")
    ax.set_title(metric)
axes[2].set_ylabel("mean caption length (words)")
axes[0].legend(fontsize=7)
fig.suptitle("Beam width and length penalty on the test scenes")
plt.show()

# %% [markdown]
# **Where beam search helps, and where it does not.** Beam search finds captions with a
# higher probability under the model; whether that is a *better* caption depends on the
# length penalty. With $\alpha = 1$ or $2$ (scores per token) the wider beams write
# slightly longer captions that state more facts (position accuracy rises), and CIDEr-D
# and attribute accuracy move up a little; BLEU-4 barely moves (the next cell prints the
# differences from greedy). With $\alpha = 0$ the total log-probability favours short
# captions: every extra word costs probability. Look at the rows with $\alpha = 0$ in the
# table and at the share of empty captions printed by the next cell: wherever a beam
# returns an empty caption, the search found that **the empty caption** (`[SEP]` right
# away) is more probable under the model than any real caption it kept. That is a *model* error that greedy decoding hides by a *search* error (Stahlberg
# and Byrne, 2019, found the same in machine translation). How often a beam meets the
# empty caption depends on $K$ in no simple way: `[SEP]` becomes a finished hypothesis only
# if it ranks among the $K$ best candidates at the first step, and a beam may leave the
# greedy path. The next cell counts for how many scenes the model prefers the empty caption
# to the greedy one.
# %%
with torch.no_grad():
    prompt = encode_prompts(tokenizer, [""] * num_test)
    first, _ = captioner.step(prompt["input_ids"].to(device), captioner.init_state(memory=memory["test"].to(device)),
                              prompt["attention_mask"].to(device))
log_p_empty = torch.log_softmax(first[:, -1].float(), -1)[:, eos].cpu()  # log P([SEP] | [CLS], x)
log_p_greedy = greedy_out.sequences_scores.cpu()  # sum_t log P(y_t | y_<t, x) of the greedy caption
empty_share = {k_a: float(np.mean([len(c.split()) == 0 for c in caps])) for k_a, caps in beam.items()}
print(f"mean log P(empty caption) = {log_p_empty.mean():.2f}, mean log P(greedy caption) = {log_p_greedy.mean():.2f}; "
      f"the empty caption is the more probable one for {(log_p_empty > log_p_greedy).float().mean():.0%} of the scenes")
print("share of empty captions per (K, alpha):", {f"K={k}, alpha={a:g}": f"{v:.0%}" for (k, a), v in empty_share.items()})
widest = f"beam K={max(widths)}, alpha={max(alphas):g}"
delta = {m: results[widest][m] - results["greedy"][m] for m in ("BLEU-4", "CIDEr-D", "attribute acc", "position acc", "words")}
print(f"{widest} minus greedy: " + ", ".join(f"{m} {v:+.3f}" for m, v in delta.items()))
assert delta["attribute acc"] > -0.01 and delta["position acc"] > -0.01, "the prose says a wide beam with alpha > 0 states facts at least as well as greedy"

# %% [markdown]
# * **Sampling** produces varied captions (one per seed), at a cost in BLEU-4, CIDEr-D and
#   attribute accuracy (the explorer's overview in section 9 shows it growing with the
#   temperature): a sample sometimes picks a wrong colour or shape, or a word from the
#   wrong task. But compare the "position acc" column:
#   samples state positions far more often than greedy or beam captions. The references
#   mention a position only about half of the time, so the *most probable* caption form
#   leaves it out, and every mode-seeking decoder inherits that; sampling reproduces the
#   distribution of forms instead.
# * **The references' own score** is the ceiling of a template: a held-out reference scored
#   against the other four does not reach attribute accuracy 1, because many templates omit
#   size or position.
#
# The cells below record the key results and check the comparisons against the baselines.

# %%
bleu_greedy, cider_greedy = results["greedy"]["BLEU-4"], results["greedy"]["CIDEr-D"]
name_beam = f"beam K={default_beam[0]}, alpha={default_beam[1]:g}"
blind_row, shuffled_row = results["blind decoder (no image)"], results["captioner, shuffled images"]
prior = max(blind_row["CIDEr-D"], shuffled_row["CIDEr-D"])
mmcourse.record("bleu4_greedy", round(bleu_greedy, 2), at_least=blind_row["BLEU-4"] + 1)
mmcourse.record("bleu4_beam", round(results[name_beam]["BLEU-4"], 2), at_least=blind_row["BLEU-4"] + 1)
mmcourse.record("cider_greedy", round(cider_greedy, 3), at_least=1.5 * prior)
mmcourse.record("cider_beam", round(results[name_beam]["CIDEr-D"], 3), at_least=1.5 * prior)
mmcourse.record("attribute_accuracy", round(results["greedy"]["attribute acc"], 3),
                at_least=blind_row["attribute acc"] + 0.15)
mmcourse.record("attribute_accuracy_blind", round(blind_row["attribute acc"], 3),
                at_most=results["greedy"]["attribute acc"] - 0.15)
mmcourse.record("cider_shuffled_images", round(shuffled_row["CIDEr-D"], 3), at_most=cider_greedy / 1.5)
ratio_bleu, ratio_cider = bleu_greedy / blind_row["BLEU-4"], cider_greedy / blind_row["CIDEr-D"]
print(f"captioner / blind decoder: BLEU-4 x{ratio_bleu:.1f}, CIDEr-D x{ratio_cider:.1f}, "
      f"attribute accuracy x{results['greedy']['attribute acc'] / blind_row['attribute acc']:.1f}")
assert ratio_bleu < ratio_cider, "the prose below says BLEU separates the two less than CIDEr-D does"

# %% [markdown]
# The captioner beats the blind decoder and the shuffled images by a wide margin in CIDEr-D
# and attribute accuracy (the floors above demand 1.5 times the better baseline's CIDEr-D
# and 0.15 more attribute accuracy), while its BLEU-4 lead is relatively smaller (the
# ratios are printed above): the blind
# decoder's captions are fluent and template-shaped, so they share many n-grams ("a picture
# of a", "on the left") with any reference. BLEU mostly sees the *form*; attribute accuracy
# sees the *facts*. Nearest-neighbour retrieval in pixel space returns a real caption of a
# similar-looking training image: fluent, but its facts are right only where the
# neighbour happens to share them.
#
# ## 6. Exposure bias: teacher forcing vs free running
#
# Teacher forcing trains every step on the *true* prefix; at generation time the model reads
# its *own* earlier tokens. One unusual word early (a template or synonym that the
# reference did not use) puts it where training never put it, and errors compound: this
# mismatch is **exposure bias**. We measure it with the same quantity both ways: the
# fraction of reference tokens predicted exactly at their position, (a) with the true
# prefix (teacher forced) and (b) comparing the greedy caption with the reference position
# by position (free running), averaged over all five references.

# %%
def position_accuracy(model, mem, refs):
    """Per-position exact-token accuracy: teacher forced and free running (greedy), vs each reference."""
    tf_hits, fr_hits, totals = np.zeros(64), np.zeros(64), np.zeros(64)
    free = [tokenizer.encode(h)[1:] for h in decode(model, mem)[0]]  # greedy tokens and [SEP]
    for j in range(len(refs[0])):
        seq = encode_sequences(tokenizer, [rs[j] for rs in refs])
        with torch.no_grad():
            logits = model.decode(seq["input_ids"].to(device), mem.to(device), seq["attention_mask"].to(device)).logits
        pred = logits[:, :-1].argmax(-1).cpu()  # (B, T-1): prediction of token t+1
        target, valid = seq["input_ids"][:, 1:], seq["loss_mask"][:, 1:].bool()
        for b in range(len(refs)):
            n = int(valid[b].sum())
            tf_hits[:n] += (pred[b, :n] == target[b, :n]).numpy()
            fr = torch.tensor((free[b] + [-1] * n)[:n])
            fr_hits[:n] += (fr == target[b, :n]).numpy()
            totals[:n] += 1
    keep = totals > 0
    return tf_hits[keep].sum() / totals[keep].sum(), fr_hits[keep].sum() / totals[keep].sum(), \
        tf_hits[keep] / totals[keep], fr_hits[keep] / totals[keep], totals[keep]


tf_acc, fr_acc, tf_curve, fr_curve, counts = position_accuracy(captioner, memory["test"], test["references"])
fig, ax = plt.subplots(figsize=(6.5, 3))
last = int(np.nonzero(counts >= 50)[0].max()) + 1  # positions with at least 50 reference tokens
ax.plot(np.arange(1, last + 1), tf_curve[:last], marker=".", label=f"teacher forced (mean {tf_acc:.2f})")
ax.plot(np.arange(1, last + 1), fr_curve[:last], marker=".", label=f"free running, greedy (mean {fr_acc:.2f})")
ax.set_xlabel("token position t in the reference")
ax.set_ylabel("exact-token accuracy")
ax.set_title("Exposure bias: the two agree at the start and part ways")
ax.legend()
plt.show()
mmcourse.record("teacher_forced_minus_free_running", round(tf_acc - fr_acc, 3), at_least=0.05)

# %% [markdown]
# Both curves start together: the first tokens are a template choice that neither way can
# know. Free running then falls behind: once the greedy caption has taken another template
# or synonym than the reference, every later token sits one or more positions away from
# the reference's. Some of this gap is the metric's (a different but correct caption is
# "wrong" here), which is one more reason captioning is scored with consensus metrics over
# several references and not with token accuracy; the compounding is what scheduled
# sampling and sequence-level training (self-critical training with CIDEr-D as the reward)
# were invented to reduce.
#
# ## 7. Visual question answering
#
# Two ways to answer "what colour is the square?":
#
# * **as classification** (分类): the decoder reads `[CLS] question [SEP]` with
#   cross-attention to the image, and a linear head on its last state picks one of the 20
#   answers (`Captioner.answer_logits`, `captioning.answer_loss`);
# * **as generation** (生成式回答): the captioner from section 4 reads the question as a
#   prefix and generates the answer (greedy), like a multimodal LLM does.
#
# The baselines: **question-only** (仅问题基线, the image memory set to zeros: what the
# question alone tells, e.g. "is there ...?" has two answers) and **image-only** (仅图像基线,
# the question replaced by an empty one: the most common answer for a given image). Each
# classifier is trained with `num_seeds` seeds; on the **held-out compositions** (组合泛化)
# the scenes contain shape-colour pairs (a purple circle, a yellow square, a cyan triangle,
# a red cross) that no training caption, question or image ever showed.

# %%
def vqa_rows(d, mem):
    qa = [q for qs in d["qa"] for q in qs]
    image = torch.tensor([i for i, qs in enumerate(d["qa"]) for _ in qs])
    enc = tokenizer([q["question"] for q in qa])
    return {"memory": mem[image], **enc, "answer": torch.tensor([ANSWERS.index(q["answer"]) for q in qa])}, qa


vqa_train, _ = vqa_rows(train, memory["train"])
vqa_test, qa_test = vqa_rows(test, memory["test"])
vqa_held, qa_held = vqa_rows(heldout, memory["heldout"])
empty_question = tokenizer([""] * 1)


def ablate(rows, what):
    rows = dict(rows)
    if what == "question-only":
        rows["memory"] = torch.zeros_like(rows["memory"])
    if what == "image-only":
        n = rows["input_ids"].shape[0]
        rows["input_ids"] = empty_question["input_ids"].expand(n, -1)
        rows["attention_mask"] = empty_question["attention_mask"].expand(n, -1)
    return rows


def train_vqa(what, seed_):
    torch.manual_seed(seed_)
    model = Captioner(config)
    model.encoder.requires_grad_(False)
    rows = ablate(vqa_train, what)
    g_, batches = torch.Generator().manual_seed(seed_), []
    while len(batches) < vqa_steps:
        order = torch.randperm(len(rows["answer"]), generator=g_)
        batches += [{k: v[order[i : i + 96]] for k, v in rows.items()} for i in range(0, len(order) - 95, 96)]
    fit(model, batches[:vqa_steps], loss_fn=answer_loss,
        config=TrainConfig(max_steps=vqa_steps, lr=3e-3, warmup_steps=10, eval_every=vqa_steps, progress=False,
                           device=str(device)))
    return model


def vqa_predict(model, rows):
    with torch.no_grad():
        logits = model.answer_logits(None, rows["input_ids"].to(device), rows["attention_mask"].to(device),
                                     memory=rows["memory"].to(device))
    return [ANSWERS[i] for i in logits.argmax(-1).tolist()]


t0 = time.perf_counter()
vqa_scores = []
for what in ("full", "question-only", "image-only"):
    for s in range(num_seeds if what != "image-only" else 1):  # image-only: a side baseline, one seed
        model = train_vqa(what, seed + s)
        for split, rows, qa in (("test", vqa_test, qa_test), ("heldout", vqa_held, qa_held)):
            acc = cm.vqa_accuracy(vqa_predict(model, ablate(rows, what)), [q["answer"] for q in qa], [q["type"] for q in qa])
            vqa_scores.append({"model": f"classifier, {what}", "seed": s, "split": split, **acc})
vqa_seconds = time.perf_counter() - t0
# the generative answers of the captioner, and of the blind decoder (its question-only twin)
for name, model, mems in (("generative", captioner, memory), ("generative, question-only", blind, None)):
    for split, d, qa in (("test", test, qa_test), ("heldout", heldout, qa_held)):
        image = torch.tensor([i for i, qs in enumerate(d["qa"]) for _ in qs])
        mem = memory[split][image] if mems is not None else torch.zeros_like(memory[split][image])
        cfg = GenerationConfig(max_new_tokens=3, eos_token_id=eos, pad_token_id=config.pad_token_id)
        answers = generate_text(model, tokenizer, memory=mem.to(device), prompts=[q["question"] for q in qa], config=cfg)[0]
        answers = [a.split()[0] if a.split() else "" for a in answers]
        acc = cm.vqa_accuracy(answers, [q["answer"] for q in qa], [q["type"] for q in qa])
        vqa_scores.append({"model": name, "seed": 0, "split": split, **acc})
vqa_table = pd.DataFrame(vqa_scores)
summary = vqa_table.groupby(["split", "model"], sort=False)[["overall", *QUESTION_TYPES]].agg(["mean", "std"])
print(f"{2 * num_seeds + 1} classifiers trained and scored in {vqa_seconds:.1f} s; mean and std over seeds "
      "(the generative rows are one model each, std NaN)")
summary.round(3)

# %%
means = vqa_table.groupby(["split", "model"], sort=False)[["overall", *QUESTION_TYPES]].mean()
fig, axes = plt.subplots(1, 2, figsize=(13, 3.4), sharey=True)
for ax, split in zip(axes, ("test", "heldout"), strict=True):
    m = means.loc[split]
    x = np.arange(len(m.columns))
    for i, (name, row) in enumerate(m.iterrows()):
        ax.bar(x + (i - 2) * 0.16, row.values, width=0.16, label=name)
    ax.set_xticks(x, m.columns)
    ax.set_title(f"VQA accuracy, {split} scenes")
axes[0].set_ylabel("accuracy")
axes[1].legend(fontsize=7, loc="upper right")
plt.show()

per_seed = vqa_table[vqa_table.split == "test"].groupby("model")["overall"]
held_per_seed = vqa_table[vqa_table.split == "heldout"].groupby("model")["overall"]
vqa_acc, vqa_q = per_seed.mean()["classifier, full"], per_seed.mean()["classifier, question-only"]
worst_full, best_q = per_seed.min()["classifier, full"], per_seed.max()["classifier, question-only"]
print(f"classifier {vqa_acc:.3f} (worst seed {worst_full:.3f}) vs question-only {vqa_q:.3f} (best seed {best_q:.3f})")
gen_test = vqa_table[(vqa_table.split == "test") & (vqa_table.model == "generative")]["overall"].mean()
gen_held = vqa_table[(vqa_table.split == "heldout") & (vqa_table.model == "generative")]["overall"].mean()
print(f"generative minus classifier: test {gen_test - vqa_acc:+.3f}, held-out "
      f"{gen_held - held_per_seed.mean()['classifier, full']:+.3f}")
mmcourse.record("vqa_accuracy", round(vqa_acc, 3), at_least=vqa_q + 0.1)
mmcourse.record("vqa_accuracy_question_only", round(vqa_q, 3), at_most=worst_full - 0.05)
mmcourse.record("vqa_accuracy_heldout", round(held_per_seed.mean()["classifier, full"], 3),
                at_least=held_per_seed.mean()["classifier, question-only"] + 0.05)

# %% [markdown]
# Reading the VQA table (means and spreads over seeds are printed above, the key
# comparisons in the line just above):
#
# * the classifier beats the question-only model on every seed by a wide margin: the image
#   carries the answer. Question-only is not at chance either: it knows that "how many"
#   wants a number and "is there" wants yes or no, and the prior within each type;
# * the image-only model cannot know which question was asked; it does better than its
#   average only where the image alone suggests the answer (the count);
# * per type, "count", "colour" and "where" need one look-up and are learned; "exists"
#   needs a *conjunction* (this colour *and* this shape on the same object): check its
#   column against the question-only row and chance (0.5) - at the default sizes no model
#   gets far above it;
# * on held-out compositions the classifier loses accuracy, most of it on "shape" (asked
#   as "what shape is the purple object?" when the purple object is a circle, a pair it
#   never saw), but stays well above the question-only baseline;
# * the generative answers come from the captioner of section 4, trained on captions and
#   questions together: compare its rows with the classifier's (the difference is printed
#   below).
#
# ## 8. Where the decoder looks
#
# The cross-attention weights of the last decoder block (averaged over heads) for every
# word of a greedy caption, drawn over the 4 x 4 patches (panel "w" shows the weights of the
# state that *predicts* w). Some words look where you would expect - a colour word at the
# object it names - and others do not: the weights of one block are not an explanation of
# the model, since the earlier block and the residual stream carry image information too.

# %%
def cross_attention(model, mem, caption):
    seq = tokenizer([caption])
    with torch.no_grad():
        out = model.decode(seq["input_ids"].to(device), mem[None].to(device), seq["attention_mask"].to(device),
                           need_weights=True)
    weights = out.cross_attentions[-1][0].mean(0).cpu()  # (T, N) averaged over heads
    return tokenizer.split(caption), weights[:-1]  # row t: the state that predicts token t+1


def draw_attention(fig, scene, caption, title):
    """The test image, then where the last block looks while writing each word of `caption`."""
    words, weights = cross_attention(captioner, memory["test"][scene], caption)
    plotting.draw_word_attention(fig, image=test["images"][scene], words=words, weights=weights,
                                 grid=captioner.encoder.config.grid_size, title=title)


def attention_figure(scene, caption, title):
    fig = plt.figure(figsize=(1.5 * (min(len(caption.split()), 12) + 2), 2.2))
    draw_attention(fig, scene, caption, title)
    plt.show()


for scene in (0, 1):
    attention_figure(scene, greedy[scene], f"test scene {scene}: where the last block looks while writing each word of \"{greedy[scene]}\"")

# %% [markdown]
# > **Common pitfall: a "DALL·E 2" loaded as a causal LM, and `sklearn.metrics.bleu_score`.**
# > 003 §5.2 fine-tunes a captioner with
# > `AutoModelForCausalLM.from_pretrained('runwayml/dall-e-2')` and scores it with
# > `from sklearn.metrics import bleu_score`. Neither works: DALL·E 2 *generates images
# > from text* (a diffusion model), there is no such causal-LM checkpoint, and a causal LM
# > alone has no way to read an image anyway; scikit-learn has no BLEU. Its evaluation also
# > takes the arg-max of teacher-forced logits (`outputs.logits.argmax(dim=2)`), which is
# > not a generated caption at all (section 6 shows how different the two are). Use instead:
# >
# > ```python
# > # an image encoder + a text decoder with cross-attention (this chapter's Captioner),
# > # or a real captioning checkpoint, e.g. transformers' VisionEncoderDecoderModel / BLIP:
# > # model = VisionEncoderDecoderModel.from_pretrained("nlpconnect/vit-gpt2-image-captioning")
# > captions = generate_text(model, tokenizer, images=images, config=GenerationConfig(num_beams=4))[0]
# > import sacrebleu                                    # BLEU: sacrebleu, several references
# > bleu = sacrebleu.corpus_bleu(captions, reference_streams).score
# > score, per_image = cider_d(captions, references)   # CIDEr-D (= pycocoevalcap's Cider)
# > ```
#
# ## 9. Explorer: decode a scene your way
#
# Pick a test scene, the decoding method, the beam width, the length penalty and the
# temperature: the caption, its attribute accuracy, its CIDEr-D (with the test set's
# document frequencies) and the cross-attention of its words. The printed overview compares
# the methods on one scene; without a Jupyter front end the figure is drawn at the controls'
# starting values.

# %%
def decode_scene(scene=0, method="beam", width=4, alpha=1.0, temperature=1.0, sample_seed=0):
    kw = {"num_beams": width, "length_penalty": alpha, "early_stopping": True} if method == "beam" else {}
    if method == "sampling":
        kw = {"do_sample": True, "temperature": temperature}
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=config.pad_token_id, **kw)
    texts_, out = generate_text(captioner, tokenizer, memory=memory["test"][scene : scene + 1].to(device), config=cfg,
                                generator=torch.Generator(device=device).manual_seed(sample_seed))
    caption = cm.normalize(texts_[0])
    hyps = [cm.normalize(h) for h in greedy]
    hyps[scene] = caption  # the test set's document frequencies, this scene's caption
    cider = cm.cider_d(hyps, test_refs)[1][scene]
    attrs = cm.attribute_accuracy([caption], [test["objects"][scene]])["overall"]
    return caption, cider, attrs


settings = [("greedy", 1, 1.0, 1.0), ("beam", 4, 0.0, 1.0), ("beam", 4, 2.0, 1.0), ("sampling", 1, 1.0, 0.7),
            ("sampling", 1, 1.0, 1.5)]
scene = 2
lines = []
for method, k, a, tau in settings:
    caption, cider, attrs = decode_scene(scene, method, k, a, tau)
    label = {"greedy": "greedy", "beam": f"beam K={k}, alpha={a:g}", "sampling": f"sampling tau={tau:g}"}[method]
    lines.append(f"{label:<22} CIDEr-D {cider:5.2f}  attributes {attrs:.2f}  {caption}")
print(f"test scene {scene}:\n" + "\n".join(lines))

# %%
import ipywidgets as widgets

from mmcourse.widgets import explore


def draw_decoding(fig, scene, method, width, alpha, temperature, sample_seed):
    caption, cider, attrs = decode_scene(scene, method, width, alpha, temperature, sample_seed)
    draw_attention(fig, scene, caption, f"test scene {scene}, {method}: {caption}\n"
                   f"CIDEr-D {cider:.2f}, attribute accuracy {attrs:.2f}")


explore(
    draw_decoding,
    figsize=(13, 2.4),
    scene=widgets.IntSlider(value=scene, min=0, max=num_test - 1, description="scene"),
    method=widgets.Dropdown(options=["greedy", "beam", "sampling"], value="beam", description="method"),
    width=widgets.IntSlider(value=4, min=1, max=16, description="beam K"),
    alpha=widgets.FloatSlider(value=2.0, min=0.0, max=3.0, step=0.25, description="alpha"),
    temperature=widgets.FloatLogSlider(value=1.0, base=10, min=-1, max=0.5, step=0.05, description="tau"),
    sample_seed=widgets.IntSlider(value=0, min=0, max=20, description="seed"),
);

# %% [markdown]
# ## 10. Summary
#
# * A captioner is an image encoder plus a text decoder whose blocks add cross-attention to
#   the image; it is trained with the sum of next-token cross-entropies,
#   $-\sum_t \log \mathbb{P}(y_t \mid y_{<t}, x)$, under teacher forcing (003 §4.2's loss with
#   the condition the right way round).
# * Generation needs a decoding strategy; beam search finds likelier captions, and the
#   length penalty decides what "likelier" means for captions of different lengths.
#   Sampling trades accuracy for variety. A KV cache makes each step cost one token.
# * BLEU and CIDEr-D measure overlap with several references (CIDEr-D discounts the
#   boilerplate every caption shares); neither checks the facts. An attribute accuracy
#   does, and it is what separates the captioner from the blind decoder most clearly.
# * VQA as a classifier over answers beats a question-only model by a wide margin, and
#   keeps an edge on unseen shape-colour compositions.

# %%
print(f"notebook ran in {time.perf_counter() - started:.0f} s wall, {time.process_time() - cpu_started:.0f} s CPU "
      "(user + sys of this kernel)")

# %% [markdown]
# ## Exercises
#
# **Exercise 1: one step of beam search.** Given the next-token log-probabilities of the
# $K$ beams of one prompt, `log_probs` of shape (K, V), and their accumulated scores
# `beam_scores` (K,), return the $K$ best extensions as three tensors of shape (K,):
# their scores, the beam each extends and the token it adds, best first.

# %%
from mmcourse.exercises.ch10 import q1, q2, q3


def beam_step_one_prompt(log_probs, beam_scores):
    raise NotImplementedError  # your code here


q1.check(beam_step_one_prompt)

# %% [markdown]
# **Exercise 2: clipped n-gram precision.** For one hypothesis (a list of words) and
# several references (lists of words), return `(matches, total)`: the hypothesis's n-grams
# that also occur in a reference, each counted at most as often as in the reference where it
# occurs most, and the number of n-grams of the hypothesis. (`sacrebleu` sums these over a
# corpus.)

# %%
def clipped_ngram_counts(hypothesis, references, n):
    raise NotImplementedError  # your code here


q2.check(clipped_ngram_counts)

# %% [markdown]
# **Exercise 3: the caption loss.** Given logits (B, T, V), the fed sequences `input_ids`
# (B, T) and a `loss_mask` (B, T) marking the target tokens, return the **sum** of the
# next-token cross-entropies over the targets (position $t$ predicts token $t+1$).

# %%
def my_caption_loss(logits, input_ids, loss_mask):
    raise NotImplementedError  # your code here


q3.check(my_caption_loss)
