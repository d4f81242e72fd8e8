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
# # 02 · Attention
#
# Chapter 01 turned every modality into a sequence of vectors, $X = [x_1, \dots, x_L]$.
# Each vector was made **on its own**: the word "red" gets the same vector whether the
# caption describes a red circle on the left or a red square on the right, and an image
# patch knows nothing about the patches around it. A model that answers "where is the red
# circle?" needs tokens that *look at* other tokens - here, caption words that look at the
# image patches showing the object they name.
#
# **Attention** (注意力) does exactly this. Every token asks a question, its **query**
# (查询); every token advertises what it holds, its **key** (键), and what it will hand
# over, its **value** (值); each query takes a weighted average of the values, weighted by
# how well their keys match it. The source articles build the multimodal transformer on it
# (002 §4.2 and §4.4, 004 §4.1): self-attention within a sequence, cross-attention
# between modalities. This chapter
#
# 1. computes attention by hand on three tokens, then explains its two design choices:
#    dot products, and the division by $\sqrt{d_k}$ (measured, not just asserted);
# 2. adds **masks** - padding, causal, and a block mask for image + text sequences;
# 3. builds **multi-head attention**, correcting the source's formula on the way;
# 4. trains a tiny **cross-attention** model in seconds on the Shapes world, and watches
#    caption words find the objects they name;
# 5. measures the cost: time and memory grow as $L^2$, and what a fused kernel saves.
#
# Everything is checked against `torch.nn.functional.scaled_dot_product_attention` and
# `torch.nn.MultiheadAttention`.

# %% tags=["parameters"]
# Parameters: papermill and `mmcourse run 02 -p name value` can change these.
seed = 0  # random seed for every generator
device = "auto"  # "auto" picks cuda, then mps, then cpu
max_dk = 512  # largest key width d_k in the sqrt(d_k) experiments (powers of two from 2)
n_pairs = 4000  # random (q, k) pairs drawn per d_k
image_size = 32  # side of a Shapes-world scene in pixels
patch_size = 4  # P: a 32 x 32 scene becomes an 8 x 8 grid, 64 patch tokens
n_train = 2000  # training scenes for the cross-attention model (full: 20000 on a GPU)
train_steps = 400  # training steps (full: 3000 on a GPU)
batch_size = 64  # scenes per training step
lr = 3e-3  # AdamW learning rate
max_length = 1024  # longest sequence in the cost experiment (full: 16384 on a GPU)
cost_repeats = 3  # timed repeats per point in the cost experiment (the median is kept)

# %%
import math
from functools import partial

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from tqdm.auto import tqdm

import mmcourse
from mmcourse import utils
from mmcourse.plotting import setup_notebook

utils.positive_int(max_dk=max_dk, n_pairs=n_pairs, image_size=image_size, patch_size=patch_size)
utils.positive_int(n_train=n_train, train_steps=train_steps, batch_size=batch_size)
utils.positive_int(max_length=max_length, cost_repeats=cost_repeats)
utils.positive_float(lr=lr)
if max_dk < 64:
    raise ValueError(f"max_dk must be at least 64 (smaller keys barely saturate the softmax), got {max_dk}")
if image_size < 16 or image_size % patch_size:
    raise ValueError(f"image_size must be >= 16 and divisible by patch_size={patch_size}, got {image_size}")
if max_length < 64:
    raise ValueError(f"max_length must be at least 64, got {max_length}")
mmcourse.seed_everything(seed)
device = mmcourse.get_device(device)
setup_notebook()
print("computing on", device)

# %% [markdown]
# ## 1. The idea: a soft lookup
#
# A Python dictionary is a hard lookup: the query must equal one key, and you get that
# key's value. Attention is a *soft* lookup: the query is compared with **every** key,
# the comparisons become weights that sum to 1, and the answer is the weighted average of
# all the values. The comparison is a **dot product**, $q \cdot k = \lVert q\rVert
# \lVert k\rVert \cos\theta$: large when the two vectors point the same way.
#
# Three tokens with $d_k = 2$ are small enough to draw. Their queries, keys and values
# are made up by hand here (a model computes them from the tokens, section 2). Below,
# the query of token 1 is compared with the three keys; the keys it points along get the
# weight.

# %%
tokens = ["red", "circle", "left"]
Q = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])  # (L, d_k): one query per token
K = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # (S, d_k): one key per token
V = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])  # (S, d_v): one value per token

i = 0  # the query we look at
alpha_i = torch.softmax(Q[i] @ K.T / math.sqrt(2), dim=-1)  # (S,)
fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
ax = axes[0]
for j, name in enumerate(tokens):
    ax.annotate("", xy=K[j].tolist(), xytext=(0, 0), arrowprops=dict(arrowstyle="->", color="C0", lw=1 + 4 * alpha_i[j].item()))
    ax.text(K[j, 0] + 0.05, K[j, 1] + 0.08, f"$k_{j + 1}$ ({name})", color="C0")
ax.annotate("", xy=Q[i].tolist(), xytext=(0, 0), arrowprops=dict(arrowstyle="->", color="C3", lw=2.5))
ax.text(Q[i, 0] - 0.1, Q[i, 1] - 0.25, f"$q_{i + 1}$", color="C3")
ax.set(xlim=(-0.3, 2.5), ylim=(-0.4, 1.5), aspect="equal", title="query 1 and the three keys (line width = weight)", xlabel="dimension 1", ylabel="dimension 2")
axes[1].bar([f"$k_{j + 1}$ ({t})" for j, t in enumerate(tokens)], alpha_i, color="C0")
for j, a in enumerate(alpha_i):
    axes[1].text(j, a.item() + 0.01, f"{a:.2f}", ha="center")
axes[1].set(title=r"weights $\alpha_{1j}$ = softmax of $q_1 \cdot k_j / \sqrt{d_k}$", ylabel="weight", ylim=(0, 1))
plt.show()

# %% [markdown]
# Why a dot product, and not some other similarity? Three reasons:
#
# * it measures alignment, and the learned projections (below) decide *which* directions
#   matter, so "similar" is learned, not fixed;
# * all $L \times S$ comparisons are **one matrix product**, $QK^\top$ - the operation
#   hardware is fastest at;
# * it needs no extra memory. The older *additive* attention (Bahdanau et al., 2015)
#   scores a pair with a small network, $w^\top \tanh(W_q q + W_k k)$, which needs an
#   $(L, S, d)$ tensor of intermediate values. Timed on one sequence:

# %%
from mmcourse.bench import peak_memory_bytes, time_candidates

L_demo, d_demo = 256, 64
q_demo, k_demo = torch.randn(L_demo, d_demo, device=device), torch.randn(L_demo, d_demo, device=device)
w_add = torch.randn(d_demo, device=device)


def dot_scores():
    return q_demo @ k_demo.T  # (L, S)


def additive_scores():
    return torch.tanh(q_demo[:, None, :] + k_demo[None, :, :]) @ w_add  # (L, S, d) -> (L, S); W_q q, W_k k given


times = time_candidates({"dot": dot_scores, "additive": additive_scores}, repeats=cost_repeats)
memory = {name: peak_memory_bytes(fn, device=device) for name, fn in [("dot", dot_scores), ("additive", additive_scores)]}
print(f"L = S = {L_demo}, d = {d_demo}:  dot product {times['dot'] * 1e3:.2f} ms, {memory['dot'] / 2**20:.2f} MB;  "
      f"additive {times['additive'] * 1e3:.2f} ms, {memory['additive'] / 2**20:.1f} MB")
print(f"additive attention is {times['additive'] / times['dot']:.0f}x slower and needs "
      f"{memory['additive'] / memory['dot']:.0f}x the memory here")

# %% [markdown]
# ## 2. The formula, by hand
#
# The source (002 §4.2) writes attention for position $i$ of a sequence of length $L$:
#
# $$\alpha_{ij} = \operatorname{softmax}_j\!\left(\frac{q_i^\top k_j}{\sqrt{d_k}}\right)
# = \frac{\exp(q_i^\top k_j / \sqrt{d_k})}{\sum_{j'=1}^{L} \exp(q_i^\top k_{j'} / \sqrt{d_k})},
# \qquad o_i = \sum_{j=1}^{L} \alpha_{ij}\, v_j ,$$
#
# where $d_k$ is the width of queries and keys and the softmax runs over the keys $j$, so
# each row of **attention weights** (注意力权重) $\alpha_{i\cdot}$ sums to 1. Stacking the
# queries, keys and values as rows of $Q \in \mathbb{R}^{L \times d_k}$,
# $K \in \mathbb{R}^{S \times d_k}$, $V \in \mathbb{R}^{S \times d_v}$ gives the matrix form,
# **scaled dot-product attention** (缩放点积注意力):
#
# $$\operatorname{Attention}(Q, K, V) = \operatorname{softmax}\!\left(\frac{QK^\top}{\sqrt{d_k}}\right) V .$$
#
# In **self-attention** (自注意力) the three come from the same sequence,
# $Q = XW^Q$, $K = XW^K$, $V = XW^V$ with learned $W^Q, W^K \in \mathbb{R}^{D \times d_k}$
# and $W^V \in \mathbb{R}^{D \times d_v}$. For our three tokens, step by step
# (`Q`, `K`, `V` hold $Q, K, V$; `scores` holds $QK^\top/\sqrt{d_k}$, `alpha` holds $\alpha$,
# `out` holds $O$, the rows $o_i$):

# %%
# NBVAL_CHECK_OUTPUT
d_k = Q.shape[-1]
scores = Q @ K.T / math.sqrt(d_k)  # (L, S): q_i . k_j / sqrt(d_k)
alpha = torch.softmax(scores, dim=-1)  # (L, S): each row sums to 1
out = alpha @ V  # (L, d_v): o_i = sum_j alpha_ij v_j
torch.set_printoptions(precision=3, sci_mode=False)
print("Q K^T =\n", Q @ K.T)
print("scores = Q K^T / sqrt(2) =\n", scores)
print("alpha = softmax over each row =\n", alpha)
print("row sums:", alpha.sum(-1))
print("O = alpha V =\n", out)
torch.set_printoptions(profile="default")

# %% [markdown]
# Token 1 ("red") matches key 1 best, so its output is mostly $v_1$; token 2's query
# matches keys 2 and 3 equally and gets an even mix of $v_2$ and $v_3$. The same numbers
# from PyTorch's fused function and from the course package:

# %%
from mmcourse.attention import fused_attention, scaled_dot_product_attention

O_torch = F.scaled_dot_product_attention(Q, K, V)
O_ours, alpha_ours = scaled_dot_product_attention(Q, K, V)  # the reference path: also returns alpha
torch.testing.assert_close(out, O_torch)
torch.testing.assert_close(out, O_ours)
torch.testing.assert_close(alpha, alpha_ours)
torch.testing.assert_close(out, fused_attention(Q, K, V))
print("by hand == F.scaled_dot_product_attention == mmcourse reference == mmcourse fused path")

# On a real batch with heads, masks and gradients too:
g = torch.Generator().manual_seed(seed)
q, k, v = (torch.randn(2, 4, 9, 16, generator=g).to(device).requires_grad_() for _ in range(3))  # (B, H, N, d)
mask = torch.rand(9, 9, generator=g).to(device) > 0.3
mask[:, 0] = True  # every query may attend to at least one key
ours = scaled_dot_product_attention(q, k, v, attn_mask=mask)[0]
theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
grads_ours = torch.autograd.grad(ours.square().sum(), (q, k, v))
grads_theirs = torch.autograd.grad(theirs.square().sum(), (q, k, v))
diff_value = (ours - theirs).abs().max().item()
diff_grad = max((a - b).abs().max().item() for a, b in zip(grads_ours, grads_theirs, strict=True))
print(f"largest difference from torch: value {diff_value:.1e}, gradient {diff_grad:.1e}")
mmcourse.record("reference_vs_torch_max_abs_diff", max(diff_value, diff_grad), at_most=1e-5)

# %% [markdown]
# ## 3. Why divide by $\sqrt{d_k}$?
#
# The source says only that $\sqrt{d_k}$ "prevents the dot products from becoming too
# large or too small". Here is why, and how much. If the components of $q$ and $k$ are
# independent with mean 0 and variance 1, then $q \cdot k = \sum_{m=1}^{d_k} q_m k_m$ is a
# sum of $d_k$ terms of variance 1 each, so
#
# $$\operatorname{Var}(q \cdot k) = d_k, \qquad \operatorname{Var}\!\left(\frac{q \cdot k}{\sqrt{d_k}}\right) = 1 .$$
#
# Measured with `n_pairs` random pairs per $d_k$:

# %%
dks = [2**p for p in range(1, int(math.log2(max_dk)) + 1)]
var_raw, var_scaled = [], []
for d in dks:
    qs = torch.randn(n_pairs, d, generator=g)
    ks = torch.randn(n_pairs, d, generator=g)
    dots = (qs * ks).sum(-1)  # (n_pairs,): q . k
    var_raw.append(dots.var().item())
    var_scaled.append((dots / math.sqrt(d)).var().item())

fig, ax = plt.subplots(figsize=(5.5, 3.5))
ax.loglog(dks, var_raw, "o-", label=r"Var$(q \cdot k)$")
ax.loglog(dks, var_scaled, "s-", label=r"Var$(q \cdot k / \sqrt{d_k})$")
ax.loglog(dks, dks, "k:", lw=1, label=r"$d_k$")
ax.set(xlabel="$d_k$", ylabel="variance (measured)", title=f"Dot products of random unit-variance vectors ({n_pairs} pairs each)")
ax.legend()
plt.show()
ratio = var_raw[-1] / dks[-1]
print(f"d_k = {dks[-1]}: Var(q.k) = {var_raw[-1]:.1f}, Var(q.k)/d_k = {ratio:.3f}, "
      f"Var(q.k/sqrt(d_k)) = {var_scaled[-1]:.3f}")
mmcourse.record("dot_variance_over_dk", ratio, at_least=0.85, at_most=1.15)

# %% [markdown]
# Why does the size matter? Because of what the softmax does with large inputs. With a
# spread of scores of standard deviation $\sqrt{d_k}$, one score is far above the others
# and the softmax puts almost all the weight on it: it **saturates** (饱和). A saturated
# softmax passes almost no gradient. Its Jacobian is
#
# $$\frac{\partial \alpha_j}{\partial s_m} = \alpha_j(\delta_{jm} - \alpha_m),$$
#
# which vanishes when one $\alpha_j$ is close to 1 and the rest close to 0. We measure,
# for queries against `n_keys` random keys each, how often the largest weight exceeds 0.99
# and the size (Frobenius norm) of this Jacobian, with and without the scaling:

# %%
n_keys = 16


def softmax_stats(scores):
    """Per row of (n, S) scores: the largest softmax weight and the Jacobian's Frobenius norm."""
    a = torch.softmax(scores, dim=-1)  # (n, S)
    jac = torch.diag_embed(a) - a[:, :, None] * a[:, None, :]  # (n, S, S): alpha_j (delta_jm - alpha_m)
    return a.max(-1).values, jac.flatten(1).norm(dim=-1)  # (n,), (n,)


stats = {"raw": [], "scaled": []}
for d in dks:
    qs = torch.randn(n_pairs // 4, 1, d, generator=g)
    ks = torch.randn(n_pairs // 4, n_keys, d, generator=g)
    raw = (qs * ks).sum(-1)  # (n, S): q . k_j
    stats["raw"].append(softmax_stats(raw))
    stats["scaled"].append(softmax_stats(raw / math.sqrt(d)))

fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
for name, marker in [("raw", "o-"), ("scaled", "s-")]:
    label = r"$q \cdot k$" if name == "raw" else r"$q \cdot k / \sqrt{d_k}$"
    axes[0].semilogx(dks, [(top > 0.99).float().mean().item() for top, _ in stats[name]], marker, base=2, label=label)
    axes[1].loglog(dks, [norm.median().item() for _, norm in stats[name]], marker, base=2, label=label)
axes[0].set(xlabel="$d_k$", ylabel="share of queries", title=f"Saturated softmax: largest of {n_keys} weights > 0.99", ylim=(-0.02, 1.02))
axes[1].set(xlabel="$d_k$", ylabel=r"median $\Vert\partial\alpha/\partial s\Vert_F$", title="The gradient the softmax lets through")
for ax in axes:
    ax.legend()
plt.show()
saturated = {name: (stats[name][-1][0] > 0.99).float().mean().item() for name in stats}
median_norm = {name: stats[name][-1][1].median().item() for name in stats}
print(f"d_k = {dks[-1]}: saturated softmax for {saturated['raw']:.0%} of queries unscaled, {saturated['scaled']:.0%} scaled; "
      f"median Jacobian norm {median_norm['raw']:.2g} vs {median_norm['scaled']:.2g} "
      f"({median_norm['scaled'] / median_norm['raw']:.0f}x larger with the scaling)")
mmcourse.record("saturated_share_unscaled", saturated["raw"], at_least=0.2)
mmcourse.record("saturated_share_scaled", saturated["scaled"], at_most=0.01)

# %% [markdown]
# Without the scaling, the wider the heads the more the softmax behaves like an arg-max
# and the smaller its gradient, so the query and key projections learn slowly or not at
# all. Dividing by $\sqrt{d_k}$ keeps the scores at unit variance for every head width:
# the weights stay soft and the gradient stays the same size.
#
# > **Common pitfall: dividing by $d_k$, or by $\sqrt{d_v}$.** The variance argument
# > needs the *standard deviation* $\sqrt{d_k}$, and $d_k$ is the width of the queries
# > and keys that are multiplied, not of the values. (Transformers built for long
# > contexts sometimes change the scale on purpose; `scale=` in both PyTorch's function
# > and ours sets it explicitly.)
#
# ## 4. Masks
#
# A **mask** says which keys each query may look at. Masked scores are set to $-\infty$
# before the softmax, so their weights are exactly 0:
#
# $$\alpha = \operatorname{softmax}\!\left(\frac{QK^\top}{\sqrt{d_k}} + M\right),
# \qquad M_{ij} = \begin{cases} 0 & \text{query } i \text{ may attend to key } j \\ -\infty & \text{otherwise.}\end{cases}$$
#
# PyTorch's `F.scaled_dot_product_attention`, and `mmcourse.attention` with it, take
# either a **boolean** mask, `True` = *may attend*, or a **float** mask that is added to
# the scores, like $M$. Three masks come up again and again:
#
# * a **padding mask** (填充掩码): sequences of different lengths are padded to one length
#   in a batch; no query may attend to the padding;
# * a **causal mask** (因果掩码): a model that generates text left to right must not see
#   the future, so token $i$ attends to tokens $j \le i$;
# * a **modality block mask**: in a sequence that concatenates image patches and text
#   tokens (002 §4.1: $X = [X^{(1)}; X^{(2)}]$), we choose which modality may look at which,
#   e.g. text may attend to the image but the image not to the text.

# %%
from mmcourse.attention import causal_mask, modality_block_mask, padding_mask

n_img, n_txt = 4, 4
masks = {
    "padding: lengths 5 and 8 of 8\n(keys of sequence 0)": padding_mask([5, 8], 8)[0].expand(8, 8),
    "causal": causal_mask(8),
    "image -> image; text -> image, text": modality_block_mask(lengths=[n_img, n_txt], allowed=[(0, 0), (1, 0), (1, 1)]),
    "...and text causal among itself": modality_block_mask(lengths=[n_img, n_txt], allowed=[(0, 0), (1, 0), (1, 1)], causal=[1]),
}
labels = [f"img{j}" for j in range(n_img)] + [f"txt{j}" for j in range(n_txt)]
fig, axes = plt.subplots(1, 4, figsize=(13, 3.6))
for ax, (title, m) in zip(axes, masks.items(), strict=True):
    ax.imshow(m, cmap="Greens", vmin=0, vmax=1.3)
    ax.set_title(title, fontsize=9)
    ax.set(xlabel="key j", ylabel="query i")
    if "image" in title or "text" in title:
        ax.set_xticks(range(8), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(8), labels, fontsize=7)
        ax.axhline(n_img - 0.5, color="k", lw=0.8)
        ax.axvline(n_img - 0.5, color="k", lw=0.8)
fig.suptitle("Masks, green = may attend (True)")
plt.show()

# %% [markdown]
# The weights that come out: masked keys get exactly zero weight, and each row still sums
# to 1 over the keys that remain.

# %%
x_mm = torch.randn(1, n_img + n_txt, 8, generator=g)  # (B, N, d): one image+text sequence
block = masks["...and text causal among itself"]
_, weights_block = scaled_dot_product_attention(x_mm, x_mm, x_mm, attn_mask=block)
_, weights_free = scaled_dot_product_attention(x_mm, x_mm, x_mm)
fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
for ax, w, title in [(axes[0], weights_free, "no mask"), (axes[1], weights_block, "modality block mask, text causal")]:
    im = ax.imshow(w[0], cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(8), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(8), labels, fontsize=7)
    ax.set(title=f"attention weights, {title}", xlabel="key", ylabel="query")
fig.colorbar(im, ax=axes, label=r"$\alpha_{ij}$")
plt.show()
assert (weights_block[0][~block] == 0).all()
torch.testing.assert_close(weights_block.sum(-1), torch.ones(1, 8))
print("masked weights are exactly 0; every row sums to 1")

# %% [markdown]
# A padded batch: whatever the padding holds, the outputs of the real tokens do not
# change - the check that a padding mask works. And a query that may attend to *nothing*
# (here: every query of a sequence that is all padding) has no weighted average to take:
# the textbook formula gives $0/0$ = NaN. `mmcourse.attention` returns zeros for such a
# row, on both paths, so one empty sequence cannot poison a whole batch.

# %%
lengths = torch.tensor([5, 8, 0])  # sequence 2 is empty (all padding)
keep = padding_mask(lengths, 8)  # (B, S): True = real token
x_pad = torch.randn(3, 8, 16, generator=g)  # (B, N, d)
garbage = x_pad.clone()
garbage[~keep] = 1e4  # write huge numbers into the padding
key_mask = keep[:, None, :]  # (B, 1, S): broadcast over the queries
out_a = scaled_dot_product_attention(x_pad, x_pad, x_pad, attn_mask=key_mask)[0]
out_b = scaled_dot_product_attention(x_pad, garbage, garbage, attn_mask=key_mask)[0]
torch.testing.assert_close(out_a, out_b)
print("real-token outputs ignore the padding's content")
print("the empty sequence's output:", out_a[2].abs().max().item(), "(zeros, not NaN);",
      "fused path the same:", torch.equal(fused_attention(x_pad, x_pad, x_pad, attn_mask=key_mask)[2], out_a[2]))

# %% [markdown]
# > **Common pitfall: three conventions for one mask.** `F.scaled_dot_product_attention`
# > (and this course): boolean `True` = **may attend**. `nn.MultiheadAttention`: its
# > boolean `key_padding_mask` *and* boolean `attn_mask` mean `True` = **ignore**. Hugging
# > Face tokenizers: `attention_mask` is an *integer* 1 = real token, 0 = padding (chapter
# > 01). Passing one where another is expected silently attends to the padding only, or
# > to nothing. `mmcourse.attention` refuses integer masks with a message
# > (`mask.bool()`), and its `MultiHeadAttention.key_padding_mask` keeps
# > `nn.MultiheadAttention`'s `True` = padding, so that code ported from it keeps working;
# > `~padding_mask(lengths)` builds it.

# %% [markdown]
# ## 5. Multi-head attention
#
# One attention computes one set of weights per query: one way of relating tokens. A
# caption word may need several at once - the colour that matches it, the patches next to
# it, the word before it. **Multi-head attention** (多头注意力) runs $h$ attentions
# ("heads") side by side, each with **its own** projections, and concatenates their
# outputs:
#
# $$\text{head}_i = \operatorname{Attention}(XW^Q_i,\; XW^K_i,\; XW^V_i), \qquad
# \operatorname{MultiHead}(X) = \operatorname{Concat}(\text{head}_1, \dots, \text{head}_h)\, W^O,$$
#
# with $W^Q_i, W^K_i, W^V_i \in \mathbb{R}^{D \times d_h}$, $d_h = D/h$ and
# $W^O \in \mathbb{R}^{D \times D}$. Each $\text{head}_i$ is an $(L, d_h)$ matrix: every
# position gets $h$ outputs, one per head, side by side. First literally, one head at a
# time (`W_q[i]` holds $W^Q_i$):

# %%
D, h, L_x = 12, 3, 5
d_h = D // h
X = torch.randn(L_x, D, generator=g)  # (L, D)
W_q, W_k, W_v = (torch.randn(h, D, d_h, generator=g) / math.sqrt(D) for _ in range(3))  # (h, D, d_h): W_i per head
W_o = torch.randn(D, D, generator=g) / math.sqrt(D)  # (D, D)

heads = []
for i in range(h):
    head_i, _ = scaled_dot_product_attention(X @ W_q[i], X @ W_k[i], X @ W_v[i])  # (L, d_h)
    heads.append(head_i)
multi_loop = torch.cat(heads, dim=-1) @ W_o  # (L, h * d_h) @ (D, D) -> (L, D)
print("heads:", [tuple(hd.shape) for hd in heads], "-> MultiHead(X):", tuple(multi_loop.shape))

# %% [markdown]
# In practice the $h$ matrices $W^Q_i$ sit side by side in one $D \times D$ matrix
# $W^Q = [W^Q_1, \dots, W^Q_h]$, so all heads are projected by one matrix product, and the
# result is *split* into heads - a reshape, written with `einops` so that the shapes are
# stated: `"l (h d) -> h l d"`. All heads then attend in one batched call:

# %%
W_Q_all = rearrange(W_q, "h D d -> D (h d)")  # (D, D): [W^Q_1 | ... | W^Q_h]
W_K_all = rearrange(W_k, "h D d -> D (h d)")
W_V_all = rearrange(W_v, "h D d -> D (h d)")
q_h = rearrange(X @ W_Q_all, "l (h d) -> h l d", h=h)  # (h, L, d_h)
k_h = rearrange(X @ W_K_all, "l (h d) -> h l d", h=h)
v_h = rearrange(X @ W_V_all, "l (h d) -> h l d", h=h)
o_h, w_h = scaled_dot_product_attention(q_h, k_h, v_h)  # (h, L, d_h), (h, L, L)
multi_batched = rearrange(o_h, "h l d -> l (h d)") @ W_o  # concatenate the heads, mix with W^O
torch.testing.assert_close(multi_batched, multi_loop)
print("one big projection + split into heads == a loop over heads with their own W_i")

# %% [markdown]
# That is exactly what `nn.MultiheadAttention` computes. Its weights are stored as
# `in_proj_weight` $= [W^Q, W^K, W^V]^\top = [(W^Q)^\top; (W^K)^\top; (W^V)^\top]$, of shape $(3D, D)$ (PyTorch's `Linear` stores $W^\top$) and
# `out_proj.weight` $= (W^O)^\top$, with biases that we set to zero here:

# %%
torch_mha = nn.MultiheadAttention(D, h, batch_first=True)
with torch.no_grad():
    torch_mha.in_proj_weight.copy_(torch.cat([W_Q_all.T, W_K_all.T, W_V_all.T]))
    torch_mha.in_proj_bias.zero_()
    torch_mha.out_proj.weight.copy_(W_o.T)
    torch_mha.out_proj.bias.zero_()
    out_torch, w_torch = torch_mha(X[None], X[None], X[None], average_attn_weights=False)
torch.testing.assert_close(out_torch[0], multi_loop, atol=1e-5, rtol=1e-5)
torch.testing.assert_close(w_torch[0], w_h, atol=1e-5, rtol=1e-5)
print("== nn.MultiheadAttention, outputs and per-head weights")

# %% [markdown]
# The course's `MultiHeadAttention` is the same computation as a module: `q_proj`,
# `k_proj`, `v_proj` and `out_proj` layers, the heads split with `einops`, and a switch
# between the reference path and PyTorch's fused kernel. It follows
# `F.scaled_dot_product_attention`'s mask convention, keeps `nn.MultiheadAttention`'s
# `key_padding_mask` (`True` = padding), and returns the weights **per head**,
# $(B, h, L, S)$ (`nn.MultiheadAttention` averages them over heads unless told not to).
# Asking for the weights uses the reference path - the fused kernel never forms them -
# as in PyTorch and Hugging Face; `need_weights=False` is the fast path. Copied from
# `torch_mha`, both paths give the same numbers, in value and gradient:

# %%
from mmcourse.attention import MultiHeadAttention

x_b = torch.randn(2, 6, D, generator=g, requires_grad=True)  # (B, N, D)
pad_b = ~padding_mask([6, 4], 6)  # (B, S): True = padding (nn.MultiheadAttention's convention)
out_t, w_t = torch_mha(x_b, x_b, x_b, key_padding_mask=pad_b)
grad_t = torch.autograd.grad(out_t.square().sum(), x_b)[0]
worst = 0.0
for use_sdpa in (True, False):
    ours_mha = MultiHeadAttention.from_torch(torch_mha, use_sdpa=use_sdpa)
    for need_weights in (True, False):
        out_o, w_o = ours_mha(x_b, key_padding_mask=pad_b, need_weights=need_weights)
        grad_o = torch.autograd.grad(out_o.square().sum(), x_b)[0]
        worst = max(worst, (out_o - out_t).abs().max().item(), (grad_o - grad_t).abs().max().item())
        if need_weights:
            worst = max(worst, (w_o.mean(1) - w_t).abs().max().item())
print(ours_mha)
print(f"largest difference from nn.MultiheadAttention (both paths, value, weights, gradient): {worst:.1e}")
mmcourse.record("mha_vs_torch_max_abs_diff", worst, at_most=1e-5)

# %% [markdown]
# > **Common pitfall: concatenating positions instead of heads.** The source (002 §4.2)
# > computes $q_i = XW^Q_i$, $\alpha_{ij}$ and $o_i = \sum_j \alpha_{ij} v_j$ - the output
# > at **position** $i$ - and then writes
# > $\operatorname{MultiHead}(X) = \operatorname{Concat}(o_1, o_2, \dots, o_h)W^O$.
# > Read literally this glues together the outputs of the first $h$ *positions* of a
# > single attention: one vector per sequence, positions $h+1 \dots L$ thrown away. What
# > transformers compute concatenates **heads**: for every position, the $h$ outputs of
# > $h$ attentions, each with its own $W^Q_i, W^K_i, W^V_i$ (the subscript $i$ on $W$
# > indexes the head, not the position). The formula above is the correct one.
#
# Numerically, with the same weights: the literal reading is not even a sequence, and the
# kindest reading - one attention over the full width, no split into heads, then $W^O$ -
# is a *one-head* `nn.MultiheadAttention`, not the $h$-head one:

# %%
o_single, _ = scaled_dot_product_attention(X @ W_Q_all, X @ W_K_all, X @ W_V_all)  # one attention, full width: o_1..o_L
literal = torch.cat([o_single[i] for i in range(h)])  # Concat(o_1, ..., o_h): the first h positions
print(f"source, literally: Concat(o_1..o_h) has shape {tuple(literal.shape)} - one vector, not {L_x} x {D};",
      f"multiplied by W^O ({D} x {D}) it does not even fit (needs {h * D} rows)")
one_head_mha = nn.MultiheadAttention(D, 1, batch_first=True)
one_head_mha.load_state_dict(torch_mha.state_dict())  # the very same parameters, one head
with torch.no_grad():
    source_kind = o_single @ W_o  # Concat over nothing: a single full-width attention, then W^O
    one_head = one_head_mha(X[None], X[None], X[None])[0][0]
print(f"single full-width attention == 1-head nn.MultiheadAttention: "
      f"{torch.allclose(source_kind, one_head, atol=1e-5)}")
print(f"...but it differs from the {h}-head nn.MultiheadAttention by up to "
      f"{(source_kind - multi_loop).abs().max():.3f} (outputs of size ~{multi_loop.abs().mean():.3f})")

# %% [markdown]
# Different heads really do attend differently. The per-head weights of our small example
# (random weights, so the patterns mean nothing yet - the trained model below has
# meaningful ones):

# %%
fig, axes = plt.subplots(1, h, figsize=(3.2 * h, 3))
for i, ax in enumerate(axes):
    im = ax.imshow(w_h[i], cmap="viridis", vmin=0, vmax=1)
    ax.set(title=f"head {i + 1}", xlabel="key position", ylabel="query position")
fig.colorbar(im, ax=axes, label="weight")
plt.show()

# %% [markdown]
# ## 6. Cross-attention: caption words look at image patches
#
# In **cross-attention** (交叉注意力) the queries come from one sequence and the keys and
# values from another. The source's modality fusion (002 §4.4) lets modality $A$ read
# modality $B$:
#
# $$O^{A \to B} = \operatorname{CrossAttention}(O^A, X^B, X^B)
# = \operatorname{softmax}\!\left(\frac{(O^A W^Q)(X^B W^K)^\top}{\sqrt{d_k}}\right) X^B W^V .$$
#
# The output has one row per token of $A$, each a weighted average of (projected) tokens
# of $B$: $A$'s tokens gather information from $B$. Nothing changes in the code, only
# $S \ne L$ and the key width may differ (`kdim`, `vdim`).
#
# **The task.** A Shapes-world scene (generated procedurally from a seed) holds 1-3
# objects, each in one of five regions and of one of two sizes. A question names one of
# them by two words, "where is the ⟨colour⟩ ⟨shape⟩, and is it large or small?", and the
# model must answer the region and the size. The question's two word tokens are the
# queries, $A$; the image's $P \times P$ patches are the keys and values, $B$. The model:
#
# 1. patch tokens: each flattened patch goes through a small MLP, plus a learned vector
#    per patch position (chapter 03 is about such positional information);
# 2. word tokens: an embedding table for the colour and shape words;
# 3. one `MultiHeadAttention` with the words as queries and the patches as keys and values;
# 4. two linear layers from the two attended word vectors: one to the regions, one to
#    the sizes.
#
# The only way for the answers to depend on the object is through the patches the words
# attend to - so, if it learns the task, the attention weights should point at the object.

# %%
from mmcourse.data import shapes
from mmcourse.modalities import patchify
from mmcourse.train import ShuffledBatches, TrainConfig, fit

WORDS = list(shapes.COLOURS) + list(shapes.SHAPES)  # the query vocabulary: 6 colours, 4 shapes
config = shapes.ShapesConfig(image_size=image_size, seed=seed)
train = shapes.shapes_tensors(n_train, split="train", config=config)
test = shapes.shapes_tensors(500, split="test", config=config)
rng = np.random.default_rng(seed)


def questions(data):
    """Pick one object per scene: its two words (colour, shape), its region and its size."""
    words, answers, picked = [], [], []
    for objects in data["objects"]:
        obj = objects[rng.integers(len(objects))]
        words.append([WORDS.index(obj["colour"]), WORDS.index(obj["shape"])])
        answers.append([shapes.POSITIONS.index(obj["position"]), shapes.SIZES.index(obj["size"])])
        picked.append(obj)
    return torch.tensor(words), torch.tensor(answers), picked  # (N, 2) words, (N, 2) answers


train_words, train_answers, _ = questions(train)
test_words, test_answers, test_objects = questions(test)
train_patches = patchify(train["images"], patch_size)  # (N_scenes, N_patches, P*P*3)
test_patches = patchify(test["images"], patch_size)
n_patches, grid = train_patches.shape[1], image_size // patch_size
print(f"{n_train} training scenes, {len(test_words)} test scenes; each: {n_patches} patches of "
      f"{train_patches.shape[2]} values; the question has 2 word tokens")
for (a, b), (r, z) in zip(train_words[:3].tolist(), train_answers[:3].tolist(), strict=True):
    print(f"  where is the {WORDS[a]} {WORDS[b]}, and is it large or small? -> {shapes.POSITIONS[r]}, {shapes.SIZES[z]}")


# %%
class WhereIsIt(nn.Module):
    """Two query words cross-attend to image patches; the attended vectors give region and size."""

    def __init__(self, *, patch_dim, n_patches, n_words, n_regions, n_sizes, dim=32, num_heads=2):
        super().__init__()
        self.patch_embed = nn.Sequential(nn.Linear(patch_dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.patch_pos = nn.Parameter(0.02 * torch.randn(n_patches, dim))  # one vector per patch position
        self.word_embed = nn.Embedding(n_words, dim)
        self.cross = MultiHeadAttention(dim=dim, num_heads=num_heads)
        self.region_head = nn.Linear(2 * dim, n_regions)
        self.size_head = nn.Linear(2 * dim, n_sizes)

    def forward(self, patches, words, need_weights=False):
        image_tokens = self.patch_embed(patches) + self.patch_pos  # (B, N, D): X^B
        word_tokens = self.word_embed(words)  # (B, 2, D): O^A
        attended, weights = self.cross(word_tokens, image_tokens, need_weights=need_weights)  # (B, 2, D)
        both = rearrange(attended, "b t d -> b (t d)")  # (B, 2 * D): the two words side by side
        return self.region_head(both), self.size_head(both), weights  # (B, 5), (B, 2), (B, H, 2, N)


model = WhereIsIt(patch_dim=train_patches.shape[2], n_patches=n_patches, n_words=len(WORDS),
                  n_regions=len(shapes.POSITIONS), n_sizes=len(shapes.SIZES)).to(device)
print(f"{sum(p.numel() for p in model.parameters()):,} parameters")

# %% [markdown]
# Training takes a few seconds. (These tensors are tiny: on a CPU, keeping two threads in
# step costs more than the arithmetic they share, so the loop runs on one thread.)

# %%
def where_loss(model, batch):
    """Cross-entropy of the region answer plus that of the size answer, for one batch."""
    patches, words, answers = batch  # (B, N, P), (B, 2), (B, 2): region, size
    region_logits, size_logits, _ = model(patches, words)
    return F.cross_entropy(region_logits, answers[:, 0]) + F.cross_entropy(size_logits, answers[:, 1])


threads = torch.get_num_threads()
if device.type == "cpu":
    torch.set_num_threads(1)
scenes = ShuffledBatches(train_patches, train_words, train_answers, batch_size=batch_size, seed=seed)
where_fit = fit(model, scenes, loss_fn=where_loss,  # the course's one training loop (chapter 01)
                config=TrainConfig(max_steps=train_steps, lr=lr, weight_decay=0.0, schedule="constant",
                                   grad_clip=None, progress=False, device=str(device)))
losses = [row["loss"] for row in where_fit.history]
torch.set_num_threads(threads)
model.eval()
with torch.no_grad():
    region_logits, size_logits, test_weights = model(test_patches.to(device), test_words.to(device), need_weights=True)
test_weights = test_weights.cpu()  # (B, H, 2, N)
region_accuracy = (region_logits.argmax(-1).cpu() == test_answers[:, 0]).float().mean().item()
size_accuracy = (size_logits.argmax(-1).cpu() == test_answers[:, 1]).float().mean().item()
print(f"test scenes: region accuracy {region_accuracy:.1%} (chance {1 / len(shapes.POSITIONS):.0%}), "
      f"size accuracy {size_accuracy:.1%} (chance {1 / len(shapes.SIZES):.0%}); "
      f"final training loss {np.mean(losses[-20:]):.3f}")
mmcourse.record("region_accuracy", region_accuracy, at_least=0.7)
mmcourse.record("size_accuracy", size_accuracy, at_least=0.7)

# %% [markdown]
# Does the model get the answer by *looking at the object*? For each test question we
# find the patches the named object covers (by drawing the object alone on an empty
# background), take the patch each word attends to most (averaged over heads), and count
# how often it lies on the object. A patch picked at random would hit the object as often
# as the object's share of the image.

# %%
def object_patches(obj):
    """(N,) bool: the patches that the object covers (drawn alone, without noise)."""
    alone = shapes.render_scene([obj], image_size=image_size, rng=np.random.default_rng(0), noise=0.0, colour_jitter=0.0)
    background = np.round(np.array(shapes.BACKGROUND_RGB) * 255)
    covered = np.abs(alone.astype(float) - background).sum(-1) > 30  # (H, W) pixels of the object
    return torch.from_numpy(covered.reshape(grid, patch_size, grid, patch_size).any(axis=(1, 3)).reshape(-1))


on_object = torch.stack([object_patches(o) for o in test_objects])  # (B, N)
mean_weights = test_weights.mean(1)  # (B, 2, N): average over heads
localisation = {}
for t, word in enumerate(["colour", "shape"]):
    top = mean_weights[:, t].argmax(-1)  # (B,): the patch this word attends to most
    hit = on_object[torch.arange(len(top)), top].float().mean().item()
    mass = (mean_weights[:, t] * on_object).sum(-1).mean().item()
    localisation[word] = hit
    print(f"{word} word: its top patch is on the object in {hit:.1%} of questions; "
          f"{mass:.1%} of its attention lies on the object")
chance = on_object.float().mean().item()
print(f"a random patch is on the object {chance:.1%} of the time")
mmcourse.record("colour_word_localisation", localisation["colour"], at_least=0.7)
mmcourse.record("shape_word_localisation", localisation["shape"], at_least=0.2)

# %% [markdown]
# The colour words find their object far above chance. The shape words are weaker, and
# spread their weight thinly over many patches (see the figure below): a
# $P \times P$ patch seen through a small MLP shows colour at once, but a shape only
# across several patches, which one layer of attention cannot combine before it chooses
# where to look. (Stacking layers - chapter 04 - is the fix.)
#
# > **Common pitfall: reading an attention map as the explanation.** In our runs, a first
# > version of this model was asked only for the region. It learned that just as well, but
# > with some seeds a word learned to look *away* from its object: the average position of all the
# > patches except the object's also tells where the object is - as a hole. Asking for
# > the size, which only the object's own patches show, removed that shortcut. High
# > accuracy does not mean that the weights point at the evidence: check them against
# > where the evidence is, as above, before you read a heatmap as "what the model looked
# > at".
#
# On a few test scenes, the weights of each word, averaged over heads, over the image:

# %%
def overlay(ax, scene, weights_n, title, full_at=0.25):
    """A dimmed scene with its patches lit in white by an (N,) attention map: opaque at >= full_at."""
    ax.imshow(0.5 * test["images"][scene].permute(1, 2, 0))
    light = np.ones((grid, grid, 4))  # white RGBA patches...
    light[..., 3] = 0.9 * np.clip(weights_n.reshape(grid, grid).numpy() / full_at, 0, 1)  # ...as opaque as their weight
    ax.imshow(light, extent=(-0.5, image_size - 0.5, image_size - 0.5, -0.5), interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.axis("off")


examples = range(6)
fig, axes = plt.subplots(3, len(examples), figsize=(2.1 * len(examples), 6.9))
for col, scene in enumerate(examples):
    colour, shape = (WORDS[w] for w in test_words[scene])
    region = shapes.POSITIONS[region_logits[scene].argmax().item()]
    size = shapes.SIZES[size_logits[scene].argmax().item()]
    axes[0, col].imshow(test["images"][scene].permute(1, 2, 0))
    true_region, true_size = (shapes.POSITIONS[test_answers[scene, 0]], shapes.SIZES[test_answers[scene, 1]])
    wrong = (region, size) != (true_region, true_size)
    axes[0, col].set_title(f"the {colour} {shape}?\n-> {region}, {size}" + (f"\n(true: {true_region}, {true_size})" if wrong else ""),
                           fontsize=8, color="red" if wrong else "black")
    axes[0, col].axis("off")
    overlay(axes[1, col], scene, mean_weights[scene, 0], f'"{colour}" attends to')
    overlay(axes[2, col], scene, mean_weights[scene, 1], f'"{shape}" attends to')
fig.suptitle(f"Cross-attention of the question words over the {grid} x {grid} patches of test scenes (white: weight, opaque at 0.25 or more)")
plt.show()

# %% [markdown]
# A title in red marks a wrong answer, with the truth below it. Each word queries the
# image on its own: the colour word's query is the same whatever the shape, so when two
# objects share a colour, only the (weaker) shape word can tell them apart - the typical
# failure of this small model.
#
# ### An explorer
#
# The weights above are averaged over heads at the trained temperature. Below you can pick
# a scene, a head, the query word and a **temperature** (温度) $\tau$ that divides the
# scores before the softmax, $\operatorname{softmax}(s/\tau)$: small $\tau$ sharpens the
# weights towards an arg-max, large $\tau$ flattens them towards uniform. We recompute the
# scores from the model's own projections and check them against its weights first.
#
# First a static overview of six settings; then the explorer. With a Jupyter front end its
# controls redraw its figure; without one (on GitHub, or run headless by papermill/nbval) it
# shows the figure at its starting values with a note.

# %%
def cross_scores(scene):
    """(H, 2, N) scaled scores q.k / sqrt(d_h) of the two words of one test scene."""
    with torch.no_grad():
        image_tokens = model.patch_embed(test_patches[scene].to(device)) + model.patch_pos  # (N, D)
        q = rearrange(model.cross.q_proj(model.word_embed(test_words[scene].to(device))), "t (h d) -> h t d", h=model.cross.num_heads)
        k = rearrange(model.cross.k_proj(image_tokens), "n (h d) -> h n d", h=model.cross.num_heads)
        return (q @ k.transpose(-2, -1) / math.sqrt(model.cross.head_dim)).cpu()  # (H, 2, N)


torch.testing.assert_close(torch.softmax(cross_scores(0), dim=-1), test_weights[0], atol=1e-5, rtol=1e-5)


def explore_head(ax, scene=0, head=0, word=0, temperature=1.0):
    weights = torch.softmax(cross_scores(scene)[head, word] / temperature, dim=-1)  # (N,)
    name = WORDS[test_words[scene, word]]
    overlay(ax, scene, weights, f'head {head}, "{name}", $\\tau$ = {temperature:g}\nlargest weight {weights.max():.2f}')


settings = [(0, 0, 1.0), (1, 0, 1.0), (0, 1, 1.0), (1, 1, 1.0), (0, 0, 0.25), (0, 0, 4.0)]  # (head, word, tau)
scene = 1
fig, axes = plt.subplots(1, len(settings), figsize=(2.3 * len(settings), 3.1))
for ax, (head, word, tau) in zip(axes, settings, strict=True):
    explore_head(ax, scene, head, word, tau)
fig.suptitle(f"Test scene {scene}: each head and word at the trained temperature, then a sharper and a flatter softmax (static overview)")
plt.show()

# %% [markdown]
# The explorer itself: one figure, redrawn when you let go of a control.

# %%
import ipywidgets as widgets

from mmcourse.widgets import explore


def draw_scene_head(fig, scene, head, word, temperature):
    explore_head(fig.subplots(), scene, head, word, temperature)


explore(
    draw_scene_head,
    figsize=(3.6, 3.9),
    scene=widgets.IntSlider(value=scene, min=0, max=len(test_words) - 1, description="scene"),
    head=widgets.IntSlider(value=0, min=0, max=model.cross.num_heads - 1, description="head"),
    word=widgets.Dropdown(options=[("colour word", 0), ("shape word", 1)], value=0, description="query"),
    temperature=widgets.FloatLogSlider(value=1.0, base=10, min=-1, max=1, step=0.05, description="tau"),
);

# %% [markdown]
# ## 7. The cost: quadratic in the sequence length
#
# $QK^\top$ compares every query with every key: for $L$ queries and $S = L$ keys that is
# $L^2$ scores per head, each costing $d_k$ multiply-adds, and the reference path stores
# the whole $L \times L$ matrix (several times: scores, masked scores, weights). A
# $224 \times 224$ image in $16 \times 16$ patches is 196 tokens; at $4 \times 4$ patches it
# would be 3,136; a minute of audio frames at 10 ms is 6,000. Attention's cost grows as the
# **square** of these numbers.
#
# A **fused kernel** (融合算子) such as FlashAttention computes the same result in blocks:
# it streams over the keys, keeping a running maximum and sum for the softmax, and never
# stores the $L \times L$ matrix. Its arithmetic is still $O(L^2)$, but its memory is
# $O(L)$. `F.scaled_dot_product_attention` picks such a kernel when it can. We time both
# paths (B = 1, 4 heads of width 32; forward, no gradient) and measure the peak memory of
# the tensors they create:

# %%
lengths = [2**p for p in range(6, int(math.log2(max_length)) + 1)]
rows = []
for L in tqdm(lengths, desc="timing", mininterval=2):
    q, k, v = (torch.randn(1, 4, L, 32, generator=g).to(device) for _ in range(3))  # (B, H, L, d_k)
    reference = partial(scaled_dot_product_attention, q, k, v)
    fused = partial(fused_attention, q, k, v)
    with torch.no_grad():
        t = time_candidates({"reference": reference, "fused": fused}, repeats=cost_repeats, min_block_s=0.01)
        mem = {"reference": peak_memory_bytes(reference, device=device), "fused": peak_memory_bytes(fused, device=device)}
        same = (reference()[0] - fused()).abs().max().item()
    rows.append({"L": L, "ref_ms": t["reference"] * 1e3, "fused_ms": t["fused"] * 1e3,
                 "ref_MB": mem["reference"] / 2**20, "fused_MB": mem["fused"] / 2**20, "max_diff": same})
print(f"{'L':>6} {'reference ms':>13} {'fused ms':>9} {'speed-up':>9} {'reference MB':>13} {'fused MB':>9} {'max |diff|':>11}")
for r in rows:
    print(f"{r['L']:>6} {r['ref_ms']:>13.2f} {r['fused_ms']:>9.2f} {r['ref_ms'] / r['fused_ms']:>8.1f}x "
          f"{r['ref_MB']:>13.2f} {r['fused_MB']:>9.2f} {r['max_diff']:>11.1e}")

# %%
Ls = np.array([r["L"] for r in rows])
fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
for ax, key, unit in [(axes[0], "ms", "time per call (ms)"), (axes[1], "MB", "peak memory of created tensors (MB)")]:
    ref = np.array([r[f"ref_{key}"] for r in rows])
    fus = np.array([r[f"fused_{key}"] for r in rows])
    ax.plot(Ls, ref, "o-", label="reference (stores L x L)")
    ax.plot(Ls, fus, "s-", label="fused kernel")
    ax.plot(Ls, ref[-1] * (Ls / Ls[-1]) ** 2, "k:", lw=1, label=r"$\propto L^2$")
    if key == "MB":
        ax.plot(Ls, fus[-1] * (Ls / Ls[-1]), "k--", lw=0.8, label=r"$\propto L$")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set(xlabel="sequence length L", ylabel=unit)
    ax.legend(fontsize=7)
axes[0].set_title(f"Time (median of {cost_repeats}, {device.type})")
axes[1].set_title("Memory")
plt.show()
speedup = rows[-1]["ref_ms"] / rows[-1]["fused_ms"]
saving = rows[-1]["ref_MB"] / rows[-1]["fused_MB"]
print(f"at L = {rows[-1]['L']}: the fused kernel is {speedup:.1f}x faster and needs {saving:.0f}x less memory")
mmcourse.record("fused_vs_reference_max_abs_diff", max(r["max_diff"] for r in rows), at_most=1e-5)
mmcourse.record("fused_memory_saving_at_max_length", saving, at_least=4)
mmcourse.record("fused_speedup_at_max_length", speedup)

# %% [markdown]
# The reference path's memory follows $L^2$; the fused kernel's follows $L$ (its output),
# and both give the same numbers. Time grows as $L^2$ for both once the work dominates
# the fixed overheads; the fused kernel is faster at every length here (the ratio wanders from run to
# run on a CPU; see the speed-up column), because it does not write and re-read the score matrix. On a CPU these times wander with the machine's
# load; `python -m mmcourse.bench attention` runs a more careful comparison, including
# the full `MultiHeadAttention` against `nn.MultiheadAttention`.
#
# > **Common pitfall: "flash attention makes attention linear."** It makes the *memory*
# > linear in $L$; the arithmetic stays quadratic. Really sub-quadratic attention changes
# > the model (local windows, fewer keys, linearised kernels), not just the kernel.
#
# ## Summary
#
# * **Attention** is a soft lookup: $\operatorname{softmax}(QK^\top/\sqrt{d_k})V$ - each
#   query takes a weighted average of the values, weighted by query-key dot products.
# * **$\sqrt{d_k}$**: dot products of random vectors have variance $d_k$; unscaled, a wide
#   head saturates the softmax and its gradient vanishes (measured above).
# * **Masks** add $-\infty$ to forbidden scores: padding, causal, and modality block masks
#   for mixed image + text sequences. Know your convention: `True` = attend
#   (`F.scaled_dot_product_attention`) or `True` = ignore (`nn.MultiheadAttention`). An
#   all-masked row gives zeros here, not NaN.
# * **Multi-head attention** concatenates *heads*, each with its own $W^Q_i, W^K_i, W^V_i$ -
#   not the outputs of positions, as the source's formula reads.
# * **Cross-attention** lets one modality's tokens read another's: a few seconds of
#   training make caption words attend to the patches of the object they name.
# * The cost is **quadratic** in the sequence length; fused kernels remove the $L^2$
#   memory, not the $L^2$ arithmetic.
#
# Chapter 03 gives attention a sense of order (it has none: permute the keys and values
# together and nothing changes), and chapter 04 stacks attention into transformer
# encoders.
#
# ## Exercises
#
# Replace each `raise NotImplementedError` (or `...`) with your answer and run the cell;
# `check()` tells you what is right or wrong. `hint()` and `solution()` help if you are
# stuck.

# %%
from mmcourse.exercises.ch02 import q1, q2, q3, q4


# Exercise 1: masked scaled dot-product attention. q (B, L, d_k), k (B, S, d_k), v (B, S, d_v),
# mask (B, L, S) boolean with True = may attend. Return the output (B, L, d_v).
def my_attention(q, k, v, mask):
    raise NotImplementedError  # your code here


q1.check(my_attention)


# %%
# Exercise 2: the causal mask for L tokens, (L, L) boolean, True = may attend.
def my_causal_mask(L):
    raise NotImplementedError  # your code here


q2.check(my_causal_mask)


# %%
# Exercise 3: split x (B, N, D) into num_heads heads, (B, H, N, D / H), the layout of nn.MultiheadAttention.
def my_split_heads(x, num_heads):
    raise NotImplementedError  # your code here


q3.check(my_split_heads)

# %%
# Exercise 4: q and k have d_k = 64 independent components of mean 0 and variance 1.
# What is the variance of their dot product q . k?
variance = ...  # your answer, a number
q4.check(variance)

# %%
# q1.hint(); q1.solution()
