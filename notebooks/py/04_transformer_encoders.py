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
# # 04 · Transformer encoders
#
# Chapter 02 built attention and chapter 03 gave it a sense of order. This chapter wraps
# attention into the unit every modern multimodal model is stacked from - the
# **transformer block** - and stacks it into three **towers** (塔), one per modality:
#
# * an **image tower**, the Vision Transformer (视觉Transformer, ViT), trained here on the
#   Shapes world;
# * a **text tower** that *is* BERT: the same parameters as `transformers.BertModel`, and,
#   loaded with the real all-MiniLM-L6-v2 weights, the same numbers;
# * an **audio tower** over log-mel spectrograms, trained on AV-Digits speech and tested
#   on voices it never heard.
#
# The source articles describe this as **joint modelling** (联合建模, 002 §2.3):
# "Transformer-based models can process input sequences of different modalities at the
# same time", and note that multimodal LLMs "usually adopt a Transformer-based
# architecture" (002 §4). 004 §4.1 lists the pieces of the multimodal Transformer:
# self-attention, cross-attention and the feed-forward network - but gives no formula
# for the last one. We write every piece down, implement it under its equation, and check
# it against PyTorch's and Hugging Face's own implementations.

# %% tags=["parameters"]
# Parameters: papermill and `mmcourse run 04 -p name value` can change these.
seed = 0  # random seed for every generator
device = "auto"  # "auto" picks cuda, then mps, then cpu
num_threads = 1  # torch CPU threads; these tiny models run fastest on one (0: torch's default)
train_images = 3000  # Shapes-world training scenes, one object each (full: 20000)
test_images = 500  # Shapes-world test scenes
patch_size = 8  # P: ViT patch side on the 32 x 32 scenes (full: 4, an 8 x 8 grid)
dim = 64  # D: token width of the image and audio towers (full: 192, as ViT-Tiny)
num_layers = 2  # blocks per image/audio tower (full: 6)
num_heads = 4  # H: attention heads per block
vit_steps = 300  # training steps of each ViT (full: 3000 on a GPU)
audio_steps = 200  # training steps of the audio tower (full: 2000 on a GPU)
audio_patch_frames = 5  # frames per audio token, 10 ms each (full: 1, one token per frame)
batch_size = 128  # images per training step
audio_batch_size = 64  # spoken clips per training step
lr = 3e-3  # peak AdamW learning rate (10 % linear warm-up, then cosine decay)
deep_layers = 6  # L of the deep stacks in the pre- vs post-norm experiment (full: 12)
deep_dim = 32  # their token width D (full: 192)
deep_steps = 150  # training steps of each deep stack (full: 2000)
deep_lr = 1e-2  # their peak learning rate: high, where the block order matters
deep_warmup = 50  # warm-up steps of the arm that has one
num_seeds = 3  # seeds of the deep-stack experiment

# %%
import dataclasses
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from matplotlib.patches import FancyBboxPatch
from torch import nn

import mmcourse
from mmcourse import utils
from mmcourse.plotting import image_grid, setup_notebook

utils.positive_int(train_images=train_images, test_images=test_images, patch_size=patch_size)
utils.positive_int(dim=dim, num_layers=num_layers, num_heads=num_heads)
utils.positive_int(vit_steps=vit_steps, audio_steps=audio_steps, audio_patch_frames=audio_patch_frames)
utils.positive_int(batch_size=batch_size, audio_batch_size=audio_batch_size)
utils.non_negative_int(num_threads=num_threads)
utils.positive_float(lr=lr)
if 32 % patch_size:
    raise ValueError(f"patch_size must divide the 32-pixel Shapes images, got {patch_size}")
if dim % 4 or dim % num_heads:
    raise ValueError(f"dim must be divisible by 4 (2-D sin-cos positions) and by num_heads={num_heads}, got {dim}")
mmcourse.seed_everything(seed)
device = mmcourse.get_device(device)
if num_threads:
    torch.set_num_threads(num_threads)
setup_notebook()
print("computing on", device, f"with {torch.get_num_threads()} CPU thread(s)")

# %% [markdown]
# ## 1. The block
#
# A transformer encoder is a stack of identical **blocks**. Each block has two
# **sublayers** - multi-head self-attention, which mixes information *between* tokens,
# and a **feed-forward network** (前馈神经网络, FFN), which transforms every token on its
# own - and wraps each one in two things:
#
# * a **residual connection** (残差连接): the sublayer's output is *added* to its input,
#   $x + f(x)$, so a block only has to learn a correction, and gradients have a direct
#   path through the sum;
# * a **layer normalisation** (层归一化, LayerNorm), which rescales every token vector to
#   zero mean and unit variance over its $D$ features, then applies a learned scale
#   $\gamma$ and shift $\beta$:
#
# $$\mathrm{LN}(x) = \gamma \odot \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta, \qquad
# \mu = \frac1D \sum_{d} x_d,\quad \sigma^2 = \frac1D \sum_d (x_d - \mu)^2 .$$
#
# The FFN is a two-layer MLP applied to each token, widening to $F$ (usually $4D$) and back:
#
# $$\mathrm{FFN}(x) = W_2\, \mathrm{GELU}(W_1 x + b_1) + b_2, \qquad W_1 \in \mathbb{R}^{F \times D},\; W_2 \in \mathbb{R}^{D \times F}.$$
#
# The original Transformer (2017) used ReLU, $\max(0, W_1 x + b_1)$; BERT and ViT use GELU,
# $\mathrm{GELU}(h) = h\,\Phi(h)$ with $\Phi$ the standard normal CDF. Where the LayerNorm
# sits gives the two kinds of block in use - **post-norm** (后置归一化) and **pre-norm**
# (前置归一化):
#
# $$\text{post-norm:}\quad X' = \mathrm{LN}_1\big(X + \mathrm{MHA}(X)\big),\qquad Y = \mathrm{LN}_2\big(X' + \mathrm{FFN}(X')\big)$$
# $$\text{pre-norm:}\quad X' = X + \mathrm{MHA}\big(\mathrm{LN}_1(X)\big),\qquad Y = X' + \mathrm{FFN}\big(\mathrm{LN}_2(X')\big)$$


# %%
FFN_TEXT = "FFN: $W_2\\,$GELU$(W_1 x + b_1) + b_2$"


def draw_block(ax, norm_first):
    """A transformer block as a flow chart, input at the bottom."""
    if norm_first:
        steps = ["LayerNorm 1", "multi-head self-attention", "+", "LayerNorm 2", FFN_TEXT, "+"]
        residuals = [(0.5, 3), (3.5, 6)]  # (where the skip branches off, the "+" it joins)
        title = "pre-norm (GPT-2, ViT)"
    else:
        steps = ["multi-head self-attention", "+", "LayerNorm 1", FFN_TEXT, "+", "LayerNorm 2"]
        residuals = [(0.5, 2), (3.5, 5)]
        title = "post-norm (2017 Transformer, BERT)"
    colours = {"multi-head self-attention": "#ed9a8a", FFN_TEXT: "#9bc1bc"}
    ax.text(0, 0, "input X  (N x D)", ha="center", va="center", fontsize=9)
    for y, name in enumerate(steps, start=1):
        ax.annotate("", xy=(0, y - 0.32), xytext=(0, y - 0.68), arrowprops=dict(arrowstyle="->"))
        if name == "+":
            ax.text(0, y, "+", ha="center", va="center", fontsize=11,
                    bbox=dict(boxstyle="circle,pad=0.15", fc="white", ec="k"))
        else:
            ax.add_patch(FancyBboxPatch((-1.1, y - 0.3), 2.2, 0.6, boxstyle="round,pad=0.03",
                                        fc=colours.get(name, "#f4d35e"), ec="k"))
            ax.text(0, y, name, ha="center", va="center", fontsize=8)
    for branch, join in residuals:  # the residual connection bypasses the sublayer
        ax.plot([0, -1.6, -1.6, -0.25], [branch, branch, join, join], color="C0", lw=1.5)
        ax.annotate("", xy=(-0.25, join), xytext=(-0.6, join), arrowprops=dict(arrowstyle="->", color="C0"))
    top = len(steps) + 1
    ax.annotate("", xy=(0, top - 0.3), xytext=(0, top - 0.68), arrowprops=dict(arrowstyle="->"))
    ax.text(0, top, "output Y  (N x D)", ha="center", va="center", fontsize=9)
    ax.text(-1.75, 1.75, "residual", color="C0", rotation=90, ha="right", va="center", fontsize=8)
    if norm_first:
        ax.text(0, top + 0.6, "(after the last block of the stack: one final LayerNorm)",
                ha="center", va="center", fontsize=8, style="italic")
    ax.set(xlim=(-2.1, 1.6), ylim=(-0.5, top + 0.9), title=title)
    ax.axis("off")


fig, axes = plt.subplots(1, 2, figsize=(9, 5))
for ax, norm_first in zip(axes, [False, True], strict=True):
    draw_block(ax, norm_first)
fig.suptitle("One transformer encoder block, two orders (blue: residual connections)")
plt.show()

# %% [markdown]
# ### Built by hand, then checked against PyTorch
#
# We take PyTorch's `nn.TransformerEncoderLayer` (post-norm by default) as the trusted
# implementation and rebuild its output from the equations, using its own weights:
# `linear1` holds $(W_1, b_1)$, `linear2` holds $(W_2, b_2)$, `norm1`/`norm2` hold
# $(\gamma, \beta)$ of the two LayerNorms, and its `self_attn` is the MHA of chapter 02.

# %%
D_demo, H_demo, F_demo, N_demo = 16, 4, 64, 6
torch_layer = nn.TransformerEncoderLayer(D_demo, H_demo, F_demo, dropout=0.1, activation="gelu",
                                         batch_first=True, norm_first=False).eval()
X = torch.randn(2, N_demo, D_demo)  # (B, N, D)


def layer_norm(x, gamma, beta, eps):
    mu = x.mean(dim=-1, keepdim=True)  # (B, N, 1): mean over the D features of each token
    var = x.var(dim=-1, unbiased=False, keepdim=True)  # (B, N, 1): sigma^2
    return gamma * (x - mu) / torch.sqrt(var + eps) + beta


def ffn(x, W1, b1, W2, b2):
    return F.gelu(x @ W1.T + b1) @ W2.T + b2  # (B, N, F) -> (B, N, D)


def mha(x):
    return torch_layer.self_attn(x, x, x, need_weights=False)[0]  # (B, N, D)


L1, L2, lin1, lin2 = torch_layer.norm1, torch_layer.norm2, torch_layer.linear1, torch_layer.linear2
with torch.no_grad():
    X1 = layer_norm(X + mha(X), L1.weight, L1.bias, L1.eps)  # X' = LN1(X + MHA(X))
    Y = layer_norm(X1 + ffn(X1, lin1.weight, lin1.bias, lin2.weight, lin2.bias), L2.weight, L2.bias, L2.eps)
    Y_torch = torch_layer(X)
print(f"post-norm block by hand vs nn.TransformerEncoderLayer: max |difference| = {(Y - Y_torch).abs().max():.1e}")
assert torch.allclose(Y, Y_torch, atol=1e-5)

# %% [markdown]
# The package's `TransformerBlock` is the same two lines per order (see
# `mmcourse/encoders.py`), built on chapter 02's `MultiHeadAttention`. Its sublayers carry
# PyTorch's names (`self_attn`, `norm1`, `norm2`, `ffn.linear1`, `ffn.linear2`), and
# `load_from_torch_layer` copies a torch layer in; the only real change is that PyTorch
# packs $W^Q, W^K, W^V$ into one `in_proj_weight` of shape $(3D, D)$, which is split into
# `q_proj`, `k_proj`, `v_proj`. We compare both orders, with padding in the batch, in value
# and in gradient (eval mode, so that dropout is off):

# %%
from mmcourse.encoders import TransformerBlock, load_from_torch_layer

padding = torch.zeros(2, N_demo, dtype=torch.bool)  # True = padding, as in PyTorch
padding[1, 4:] = True  # the second sequence has 4 real tokens
worst = 0.0
for norm_first in [False, True]:
    theirs = nn.TransformerEncoderLayer(D_demo, H_demo, F_demo, dropout=0.1, activation="gelu",
                                        batch_first=True, norm_first=norm_first).eval()
    ours = TransformerBlock(dim=D_demo, num_heads=H_demo, hidden_dim=F_demo, dropout=0.1,
                            norm_first=norm_first, layer_norm_eps=1e-5).eval()
    load_from_torch_layer(ours, theirs)
    x_ours, x_theirs = X.clone().requires_grad_(), X.clone().requires_grad_()
    y_ours, _ = ours(x_ours, key_padding_mask=padding)
    y_theirs = theirs(x_theirs, src_key_padding_mask=padding)
    y_ours.square().sum().backward()
    y_theirs.square().sum().backward()
    value = (y_ours - y_theirs).abs().max().item()
    grad_x = (x_ours.grad - x_theirs.grad).abs().max().item()
    grad_w = (ours.ffn.linear1.weight.grad - theirs.linear1.weight.grad).abs().max().item()
    worst = max(worst, value, grad_x, grad_w)
    name = "pre-norm " if norm_first else "post-norm"
    print(f"{name}: max |difference| output {value:.1e}, d/dX {grad_x:.1e}, d/dW1 {grad_w:.1e}")
mmcourse.record("block_max_abs_difference", worst, at_most=1e-5)

# %% [markdown]
# Same numbers, forward and backward: our block *is* PyTorch's encoder layer.
#
# **Why two orders?** In a post-norm stack every block output passes through a LayerNorm,
# so the path from the loss back to the first block crosses one LayerNorm per block. In a
# pre-norm stack the residual stream is a plain sum, $X_L = X_0 + \sum_{l} f_l(\mathrm{LN}(X_l))$,
# and the gradient reaches every block through the identity. That is why deep post-norm
# models need a learning-rate **warm-up** and pre-norm ones train more easily (Xiong et
# al., 2020); the price is one extra LayerNorm after the last block, since the sum itself
# is never normalised. BERT is post-norm; ViT, GPT-2 and most recent models are pre-norm.
# Section 3 trains deep stacks of both orders and shows when the order matters.
#
# ## 2. The text tower: BERT, rebuilt
#
# BERT's encoder is exactly this: chapter 01's embedding layer
# $h^0_i = \mathrm{LN}(E^{\text{word}}_{w_i} + E^{\text{pos}}_i + E^{\text{type}}_{t_i})$, then
# $L$ post-norm blocks (GELU, $\epsilon = 10^{-12}$), then a **pooler**
# $\tanh(W h^L_{\text{[CLS]}} + b)$ on the first token. `TextEncoder` builds it from
# `TransformerBlock`. Its config reads a `BertConfig`; here the one of the real
# all-MiniLM-L6-v2:

# %%
from transformers import BertModel

from mmcourse.encoders import (TextEncoder, TextEncoderConfig, bert_weight_map, count_parameters,
                               load_from_bert)
from mmcourse.pretrained import encode_sentences, load_text_encoder, mean_pooling

tokenizer, minilm = load_text_encoder()
text_config = TextEncoderConfig.from_bert_config(minilm.config)
print(text_config)
ours_text = TextEncoder(text_config).eval()
bert_random = BertModel(text_config.to_bert_config()).eval()  # a fresh BertModel, same config

# %% [markdown]
# Three models: ours, a `BertModel` built by `transformers` from the matching config, and
# the pretrained MiniLM. Their parameters, part by part:

# %%
# NBVAL_CHECK_OUTPUT
def parameters_by_part(named_parameters, parts):
    counts = dict.fromkeys(parts, 0)
    for name, p in named_parameters:
        part = next(part for part, prefix in parts.items() if name.startswith(prefix))
        counts[part] += p.numel()
    return counts


ours_parts = {"embeddings": "embeddings.", **{f"block {i}": f"blocks.{i}." for i in range(text_config.num_layers)},
              "pooler": "pooler"}
bert_parts = {"embeddings": "embeddings.", **{f"block {i}": f"encoder.layer.{i}." for i in range(text_config.num_layers)},
              "pooler": "pooler."}
columns = {
    "ours (TextEncoder)": parameters_by_part(ours_text.named_parameters(), ours_parts),
    "BertModel(config)": parameters_by_part(bert_random.named_parameters(), bert_parts),
    "all-MiniLM-L6-v2": parameters_by_part(minilm.named_parameters(), bert_parts),
}
print(f"{'part':12}" + "".join(f"{c:>21}" for c in columns))
for part in ours_parts:
    print(f"{part:12}" + "".join(f"{col[part]:>21,}" for col in columns.values()))
totals = [sum(col.values()) for col in columns.values()]
print(f"{'total':12}" + "".join(f"{t:>21,}" for t in totals))
assert len(set(totals)) == 1
mmcourse.record("text_tower_parameters", totals[0])

# %% [markdown]
# The structures correspond one to one. `bert_weight_map` lists, for each of our
# parameters, its BERT name; for the first block:

# %%
mapping = bert_weight_map(text_config)
for ours_name, bert_name in mapping.items():
    if ours_name.startswith("blocks.0.") and ours_name.endswith("weight"):
        shape = tuple(dict(ours_text.named_parameters())[ours_name].shape)
        print(f"{ours_name:34} <- {bert_name:50} {shape}")

# %% [markdown]
# Equal counts could still hide a different computation. So we load MiniLM's pretrained
# weights into our tower (`load_from_bert`) and run both on real captions, padded to one
# length:

# %%
load_from_bert(ours_text, minilm)
captions = ["a red circle", "a crimson disk on the left", "someone says the digit seven"]
batch = tokenizer(captions, padding=True, return_tensors="pt")
with torch.no_grad():
    out = ours_text(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    ref = minilm(**batch)
real = batch["attention_mask"].bool()  # compare the real tokens (padding outputs are unused)
text_diff = (out.last_hidden_state - ref.last_hidden_state)[real].abs().max().item()
pooled_diff = (out.pooled - ref.pooler_output).abs().max().item()
sentences = F.normalize(mean_pooling(out.last_hidden_state, batch["attention_mask"]), dim=-1)
sentence_diff = (sentences - encode_sentences(captions, tokenizer, minilm)).abs().max().item()
print(f"ids {tuple(batch['input_ids'].shape)}; max |difference| from MiniLM: tokens {text_diff:.1e}, "
      f"pooler {pooled_diff:.1e}, sentence embeddings {sentence_diff:.1e}")
mmcourse.record("text_tower_max_abs_difference", max(text_diff, pooled_diff, sentence_diff), at_most=1e-4)

# %% [markdown]
# Our text tower, with MiniLM's weights, computes MiniLM. (The tests also check the
# gradients against a small random `BertModel`.)
#
# > **Common pitfall: the mask that BERT's tokenizer returns is not a key-padding mask.**
# > `attention_mask` is 1 for real tokens and 0 for padding; `nn.MultiheadAttention`'s and
# > `nn.TransformerEncoderLayer`'s `key_padding_mask` is `True` for *padding*; a boolean
# > `attn_mask` of `F.scaled_dot_product_attention` is `True` for *may attend* (chapter 02).
# > Passing `attention_mask.bool()` as a key-padding mask silently hides every real token
# > and attends only to the padding. `TextEncoder` converts it once: `attention_mask == 0`.
#
# ## 3. The image tower: a Vision Transformer
#
# The ViT (Dosovitskiy et al., 2021) reads an image like a sentence. It cuts the image into
# $P \times P$ patches $x_p^1, \dots, x_p^{N}$ (chapter 01), embeds each with one matrix
# $E \in \mathbb{R}^{(P^2 C) \times D}$, puts a learned **[CLS] token** (分类标记)
# $x_{\text{cls}}$ in front, and adds positions (chapter 03's fixed 2-D sin-cos here):
#
# $$z_0 = [\,x_{\text{cls}};\; x_p^1 E;\; \dots;\; x_p^{N} E\,] + E_{\text{pos}}, \qquad
# z_l = \mathrm{Block}_l(z_{l-1}),\qquad y = \mathrm{LN}(z_L^{0}).$$
#
# $y$, the final state of the [CLS] token, is the image's vector; a linear head on it
# classifies. The task: name the object of a single-object Shapes-world scene, shape *and*
# colour (for instance "red circle").

# %%
from mmcourse.data import shapes
from mmcourse.encoders import ViTConfig, ViTEncoder
from mmcourse.modalities import patchify

shapes_config = shapes.ShapesConfig(max_objects=1, seed=seed)
train_set = shapes.shapes_tensors(train_images, split="train", config=shapes_config)
test_set = shapes.shapes_tensors(test_images, split="test", config=shapes_config)
num_classes = len(shapes.CLASS_NAMES)  # colour x shape; the held-out pairs never occur
seen = train_set["labels"].unique().numel()
print(f"train {tuple(train_set['images'].shape)}, test {tuple(test_set['images'].shape)}; "
      f"{seen} of {num_classes} colour-shape classes occur (chance {1 / seen:.0%})")
fig = image_grid(test_set["images"][:8], [shapes.CLASS_NAMES[i] for i in test_set["labels"][:8]],
                 ncols=8, suptitle="Test scenes and their labels")
plt.show()

# %%
vit_config = ViTConfig(image_size=32, patch_size=patch_size, dim=dim, num_layers=num_layers,
                       num_heads=num_heads, num_classes=num_classes, norm_first=True)
torch.manual_seed(seed)
vit = ViTEncoder(vit_config).to(device)
print(f"{vit_config.num_patches} patches of {patch_size}x{patch_size} + [CLS] = "
      f"{vit_config.num_patches + 1} tokens of width {dim}; {count_parameters(vit):,} parameters")

# %% [markdown]
# Before training, we build $z_0$ by hand from the equation - `patchify`, one matrix
# product with $E$, the [CLS] token in front, the position table added - and check
# that it runs through the blocks to the model's own output:

# %%
x = test_set["images"][:4].to(device)  # (B, C, S, S)
with torch.no_grad():
    E = rearrange(vit.patch_embed.weight, "d c p1 p2 -> (p1 p2 c) d")  # (P*P*C, D), patchify's layout
    patch_tokens = patchify(x, patch_size) @ E + vit.patch_embed.bias  # (B, N, D)
    z = torch.cat([vit.cls_token.expand(len(x), -1, -1), patch_tokens], dim=1) + vit.pos_embed  # z_0
    for block in vit.blocks:
        z, _ = block(z)  # z_l = Block_l(z_{l-1})
    y = vit.norm(z)[:, 0]  # y = LN(z_L^0)
    torch.testing.assert_close(y, vit(x).pooled, atol=1e-5, rtol=1e-5)
print("z_0 by hand -> blocks -> LN(z_L^0) equals ViTEncoder's pooled output", tuple(y.shape))

# %% [markdown]
# Training is the standard recipe: AdamW, cross-entropy, a short linear warm-up (10 % of the
# steps) and then a cosine decay, gradients clipped to norm 1, on shuffled batches of the
# training scenes. The course has
# one training loop, `mmcourse.train.fit`; a task hands it the model, the batches and a loss
# function `loss_fn(model, batch)`. Chapter 08 takes `fit` apart; here it is a tool.

# %%
from mmcourse.train import ShuffledBatches, TrainConfig, fit


def classification_loss(model, batch):
    """Cross-entropy of the tower's logits on one batch (inputs, labels)."""
    inputs, labels = batch
    return F.cross_entropy(model(inputs).logits, labels)


def train(model, inputs, labels, *, steps, batch, peak_lr=lr, warmup=None, run_seed=seed):
    """Train `model` with fit; return the loss of every step."""
    config = TrainConfig(max_steps=steps, lr=peak_lr, warmup_steps=steps // 10 if warmup is None else warmup,
                         weight_decay=0.05, eval_every=steps, restore_best=False,
                         progress=False, device=str(device))
    batches = ShuffledBatches(inputs, labels, batch_size=batch, num_batches=steps, seed=run_seed)
    return [row["loss"] for row in fit(model, batches, loss_fn=classification_loss, config=config).history]


@torch.no_grad()
def accuracy(model, inputs, labels):
    predictions = torch.cat([model(chunk.to(device)).logits.argmax(-1).cpu() for chunk in inputs.split(500)])
    return (predictions == labels).float().mean().item()


vit_losses = train(vit, train_set["images"], train_set["labels"], steps=vit_steps, batch=batch_size)
vit_acc = accuracy(vit, test_set["images"], test_set["labels"])
print(f"pre-norm ViT, {num_layers} blocks: test accuracy {vit_acc:.1%} (chance {1 / seen:.0%})")
mmcourse.record("vit_test_accuracy", vit_acc, at_least=0.75)

# %% [markdown]
# ### Pre-norm or post-norm: when does the order matter?
#
# With two blocks and a warm-up, both orders train about equally well. The difference
# section 1 predicts appears in a deeper stack at a high learning rate. The experiment
# below trains ViTs of `deep_layers` blocks three ways, over `num_seeds` seeds, each seed's arms
# on the same batches:
#
# * pre-norm, no warm-up;
# * post-norm, no warm-up;
# * post-norm with a warm-up of `deep_warmup` steps.

# %%
deep_config = dataclasses.replace(vit_config, dim=deep_dim, num_layers=deep_layers)
arms = {"pre-norm, no warm-up": (True, 0), "post-norm, no warm-up": (False, 0),
        f"post-norm, {deep_warmup} warm-up steps": (False, deep_warmup)}
deep_losses, rows = {}, []
started_deep = time.perf_counter()
for run_seed in range(seed, seed + num_seeds):
    for arm, (norm_first, warmup) in arms.items():
        torch.manual_seed(run_seed)
        model = ViTEncoder(dataclasses.replace(deep_config, norm_first=norm_first))
        deep_losses[arm, run_seed] = train(model, train_set["images"], train_set["labels"], steps=deep_steps,
                                           batch=batch_size // 2, peak_lr=deep_lr, warmup=warmup, run_seed=run_seed)
        rows.append(dict(arm=arm, seed=run_seed, accuracy=accuracy(model, test_set["images"], test_set["labels"]),
                         final_loss=float(np.mean(deep_losses[arm, run_seed][-20:]))))
deep = pd.DataFrame(rows)
print(f"{len(rows)} runs of {deep_layers} blocks, D = {deep_dim}, peak lr {deep_lr:g}, {deep_steps} steps "
      f"({time.perf_counter() - started_deep:.0f} s); chance accuracy {1 / seen:.3f}, chance loss ln {seen} = "
      f"{np.log(seen):.2f}")
deep.pivot(index="arm", columns="seed", values="accuracy").assign(
    mean=lambda t: t.mean(axis=1), std=lambda t: t.iloc[:, :num_seeds].std(axis=1)).loc[list(arms)].round(3)

# %%
by_seed = deep.pivot(index="seed", columns="arm", values="accuracy")
warm_arm = list(arms)[2]
pre_gain = by_seed["pre-norm, no warm-up"] - by_seed["post-norm, no warm-up"]  # per seed
warmup_gain = by_seed[warm_arm] - by_seed["post-norm, no warm-up"]


def margin_floor(gains):
    """Two standard errors of the per-seed differences, and at least 0.05."""
    return max(0.05, 2 * gains.std() / np.sqrt(len(gains))) if len(gains) > 1 else 0.05


print(f"pre-norm beats post-norm without warm-up by {pre_gain.mean():.3f} (per seed: "
      f"{', '.join(f'{g:+.3f}' for g in pre_gain)}); warm-up lifts post-norm by {warmup_gain.mean():.3f} "
      f"(per seed: {', '.join(f'{g:+.3f}' for g in warmup_gain)})")
mmcourse.record("deep_pre_norm_minus_post_norm_accuracy", float(pre_gain.mean()), at_least=margin_floor(pre_gain))
mmcourse.record("deep_post_norm_warmup_gain", float(warmup_gain.mean()), at_least=margin_floor(warmup_gain))
mmcourse.record("deep_post_norm_no_warmup_accuracy", float(by_seed["post-norm, no warm-up"].mean()),
                at_most=float(by_seed["pre-norm, no warm-up"].mean()))


def smooth(values, k=10):
    return np.convolve(values, np.ones(k) / k, mode="valid")


fig, axes = plt.subplots(1, 2, figsize=(11, 3.5), layout="constrained")
for k, arm in enumerate(arms):
    for j, run_seed in enumerate(range(seed, seed + num_seeds)):
        curve = smooth(deep_losses[arm, run_seed])
        axes[0].plot(np.arange(len(curve)) + 10, curve, color=f"C{k}", alpha=0.8, lw=1,
                     label=arm if j == 0 else None)
axes[0].axhline(np.log(seen), color="gray", ls=":", label=f"chance, ln {seen}")
axes[0].set(title=f"{deep_layers} blocks, peak lr {deep_lr:g}: training loss, {num_seeds} seeds",
            xlabel="training step", ylabel="cross-entropy (mean of 10 steps)")
axes[0].legend(fontsize=8)
summary = deep.groupby("arm", sort=False)["accuracy"]
axes[1].bar(range(len(arms)), summary.mean(), yerr=summary.std(), color=[f"C{k}" for k in range(len(arms))],
            capsize=4)
for k, arm in enumerate(arms):
    axes[1].plot([k] * num_seeds, deep[deep.arm == arm].accuracy, "k.", ms=6)
axes[1].axhline(1 / seen, color="gray", ls=":", label="chance")
axes[1].set_xticks(range(len(arms)), [a.replace(", ", "\n") for a in arms], fontsize=8)
axes[1].set(title="test accuracy (mean, std over seeds, dots: seeds)", ylabel="accuracy")
axes[1].legend(fontsize=8)
plt.show()

# %% [markdown]
# Without a warm-up, the post-norm stacks stay at chance in this run: their loss never
# leaves $\ln 20$, while the pre-norm stacks learn from the first steps. A warm-up rescues
# post-norm: on the same batches it then learns, seed after seed (the per-seed gains are
# printed above, and both margins are checked against two standard errors of the seeds). This is what Xiong et al.
# (2020) explain: at initialisation, the gradients of a post-norm stack's last layers are
# large, and a full learning rate from step 0 throws the model into a region it does not
# leave; the warm-up keeps the first updates small until they settle. (Gradient clipping,
# on in every arm, does not prevent it: it bounds the size of a step, not its direction.) Pre-norm removes the
# need, which is why ViT, GPT and most recent models use it. The effect is one of depth and
# learning rate: with the chapter's two blocks both orders train either way (lower
# `deep_layers` or `deep_lr` to see the gap close).
#
# ### What does the [CLS] token look at?
#
# The pooled vector is the [CLS] token's final state, so its **attention map** (注意力图)
# - the weights with which the [CLS] query reads each patch, averaged over the heads -
# shows where the image's vector comes from. `output_attentions=True` returns the
# $(B, H, N+1, N+1)$ weights of every block; row 0 is the [CLS] query.

# %%
with torch.no_grad():
    test_out = vit(test_set["images"].to(device), output_attentions=True)
grid = vit_config.grid_size
cls_maps = [a.mean(1)[:, 0, 1:].cpu() for a in test_out.attentions]  # per block (B, N): [CLS] -> patches
predicted = test_out.logits.argmax(-1).cpu()

show = 8
object_pixels = test_set["images"].amax(dim=1) > 0.4  # (B, S, S): objects are bright, background dark
fig, axes = plt.subplots(1 + num_layers, show, figsize=(1.45 * show, 1.6 * (1 + num_layers)))
for j in range(show):
    true, guess = shapes.CLASS_NAMES[test_set["labels"][j]], shapes.CLASS_NAMES[predicted[j]]
    axes[0, j].imshow(test_set["images"][j].permute(1, 2, 0).numpy())
    axes[0, j].set_title(guess if guess == true else f"{guess}\n(true: {true})", fontsize=7,
                         color="k" if guess == true else "C3")
    for layer in range(num_layers):
        ax = axes[1 + layer, j]
        im = ax.imshow(cls_maps[layer][j].reshape(grid, grid), cmap="magma", vmin=0, vmax=1,
                       extent=(-0.5, 31.5, 31.5, -0.5), interpolation="nearest")
        ax.contour(object_pixels[j].float(), levels=[0.5], colors="cyan", linewidths=0.8)
        if j == 0:
            ax.set_ylabel(f"block {layer + 1}", fontsize=8)
for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
fig.colorbar(im, ax=axes[1:, :], shrink=0.8, label="[CLS] attention weight")
fig.suptitle("Prediction (top); where [CLS] attends in each block, one square per patch (cyan: the object)")
plt.show()

# %% [markdown]
# A number for the picture: the share of the [CLS] attention that falls on the patches
# holding the object (those where the object covers some pixels), against the share
# those patches would get from uniform attention.

# %%
coverage = reduce(object_pixels.float(), "b (h p1) (w p2) -> b (h w)", "mean", p1=patch_size, p2=patch_size)
on_object = coverage > 0.05  # (B, N) patches that hold part of the object
baseline = on_object.float().mean(1).mean().item()
for layer, cls_map in enumerate(cls_maps):
    share = (cls_map * on_object).sum(1).mean().item()
    print(f"block {layer + 1}: {share:.0%} of the [CLS] attention on object patches (uniform: {baseline:.0%})")
first_share = (cls_maps[0] * on_object).sum(1).mean().item()
mmcourse.record("vit_cls_attention_on_object", first_share, at_least=2 * baseline)

# %% [markdown]
# In the first block the [CLS] token reads its patches directly, and it reads mostly the
# ones with the object: nobody told it where objects are, the classification loss alone
# taught it. In later blocks each token has already mixed with the others, so a weight on
# "patch $k$" no longer means "pixels of patch $k$" only; read those maps with care.

# %% [markdown]
# ### Explore: every block, every head, every query
#
# The maps above average the heads and show only the [CLS] row. Here you pick a test image,
# a block, a head and the query token ([CLS] or one patch, 0 to N-1 in reading order) and
# see that one row of the trained ViT's attention (computed once above, for the whole test
# set; nothing is retrained). Heads of the same block often split the work: one reads the
# object, another the background or the query's own neighbourhood.

# %%
import ipywidgets as widgets

from mmcourse.plotting import draw_attention_map
from mmcourse.widgets import explore

attention_stack = torch.stack([a.cpu() for a in test_out.attentions], dim=1)  # (B, L, H, N+1, N+1)


def draw_vit_head(fig, image, block, head, query):
    true, guess = shapes.CLASS_NAMES[test_set["labels"][image]], shapes.CLASS_NAMES[predicted[image]]
    draw_attention_map(fig, image=test_set["images"][image], attentions=attention_stack[image], layer=block - 1,
                       head=head, query=query, title=f"test image {image}: predicted {guess} (true: {true})")


explore(
    draw_vit_head,
    figsize=(8, 3.6),
    image=widgets.IntSlider(value=0, min=0, max=len(attention_stack) - 1, description="test image"),
    block=widgets.IntSlider(value=1, min=1, max=num_layers, description="block"),
    head=widgets.IntSlider(value=0, min=0, max=num_heads - 1, description="head"),
    query=widgets.IntSlider(value=0, min=0, max=vit_config.num_patches, description="query (0: CLS)"),
);

# %% [markdown]
# ## 4. The audio tower
#
# The log-mel spectrogram of chapter 01, a $(J, M)$ image of mel bands by 10 ms frames,
# becomes tokens the same way. A token is a patch of the spectrogram: all $J$ bands of
# `audio_patch_frames` consecutive frames (non-overlapping groups of frames: a
# simplification of Whisper's strided convolutions; with patches of fewer bands it becomes the Audio Spectrogram
# Transformer). A 1-D sinusoidal position goes with each token; here the tokens are
# **mean-pooled** instead of read through a [CLS] token. The task: which digit is spoken,
# by voices the model never heard in training.

# %%
from mmcourse.data import avdigits
from mmcourse.encoders import AudioEncoder, AudioEncoderConfig

av_config = avdigits.AVDigitsConfig(seed=seed)
av_train = avdigits.av_digits_tensors("train", config=av_config, n_mels=40)
av_test = avdigits.av_digits_tensors("test", config=av_config, n_mels=40)
mu, sigma = av_train["audio"].mean(), av_train["audio"].std()  # standardise with training statistics
audio_train, audio_test = (av_train["audio"] - mu) / sigma, (av_test["audio"] - mu) / sigma
n_mels, frames = audio_train.shape[1:]
audio_config = AudioEncoderConfig(n_mels=n_mels, max_frames=frames, patch_frames=audio_patch_frames, dim=dim,
                                  num_layers=num_layers, num_heads=num_heads, pool="mean", num_classes=10)
torch.manual_seed(seed)
audio_model = AudioEncoder(audio_config).to(device)
tokens = audio_config.grid[1]
print(f"log-mel {n_mels} x {frames} -> {tokens} tokens of {audio_patch_frames} frames "
      f"({10 * audio_patch_frames} ms) each; {count_parameters(audio_model):,} parameters")
print(f"train {len(av_train['label'])} clips, test {len(av_test['label'])} clips; test voices "
      f"{sorted(set(av_test['voice']))} never occur in training: {not set(av_test['voice']) & set(av_train['voice'])}")

# %%
audio_losses = train(audio_model, audio_train, av_train["label"], steps=audio_steps, batch=audio_batch_size)
audio_acc = accuracy(audio_model, audio_test, av_test["label"])
print(f"spoken digits, unseen voices: test accuracy {audio_acc:.1%} (chance 10%)")
mmcourse.record("audio_test_accuracy", audio_acc, at_least=0.75)

# %%
with torch.no_grad():
    audio_pred = torch.cat([audio_model(c.to(device)).logits.argmax(-1).cpu() for c in audio_test.split(500)])
confusion = torch.zeros(10, 10, dtype=torch.long)
confusion.index_put_((av_test["label"], audio_pred), torch.ones_like(audio_pred), accumulate=True)
fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), gridspec_kw={"width_ratios": [1.3, 1, 1]})
k = 0
spectrogram = av_test["audio"][k]
im = axes[0].imshow(spectrogram, origin="lower", aspect="auto", cmap="magma", vmin=spectrogram.max() - 80)
fig.colorbar(im, ax=axes[0], label="dB")
for t in range(1, tokens + 1):
    axes[0].axvline(t * audio_patch_frames - 0.5, color="w", lw=0.6)
axes[0].set(title=f"a test clip, '{avdigits.LABEL_NAMES[av_test['label'][k]]}': {tokens} tokens (white lines)",
            xlabel="frame (10 ms)", ylabel="mel band")
axes[1].plot(np.arange(len(smooth(audio_losses, 20))) + 20, smooth(audio_losses, 20))
axes[1].set(title="training loss", xlabel="step", ylabel="cross-entropy (mean of 20 steps)", yscale="log")
axes[2].imshow(confusion, cmap="Blues")
for (r, c), v in np.ndenumerate(confusion.numpy()):
    if v:
        axes[2].text(c, r, str(v), ha="center", va="center", fontsize=6, color="w" if v > 10 else "k")
axes[2].set(title=f"test confusion (accuracy {audio_acc:.1%})", xlabel="predicted digit", ylabel="spoken digit")
axes[2].set_xticks(range(10))
axes[2].set_yticks(range(10))
plt.show()

# %% [markdown]
# ## Summary
#
# * A **transformer block** is self-attention and an FFN, $W_2\,\mathrm{GELU}(W_1x+b_1)+b_2$,
#   each with a **residual connection** and a **LayerNorm** - after the sum (post-norm,
#   BERT) or before the sublayer (pre-norm, ViT, plus one final LayerNorm). Ours equals
#   `nn.TransformerEncoderLayer` in value and gradient.
# * The order matters in deep stacks at high learning rates: there, post-norm needs a
#   warm-up to train at all, pre-norm does not (measured above over seeds).
# * The same block builds every tower; only the first layer, which turns the input into
#   tokens, depends on the modality:

# %%
rows = [
    ("image (ViT)", "(3, 32, 32) scene", f"{vit_config.num_patches} patches + [CLS]", count_parameters(vit),
     f"test accuracy {vit_acc:.1%}"),
    ("text (BERT)", "WordPiece ids", "one per token", count_parameters(ours_text),
     f"= MiniLM to {text_diff:.0e}"),
    ("audio", f"({n_mels}, {frames}) log-mel", f"{tokens} frame groups", count_parameters(audio_model),
     f"test accuracy {audio_acc:.1%}"),
]
print(f"{'tower':12} {'input':20} {'tokens':22} {'parameters':>12}   result")
for tower, inputs, toks, params, result in rows:
    print(f"{tower:12} {inputs:20} {toks:22} {params:>12,}   {result}")

# %% [markdown]
# * The text tower is BERT: the same parameter count and structure as `BertModel`, and the
#   same outputs once MiniLM's weights are loaded. The image and audio towers train in
#   seconds on a CPU; the [CLS] token of the ViT learns to look at the object.
#
# Chapter 05 puts these towers together: early, late and cross-attention **fusion**.
#
# ## Exercises
#
# Replace each `raise NotImplementedError` (or `...`) with your answer and run the cell;
# `check()` tells you what is right or wrong. `hint()` and `solution()` help if you are stuck.

# %%
from mmcourse.exercises.ch04 import q1, q2, q3, q4


# Exercise 1: FFN(x) = W2 GELU(W1 x + b1) + b2 for x (B, N, D), with W1 (F, D), b1 (F,),
# W2 (D, F), b2 (D,) stored like nn.Linear weights.
def my_ffn(x, W1, b1, W2, b2):
    raise NotImplementedError  # your code here


q1.check(my_ffn)


# %%
# Exercise 2: the forward pass of a pre-norm block, given its sublayers as functions
# (B, N, D) -> (B, N, D): attention, ffn, norm1, norm2.
def my_pre_norm_block(x, attention, ffn, norm1, norm2):
    raise NotImplementedError  # your code here


q2.check(my_pre_norm_block)


# %%
# Exercise 3: the number of parameters of ViTEncoder(config), from the config alone. Count:
# the patch embedding (Conv2d, weights + bias), the [CLS] token, the position table (only if
# config.position == "learned"; the sin-cos table is a fixed buffer), the blocks, the final
# LayerNorm (pre-norm only) and the classifier (only if config.num_classes > 0).
def my_vit_num_parameters(config):
    raise NotImplementedError  # your code here


q3.check(my_vit_num_parameters)


# %%
# Exercise 4: turn a tokenizer's attention_mask (B, N) of 1s and 0s into the key_padding_mask
# that TransformerBlock and nn.TransformerEncoderLayer expect.
def my_key_padding_mask(attention_mask):
    raise NotImplementedError  # your code here


q4.check(my_key_padding_mask)

# %%
# q1.hint(); q1.solution()
