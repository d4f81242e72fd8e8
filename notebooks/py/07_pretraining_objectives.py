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
# # 07 · Pretraining objectives: MLM, image-text matching, hard negatives
#
# **Pretraining** (预训练) means training on a large, general objective before adapting
# the model to a task. The source lists the multimodal objectives without formulas:
# 004 §3.1 names **masked language modelling** (掩码语言建模, MLM), **image-text
# matching** (图像-文本匹配, ITM) and multimodal contrastive learning; 002 §3.1 adds
# distillation and "self-supervised tasks such as modality masking". This chapter writes
# each one down, implements it, trains it on the Shapes world and measures what it buys:
#
# 1. **image-text contrastive** learning (图文对比学习, ITC), the CLIP loss of chapter 06:
#    two towers that only meet in a dot product;
# 2. **MLM**: hide words of the caption and predict them - with a *fusion encoder* whose
#    text tokens cross-attend to the image, the model must look at the picture to fill
#    "a large [MASK] circle";
# 3. **ITM**: a yes/no classifier on (image, caption), trained with **hard negatives**
#    (难负样本) mined from the ITC similarity, as ALBEF and BLIP do.
#
# Then we compare what the objectives learned: masked-word accuracy with and without the
# image, ITM on fine-grained mismatches, retrieval (ITC alone vs ITM re-ranking) and
# linear probes of the frozen image features. Everything is small enough for a CPU, so the
# numbers are honest but modest; the cells say what they measure.

# %% tags=["parameters"]
# Parameters: papermill and `mmcourse run 07 -p name value` can change these.
seed = 0  # random seed: data order, masks, negatives and initialisation
device = "auto"  # "auto" picks cuda, then mps, then cpu
num_train = 3000  # single-object training scenes (full: 20000 on a GPU)
num_test = 500  # test scenes (full: 2000)
clip_steps = 400  # ITC (CLIP) steps, batch 64 (full: 3000)
mlm_steps = 200  # MLM steps per model, batch 64 (full: 2000)
itm_steps = 250  # MLM + ITM steps per model, batch 32, so 96 ITM pairs a step (full: 2000)
fusion_layers = 2  # cross-attention layers of the fusion encoder (ALBEF: 6)
mask_probability = 0.4  # MLM: chance that a word is chosen (BERT: 0.15; 0.4 suits 7-word captions)
itm_temperature = 3.0  # hard negatives ~ softmax(ITC logits / T) (ALBEF: 1)
rerank_k = 8  # ITM re-scores the ITC top-k of our 200 captions, so k is at most 200 (ALBEF: 128-256 of far larger galleries)
num_seeds = 3  # seeds of the cheap ITM heads of section 6b, each trained with both kinds of negatives (full: 5)
head_steps = 400  # steps of each cheap ITM head, 64 pairs a step (full: 1000)
cpu_threads = 2  # torch threads on a CPU: both cores of the 2-core budget (0: torch's default; the numbers depend on the count)

# %%
import copy

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

import mmcourse
from mmcourse import utils
from mmcourse.plotting import setup_notebook

utils.positive_int(num_train=num_train, num_test=num_test, clip_steps=clip_steps, mlm_steps=mlm_steps)
utils.positive_int(itm_steps=itm_steps, fusion_layers=fusion_layers, rerank_k=rerank_k)
utils.positive_int(num_seeds=num_seeds, head_steps=head_steps)
utils.positive_float(itm_temperature=itm_temperature)
utils.fraction(mask_probability=mask_probability)
utils.non_negative_int(seed=seed, cpu_threads=cpu_threads)
if num_train < 200:
    raise ValueError(f"num_train must be >= 200 (batches of 64 and probes), got {num_train}")
if rerank_k > 200:  # the gallery: 20 seen shape-colour pairs x 2 sizes x 5 positions
    raise ValueError(f"rerank_k must be <= 200, the number of distinct captions, got {rerank_k}")
mmcourse.seed_everything(seed)
device = mmcourse.get_device(device)
if device.type == "cpu" and cpu_threads:
    torch.set_num_threads(cpu_threads)  # a fixed count: the numbers depend on it (the order of float sums)
setup_notebook()
print("computing on", device, f"({torch.get_num_threads()} thread(s))" if device.type == "cpu" else "")

# %% [markdown]
# ## 1. Data: one object, one canonical caption
#
# We use single-object Shapes scenes and their *canonical* captions,
# `"a {size} {colour} {shape} {preposition} the {position}"`: every caption then has
# exactly seven words, and each content word is a fact about the picture. That makes the
# lesson measurable - word 3 is always the colour - and it makes the world small: 20
# shape-colour pairs × 2 sizes × 5 positions = 200 distinct captions (the held-out
# compositions of chapter 00 are not used here). Identical captions are frequent, which
# matters for ITM below.

# %%
from mmcourse.clip import WordTokenizer
from mmcourse.data.shapes import COLOURS, POSITIONS, SHAPES, SIZES, TRAIN_PAIRS, ShapesConfig, canonical_caption, shapes_tensors

world = ShapesConfig(max_objects=1, seed=seed)
train = shapes_tensors(num_train, split="train", config=world)
test = shapes_tensors(num_test, split="test", config=world)
tokenizer = WordTokenizer.from_texts(train["canonical_caption"])
text = {"train": tokenizer(train["canonical_caption"]), "test": tokenizer(test["canonical_caption"])}
objects = {"train": [o[0] for o in train["objects"]], "test": [o[0] for o in test["objects"]]}
SLOTS = {"size": 2, "colour": 3, "shape": 4, "position": 7}  # token index of each content word
assert text["train"]["input_ids"].shape[1] == 9 and (text["train"]["attention_mask"] == 1).all()
print(f"{num_train} training scenes, {len(set(train['canonical_caption']))} distinct captions, "
      f"vocabulary of {len(tokenizer)} ids:", " ".join(tokenizer.id_to_token))
print("tokens of", repr(train["canonical_caption"][0]), "->", text["train"]["input_ids"][0].tolist())

# %% [markdown]
# ## 2. The idea: three heads on two towers and a fusion encoder
#
# ALBEF's recipe, which BLIP and many later models keep: an image tower and a text tower
# are aligned by ITC; a fusion encoder - BERT layers with an extra **cross-attention**
# (chapter 02) from the text tokens to the image's patch tokens - then carries two heads:
# the MLM head on every token and the ITM head on the fused [CLS]. ITC also picks the
# hard negatives that ITM trains on.

# %%
fig, ax = plt.subplots(figsize=(9, 3.4))
ax.set_axis_off()
boxes = {
    "image tower\n(ViT)": (0.05, 0.62), "text tower\n(BERT layers)": (0.05, 0.12),
    "fusion encoder\nself-attn + cross-attn\nto image tokens": (0.42, 0.32),
    "ITC: contrastive loss\non [CLS] embeddings": (0.42, 0.82), "MLM head\n(every token)": (0.78, 0.55),
    "ITM head\n(fused [CLS])": (0.78, 0.12),
}
for label, (x, y) in boxes.items():
    ax.text(x, y, label, ha="left", va="center", fontsize=9,
            bbox=dict(boxstyle="round", fc="#eef3fb" if "head" not in label else "#fbefe6", ec="#555"))
arrows = [((0.2, 0.62), (0.42, 0.38)), ((0.22, 0.12), (0.42, 0.28)), ((0.16, 0.7), (0.42, 0.82)),
          ((0.2, 0.2), (0.42, 0.78)), ((0.66, 0.36), (0.78, 0.55)), ((0.66, 0.3), (0.78, 0.14)),
          ((0.56, 0.76), (0.56, 0.45))]
for (x0, y0), (x1, y1) in arrows:
    ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops=dict(arrowstyle="->", color="#555"))
ax.text(0.575, 0.6, "hard negatives", fontsize=8, color="#a33")
ax.set_title("ALBEF-style pretraining: ITC aligns the towers, MLM and ITM train the fusion encoder")
plt.show()

# %% [markdown]
# The figure is ALBEF's design: there the text tower's layers feed the fusion encoder
# (**fusion encoder**, 融合编码器) and everything is trained jointly. In this chapter, to
# stay fast on a CPU, the ITC model is trained first and then frozen; the fusion encoder
# has its own text layers and reads the frozen image tower's tokens.

# %% [markdown]
# ## 3. ITC, recapped from chapter 06
#
# For a batch of $B$ pairs with unit-norm embeddings $u_i$ (image) and $v_j$ (text) and
# the learned inverse temperature $s = 1/\tau$, the similarity is $s_{ij} = s\,u_i^\top v_j$
# and
#
# $$\mathcal{L}_\text{ITC} = \frac{1}{2B}\sum_{i=1}^{B}\Big[-\log\frac{e^{s_{ii}}}{\sum_{j=1}^{B} e^{s_{ij}}}
#   - \log\frac{e^{s_{ii}}}{\sum_{j=1}^{B} e^{s_{ji}}}\Big].$$
#
# > **Common pitfall: the InfoNCE denominator without the positive.** 004 §4.2.1 writes
# > the sum over $y' \in \mathcal{Y}$ and calls $\mathcal{Y}$ "the set of negative
# > images". CLIP's loss, and every loss in this course, sums over all $B$ candidates,
# > the positive included: each row is a $B$-way classification whose correct answer is
# > the diagonal, so the loss is a cross-entropy, never below 0, with chance at $\ln B$.
# > With the positive left out the ratio is no longer a probability and the loss can go
# > below 0. It does not run away: with unit-norm embeddings and the clamped scale
# > ($s \le 100$), every term $-s_{ii} + \log\sum_{j \ne i} e^{s_{ij}}$ is at least
# > $-2s + \ln(B-1)$. It is a *different* loss, and a published one: Decoupled
# > Contrastive Learning (DCL; Yeh et al. 2022) removes the positive from the denominator
# > on purpose, to decouple the positive's gradient from the negatives'. Know which of the
# > two you implement; their values are not comparable (a DCL loss below 0 is no bug, a
# > CLIP loss below 0 is).
#
# We train the tiny CLIP of chapter 06 (`mmcourse.clip`, through `fit` as there) and keep it frozen for the rest
# of the chapter: its image tower's tokens feed the fusion encoder, and its similarities
# mine the hard negatives.

# %%
from mmcourse.clip import PairBatches, TinyClip, TinyClipConfig, clip_recipe, encode_images, encode_texts
from mmcourse.contrastive import PairObjective
from mmcourse.train import fit

torch.manual_seed(seed)
clip = TinyClip(TinyClipConfig(vocab_size=len(tokenizer)))
clip_run = fit(clip, PairBatches(train["images"], text["train"], batch_size=64, seed=seed), loss_fn=PairObjective(),
               config=clip_recipe(clip_steps, device=str(device), progress=True))
clip.cpu()
scale = float(clip.logit_scale().detach())
with torch.no_grad():  # cache everything the frozen CLIP gives: no tower runs again below
    image_tokens = {name: clip.image_encoder(d["images"]).last_hidden_state for name, d in (("train", train), ("test", test))}
u = {"train": encode_images(clip, train["images"]), "test": encode_images(clip, test["images"])}
v_train = encode_texts(clip, text["train"])
print(f"ITC: {clip_steps} steps in {clip_run.seconds:.1f} s, final loss {clip_run.history[-1]['loss']:.3f}, "
      f"learned 1/tau = {scale:.1f}; image tokens per picture: {tuple(image_tokens['train'].shape[1:])}")

# %% [markdown]
# How good is ITC alone? Image → caption retrieval over all 200 possible captions: for each
# test image, is the most similar caption exactly its own?

# %%
all_captions = [canonical_caption([dict(shape=s, colour=c, size=z, position=p)])
                for (s, c) in TRAIN_PAIRS for z in SIZES for p in POSITIONS]
candidates = tokenizer(all_captions)
v_all = encode_texts(clip, candidates)  # (200, E)
itc_sim = u["test"] @ v_all.T  # (N_test, 200) cosine similarities
truth = torch.tensor([all_captions.index(c) for c in test["canonical_caption"]])
itc_r1 = (itc_sim.argmax(1) == truth).float().mean().item()
itc_rk = (itc_sim.topk(rerank_k, dim=1).indices == truth[:, None]).any(1).float().mean().item()
print(f"ITC image->caption over {len(all_captions)} captions: R@1 = {itc_r1:.3f}, R@{rerank_k} = {itc_rk:.3f} "
      f"(chance R@1 = {1 / len(all_captions):.3f})")
mmcourse.record("itc_image_to_caption_R1", round(itc_r1, 3), at_least=0.6)

# %% [markdown]
# ## 4. Masked language modelling
#
# BERT's recipe (Devlin et al. 2019). Choose a random set $M$ of positions, each
# non-special token with probability $p = 0.15$. Corrupt the caption: a chosen token
# becomes [MASK] with probability 0.8, a random word with 0.1, and stays itself with 0.1
# (so that the model cannot assume that every visible word is correct). Predict the
# original words at the chosen positions only:
#
# $$\mathcal{L}_\text{MLM} = -\frac{1}{|M|}\sum_{i \in M} \log p_\theta\big(w_i \mid \tilde w, I\big),$$
#
# where $\tilde w$ is the corrupted caption and $I$ the image (absent for text-only BERT).
# The labels are $w_i$ on $M$ and $-100$ elsewhere, PyTorch's `ignore_index`.
#
# The masking, step by step, with the same random draws as `transformers`'
# `DataCollatorForLanguageModeling`:

# %%
# NBVAL_CHECK_OUTPUT
from transformers import BertTokenizer, DataCollatorForLanguageModeling

from mmcourse.pretraining import mask_tokens, mlm_loss

p = 0.15
ids = text["train"]["input_ids"][:64]
special_ids = [tokenizer.token_to_id[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")]
g = torch.Generator().manual_seed(seed)
is_special = torch.isin(ids, torch.tensor(special_ids))
chosen = torch.bernoulli(torch.full(ids.shape, p).masked_fill(is_special, 0.0), generator=g).bool()  # the set M
labels = ids.masked_fill(~chosen, -100)  # predict only the chosen positions
corrupted = ids.clone()
to_mask = torch.bernoulli(torch.full(ids.shape, 0.8), generator=g).bool() & chosen  # 80 %: [MASK]
corrupted[to_mask] = tokenizer.mask_token_id
to_random = torch.bernoulli(torch.full(ids.shape, 0.5), generator=g).bool() & chosen & ~to_mask  # half the rest: 10 %
corrupted[to_random] = torch.randint(len(tokenizer), ids.shape, generator=g)[to_random]  # the last 10 %: unchanged

ours = mask_tokens(ids, mask_token_id=4, vocab_size=len(tokenizer), special_ids=special_ids,
                   probability=p, generator=torch.Generator().manual_seed(seed))
hf_tokenizer = BertTokenizer(vocab=dict(tokenizer.token_to_id))  # the same ids, built offline
theirs = DataCollatorForLanguageModeling(hf_tokenizer, mlm_probability=p, seed=seed)([{"input_ids": r} for r in ids])
assert torch.equal(corrupted, ours[0]) and torch.equal(labels, ours[1])
assert torch.equal(ours[0], theirs["input_ids"]) and torch.equal(ours[1], theirs["labels"])
for i in range(3):
    print(f"{tokenizer.decode(ids[i]):45s} -> {tokenizer.decode(corrupted[i], skip_special_tokens=False)}")
print("step by step == mmcourse.pretraining.mask_tokens == transformers' collator: True")

# %% [markdown]
# The loss averages over the masked positions only; `mlm_loss` equals
# `F.cross_entropy(..., ignore_index=-100)` (and, in `tests/test_pretraining.py`,
# `BertForMaskedLM`'s loss with the same weights, in value and gradient). On random
# logits the loss is *above* $\ln V$, the loss of a uniform guess: with unit-variance
# logits $z$, $\mathbb{E}\log\sum_k e^{z_k} \approx \ln V + \tfrac12$ (since
# $\mathbb{E}e^{z} = e^{1/2}$) while the true word's logit averages 0, so confident random
# guesses cost about half a nat more than no guess.

# %%
# NBVAL_CHECK_OUTPUT
logits = torch.randn(*ids.shape, len(tokenizer), generator=torch.Generator().manual_seed(seed))  # unit-variance logits
by_hand = -(logits.log_softmax(-1)[chosen].gather(1, ids[chosen][:, None])).mean()
torch.testing.assert_close(by_hand, mlm_loss(logits, labels))
torch.testing.assert_close(by_hand, F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100))
V = len(tokenizer)
print(f"|M| = {int(chosen.sum())} masked tokens of {int((~is_special).sum())} words; loss on random logits "
      f"{by_hand.item():.2f} vs ln V = {np.log(V):.2f} (uniform prediction) and ln V + 1/2 = {np.log(V) + 0.5:.2f}")

# %% [markdown]
# > **Common pitfall: masking [CLS], [SEP] or padding, and a loss over every position.**
# > Special tokens carry no content; masking them wastes the budget, and masking
# > padding teaches the model to predict [PAD] from [PAD]. With labels equal to the
# > inputs everywhere (a common slip when building labels by hand), the loss is dominated
# > by copying the visible words, which is trivial, and the few masked ones barely count.
# > Set the labels to -100 outside $M$ - `mask_tokens` does, and never chooses a special
# > token.
#
# ### MLM with and without the image
#
# The MLM head is BERT's: a transform (Linear, GELU, LayerNorm) and a decoder whose
# weight *is* the word-embedding table (**weight tying**, 权重绑定). We train two fusion
# encoders of the same size on the same captions: one cross-attends to the frozen ITC
# image tokens, the other has no image at all (its fusion layers are plain BERT layers).
#
# BERT's 15 % is a poor fit for our captions: with seven words, $0.85^7 = 32\,\%$ of the
# captions would get no mask at all, and the shape word would be a target in only 15 % of
# the steps it appears. Wettig et al. (2022), "Should You Mask 15% in Masked Language
# Modeling?", find 40 % at least as good as 15 % for BERT-large pretraining; we use
# `mask_probability` = 0.4 (the demonstration above kept BERT's 0.15).

# %%
from mmcourse.pretraining import ImageTextConfig, ImageTextEncoder, PretrainConfig, mask_positions, predict_masked, pretrain

model_config = ImageTextConfig(vocab_size=len(tokenizer), image_dim=clip.config.vision_dim, fusion_layers=fusion_layers)
mlm_models, mlm_seconds = {}, {}
for name, use_image in (("with image", True), ("text only", False)):
    torch.manual_seed(seed)
    model = ImageTextEncoder(ImageTextConfig(**{**model_config.__dict__, "use_image": use_image}))
    history = pretrain(model, image_tokens=image_tokens["train"] if use_image else None, device=device,
                       input_ids=text["train"]["input_ids"], attention_mask=text["train"]["attention_mask"],
                       config=PretrainConfig(objectives=("mlm",), steps=mlm_steps, batch_size=64, seed=seed,
                                             mask_probability=mask_probability))
    mlm_models[name], mlm_seconds[name] = model.cpu(), history.seconds
    print(f"MLM {name}: {mlm_steps} steps in {history.seconds:.1f} s, last-20 loss {np.mean(history.loss['mlm'][-20:]):.3f}")

# %% [markdown]
# Now mask one content word of every test caption - "a large [MASK] circle on the left" -
# and ask each model for it.

# %%
def slot_accuracy(model, use_image):
    row = {}
    for slot, position in SLOTS.items():
        masked, slot_labels = mask_positions(text["test"]["input_ids"], torch.full((num_test,), position), mask_token_id=4)
        pred = predict_masked(model, image_tokens["test"] if use_image else None, masked, text["test"]["attention_mask"])
        row[slot] = (pred[:, position] == slot_labels[:, position]).float().mean().item()
    return row

values = {"size": SIZES, "colour": COLOURS, "shape": SHAPES, "position": POSITIONS}
mlm_table = pd.DataFrame({name: slot_accuracy(m, name == "with image") for name, m in mlm_models.items()})
mlm_table["chance (1 / #values)"] = [1 / len(values[s]) for s in mlm_table.index]


def text_only_best_guess(slot):
    """Test accuracy of the best guess of a slot's word from the other words (training-caption counts)."""
    def context(caption):
        words = caption.split()
        return " ".join(words[: SLOTS[slot] - 1] + ["_"] + words[SLOTS[slot]:])
    word = lambda caption: caption.split()[SLOTS[slot] - 1]  # noqa: E731
    counts = pd.crosstab(pd.Series([context(c) for c in train["canonical_caption"]]),
                         pd.Series([word(c) for c in train["canonical_caption"]]))
    best = counts.idxmax(axis=1)
    return np.mean([best.get(context(c)) == word(c) for c in test["canonical_caption"]])


mlm_table["text-only best guess"] = [text_only_best_guess(s) for s in mlm_table.index]
print(mlm_table.round(3).to_string())
text_gap = (mlm_table["text only"] - mlm_table["text-only best guess"]).abs()
image_gain = mlm_table["with image"] - mlm_table["text only"]
print(f"text only vs the best guess from the other words: at most {text_gap.max():.3f} apart (slot {text_gap.idxmax()}); "
      f"the image model's smallest lead over text only: {image_gain.min():.3f} (slot {image_gain.idxmin()})")
mmcourse.record("mlm_colour_accuracy_with_image", round(mlm_table.loc["colour", "with image"], 3), at_least=0.8)
mmcourse.record("mlm_colour_accuracy_text_only", round(mlm_table.loc["colour", "text only"], 3), at_most=0.4)
mmcourse.record("mlm_content_words_with_image", round(mlm_table["with image"].mean(), 3), at_least=0.7)
mmcourse.record("mlm_text_only_max_gap_to_best_guess", round(text_gap.max(), 3), at_most=0.08)
mmcourse.record("mlm_image_lead_over_text_only_min_slot", round(image_gain.min(), 3), at_least=0.2)

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.4), gridspec_kw={"width_ratios": [1.2, 1]}, layout="constrained")
mlm_table[["with image", "text only"]].plot.bar(ax=axes[0], rot=0, color=["#3a7", "#aaa"])
axes[0].plot(np.arange(4), mlm_table["chance (1 / #values)"], "k_", markersize=30, label="chance")
axes[0].set(ylim=(0, 1.3), ylabel="accuracy of the masked word", title="MLM: fill one content word of a test caption")
axes[0].legend(loc="upper center", fontsize=8, ncol=3)
shown = [0, 1, 2, 3]
masked, _ = mask_positions(text["test"]["input_ids"][shown], torch.full((4,), SLOTS["colour"]), mask_token_id=4)
guess = {name: predict_masked(m, image_tokens["test"][shown] if name == "with image" else None, masked,
                              text["test"]["attention_mask"][shown]) for name, m in mlm_models.items()}
axes[1].set_axis_off()
inner = axes[1].inset_axes([0, 0, 1, 1])
inner.imshow(torch.cat([test["images"][i] for i in shown], dim=2).permute(1, 2, 0))
inner.set_xticks([16 + 32 * k for k in range(4)],
                 [f"{tokenizer.id_to_token[guess['with image'][k, 3]]}\n"
                  f"(text only: {tokenizer.id_to_token[guess['text only'][k, 3]]})" for k in range(4)], fontsize=8)
inner.set_yticks([])
inner.set_title("the colour word masked in each caption: the model's fill", fontsize=9)
plt.show()

# %% [markdown]
# The text-only model can only learn what the other words allow, so its fair baseline is
# the *text-only best guess* column, not 1/#values: the most frequent word for the other
# words in the training captions, scored on the test captions. It is a baseline, not a
# ceiling - the text-only model is scored on the same finite test set and can land a few
# points above it, as it does here on some slots:
# after "a large ... circle" only the five colours paired with circles are possible, so
# colour is capped near 1/5; the shape given the colour is a 3-or-4-way guess; and the
# position leaks from the preposition ("in the" is always "center", "at the" is "top" or
# "bottom"). The text-only model sits within a few points of that best guess on every slot
# (above it on some, below on others; the largest gap is printed), far below the image
# model. Looking at the
# picture through cross-attention, the same architecture fills the size, colour and
# position almost perfectly and the shape far less reliably (the table): shape is the
# attribute this fusion encoder is slowest to learn in `mlm_steps` steps (ITC's own
# retrieval, below, gets it right far more often from the same image tokens). MLM on
# image-caption pairs is therefore a **grounding** (视觉落地) objective: the language model
# is forced to read the image.

# %% [markdown]
# ### Explore: the masking rate
#
# The models were trained at `mask_probability`; how do they do when more or fewer words
# are hidden? Each word of 300 test captions is masked with probability $p$ (all of them as
# [MASK]; the same draws for both models), and each model fills them in. The accuracy curve
# is precomputed once for nine rates (one forward pass each); the slider picks a rate and shows
# one caption masked at that rate with the image model's fill. Compare how far each curve
# falls as more words go: the text-only model's context goes with them, the picture stays.

# %%
import ipywidgets as widgets

from mmcourse.plotting import draw_masking_curve
from mmcourse.widgets import explore

mask_rates = [round(0.1 * k, 1) for k in range(1, 10)]
probe_n = min(300, num_test)
probe_ids, probe_attention = text["test"]["input_ids"][:probe_n], text["test"]["attention_mask"][:probe_n]
probe_words = ~torch.isin(probe_ids, torch.tensor(special_ids))  # (n, L) maskable positions
mask_gen = torch.Generator().manual_seed(seed)
masks = {p: (torch.rand(probe_ids.shape, generator=mask_gen) < p) & probe_words for p in mask_rates}
fills, mask_accuracy = {}, {name: [] for name in mlm_models}
for p, chosen in masks.items():
    masked_ids, _ = mask_positions(probe_ids, chosen, mask_token_id=4)
    for name, m in mlm_models.items():
        fill = predict_masked(m, image_tokens["test"][:probe_n] if name == "with image" else None, masked_ids,
                              probe_attention)
        mask_accuracy[name].append((fill[chosen] == probe_ids[chosen]).float().mean().item())
        if name == "with image":
            fills[p] = (masked_ids, fill)


def show_caption(ids_row, attention_row):
    return " ".join(tokenizer.id_to_token[int(i)] for i, a in zip(ids_row, attention_row, strict=True)
                    if a and int(i) not in special_ids[:4])


def draw_masking(fig, rate, caption):
    masked_ids, fill = fills[rate]
    chosen = masks[rate][caption]
    shown = torch.where(chosen, fill[caption], probe_ids[caption])
    example = [("true", show_caption(probe_ids[caption], probe_attention[caption])),
               ("masked", show_caption(masked_ids[caption], probe_attention[caption])),
               ("image model fills", show_caption(shown, probe_attention[caption]))]
    draw_masking_curve(fig, rates=mask_rates, accuracies=mask_accuracy, rate=rate, trained_at=mask_probability,
                       example=example)


explore(
    draw_masking,
    figsize=(11, 3.4),
    rate=widgets.SelectionSlider(options=mask_rates, value=0.5, description="mask rate p"),
    caption=widgets.IntSlider(value=0, min=0, max=probe_n - 1, description="test caption"),
);

# %% [markdown]
# ## 5. Image-text matching with hard negatives
#
# ITM asks a binary question about a pair: does caption $T$ describe image $I$? The fused
# [CLS] state $h_\text{cls}(I, T)$ goes through a linear head to two logits,
#
# $$p_\text{itm}(I, T) = \mathrm{softmax}(W h_\text{cls} + b),\qquad
#   \mathcal{L}_\text{ITM} = -\mathbb{E}_{(I, T, y)} \log p_\text{itm}(y \mid I, T).$$
#
# The positives are the batch's pairs. The negatives decide what the model learns.
# ALBEF draws, for every image $i$, one text $j$ of the batch with probability
#
# $$p(j \mid i) = \frac{e^{s_{ij}}}{\sum_{k \notin P(i)} e^{s_{ik}}},\quad j \notin P(i),$$
#
# from the ITC similarity $s_{ij}$ (ALBEF mines with the *online* model; ours is frozen):
# the captions ITC finds similar but wrong are the *hard*
# negatives; each text gets a hard negative image in the same way. $P(i)$ is the set of
# positives of $i$: the diagonal and - easy to forget - every other caption that is
# equally true for image $i$. Here that is every *identical* caption: in a batch of 64 of
# our 200 captions, duplicates are common (BLIP masks by image id for the same reason).
# Each batch gives $3B$ ITM pairs: $B$ positives, $B$ (image, hard text), $B$ (hard image, text).

# %%
from mmcourse.pretraining import sample_bank_negatives, sample_negatives

caption_ids = torch.tensor([all_captions.index(c) for c in train["canonical_caption"]])  # row in the bank
batch = torch.arange(64)
s = scale * u["train"][batch] @ v_train[batch].T  # (B, B) ITC logits
positive = caption_ids[batch][:, None] == caption_ids[batch][None, :]  # P(i): identical captions
weights = s.masked_fill(positive, float("-inf")).softmax(dim=1)  # p(j | i), by the formula
t4i, _ = sample_negatives(s, ids=caption_ids[batch], generator=torch.Generator().manual_seed(seed))
assert (caption_ids[batch][t4i] != caption_ids[batch]).all()  # never a positive, never a duplicate
assert torch.allclose(weights.sum(1), torch.ones(64)) and (weights[positive] == 0).all()
tempered = (s / itm_temperature).masked_fill(positive, float("-inf")).softmax(dim=1)
print(f"duplicate captions in this batch: {int(positive.sum() - 64)} ordered pairs; the most likely negative "
      f"of image 0 has p = {weights[0].max():.2f} at T = 1, p = {tempered[0].max():.2f} at T = {itm_temperature:g}")

# %% [markdown]
# Two problems with the draw as written, both visible in the print above. ITC has
# converged ($1/\tau$ is large), so the softmax is sharp: image 0 gets the same negative
# most of the time, every epoch, and it is the pair that even ITC can barely tell apart -
# for a small fusion encoder that is close to label noise. We **temper** the draw,
# $p(j \mid i) \propto e^{s_{ij}/T}$ with $T = $ `itm_temperature`, and draw each image's
# negative caption from a **caption bank** - all 200 captions, embedded once by ITC -
# instead of the $B - 1$ other captions of its batch ($B$ = 64 in the print above; the
# ITM runs below train on batches of 32): the test below re-ranks ITC's top-$k$ over all 200,
# so training should see negatives from the same pool (`sample_bank_negatives`; a bank of
# distinct captions has no false negative but the image's own). Which attributes do the
# negatives differ in?

# %%
def attributes_differing(a, b):
    return [k for k in ("size", "colour", "shape", "position") if a[k] != b[k]]

bank_objects = [dict(shape=sh, colour=c, size=z, position=p) for (sh, c) in TRAIN_PAIRS for z in SIZES for p in POSITIONS]
bank_sim = scale * u["train"] @ v_all.T  # (P, 200) ITC logits of every training image vs the bank
gen = torch.Generator().manual_seed(seed)
draws = {"hard, T = 1, batch": [], f"hard, T = {itm_temperature:g}, bank": [], "random, bank": []}
for start in range(0, num_train - 63, 64):
    batch = torch.arange(start, start + 64)
    s = scale * u["train"][batch] @ v_train[batch].T
    t4i, _ = sample_negatives(s, ids=caption_ids[batch], generator=gen)
    draws["hard, T = 1, batch"] += caption_ids[batch][t4i].tolist()
    for kind, hard in ((f"hard, T = {itm_temperature:g}, bank", True), ("random, bank", False)):
        draws[kind] += sample_bank_negatives(bank_sim[batch], caption_ids[batch], hard=hard, temperature=itm_temperature,
                                             generator=gen).tolist()
n_drawn = len(draws["random, bank"])
stats = {kind: [attributes_differing(bank_objects[j], objects["train"][i]) for i, j in enumerate(d)] for kind, d in draws.items()}
counts = pd.DataFrame({kind: pd.Series([len(d) for d in diffs]).value_counts(normalize=True).reindex([1, 2, 3, 4], fill_value=0)
                       for kind, diffs in stats.items()})
which = pd.DataFrame({kind: {a: np.mean([a in d for d in diffs]) for a in ("size", "colour", "shape", "position")}
                      for kind, diffs in stats.items()})
print("number of attributes in which the negative caption differs from the true one (fraction of negatives):")
print(counts.round(3).to_string())
print("fraction of negatives that differ in each attribute:")
print(which.round(3).to_string())
mmcourse.record("hard_negatives_one_attribute_off", round(float(counts.loc[1, f"hard, T = {itm_temperature:g}, bank"]), 3), at_least=0.2)

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3.2), layout="constrained")
colors = ["#c63", "#e9a", "#aaa"]
counts.plot.bar(ax=axes[0], rot=0, color=colors)
axes[0].set(xlabel="number of attributes that differ", ylabel="fraction of negatives", title="How far is the negative?")
axes[0].legend(fontsize=8)
which.plot.bar(ax=axes[1], rot=0, color=colors, legend=False)
axes[1].set(ylabel="fraction of negatives", title="Which attribute differs?")
plt.show()
shown = torch.arange(4)
example = {kind: sample_bank_negatives(bank_sim[shown], caption_ids[shown], hard=hard, temperature=itm_temperature,
                                       generator=torch.Generator().manual_seed(seed + 1))
           for kind, hard in (("hard negative", True), ("random negative", False))}
examples = pd.DataFrame({"true caption": [train["canonical_caption"][k] for k in range(4)],
                         **{kind: [all_captions[int(j)] for j in d] for kind, d in example.items()}})
print(examples.to_string())

# %% [markdown]
# Tempered or not, hard negatives are mostly one or two attributes away from the truth,
# and which attribute depends on what ITC confuses. Random negatives are usually wrong in
# two or three ways at once (the table prints how often in each attribute): a model can
# reject most of them by checking the colour, the shape or the position alone.
#
# > **Common pitfall: random negatives are too easy, and hard ones can be false.** With
# > random negatives the ITM loss falls quickly while the model may learn a shortcut.
# > Hard mining prefers exactly the captions that are as true as the positive -
# > duplicates, paraphrases, a second caption of the same image - so they must be
# > excluded, or the model is trained to call correct pairs wrong. `sample_negatives(...,
# > ids=...)` and `sample_bank_negatives(..., own)` do.
#
# ### Training ITM: random vs hard negatives
#
# Both models start from the image-conditioned MLM model above and train MLM and ITM
# *together* (the losses are summed, as in ALBEF; ITM alone on top of MLM weights
# forgets the grounding that MLM taught, see the diagnostic below) for the same number of
# steps on the same batches; only the negative captions differ. One more correction: each
# batch holds $B$ positives and $2B$ negatives, so a model that ignores the pair would
# learn $p(\text{match}) = 1/3$ and its loss would look fine. We weight the positives ×2
# (`positive_weight=2`), which makes the classes balanced: a pair-blind model then sits at
# $\ln 2$.

# %% [markdown]
# ### Explore: the hard-negative pool
#
# What the sampler hands to ITM depends on the temperature $T$ and on the pool it draws
# from: all 200 captions of the bank, or (as in a batch) a random subset of $K$ of them.
# The explorer computes the sampler's exact probabilities (`bank_negative_weights`, the
# weights `sample_bank_negatives` draws from, restricted to the pool) for every training
# image, from the frozen ITC similarities above; nothing is retrained. Left: the expected
# share of negatives that change 1, 2, 3 or 4 attributes; right: one image's likeliest
# negatives, with the number of attributes each changes.

# %%
from mmcourse.plotting import draw_hard_negatives

attribute_codes = {k: {v: i for i, v in enumerate(sorted({o[k] for o in bank_objects}))}
                   for k in ("size", "colour", "shape", "position")}
image_codes = torch.tensor([[attribute_codes[k][o[k]] for k in attribute_codes] for o in objects["train"]])  # (N, 4)
bank_codes = torch.tensor([[attribute_codes[k][o[k]] for k in attribute_codes] for o in bank_objects])  # (C, 4)
differing = (image_codes[:, None, :] != bank_codes[None, :, :]).sum(-1)  # (N, C)
assert (differing[torch.arange(num_train), caption_ids] == 0).all()  # an image's own caption changes nothing
pool_order = torch.rand(bank_sim.shape, generator=torch.Generator().manual_seed(seed)).argsort(1).argsort(1)


def draw_pool(fig, temperature, hard, pool_size, image):
    draw_hard_negatives(fig, similarity=bank_sim, own=caption_ids, differing=differing, temperature=temperature,
                        hard=hard, pool=pool_order < pool_size, example_captions=all_captions, example=image)


explore(
    draw_pool,
    figsize=(11, 3.6),
    temperature=widgets.FloatLogSlider(value=itm_temperature, base=10, min=-1, max=1.5, step=0.05, description="T"),
    hard=widgets.Checkbox(value=True, description="hard (off: uniform)"),
    pool_size=widgets.IntSlider(value=len(all_captions), min=8, max=len(all_captions), step=8, description="pool K"),
    image=widgets.IntSlider(value=0, min=0, max=num_train - 1, description="image"),
);

# %%
from mmcourse.pretraining import match_log_odds, match_probability

bank = (candidates["input_ids"], candidates["attention_mask"], v_all)
itm_models = {}
for kind in ("random", "hard"):
    model = copy.deepcopy(mlm_models["with image"])
    history = pretrain(model, image_tokens=image_tokens["train"], device=device,
                       input_ids=text["train"]["input_ids"], attention_mask=text["train"]["attention_mask"],
                       config=PretrainConfig(objectives=("mlm", "itm"), negatives=kind, temperature=itm_temperature,
                                             positive_weight=2.0, mask_probability=mask_probability,
                                             steps=itm_steps, batch_size=32, seed=seed),
                       similarity_embeds=(u["train"], v_train, scale), caption_ids=caption_ids, caption_bank=bank)
    itm_models[kind] = model.cpu()
    print(f"MLM + ITM with {kind} negatives: {itm_steps} steps in {history.seconds:.1f} s, last-20 ITM loss "
          f"{np.mean(history.loss['itm'][-20:]):.3f} (a pair-blind model: ln 2 = {np.log(2):.3f})")

# %% [markdown]
# The test: every test image with (a) its true caption, (b) the same caption with exactly
# one attribute changed - a fine-grained mismatch, always to a shape-colour pair seen in
# training so that no held-out composition sneaks in - and (c) the wrong caption that ITC
# ranks highest. We lead with the *pairwise* accuracy: how often the true caption scores
# higher than the wrong one, which is what re-ranking needs and is independent of any
# threshold. Next to it, the ROC-AUC of the ITM score over true vs wrong pairs, and the
# thresholded rates (accept the truth / reject the swap at log-odds 0, i.e. $p = 0.5$).

# %%
from sklearn.metrics import roc_auc_score

rng = np.random.default_rng(seed)
seen_pairs = set(TRAIN_PAIRS)
swapped = {}
for attribute in ("colour", "shape", "size", "position"):
    swapped[attribute] = []
    for o in objects["test"]:
        options = [x for x in values[attribute] if x != o[attribute]
                   and (({**o, attribute: x}["shape"], {**o, attribute: x}["colour"]) in seen_pairs)]
        swapped[attribute].append(canonical_caption([{**o, attribute: rng.choice(options)}]))
assert all(c in all_captions for captions in swapped.values() for c in captions)  # every swap is a training caption
itc_hardest = itc_sim.masked_fill(F.one_hot(truth, len(all_captions)).bool(), -9).argmax(1)
swapped["ITC's top wrong"] = [all_captions[int(i)] for i in itc_hardest]


def itm_score(model, captions, images=None):
    t = tokenizer(captions)
    return match_log_odds(model, image_tokens["test"] if images is None else images, t["input_ids"], t["attention_mask"])


rows = {}
scores_true = {kind: itm_score(model, test["canonical_caption"]) for kind, model in itm_models.items()}
for kind, model in itm_models.items():
    row = {("accept", "true caption"): (scores_true[kind] > 0).float().mean().item()}
    for name, captions in swapped.items():
        wrong = itm_score(model, captions)
        row[("pairwise", name)] = (scores_true[kind] > wrong).float().mean().item()
        row[("ROC-AUC", name)] = roc_auc_score(np.r_[np.ones(num_test), np.zeros(num_test)], np.r_[scores_true[kind], wrong])
        row[("reject", name)] = (wrong < 0).float().mean().item()
    rows[f"{kind} negatives"] = row
itm_table = pd.DataFrame(rows)
print(itm_table.round(3).to_string())

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.3), sharey=True, layout="constrained")
for ax, metric in zip(axes, ("pairwise", "ROC-AUC"), strict=True):
    itm_table.loc[metric].plot.bar(ax=ax, rot=0, color=["#aaa", "#c63"], legend=metric == "ROC-AUC")
    ax.axhline(0.5, color="k", lw=0.8, ls=":")
    ax.set(ylim=(0, 1.05), title={"pairwise": "true caption scores higher than the wrong one",
                                   "ROC-AUC": "ROC-AUC: true vs wrong pairs"}[metric], xlabel="the wrong caption")
axes[1].legend(fontsize=8, loc="lower right")
axes[0].set_ylabel("fraction of test images / AUC")
plt.show()
pairwise = itm_table.loc["pairwise"]
for attribute in pairwise.index:
    print(f"{attribute:>16}: pairwise {pairwise.loc[attribute, 'hard negatives']:.3f} (hard) vs "
          f"{pairwise.loc[attribute, 'random negatives']:.3f} (random)")
mmcourse.record("itm_pairwise_itc_top_wrong_random", round(pairwise.loc["ITC's top wrong", "random negatives"], 3), at_least=0.65)
mmcourse.record("itm_pairwise_itc_top_wrong_hard", round(pairwise.loc["ITC's top wrong", "hard negatives"], 3), at_least=0.55)
mmcourse.record("itm_pairwise_shape_random", round(pairwise.loc["shape", "random negatives"], 3), at_least=0.7)
mmcourse.record("itm_pairwise_shape_hard", round(pairwise.loc["shape", "hard negatives"], 3), at_least=0.55)
random_lead = pairwise["random negatives"] - pairwise["hard negatives"]
auc = itm_table.loc["ROC-AUC"]
auc_gap = (auc["random negatives"] - auc["hard negatives"])[["shape", "ITC's top wrong"]].abs().max()
print(f"random minus hard negatives, pairwise: smallest lead {random_lead.min():+.3f} ({random_lead.idxmin()}); "
      f"ROC-AUC on shape and ITC's top wrong: at most {auc_gap:.3f} apart")
# the claims of this section are about the default budget: with four times the ITM steps hard
# negatives win (section 6b quotes that run), so these two bounds apply at the default only
at_default = itm_steps <= 250
mmcourse.record("itm_pairwise_random_minus_hard_min", round(random_lead.min(), 3),
                at_least=-0.02 if at_default else None)  # hard never ahead by > 2 points
mmcourse.record("itm_auc_shape_top_wrong_random_vs_hard_max_gap", round(auc_gap, 3), at_most=0.1 if at_default else None)

# %% [markdown]
# Two diagnostics. Does the model score *pairs* or just *captions*? Shuffle the images:
# if the true caption still beats the swap as often, ITM has learned which captions are
# plausible, not whether they fit the picture. And did training ITM keep the grounding
# that MLM taught? The masked-word accuracy of each model after the ITM stage, next to
# the MLM model it started from (here MLM kept training alongside ITM; what ITM alone
# does is the open part of exercise 4, with no parameter and no checker: it means editing
# the ITM runs' `objectives`).

# %%
perm = torch.randperm(num_test, generator=torch.Generator().manual_seed(seed))
diagnostic = {}
for kind, model in itm_models.items():
    shuffled = image_tokens["test"][perm]
    row = {f"pairwise, shuffled images: {name}": (itm_score(model, test["canonical_caption"], shuffled)
                                                  > itm_score(model, captions, shuffled)).float().mean().item()
           for name, captions in swapped.items() if name in ("colour", "shape")}
    row.update({f"MLM {slot} after ITM": acc for slot, acc in slot_accuracy(model, True).items()})
    diagnostic[f"{kind} negatives"] = row
diagnostic = pd.DataFrame(diagnostic)
diagnostic["MLM model (start)"] = [np.nan, np.nan] + mlm_table["with image"].tolist()
print(diagnostic.round(3).to_string())
kinds = [f"{kind} negatives" for kind in itm_models]
shuffled_rows = diagnostic.loc[[f"pairwise, shuffled images: {a}" for a in ("colour", "shape")], kinds]
true_minus_shuffled = min(pairwise.loc[a, k] - diagnostic.loc[f"pairwise, shuffled images: {a}", k]
                          for a in ("colour", "shape") for k in kinds)
grounding_kept = min(diagnostic.loc[f"MLM {slot} after ITM", k] - diagnostic.loc[f"MLM {slot} after ITM", "MLM model (start)"]
                     for slot in SLOTS for k in kinds)
print(f"shuffled images: pairwise at most {(shuffled_rows - 0.5).abs().max().max():.3f} from 0.5, and at least "
      f"{true_minus_shuffled:.3f} below the same model on the true images; masked-word accuracy after ITM minus "
      f"the MLM model's, worst slot: {grounding_kept:+.3f}")
mmcourse.record("itm_shuffled_images_max_distance_from_half", round((shuffled_rows - 0.5).abs().max().max(), 3), at_most=0.1)
mmcourse.record("itm_true_minus_shuffled_images_min", round(true_minus_shuffled, 3), at_least=0.2)
mmcourse.record("mlm_after_itm_minus_start_worst_slot", round(grounding_kept, 3), at_least=-0.02)

# %% [markdown]
# What the tables say. On the pairwise metric the hard-negative model is nowhere clearly
# ahead: the random-negative one is as good or better on every kind of wrong caption, or
# behind by at most two points (the smallest lead is printed). Which of the two leads on
# shape and on ITC's top wrong caption is not stable: it changes from run to run, even
# with the number of CPU threads (the order of float sums), and so do the ROC-AUC rows on
# those two, within a few points of each other either way. One run of each model cannot
# settle the question; section 6b asks it over seeds. Tempering
# the draw, mining from the whole caption bank and balancing the classes did not turn hard
# negatives into a win at this budget (with four times the steps they win: section 6b
# quotes that run): the hard-negative model's ITM loss stays well above
# the random one's, i.e. it has not learned to separate its one-attribute-off negatives
# in `itm_steps` steps, while random negatives (mostly wrong in several attributes) are
# easy to learn yet teach checks that transfer to the single swaps. The diagnostics rule
# out two other explanations: with shuffled images both models fall to near 0.5, far
# below their scores on the true images, so they
# score the *pair*, not the caption's plausibility; and training MLM alongside ITM keeps
# the grounding - the masked-word accuracies after the ITM stage are as high as (for
# shape, higher than) the MLM model's they started from. The thresholded rows (accept,
# reject at $p = 0.5$) depend on where each model puts its threshold and are the least
# informative numbers in the table.
#
# ## 6. Retrieval: ITC alone vs ITM re-ranking
#
# ITM needs a forward pass of the fusion encoder for every (image, caption) pair, too
# expensive for a whole collection. ALBEF therefore retrieves the top-$k$ captions by ITC
# ($k_\text{test}$ = 128 on Flickr30K, 256 on COCO) and **re-ranks** (重排序) them by the ITM score;
# BLIP re-ranks by the ITM score *plus* the ITC similarity. We rank by the ITM
# **log-odds** $\ell_1 - \ell_0$ (the probability saturates at 1 when several candidates
# look right) and compare three scores on ITC's top-$k$: ITC alone, ITM alone (ALBEF), and
# the fused score $\ell_1 - \ell_0 + s\,\cos(u, v)$ (BLIP's, with ITC's own logit scale $s$).
#
# Before the numbers, the arithmetic of the setup: ITC's R@1 is high and its R@$k$ is the
# ceiling of any re-ranker, so re-ranking can gain at most R@$k$ − R@1 and lose at most
# R@1. And the image tower is frozen: the fusion encoder sees the same image tokens as
# ITC's head, so ITM can only win where it reads those tokens better than ITC does.

# %%
from mmcourse.pretraining import rerank

top = itc_sim.topk(rerank_k, dim=1).indices  # (N_test, k) the ITC shortlist, best first
flat = top.flatten()
shortlist_scores = {kind: match_log_odds(model, image_tokens["test"].repeat_interleave(rerank_k, 0),
                                         candidates["input_ids"][flat], candidates["attention_mask"][flat]).view(-1, rerank_k)
                    for kind, model in itm_models.items()}  # (N_test, k) log-odds, one pass covers every k <= rerank_k
choices = {"ITC alone": itc_sim.argmax(1)}
for kind, s in shortlist_scores.items():
    choices[f"ITM only ({kind} negatives)"] = rerank(itc_sim, s, k=rerank_k)
    choices[f"ITM + s * ITC ({kind} negatives)"] = rerank(itc_sim, s, k=rerank_k, itc_weight=scale)
retrieval = {name: (c == truth).float().mean().item() for name, c in choices.items()}
print(f"image->caption R@1 over {len(all_captions)} captions, re-ranking ITC's top-{rerank_k}:")
print(pd.Series(retrieval).round(3).to_string())
print(f"ceiling R@{rerank_k} of ITC = {itc_rk:.3f}: re-ranking can gain at most {itc_rk - itc_r1:.3f} and lose at most {itc_r1:.3f}")

itc_right = choices["ITC alone"] == truth
for name in ("ITM only (random negatives)", "ITM + s * ITC (random negatives)"):
    right = choices[name] == truth
    table = pd.crosstab(pd.Series(itc_right.numpy(), name="ITC right"), pd.Series(right.numpy(), name=f"{name} right"))
    print(f"\n{table.to_string()}")

by_k = pd.DataFrame({name: [(rerank(itc_sim, shortlist_scores[kind][:, :k], k=k, itc_weight=w) == truth).float().mean().item()
                            for k in range(1, rerank_k + 1)]
                     for kind in itm_models for name, w in ((f"ITM only ({kind})", 0.0), (f"ITM + s * ITC ({kind})", scale))},
                    index=pd.Index(range(1, rerank_k + 1), name="k"))
print("\nR@1 after re-ranking ITC's top-k, for each k (k = 1 is ITC alone):")
print(by_k.round(3).T.to_string())
fused_r1 = retrieval["ITM + s * ITC (random negatives)"]
mmcourse.record("rerank_fused_R1_random", round(fused_r1, 3), at_least=round(itc_r1 - 0.03, 3))
mmcourse.record("rerank_itm_only_R1_random", round(retrieval["ITM only (random negatives)"], 3), at_least=0.4)
itm_only_gain = max(retrieval[f"ITM only ({kind} negatives)"] for kind in itm_models) - itc_r1
fused_gain = [retrieval[f"ITM + s * ITC ({kind} negatives)"] - itc_r1 for kind in itm_models]
print(f"\nR@1 minus ITC alone: ITM only at best {itm_only_gain:+.3f}; fused {min(fused_gain):+.3f} .. {max(fused_gain):+.3f}")
mmcourse.record("rerank_itm_only_minus_itc_max", round(itm_only_gain, 3),
                at_most=0.0 if at_default else None)  # ITM alone re-ranks worse (at the default budget)
mmcourse.record("rerank_fused_minus_itc_min", round(min(fused_gain), 3), at_least=-0.02)  # a little below ITC...
mmcourse.record("rerank_fused_minus_itc_max", round(max(fused_gain), 3), at_most=0.0 if at_default else None)  # ...not above it

# %%
fig, ax = plt.subplots(figsize=(7, 3.2), layout="constrained")
for (name, col), style in zip(by_k.items(), ["--", "-", ":", "-."], strict=True):
    ax.plot(by_k.index, col, style, marker="o", label=name, color="#c63" if "hard" in name else "#555")
ax.axhline(itc_r1, color="#37a", lw=0.8, label="ITC alone")
ax.set(xlabel="k (ITC shortlist length)", ylabel="image->caption R@1", ylim=(0, 1.02),
       title="Re-ranking ITC's top-k: ITM alone vs the fused score")
ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
plt.show()

# %% [markdown]
# The printed R@1 rows and the 2×2 table tell one story. ITM alone (ALBEF's score) re-ranks
# *worse* than ITC's own order, and more so the longer the shortlist: ITC is right for most
# images, and each extra candidate is another chance for the weaker ITM to prefer a wrong
# caption (the table counts the images ITC got right that ITM-only lost, against the few
# it fixed). The fused score (BLIP's) lets ITM override ITC only where ITC's margin is
# small: it fixes a few of ITC's errors and breaks a few more of its hits (the second
# 2×2 table, for random negatives), and with either kind of negatives it ends a little
# below ITC alone, within two points of it (the printed rows). With a frozen image tower and a fusion encoder that reads
# shape less well than ITC's head does (section 4, the shape slot), there is little for
# ITM to add here; ALBEF and BLIP gain from re-ranking with a fusion encoder trained
# jointly with both towers on millions of pairs. Exercise 3 asks you to write the fused
# re-ranking.
#
# ## 6b. Over several seeds: which negatives teach ITM to say "no" to a near miss?
#
# One seed of one fusion encoder is an example, not an estimate, and the two runs above
# differ in *two* ways from what the question needs: ITC-mined negatives change whatever
# ITC confuses (mostly the shape, rarely the size; section 5's table), and the pairwise
# metric asks for a ranking, while ITM is a yes/no classifier. So we ask the question
# directly, over `num_seeds` seeds: does ITM trained on negatives that change **exactly one
# attribute** (`attribute_neighbours`, the pool `sample_bank_negatives(..., allowed=...)`
# draws from) tell a true caption from a one-attribute near miss better than ITM trained on
# random negatives (which change two or three attributes, section 5)?
#
# To afford several seeds we cache both frozen ITC towers - the image tokens and the text
# tower's token states of the 200 captions - and train only ALBEF's fusion step on top:
# a `CrossAttentionMatcher`, one cross-attention block and the ITM head, on balanced pairs
# (each image once with its caption and once with a drawn negative, `itm_pairs`), with
# `mmcourse.train.fit` and the loss below. A step costs a few small matrix products.
# Both kinds of negatives share the seed, the initialisation and the image order; only
# the pool of negative captions differs. We score the same near misses as section 5
# (one attribute changed; a **near miss**, 近似负样本) at the model's own threshold,
# $p = 0.5$: **accept** the true caption, **reject** the near miss, and their mean, the
# **balanced accuracy** (平衡准确率); the pairwise
# rate (true above near miss) and re-ranking R@1 come along.

# %%
from mmcourse.pretraining import CrossAttentionMatcher, attribute_neighbours, bank_negative_weights, itm_pairs
from mmcourse.train import ShuffledBatches, TrainConfig, fit

with torch.no_grad():  # the frozen ITC text tower's token states of the 200 captions: (200, 9, D_t)
    caption_states = clip.text_encoder(candidates["input_ids"], candidates["attention_mask"]).last_hidden_state
one_attribute = attribute_neighbours(bank_codes)  # (200, 200): True where two captions differ in one attribute
pools = {"random": bank_negative_weights(bank_sim, caption_ids, hard=False),
         "one attribute": bank_negative_weights(bank_sim, caption_ids, hard=False, allowed=one_attribute[caption_ids])}
print("negatives per training caption: random", int(pools["random"][0].sum()), "| one attribute",
      int(pools["one attribute"][0].sum()), f"(of {len(all_captions)} captions)")
cache = {"states": caption_states.to(device), "mask": candidates["attention_mask"].to(device),
         "tokens": image_tokens["train"].to(device)}


def head_loss(model, batch):
    images, captions, labels = batch  # (2B,) each: image rows, bank rows, 1 = the pair matches
    logits = model(cache["states"][captions], cache["tokens"][images], cache["mask"][captions])  # (2B, 2)
    return F.cross_entropy(logits.float(), labels)


@torch.no_grad()
def head_log_odds(model, tokens, caption_index):
    model.cpu().eval()
    logits = model(caption_states[caption_index], tokens, candidates["attention_mask"][caption_index])
    return logits[:, 1] - logits[:, 0]  # (N,)


near_miss = {a: torch.tensor([all_captions.index(c) for c in swapped[a]]) for a in ("colour", "shape", "size", "position")}
shortlist = itc_sim.topk(rerank_k, dim=1).indices.flatten()  # (N_test * k,) ITC's shortlists, best first
epochs = head_steps * 64 // (2 * num_train) + 1  # enough drawn pairs for head_steps batches of 64
rows = []
for run_seed in range(seed, seed + num_seeds):
    for kind, weights in pools.items():
        pairs = itm_pairs(weights, caption_ids, epochs=epochs, generator=torch.Generator().manual_seed(run_seed))
        torch.manual_seed(run_seed)
        head = CrossAttentionMatcher(dim=caption_states.shape[-1], image_dim=image_tokens["train"].shape[-1])
        fit(head, ShuffledBatches(*pairs, batch_size=64, num_batches=head_steps, seed=run_seed), loss_fn=head_loss,
            config=TrainConfig(max_steps=head_steps, lr=2e-3, warmup_steps=20, eval_every=head_steps, progress=False,
                               device=str(device)))
        true_score = head_log_odds(head, image_tokens["test"], truth)
        row = {"seed": run_seed, "negatives": kind, "accept true": (true_score > 0).float().mean().item()}
        for a, index in near_miss.items():
            wrong = head_log_odds(head, image_tokens["test"], index)
            row[f"reject {a}"] = (wrong < 0).float().mean().item()
            row[f"pairwise {a}"] = (true_score > wrong).float().mean().item()
        scores = head_log_odds(head, image_tokens["test"].repeat_interleave(rerank_k, 0), shortlist).view(-1, rerank_k)
        row["R@1 ITM only"] = (rerank(itc_sim, scores, k=rerank_k) == truth).float().mean().item()
        row["R@1 ITM + s * ITC"] = (rerank(itc_sim, scores, k=rerank_k, itc_weight=scale) == truth).float().mean().item()
        rows.append(row)
heads = pd.DataFrame(rows)
heads["reject near miss"] = heads[[f"reject {a}" for a in near_miss]].mean(axis=1)
heads["balanced accuracy"] = (heads["accept true"] + heads["reject near miss"]) / 2
heads["pairwise"] = heads[[f"pairwise {a}" for a in near_miss]].mean(axis=1)
shown_columns = ["accept true", *[f"reject {a}" for a in near_miss], "reject near miss", "balanced accuracy",
                 "pairwise", "R@1 ITM only", "R@1 ITM + s * ITC"]
print(f"{num_seeds} seeds x 2 kinds of negatives, {head_steps} steps each; ITC alone: R@1 = {itc_r1:.3f}")
heads.groupby("negatives")[shown_columns].agg(["mean", "std"]).T.unstack().round(3)

# %%
per_seed = heads.pivot(index="seed", columns="negatives")


def margin_floor(gains, at_least=0.01):
    """Two standard errors of the per-seed differences, and at least ``at_least``."""
    return max(at_least, 2 * gains.std() / np.sqrt(len(gains))) if len(gains) > 1 else at_least


gain = {m: per_seed[m]["one attribute"] - per_seed[m]["random"]
        for m in ("balanced accuracy", "reject near miss", "pairwise", "accept true")}
fused_minus_itc = per_seed["R@1 ITM + s * ITC"] - itc_r1  # (seeds, kinds)
for m, g in gain.items():
    print(f"one attribute minus random, {m:>17}: {g.mean():+.3f} (per seed: {', '.join(f'{x:+.3f}' for x in g)})")
print(f"fused re-ranking minus ITC alone, per seed and kind: {fused_minus_itc.min().min():+.3f} .. {fused_minus_itc.max().max():+.3f}")
fig, axes = plt.subplots(1, 3, figsize=(11, 3.2), layout="constrained")
for ax, m in zip(axes, ("balanced accuracy", "pairwise", "R@1 ITM + s * ITC"), strict=True):
    for x, kind in enumerate(pools):
        ax.plot(np.full(num_seeds, x), per_seed[m][kind], "o", color="#c63" if kind != "random" else "#888", alpha=0.7)
        ax.errorbar(x + 0.15, per_seed[m][kind].mean(), yerr=per_seed[m][kind].std() if num_seeds > 1 else 0, fmt="_k",
                    markersize=14, capsize=3)
    if m.startswith("R@1"):
        ax.axhline(itc_r1, color="#37a", lw=0.8, label="ITC alone")
        ax.legend(fontsize=8, loc="lower right")
    ax.set(xticks=[0, 1], xticklabels=list(pools), xlim=(-0.5, 1.6), title=m, xlabel="negatives")
axes[0].set_ylabel("test score (one dot per seed; mean ± std)")
plt.show()
# one-attribute negatives teach the yes/no decision on near misses: measured against random negatives, same seeds
mmcourse.record("heads_balanced_accuracy_one_attribute_minus_random", round(float(gain["balanced accuracy"].mean()), 3),
                at_least=round(margin_floor(gain["balanced accuracy"]), 3))
mmcourse.record("heads_reject_near_miss_one_attribute_minus_random", round(float(gain["reject near miss"].mean()), 3),
                at_least=round(margin_floor(gain["reject near miss"], 0.03), 3))
# ...but not the ranking: the pairwise rates stay level
pairwise_band = margin_floor(gain["pairwise"], 0.02)
mmcourse.record("heads_pairwise_one_attribute_minus_random", round(float(gain["pairwise"].mean()), 3),
                at_least=round(-pairwise_band, 3), at_most=round(pairwise_band, 3))
# re-ranking with a head on the frozen towers does not beat ITC alone at this size
mmcourse.record("heads_rerank_fused_minus_itc_max_mean", round(float(fused_minus_itc.mean().max()), 3),
                at_most=round(margin_floor(fused_minus_itc.max(axis=1), 0.005), 3))

# %% [markdown]
# Over every seed, the heads trained on one-attribute negatives reject more of the near
# misses - most clearly the shape and position changes - for a small loss in accepting
# the true captions, so their balanced accuracy is higher; the per-seed differences and
# the recorded margins, asserted against two standard errors of the seed-to-seed spread,
# are printed above. This is what hard negatives are for: a matcher trained on easy
# negatives learns that "some attribute is wrong" is rare and says *yes* to captions that
# are wrong in one detail. What they do **not** buy here is a better ranking: the pairwise
# rates of the two kinds are level. Random negatives already teach every single check
# (each one changes two or three attributes, and the model cannot know which), they just
# put the threshold where easy negatives sit.
#
# Re-ranking stays a null result at this size, and the reason is structural, not noise:
# ITC's single vector is trained end to end with the image tower, while every ITM here
# reads the same *frozen* tokens with a few hundred steps of training (ITC's R@1 is
# printed beside the re-ranked ones). The near misses the heads handle worst are the
# shape changes (the "reject shape" row), the attribute the fusion encoder of section 4
# also reads worst, and shape is where a re-ranker would have to beat ITC. The condition under which re-ranking pays off is
# an ITM that reads the image better than ITC does - in ALBEF and BLIP a deep fusion
# encoder trained jointly with both towers on millions of pairs; here, more training of
# the fusion encoder. Measured: one run of this chapter with `-p itm_steps 1000` (four
# times the ITM steps, 109 s on this 2-core CPU, this version of the code) turns both
# section-5 nulls around. Hard negatives then beat random ones on shape (pairwise 0.972
# against 0.934) and on ITC's top wrong caption (0.936 against 0.860; ROC-AUC 0.981
# against 0.880), and re-ranking with the hard-negative ITM pays: R@1 0.924 for ITM alone
# and 0.932 for the fused score, against 0.916 for ITC alone, while the random-negative
# ITM still loses to ITC (0.854, fused 0.898). The bounds recorded in sections 5 and 6
# describe the default budget and are lifted at larger ones. Exercise 4 asks you to
# reproduce that run and read its tables.
#
# ## 7. Linear probes: what do the frozen features encode?
#
# A **linear probe** (线性探测) fits only a logistic regression on frozen features: its
# test accuracy says what the representation makes *linearly readable* - a lower bound on
# what the representation holds, since a non-linear read-out can do better. We probe each
# attribute of the object from the raw pixels, a randomly initialised ViT's [CLS], the
# ITC-trained ViT's [CLS] and ITC's projected embedding; and, to measure MLM and ITM too,
# the fused [CLS] of the MLM model and of both ITM models, each fed a *content-free*
# caption, "[CLS] a [MASK] [MASK] [MASK] [MASK] the [MASK] [SEP]", so that everything the
# [CLS] knows about the object comes from the image through cross-attention. For
# reference, ITC zero-shot reads each attribute off the arg-max caption of the 200.

# %%
from mmcourse.encoders import ViTEncoder
from mmcourse.pretraining import linear_probe_accuracy

torch.manual_seed(seed)
random_tower = ViTEncoder(clip.config.vision_config()).eval()
n_probe = min(2000, num_train)
blank = tokenizer(["a"])["input_ids"][0]  # [CLS] a [SEP]
mask_id = tokenizer.mask_token_id
content_free = torch.tensor([blank[0], blank[1], mask_id, mask_id, mask_id, mask_id, tokenizer.token_to_id["the"], mask_id, blank[2]])


@torch.no_grad()
def fused_cls(model, tokens):
    ids = content_free.expand(tokens.shape[0], -1)
    return model.fused(tokens, ids, torch.ones_like(ids))[0][:, 0]  # (N, D)


with torch.no_grad():
    features = {
        "pixels": (train["images"][:n_probe].flatten(1), test["images"].flatten(1)),
        "random ViT [CLS]": (random_tower(train["images"][:n_probe]).pooled, random_tower(test["images"]).pooled),
        "ITC ViT [CLS]": (image_tokens["train"][:n_probe, 0], image_tokens["test"][:, 0]),
        "ITC embedding": (u["train"][:n_probe], u["test"]),
    }
    for name, model in (("MLM", mlm_models["with image"]), ("MLM+ITM random", itm_models["random"]), ("MLM+ITM hard", itm_models["hard"])):
        features[f"{name} fused [CLS]"] = (fused_cls(model, image_tokens["train"][:n_probe]), fused_cls(model, image_tokens["test"]))
probe_table = pd.DataFrame({
    attribute: {name: linear_probe_accuracy(tr, [o[attribute] for o in objects["train"][:n_probe]],
                                            te, [o[attribute] for o in objects["test"]])
                for name, (tr, te) in features.items()}
    for attribute in ("colour", "shape", "size", "position")
})
itc_choice = [bank_objects[int(j)] for j in itc_sim.argmax(1)]
probe_table.loc["ITC zero-shot (arg-max caption)"] = [np.mean([c[a] == o[a] for c, o in zip(itc_choice, objects["test"], strict=True)])
                                                      for a in probe_table.columns]
probe_table.loc["chance"] = [1 / len(values[a]) for a in probe_table.columns]
print(probe_table.round(3).to_string())
shape_probe = probe_table["shape"]
shown_rows = probe_table.drop(["chance", "ITC zero-shot (arg-max caption)"])  # the linear probes
fused_rows = [name for name in probe_table.index if "fused" in name]
# the baselines of this run: the random-init tower and the pixels
mmcourse.record("probe_shape_random_cls", round(shape_probe["random ViT [CLS]"], 3), at_least=shape_probe["chance"])
mmcourse.record("probe_shape_pixels", round(shape_probe["pixels"], 3))
# ITC training adds shape information over its own random initialisation (same architecture)
mmcourse.record("probe_shape_itc_cls", round(shape_probe["ITC ViT [CLS]"], 3),
                at_least=round(shape_probe["random ViT [CLS]"] + 0.05, 3))
# the fused [CLS] of the three fusion models: above the random tower, near the ITC tower's [CLS]
mmcourse.record("probe_shape_mlm_fused_cls", round(shape_probe["MLM fused [CLS]"], 3))
mmcourse.record("probe_shape_fused_min_minus_random_cls", round(shape_probe[fused_rows].min() - shape_probe["random ViT [CLS]"], 3),
                at_least=0.03)
mmcourse.record("probe_shape_itc_cls_minus_fused_max", round(shape_probe["ITC ViT [CLS]"] - shape_probe[fused_rows].max(), 3),
                at_least=-0.1 if at_default else None, at_most=0.1)  # longer ITM training lifts the fused [CLS] further
# no linear probe reaches ITC's zero-shot shape accuracy
mmcourse.record("zero_shot_shape_minus_best_probe", round(shape_probe["ITC zero-shot (arg-max caption)"] - shape_probe[shown_rows.index].max(), 3),
                at_least=0.03)

# %%
fig, ax = plt.subplots(figsize=(10, 3.4), layout="constrained")
shown_rows.T.plot.bar(ax=ax, rot=0, color=["#bbb", "#888", "#3a7", "#37a", "#a7c", "#c96", "#c63"], width=0.85)
ax.plot(np.arange(4), probe_table.loc["ITC zero-shot (arg-max caption)"], "k_", markersize=40, label="ITC zero-shot")
ax.set(ylim=(0, 1.05), ylabel="linear-probe test accuracy", title="What the frozen features make linearly readable")
ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
plt.show()

# %% [markdown]
# Colour, size and position are almost linearly readable from the pixels themselves in
# this world (1,024 pixels × 3 channels = 3,072 values per image), and even a random ViT
# keeps most of them (it loses some of the position): on colour and size a linear probe
# can hardly tell these representations apart. Shape is where the rows differ: the random
# tower loses much of it, ITC training puts much of it back into the same architecture
# (the ITC tower's shape probe is recorded against the random tower's, measured here),
# close to what the pixels give a linear probe (a little less in this run). The fused
# [CLS] of the three fusion models, which attends to all of the frozen image tokens and not
# only to their [CLS], is well above the random tower and near the ITC tower's [CLS]
# (within 0.1, recorded); in this run the MLM model's is above it, but one run of each
# cannot order representations that close. No probe reaches ITC's zero-shot shape accuracy:
# a linear probe gives a *lower bound* on what a representation holds. On a world this
# simple probes are a coarse instrument; on real images (ImageNet probes of CLIP, ALBEF,
# MAE) they separate objectives much more clearly.
#
# ## 8. Summary
#
# | objective | what it needs | what it taught here |
# |---|---|---|
# | ITC | two towers, a batch of pairs | a shared space that retrieves the exact caption for most test images; its top-8 always holds the right one |
# | MLM | a fusion encoder, masked captions | with the image: size, colour and position of the masked word read from the picture, shape less reliably; without: about the text-only best guess |
# | ITM | a fusion encoder, negatives | over every seed, negatives that change one attribute teach ITM to reject near misses (higher balanced accuracy than random negatives); the ranking of true vs near miss stays level, ITC-mined negatives at T = 3 do not beat random ones in one run, and at this budget re-ranking does not beat ITC: ITM alone re-ranks worse, fused with ITC it stays close to ITC; with four times the ITM steps, hard negatives win and re-ranking with them beats ITC (section 6b) |
#
# The source's list has a fourth family, generative pretraining (生成式预训练, 002 §3.1):
# predicting the caption word by word from the image. It is the objective of the decoders
# in chapters 10-11.
#
# The results of this run:

# %%
summary = pd.Series(mmcourse.recorded())
print(summary.to_string())

# %% [markdown]
# ## Exercises
#
# **Exercise 1.** Write the MLM loss: `logits` (B, N, V) and `labels` (B, N) with -100
# at unmasked positions; return the mean cross-entropy over the masked positions.

# %%
from mmcourse.exercises.ch07 import q1, q2, q3


def my_mlm_loss(logits, labels):
    raise NotImplementedError  # your code here


q1.check(my_mlm_loss)

# %% [markdown]
# **Exercise 2.** Write the hard-negative sampling weights: `similarity` (B, B), image
# rows and text columns, and `ids` (B,) (equal ids = identical captions). Return the
# (B, B) matrix whose row $i$ is $p(j \mid i)$: the softmax over the allowed texts, and
# exactly 0 on the diagonal and on every identical caption.

# %%
def my_negative_weights(similarity, ids):
    raise NotImplementedError  # your code here


q2.check(my_negative_weights)

# %% [markdown]
# **Exercise 3.** BLIP's fused re-ranking: given ITC scores `itc_scores` (Q, C), ITM
# scores `itm_scores` (Q, C) (pretend only the shortlist's are computed), `k` and a
# `weight`, return for each query the index of the candidate, among ITC's top `k`, with
# the highest `itm + weight * itc`.

# %%
def my_rerank(itc_scores, itm_scores, k, weight):
    raise NotImplementedError  # your code here


q3.check(my_rerank)

# %% [markdown]
# **Exercise 4 (open).** Compare the re-ranking scores and the mining temperature: run
# the chapter with `mmcourse run 07 -p itm_temperature 1` (ALBEF's sharp draw) and with
# the default T = 3, and compare, for the hard-negative model, the pairwise table and the
# R@1 of "ITM only" vs "ITM + s * ITC". Then give ITM more steps (`-p itm_steps 1000`):
# does the gap between hard and random negatives close, does ITM-only re-ranking stop
# losing to ITC, and does the fused score overtake ITC alone (section 6b's condition)?
# Section 6b's heads take `-p head_steps` and `-p num_seeds` the same way: with half the
# steps, do one-attribute negatives still win? They are the harder task, and a harder task
# needs more training before it pays. (To see the grounding diagnostic change, edit the ITM runs to train with
# `objectives=("itm",)` instead of `("mlm", "itm")`; no parameter does it.) This exercise
# is open: there is no checker, the chapter's tables are your instrument.
