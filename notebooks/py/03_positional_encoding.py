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
# # 03 · Positional encoding
#
# "The dog bites the man" and "the man bites the dog" contain the same words. Only their
# **order** tells them apart - and the attention of chapter 02, on its own, cannot see
# order at all. The source article says it in one line (002 §4.3): the Transformer has no
# built-in mechanism that captures the order of a sequence, so we add a
# **positional encoding** (位置编码) to every position.
#
# This chapter first shows *exactly* what attention misses, then the three ways to put
# order back in, each implemented, checked and plotted:
#
# 1. **add** a vector per position: the fixed sinusoidal table of the original
#    Transformer (002 §4.3), or a learned table (BERT, GPT-2, ViT);
# 2. **rotate** queries and keys by their position: RoPE (Llama and most current LLMs);
# 3. for images, encode the **row and column** of every patch (MAE).
#
# A multimodal sequence also has to say which tokens are image and which are text: the
# **modality markers** of 002 §4.1 and modality embeddings. The chapter ends with an
# experiment: a small transformer on a task that is *only* about order, trained with each
# kind of position, and tested on sequences longer than any it saw in training.

# %% tags=["parameters"]
# Parameters: papermill and `mmcourse run 03 -p name value` can change these.
seed = 0  # random seed for every generator
device = "auto"  # "auto" picks cuda, then mps, then cpu
d_model = 64  # d_model: width of the encodings in the figures (divisible by 4)
num_positions = 100  # positions shown in the figures
base = 10000.0  # the constant 10000 of the sinusoidal and rotary formulas
grid_size = 14  # patches per side in the 2-D figures (ViT-B/16 at 224 x 224 pixels: 14)
train_length = 16  # N: sequence length in training
test_length = 32  # longer sequences, never seen in training, for the length test
model_dim = 32  # D: width of the experiment's transformer (full: 128 on a GPU)
num_heads = 4  # H: attention heads; the head width D / H must be even (RoPE pairs)
num_layers = 1  # transformer blocks (full: 4)
train_steps = 300  # training steps per model (full: 3000 on a GPU)
batch_size = 64  # sequences per training step (full: 256)
lr = 3e-3  # AdamW learning rate
eval_sequences = 4000  # test sequences per length

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import mmcourse
from mmcourse import utils
from mmcourse.plotting import setup_notebook

utils.positive_int(d_model=d_model, num_positions=num_positions, grid_size=grid_size)
utils.positive_int(train_length=train_length, test_length=test_length, model_dim=model_dim)
utils.positive_int(num_heads=num_heads, num_layers=num_layers, train_steps=train_steps)
utils.positive_int(batch_size=batch_size, eval_sequences=eval_sequences)
utils.positive_float(base=base, lr=lr)
if d_model % 4:
    raise ValueError(f"d_model must be divisible by 4 (the 2-D encoding has 4 blocks), got {d_model}")
if train_length < 2 or test_length < train_length:
    raise ValueError(f"need 2 <= train_length <= test_length, got {train_length} and {test_length}")
if model_dim % num_heads or (model_dim // num_heads) % 2:
    raise ValueError(f"model_dim / num_heads must be an even integer, got {model_dim} / {num_heads}")
mmcourse.seed_everything(seed)
device = mmcourse.get_device(device)
if device.type == "cpu":
    # The models here are tiny: on a CPU one thread beats several that wait on each other.
    torch.set_num_threads(1)
setup_notebook()
print("computing on", device)

# %% [markdown]
# ## 1. Attention cannot see order
#
# Self-attention over the rows of $X \in \mathbb{R}^{L \times d}$ (one row per token) is
#
# $$\mathrm{Attn}(X) = \mathrm{softmax}\!\Big(\frac{(XW^Q)(XW^K)^\top}{\sqrt{d_k}}\Big)\,XW^V .$$
#
# Shuffle the tokens with a permutation matrix $P$. Every term is computed row by row or
# pair by pair, so the output is shuffled the same way and nothing else changes:
#
# $$\mathrm{Attn}(PX) = P\,\mathrm{Attn}(X).$$
#
# Attention is **permutation equivariant** (置换等变). Any readout that does not look at
# positions, such as the mean over tokens, is then **permutation invariant** (置换不变): the
# same for every order. We check it on "dog bites man" and "man bites dog":

# %%
words = ["dog", "bites", "man"]
vocab = {w: k for k, w in enumerate(words)}
embed = nn.Embedding(len(vocab), 8)
W_Q, W_K, W_V = (torch.randn(8, 8) for _ in range(3))


def attention(X):
    """softmax(X W_Q (X W_K)^T / sqrt(d_k)) X W_V for X of shape (L, d)."""
    return F.scaled_dot_product_attention(X @ W_Q, X @ W_K, X @ W_V)


with torch.no_grad():
    X1 = embed(torch.tensor([vocab[w] for w in ["dog", "bites", "man"]]))  # (3, 8)
    X2 = embed(torch.tensor([vocab[w] for w in ["man", "bites", "dog"]]))  # the same rows, permuted
    perm = torch.tensor([2, 1, 0])  # X2 = P X1
    out1, out2 = attention(X1), attention(X2)
print("Attn(PX) == P Attn(X):", torch.allclose(out2, out1[perm], atol=1e-6))
print("mean over tokens equal for both sentences:", torch.allclose(out1.mean(0), out2.mean(0), atol=1e-6))
print(f"largest difference of the means: {(out1.mean(0) - out2.mean(0)).abs().max():.1e}")

# %% [markdown]
# The two sentences are indistinguishable: each word's output is the same in both, only
# listed in another order. Stacking more layers does not help - a composition of
# permutation-equivariant maps is permutation equivariant. The model has to be *told*
# where each token is.
#
# ## 2. The sinusoidal encoding
#
# The source gives the **sinusoidal positional encoding** (正弦位置编码) of the original
# Transformer (002 §4.3), for position $i$ and model width $d_\text{model}$:
#
# $$\mathrm{PE}(i, 2j) = \sin\!\Big(\frac{i}{10000^{2j/d_\text{model}}}\Big), \qquad
#   \mathrm{PE}(i, 2j+1) = \cos\!\Big(\frac{i}{10000^{2j/d_\text{model}}}\Big),$$
#
# added to the input, $X' = X + \mathrm{PE}$. (The Transformer paper also scales the token
# embeddings by $\sqrt{d_\text{model}}$ before the sum, so that neither part drowns the
# other.)
#
# > **Common pitfall: $j$ is not the dimension index.** The source says "$j$ is the
# > dimension index". It is the index of a sin/cos **pair**: $j = 0, \dots, d_\text{model}/2 - 1$,
# > and the two dimensions $2j$ and $2j+1$ share one frequency
# > $\omega_j = 1/10000^{2j/d_\text{model}}$. Read as a dimension index
# > ($j = 0, \dots, d_\text{model}-1$), the formula writes past the end of the vector and
# > the exponent climbs to 2; code that uses the dimension index $k$ in the exponent
# > ($10000^{k/d_\text{model}}$) gives the sine and the cosine of a pair different
# > frequencies, and code with $j/d_\text{model}$ instead of $2j/d_\text{model}$ makes the
# > frequencies fall twice as fast. Exercise 1's checker catches all three.
#
# In code, `i` holds the positions, `j` the pair indices, `d_model` the width:

# %%
i = torch.arange(num_positions, dtype=torch.float64)[:, None]  # (N, 1) positions
j = torch.arange(d_model // 2, dtype=torch.float64)[None, :]  # (1, d/2) pair indices
omega = 1.0 / base ** (2 * j / d_model)  # (1, d/2) frequencies omega_j
PE = torch.zeros(num_positions, d_model, dtype=torch.float64)
PE[:, 0::2] = torch.sin(i * omega)  # PE(i, 2j)
PE[:, 1::2] = torch.cos(i * omega)  # PE(i, 2j+1)
PE = PE.float()

from mmcourse.positional import sinusoidal_encoding

assert PE.shape == (num_positions, d_model)
torch.testing.assert_close(PE, sinusoidal_encoding(num_positions, d_model, base=base))
print(f"PE: {tuple(PE.shape)}, equal to mmcourse.positional.sinusoidal_encoding")
print("row i = 0 is (sin 0, cos 0, ...) =", PE[0, :6].tolist(), "...")

# %% [markdown]
# Pair $j$ is a sine wave of wavelength $\lambda_j = 2\pi / \omega_j = 2\pi \cdot
# 10000^{2j/d_\text{model}}$: a geometric ladder from $2\pi$ positions (the first pair
# turns by one radian per position) to $2\pi \cdot 10000^{1 - 2/d_\text{model}}$ for the
# last pair, $j = d_\text{model}/2 - 1$. The exponent never reaches 1, so the longest
# wavelength stays below $2\pi \cdot 10000 \approx 62{,}832$ and approaches it only as
# $d_\text{model}$ grows: with the default $d_\text{model} = 64$ it is $2\pi \cdot 10000^{31/32}
# \approx 2\pi \cdot 7{,}499$, the value printed below. Fast pairs tell
# neighbours apart, slow pairs tell far-apart regions apart - like the hands of a clock.

# %%
wavelengths = 2 * np.pi / omega.ravel().numpy()
print(f"wavelengths: shortest {wavelengths[0]:.2f} positions (j = 0), longest "
      f"{wavelengths[-1]:,.0f} positions (j = {d_model // 2 - 1})")

fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
im = axes[0].imshow(PE.T, aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1, origin="lower", interpolation="nearest")
axes[0].set(title=r"PE$(i, k)$", xlabel="position $i$", ylabel="dimension $k$")
fig.colorbar(im, ax=axes[0])
for k in [d_model // 16, d_model // 4, d_model // 4 + 1, d_model // 2]:  # for d_model = 64: 4, 16, 17, 32
    kind, jk = ("sin" if k % 2 == 0 else "cos"), k // 2
    axes[1].plot(PE[:, k], lw=1.2, label=f"k = {k}: {kind}, j = {jk}, wavelength {wavelengths[jk]:.0f}")
axes[1].set(title="a few dimensions along the positions", xlabel="position $i$", ylabel="value")
axes[1].legend(fontsize=7, loc="lower left")
axes[2].semilogy(np.arange(d_model // 2), wavelengths, "o-", ms=3)
axes[2].set(title=r"wavelength $\lambda_j = 2\pi\, 10000^{2j/d}$", xlabel="pair index $j$",
            ylabel="wavelength (positions, log scale)")
plt.show()

# %% [markdown]
# ## 3. Relative positions: PE(i + k) is a rotation of PE(i)
#
# Why sines and cosines? Because of the angle-addition formulas. For one pair with
# frequency $\omega$ and a shift of $k$ positions (the **relative position** (相对位置)):
#
# $$\begin{pmatrix}\sin((i+k)\omega)\\ \cos((i+k)\omega)\end{pmatrix}
#   = \underbrace{\begin{pmatrix}\cos k\omega & \sin k\omega\\ -\sin k\omega & \cos k\omega\end{pmatrix}}_{\text{rotation by } k\omega}
#   \begin{pmatrix}\sin i\omega\\ \cos i\omega\end{pmatrix}.$$
#
# Stacking the $d_\text{model}/2$ pairs, $\mathrm{PE}(i+k) = M_k\,\mathrm{PE}(i)$ with
# $M_k$ block-diagonal - and $M_k$ does **not** depend on $i$. A linear layer (like
# $W^Q$, $W^K$) can therefore express "$k$ positions further" the same way everywhere in
# the sequence. We build $M_k$ and check it on every position:

# %%
k = 5
blocks = []
for w in omega.ravel():
    c, s = torch.cos(k * w), torch.sin(k * w)
    blocks.append(torch.tensor([[c, s], [-s, c]]))
M_k = torch.block_diag(*blocks).float()  # (d, d)

from mmcourse.positional import sinusoidal_shift_matrix

torch.testing.assert_close(M_k, sinusoidal_shift_matrix(k, d_model, base=base))
shifted = PE[:-k] @ M_k.T  # row i: M_k PE(i)
error = (shifted - PE[k:]).abs().max().item()
print(f"max |M_k PE(i) - PE(i + k)| over all {num_positions - k} positions i, k = {k}: {error:.1e}")
print("M_k is orthogonal (a rotation):", torch.allclose(M_k @ M_k.T, torch.eye(d_model), atol=1e-5))
assert error < 1e-4

# %% [markdown]
# A consequence: the dot product of two encodings depends only on their distance,
#
# $$\mathrm{PE}(i)\cdot\mathrm{PE}(i+k) = \sum_j \big[\sin i\omega_j \sin (i+k)\omega_j
#   + \cos i\omega_j \cos (i+k)\omega_j\big] = \sum_j \cos k\omega_j ,$$
#
# the same for every $i$, largest at $k = 0$ and falling (with ripples) as $|k|$ grows.
# It is also **symmetric**: $k$ and $-k$ give the same value, so the dot product alone
# cannot say whether a token is before or after another. The matrix $\mathrm{PE}\,\mathrm{PE}^\top$
# is constant along its diagonals:

# %%
gram = PE @ PE.T  # (N, N)
K = num_positions // 3  # offsets shown: -K .. K
offsets = np.arange(-K, K + 1)
fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), gridspec_kw={"width_ratios": [1.7, 1]})
for start, width in zip([K, num_positions // 2, num_positions - 1 - K], [5, 3, 1.2], strict=True):
    axes[0].plot(offsets, [gram[start, start + o].item() for o in offsets], lw=width, alpha=0.7, label=f"i = {start}")
axes[0].plot(offsets, [np.cos(o * omega.ravel().numpy()).sum() for o in offsets], "k:", lw=1,
             label=r"$\sum_j \cos k\omega_j$")
axes[0].set(title=r"PE$(i)\cdot$PE$(i+k)$: the same curve for every $i$",
            xlabel="offset $k$", ylabel="dot product")
axes[0].legend(fontsize=7)
im = axes[1].imshow(gram, cmap="viridis")
axes[1].set(title=r"PE PE$^\top$: constant along diagonals", xlabel="position", ylabel="position")
fig.colorbar(im, ax=axes[1])
plt.show()
spread = max(np.ptp([gram[s, s + o].item() for s in range(num_positions - K)]) for o in range(K))
print(f"largest spread of PE(i)·PE(i+k) over all i, for any k in 0..{K - 1}: {spread:.1e}")

# %% [markdown]
# ## 4. Learned positions
#
# BERT, GPT-2 and ViT do not use a formula: they learn a table $E^\text{pos} \in
# \mathbb{R}^{N_\text{max} \times D}$, one row per position, and add row $i$ to token $i$ - a
# **learned positional embedding** (可学习位置嵌入). Training decides what the rows mean.
# Two costs: $N_\text{max} \cdot D$ parameters, and no row at all for positions past
# $N_\text{max}$ (rows that training never reached stay random).

# %%
from mmcourse.positional import LearnedPositionalEmbedding

table = LearnedPositionalEmbedding(num_positions=train_length, dim=model_dim)
x = torch.zeros(2, train_length, model_dim)  # (B, N, D)
print("learned table:", tuple(table.weight.shape), "=", table.weight.numel(), "parameters;",
      "output", tuple(table(x).shape))
try:
    table(torch.zeros(2, test_length, model_dim))
except ValueError as err:
    print("a longer sequence:", err)

# %% [markdown]
# ## 5. Rotary position embedding (RoPE)
#
# The **rotary position embedding** (旋转位置编码, Su et al. 2021) puts position where
# attention uses it: in the query-key product. Instead of adding a vector, it *rotates*
# each pair of channels of a query or key at position $m$ by the angle $m\theta_j$, with the
# same frequencies as before, $\theta_j = 10000^{-2j/d}$ ($d$ is the head width $D_h$):
#
# $$\tilde q_m = R_m q_m,\quad \tilde k_n = R_n k_n \quad\Longrightarrow\quad
#   \tilde q_m^\top \tilde k_n = q_m^\top R_m^\top R_n k_n = q_m^\top R_{n-m}\, k_n .$$
#
# The attention score sees only the **offset** $n - m$, with its sign, and the vectors
# keep their length. Nothing is added to the token embeddings and there are no parameters.
#
# Llama's code (and `transformers`) pairs channel $j$ with channel $j + d/2$, so the
# rotation of all pairs at once is
#
# $$R_m x = x \odot \cos(m\theta) + \mathrm{rotate\_half}(x) \odot \sin(m\theta), \qquad
#   \mathrm{rotate\_half}(x_1, x_2) = (-x_2, x_1),$$
#
# where $x_1, x_2$ are the two halves of $x$ and $\cos(m\theta)$, $\sin(m\theta)$ repeat
# the $d/2$ angles twice. In code, `m` holds positions, `theta` the frequencies:

# %%
Dh = model_dim // num_heads  # head width d
L = 12
m = torch.arange(L, dtype=torch.float64)[:, None]  # (L, 1) positions
theta = base ** (-torch.arange(0, Dh, 2, dtype=torch.float64) / Dh)  # (d/2,)
angles = torch.cat([m * theta, m * theta], dim=-1)  # (L, d): pair (j, j + d/2)
cos, sin = angles.cos().float(), angles.sin().float()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


q = torch.randn(2, num_heads, L, Dh)  # (B, H, L, d)
k_ = torch.randn(2, num_heads, L, Dh)  # the keys k (k_, as k still holds the shift of section 3)
q_rot = q * cos + rotate_half(q) * sin
k_rot = k_ * cos + rotate_half(k_) * sin

from mmcourse.positional import apply_rotary, rope_cos_sin

cos_pkg, sin_pkg = rope_cos_sin(L, Dh, base)
torch.testing.assert_close(q_rot, apply_rotary(q, cos_pkg, sin_pkg))
print(f"q {tuple(q.shape)} rotated; equal to mmcourse.positional.apply_rotary;",
      "norms kept:", torch.allclose(q_rot.norm(dim=-1), q.norm(dim=-1), atol=1e-5))

# %% [markdown]
# The trusted reference is `transformers`' own Llama code: `LlamaRotaryEmbedding` makes
# the cos/sin tables from a config, `apply_rotary_pos_emb` rotates queries and keys.

# %%
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

config = LlamaConfig(hidden_size=model_dim, num_attention_heads=num_heads, num_key_value_heads=num_heads,
                     intermediate_size=4 * model_dim, num_hidden_layers=1, vocab_size=16,
                     rope_parameters={"rope_type": "default", "rope_theta": base})
rotary = LlamaRotaryEmbedding(config)
cos_hf, sin_hf = rotary(q, torch.arange(L)[None].expand(2, L))  # each (B, L, d)
q_hf, k_hf = apply_rotary_pos_emb(q, k_, cos_hf, sin_hf)
torch.testing.assert_close(q_rot, q_hf, atol=1e-5, rtol=1e-5)
torch.testing.assert_close(k_rot, k_hf, atol=1e-5, rtol=1e-5)
print("our RoPE equals transformers' Llama RoPE for queries and keys")

# %% [markdown]
# Now the property that matters: put one query vector at position $m$ and one key vector at
# position $n$, then move both by the same $s$. The score does not change:

# %%
d_head = d_model  # a wider head than the model's, for a smoother picture
cos_long, sin_long = rope_cos_sin(num_positions, d_head, base)
q_vec, k_vec = torch.randn(d_head), torch.randn(d_head)
q_at = apply_rotary(q_vec.expand(num_positions, d_head), cos_long, sin_long)  # q at every position
k_at = apply_rotary(k_vec.expand(num_positions, d_head), cos_long, sin_long)  # k at every position
scores = q_at @ k_at.T  # (N, N): q at m, k at n
for m0, n0, s in [(3, 10, 0), (3, 10, 50), (20, 5, 0), (20, 5, 70)]:
    print(f"q at {m0 + s:>2}, k at {n0 + s:>2} (offset {n0 - m0:+d}): score {scores[m0 + s, n0 + s]:+.4f}")
rows = torch.arange(num_positions - 20)
print("score depends only on n - m:", all(
    torch.allclose(scores[rows, rows + o], scores[0, o].expand(len(rows)), atol=1e-4) for o in range(20)))

shown = min(num_positions, 48)
lim = scores.abs().max().item()
fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), gridspec_kw={"width_ratios": [1, 1.5]})
im = axes[0].imshow(scores[:shown, :shown], cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
axes[0].set(title=rf"RoPE score $\tilde q_m \cdot \tilde k_n$ (one q, one k, $d$ = {d_head})",
            xlabel="key position $n$", ylabel="query position $m$")
fig.colorbar(im, ax=axes[0])
K = num_positions // 3
off = np.arange(-K, K + 1)
axes[1].plot(off, [scores[K, K + o].item() for o in off], lw=1.2)
axes[1].axvline(0, color="grey", lw=0.5)
axes[1].set(title="score against the offset n - m: not symmetric, so before and after differ",
            xlabel="offset $n - m$", ylabel="score")
plt.show()

# %% [markdown]
# > **Common pitfall: two RoPE layouts.** The RoPE paper (and Meta's original Llama code,
# > with complex numbers) rotates *neighbouring* channels $(2j, 2j+1)$; `transformers`
# > rotates $(j, j + d/2)$. Both are correct and give the same scores after permuting the
# > channels of $W^Q$ and $W^K$ - which is what `transformers`' Llama conversion script does
# > to the weights. Mixing layouts (weights of one, code of the other) raises no error: it
# > silently rotates the wrong channels and the model degrades. The check below shows
# > that the two layouts differ exactly by that permutation.

# %%
half = Dh // 2
interleave = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).ravel()  # 0, d/2, 1, ...
x = torch.randn(L, Dh)
x_il = x[:, interleave]  # the same vector in the interleaved layout
c, s = cos[:, :half], sin[:, :half]
rot_il = torch.stack([x_il[:, 0::2] * c - x_il[:, 1::2] * s, x_il[:, 0::2] * s + x_il[:, 1::2] * c], -1).flatten(1)
torch.testing.assert_close(rot_il, apply_rotary(x, cos, sin)[:, interleave])
print("interleaved RoPE == half-split RoPE up to the channel permutation", interleave.tolist())

# %% [markdown]
# ### Learned, sinusoidal, RoPE: where position enters
#
# | | sinusoidal | learned | RoPE |
# |---|---|---|---|
# | where | added to the input | added to the input | rotates q and k in every attention layer |
# | parameters | none | $N_\text{max} \cdot D$ | none |
# | longest sequence | any (unseen positions are new vectors) | $N_\text{max}$ | any (unseen *offsets* are new angles) |
# | what a score sees | absolute positions, relative ones through $M_k$ | whatever training made of it | the offset $n - m$ only |
# | used by | original Transformer | BERT, GPT-2, ViT, CLIP | Llama, Qwen, Mistral, most LLMs today |
#
# The experiment in section 8 measures what these differences do.
#
# ## 6. Two dimensions: positions of image patches
#
# An image of $h \times w$ patches (chapter 01) is read as a sequence in row-major order,
# but its neighbours are above and below as well as left and right. The **2-D sin-cos
# encoding** (二维正弦余弦位置编码) of MAE (He et al. 2022) gives half of the $D$ channels to
# the column $c$ and half to the row $r$, each half a 1-D sin-cos encoding of width $D/2$:
#
# $$\mathrm{PE}(r, c) = \big[\,\mathrm{PE}_{1D}(c)\;;\;\mathrm{PE}_{1D}(r)\,\big],\qquad
#   \mathrm{PE}_{1D}(p) = \big[\sin(p\,\omega_0), \dots, \sin(p\,\omega_{D/4-1}),\;
#   \cos(p\,\omega_0), \dots, \cos(p\,\omega_{D/4-1})\big],$$
#
# with $\omega_t = 10000^{-t/(D/4)}$. Note two layout details that differ from section 2:
# MAE puts all sines first and then all cosines (a permutation of the channels, equally
# good), and the column comes first.
#
# > **Common pitfall: MAE's `emb_h` holds the column.** In MAE's `get_2d_sincos_pos_embed`,
# > `grid = np.meshgrid(grid_w, grid_h)` puts $w$ first, so `grid[0]` is the column index,
# > and the half named `emb_h` encodes the column. Rewrite it "by the names" and you swap
# > the two halves: fine for a model trained from scratch, wrong for MAE's (or DiT's, which
# > copies the function) pretrained weights. We check the layout below; the tests compare
# > with a copy of MAE's numpy code.

# %%
# NBVAL_CHECK_OUTPUT
rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
rows, cols = rows.reshape(-1), cols.reshape(-1)  # (h*w,) row-major: token t = r * w + c
t = torch.arange(d_model // 4, dtype=torch.float64)
omega_2d = base ** (-t / (d_model // 4))  # (D/4,)


def pe_1d_blocks(p):
    angle = p.double()[:, None] * omega_2d  # (M, D/4)
    return torch.cat([angle.sin(), angle.cos()], dim=1)  # (M, D/2): sines, then cosines


PE_2d = torch.cat([pe_1d_blocks(cols), pe_1d_blocks(rows)], dim=1).float()  # (h*w, D)

from mmcourse.positional import sincos_2d_encoding

torch.testing.assert_close(PE_2d, sincos_2d_encoding(grid_size, grid_size, d_model, base=base))
grid = PE_2d.reshape(grid_size, grid_size, d_model)  # (h, w, D)
print(f"PE_2d {tuple(PE_2d.shape)} equals mmcourse.positional.sincos_2d_encoding")
print("first half constant down each column:", bool((grid[:, :, : d_model // 2] == grid[:1, :, : d_model // 2]).all()),
      "| second half constant along each row:", bool((grid[:, :, d_model // 2:] == grid[:, :1, d_model // 2:]).all()))

# %%
Q = d_model // 4
channels = [(0, "column, sin, t=0"), (2, "column, sin, t=2"), (Q + 4, "column, cos, t=4"),
            (2 * Q + 0, "row, sin, t=0"), (2 * Q + 2, "row, sin, t=2"), (3 * Q + 4, "row, cos, t=4")]
fig, axes = plt.subplots(2, 6, figsize=(14, 5.2))
for ax, (ch, name) in zip(axes[0], channels, strict=True):
    ax.imshow(grid[:, :, ch], cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_title(f"channel {ch}\n{name}", fontsize=8)
    ax.set(xlabel="column", ylabel="row")
cos_sim = F.normalize(PE_2d, dim=-1) @ F.normalize(PE_2d, dim=-1).T  # (h*w, h*w)
picks = [(0, 0), (3, 10), (grid_size // 2, grid_size // 2), (grid_size - 1, 2), (10, grid_size - 1), (grid_size - 1, grid_size - 1)]
for ax, (r, c) in zip(axes[1], picks, strict=True):
    r, c = min(r, grid_size - 1), min(c, grid_size - 1)
    ax.imshow(cos_sim[r * grid_size + c].reshape(grid_size, grid_size), cmap="viridis", vmin=0, vmax=1)
    ax.plot(c, r, "r+", ms=10)
    ax.set_title(f"similarity to patch (row {r}, col {c})", fontsize=8)
    ax.set(xlabel="column", ylabel="row")
fig.suptitle(f"2-D sin-cos encoding of a {grid_size} x {grid_size} patch grid, D = {d_model}: "
             "channels (top) and cosine similarity of one patch's encoding to all others (bottom)")
plt.show()

# %% [markdown]
# Each channel varies along one axis only, at its own frequency; together they make every
# patch most similar to itself and to patches near it in **both** directions - the same
# picture the ViT paper found in its *learned* 2-D-aware embeddings.
#
# ## 7. Modalities in one sequence: markers and modality embeddings
#
# The source's input representation (002 §4.1) encodes each of $M$ modalities to a
# sequence $X^{(m)} = [x^{(m)}_1, \dots, x^{(m)}_{L_m}]$, concatenates them,
# $X = [X^{(1)}; X^{(2)}; \dots; X^{(M)}]$, and adds a special **modality marker** (模态标记) $m_k$
# "to indicate where the $k$-th modality starts".
#
# > **Common pitfall: one marker per segment.** The source places the marker "at the
# > beginning of the sequence". A single marker in front of everything cannot say where
# > the second modality starts: each segment gets its own marker,
# > $X = [m_1; X^{(1)}; m_2; X^{(2)}; \dots]$, like the `<image>` tokens of multimodal LLMs.
#
# Markers only mark the boundaries. Most models also add a learned **modality embedding**
# (模态嵌入) to *every* token, one vector per modality (BERT's segment embedding, ViLT's
# modality-type embedding), so that each token carries its modality wherever it is; and
# each segment keeps its own positions - 2-D for patches, 1-D for words. We build such a
# sequence from a Shapes-world scene and its caption:

# %%
from mmcourse.data.shapes import ShapesConfig, shapes_tensors
from mmcourse.modalities import patchify
from mmcourse.positional import ModalityEmbedding, concat_modalities

scene = shapes_tensors(1, split="train", config=ShapesConfig(seed=seed))
image, caption = scene["images"], scene["canonical_caption"][0]  # (1, 3, 32, 32), a string
P = 8  # patch size: a 4 x 4 grid of patches
caption_words = caption.split()
text_vocab = {w: n for n, w in enumerate(sorted(set(caption_words)))}
D = d_model
patch_embed = nn.Linear(3 * P * P, D)  # untrained towers: only the layout matters here
word_embed = nn.Embedding(len(text_vocab), D)
markers = nn.Parameter(0.02 * torch.randn(2, D))  # m_image, m_text
types = ModalityEmbedding(num_modalities=2, dim=D)  # modality 0 = image, 1 = text

with torch.no_grad():
    patches = patchify(image, P)  # (1, 16, 3 P P)
    gh = image.shape[-1] // P
    x_image = patch_embed(patches) + sincos_2d_encoding(gh, gh, D)  # (1, 16, D): 2-D positions
    ids = torch.tensor([[text_vocab[w] for w in caption_words]])  # (1, L_text)
    x_text = word_embed(ids) + sinusoidal_encoding(len(caption_words), D)  # (1, L_text, D): 1-D
    x, modality_ids = concat_modalities([x_image, x_text], markers=markers)  # (1, N, D), (N,)
    x = types(x, modality_ids)  # + modality embedding on every token
token_names = ["<image>"] + [f"({r},{c})" for r in range(gh) for c in range(gh)] + ["<text>"] + caption_words
print(f"caption: {caption!r}")
print(f"sequence: {len(token_names)} tokens = 1 marker + {gh * gh} patches + 1 marker + {len(caption_words)} words; "
      f"x {tuple(x.shape)}")
print("modality ids:", modality_ids.tolist())

# %%
fig = plt.figure(figsize=(14, 3.4))
ax = fig.add_subplot(1, 5, 1)
ax.imshow(image[0].permute(1, 2, 0).numpy())
for n in range(1, gh):
    ax.axhline(n * P - 0.5, color="w", lw=0.6)
    ax.axvline(n * P - 0.5, color="w", lw=0.6)
for r in range(gh):
    for c in range(gh):
        ax.text(c * P + 1, r * P + 2, f"({r},{c})", color="w", fontsize=6, va="top")
ax.set_title("the scene, 4 x 4 patches", fontsize=9)
ax.axis("off")
ax = fig.add_subplot(1, 5, (2, 5))
strip = modality_ids[None].numpy()
ax.imshow(strip, cmap="Pastel1", aspect="auto", vmin=0, vmax=8)
for n, name in enumerate(token_names):
    bold = name.startswith("<")
    ax.text(n, 0, name, rotation=90, ha="center", va="center", fontsize=8, weight="bold" if bold else None)
ax.set_yticks([])
ax.set_xticks(range(len(token_names)), [str(int(v)) for v in modality_ids], fontsize=7)
ax.set_xlabel("modality id of each token (0 = image, 1 = text); patches labelled (row, col)")
ax.set_title("one multimodal sequence: [m_image; patches + 2-D PE; m_text; words + 1-D PE] + modality embedding",
             fontsize=9)
plt.show()

# %% [markdown]
# ## 8. The experiment: which comes first, A or B?
#
# A task that is *only* about order: a sequence of `train_length` random filler tokens
# holds one token **A** and one token **B** at random places; the model says whether A
# comes before B. Both answers use exactly the same tokens, so without positions the
# task is impossible (chance is 50%).
#
# We train the same tiny transformer (`mmcourse.positional.OrderProbe`: embedding,
# transformer blocks, mean over tokens, linear classifier) four times, changing only how
# positions enter: `none`, `sinusoidal`, `learned`, `rope`. Every model starts from the same
# token embeddings and sees the same training batches. Then we test on fresh sequences of
# the training length and on **longer** ones (`test_length`), to see which encodings carry
# over to positions never seen - **length extrapolation** (长度外推). The learned table gets
# rows for the long sequences too, but training only ever reaches the first
# `train_length` of them.

# %%
# NBVAL_CHECK_OUTPUT
from mmcourse.positional import POSITIONS, OrderProbe, OrderProbeConfig, accuracy, which_comes_first
from mmcourse.train import TrainConfig, fit

tokens, labels = which_comes_first(4, train_length, generator=torch.Generator().manual_seed(seed))
for row, label in zip(tokens, labels, strict=True):
    text = " ".join("A" if v == 0 else "B" if v == 1 else "." for v in row.tolist())
    print(f"{text}   -> {'A first' if label else 'B first'}")

eval_gen = torch.Generator().manual_seed(seed + 1)
test_sets = {n: which_comes_first(eval_sequences, n, generator=eval_gen) for n in (train_length, test_length)}

# %%
def order_loss(model, batch):
    """Cross-entropy of "which comes first" on one batch of sequences."""
    tokens, labels = batch
    return F.cross_entropy(model(tokens), labels)


data = torch.Generator().manual_seed(seed)  # fresh sequences every step, the same for every model
batches = [which_comes_first(batch_size, train_length, generator=data) for _ in range(train_steps)]
models, curves = {}, {}
for position in POSITIONS:
    torch.manual_seed(seed)  # the same initial token embeddings for every model
    config = OrderProbeConfig(vocab_size=16, dim=model_dim, num_heads=num_heads, num_layers=num_layers,
                              position=position, max_positions=test_length, base=base)
    model = OrderProbe(config).to(device)
    result = fit(model, batches, loss_fn=order_loss,  # the course's one training loop (chapter 01)
                 config=TrainConfig(max_steps=train_steps, lr=lr, schedule="constant", grad_clip=None,
                                    progress=False, device=str(device)))
    models[position], curves[position] = model, [row["loss"] for row in result.history]

# %%
@torch.no_grad()
def predict(model, tokens):
    model.eval()
    return model(tokens.to(device)).argmax(-1).cpu()


results = {}
print(f"{'position':<11} {'parameters':>10} {'acc, N=' + str(train_length):>11} {'acc, N=' + str(test_length) + ' (longer)':>21}")
for position, model in models.items():
    accs = [(predict(model, test_sets[n][0]) == test_sets[n][1]).float().mean().item() for n in (train_length, test_length)]
    assert abs(accs[0] - accuracy(model, *test_sets[train_length])) < 1e-6
    results[position] = accs
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{position:<11} {n_params:>10} {accs[0]:>11.3f} {accs[1]:>21.3f}")

# %% [markdown]
# The results, recorded with honest floors (and a ceiling for the model that cannot see
# order):

# %%
mmcourse.record("order_acc_none", results["none"][0], at_most=0.6)  # blind to order: chance
for position in ("sinusoidal", "learned", "rope"):
    mmcourse.record(f"order_acc_{position}", results[position][0], at_least=0.9)
mmcourse.record("longer_acc_rope", results["rope"][1], at_least=0.8)
mmcourse.record("longer_acc_sinusoidal", results["sinusoidal"][1])
mmcourse.record("longer_acc_learned", results["learned"][1])
# RoPE carries over to longer sequences better than both absolute encodings:
mmcourse.record("longer_rope_advantage", results["rope"][1] - max(results["sinusoidal"][1], results["learned"][1]),
                at_least=0.1)

# %% [markdown]
# Where do the long sequences go wrong? We sort the long test sequences by the position of
# whichever of A and B comes **later**, in groups of `train_length / 2` positions: up to
# `train_length - 1`, both sit at positions seen in training.

# %%
long_tokens, long_labels = test_sets[test_length]
later = torch.maximum((long_tokens == 0).long().argmax(1), (long_tokens == 1).long().argmax(1))  # (B,)
width = max(1, train_length // 2)
bins = np.arange(0, test_length + width, width)
fig, axes = plt.subplots(1, 2, figsize=(13, 3.8))
for position, model in models.items():
    correct = (predict(model, long_tokens) == long_labels).float()
    acc_by_bin = [correct[(later >= lo) & (later < lo + width)].mean().item() for lo in bins[:-1]]
    axes[0].plot(bins[:-1] + (width - 1) / 2, acc_by_bin, "o-", ms=5, label=position)
    window = min(20, train_steps)
    smooth = np.convolve(curves[position], np.ones(window) / window, mode="valid")
    axes[1].plot(np.arange(window - 1, train_steps), smooth, lw=1.2, label=position)
axes[0].axvspan(train_length - 0.5, test_length, color="grey", alpha=0.15, label="positions unseen in training")
axes[0].axhline(0.5, color="k", ls=":", lw=0.8)
axes[0].set_xticks(bins[:-1] + (width - 1) / 2, [f"{lo}-{min(lo + width, test_length) - 1}" for lo in bins[:-1]])
axes[0].set(title=f"accuracy on length-{test_length} sequences", xlabel="position of the later of A and B (group)",
            ylabel="accuracy", ylim=(0.3, 1.05))
axes[0].legend(fontsize=7)
axes[1].set(title="training loss (moving average)", xlabel="step", ylabel="cross-entropy")
axes[1].legend(fontsize=7)
plt.show()

# %% [markdown]
# Reading the table and the figure:
#
# * **No positions**: chance, at any length - the model is a function of the *multiset* of
#   tokens, exactly as section 1 predicts. No amount of training changes that.
# * **Sinusoidal** and **learned** solve the task at the training length (above 0.99 at
#   seeds 0, 1 and 2). On longer
#   sequences they hold while A and B both sit in the positions seen in training and fall
#   towards chance beyond: the learned rows there were never trained, and the sinusoidal
#   vectors there are combinations the network never saw.
# * **RoPE** solves it too, and carries over to the longer sequences best: attention
#   compares positions only through the offset between query and key, and the sign of the
#   offset (before or after) is what this task needs. It is not a free lunch - offsets
#   longer than any in training are still new angles, and it need not be perfect in every
#   group; long-context LLMs rescale RoPE's frequencies for this reason (position
#   interpolation, NTK and YaRN scaling).
#
# Run it with other seeds (`mmcourse run 03 -p seed 1`) - the floors above hold across
# seeds - or at the full sizes on a GPU.
#
# ## 9. Explore the sinusoidal encoding
#
# Move the sliders: the position $i$, the width $d_\text{model}$ and the base. Left: the
# vector $\mathrm{PE}(i)$, sine dimensions in blue and cosine in orange. Right: how similar
# $\mathrm{PE}(i)$ is to every other position. A small base makes all wavelengths short, so
# distant positions start to look alike. (Without a live Jupyter front end - on GitHub, or
# run headless - you see the figure for the starting values, with a note.)

# %%
import ipywidgets as widgets

from mmcourse.widgets import explore


def draw_explorer(fig, position=20, width=64, base_=10000.0):
    pe = sinusoidal_encoding(num_positions, width, base=base_)
    axes = fig.subplots(1, 2)
    axes[0].bar(range(width), pe[position], color=["C0" if k % 2 == 0 else "C1" for k in range(width)])
    axes[0].set(title=f"PE(i = {position}), d_model = {width}, base = {base_:g}", xlabel="dimension $k$",
                ylabel="value", ylim=(-1.1, 1.1))
    axes[1].plot(pe @ pe[position] / (width / 2), lw=1.2)
    axes[1].axvline(position, color="grey", lw=0.6)
    axes[1].set(title="PE(i) · PE(n) / (d/2) for every position n", xlabel="position $n$",
                ylabel="normalised dot product", ylim=(-1.05, 1.05))


start_position = min(20, num_positions - 1)
explore(
    draw_explorer,
    figsize=(12, 3.2),
    position=widgets.IntSlider(value=start_position, min=0, max=num_positions - 1, description="position i"),
    width=widgets.IntSlider(value=d_model, min=4, max=256, step=4, description="d_model"),
    base_=widgets.FloatLogSlider(value=base, base=10, min=1, max=6, description="base"),
);

# %% [markdown]
# ## Summary
#
# * Attention is **permutation equivariant**; with an order-free readout the whole model
#   is blind to order. Position has to be put in.
# * **Sinusoidal**: $\mathrm{PE}(i, 2j) = \sin(i\,\omega_j)$, $\mathrm{PE}(i, 2j+1) =
#   \cos(i\,\omega_j)$ with $\omega_j = 10000^{-2j/d}$, $j$ the *pair* index. A shift by $k$
#   is a fixed rotation $M_k$, and dot products depend only on the distance.
# * **Learned** tables are simple and flexible but end at $N_\text{max}$, and rows that
#   training never reached are noise.
# * **RoPE** rotates queries and keys, so attention scores depend only on the offset
#   $n - m$; it matches `transformers`' Llama exactly (mind the two channel layouts).
# * **Images** use 2-D encodings: half the channels for the column, half for the row (MAE's
#   layout, column first).
# * **Multimodal** sequences add a marker in front of each modality segment and a modality
#   embedding to every token (002 §4.1, corrected).
# * On an order-only task the model without positions stays at chance, all three encodings
#   solve it, and RoPE carries over best to longer sequences.
#
# Next, chapter 04 stacks attention, positions and feed-forward layers into full
# transformer encoders for images, text and audio.
#
# ## Exercises
#
# Replace each `raise NotImplementedError` (or `...`) with your answer and run the cell;
# `check()` tells you what is right or wrong. `hint()` and `solution()` help if you are
# stuck.

# %%
from mmcourse.exercises.ch03 import q1, q2, q3, q4


# Exercise 1: the sinusoidal table (num_positions, dim), sin and cos interleaved, base 10000.
def my_sinusoidal(num_positions, dim):
    raise NotImplementedError  # your code here


q1.check(my_sinusoidal)


# %%
# Exercise 2: rotate x (..., N, d) by RoPE, with cos and sin (N, d) in Llama's half-split layout.
def my_apply_rotary(x, cos, sin):
    raise NotImplementedError  # your code here


q2.check(my_apply_rotary)


# %%
# Exercise 3: the (dim, dim) matrix M_k with PE(p + k) = M_k @ PE(p) for every position p.
def my_shift_matrix(k, dim):
    raise NotImplementedError  # your code here


q3.check(my_shift_matrix)

# %%
# Exercise 4: parameters of ViT-B/16's learned position table at 224 x 224 (D = 768).
# ViT puts one extra [CLS] token in front of the 196 patches (chapter 04); it gets a position too.
table_parameters = ...  # your answer, an int
q4.check(table_parameters)

# %%
# q1.hint(); q1.solution()
