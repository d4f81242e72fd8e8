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
# # 05 · Fusion strategies
#
# A multimodal model has several senses. Somewhere it must combine them: this is
# **modal fusion** (模态融合). The source articles name the options without comparing
# them. 002 §2.2 distinguishes **early fusion** (早期融合, "concatenate or weight the
# features at the bottom of the model"), **late fusion** (晚期融合, "encode each modality
# separately, fuse at the top") and **interactive fusion** (交互式融合, "the modalities
# interact at several levels"), and 002 §4.4 writes the interaction as cross-attention.
# 001 §4.2 offers $z = \mathrm{Concat}(h_v, h_t)$ *or* $z = \mathrm{Attention}(h_v, h_t)$;
# 000 §4.1 writes the whole model as a sum of per-modality models,
# $M_\theta(x) = M_{\theta_t}(x_t) + M_{\theta_v}(x_v) + M_{\theta_a}(x_a)$.
#
# Which one should you use? This chapter builds six families of strategies (eight
# variants) behind one interface, each from its formula, and measures them on
# **AV-Digits**: real handwritten digits paired with synthesised spoken digits, both degraded so that neither sense alone is enough - the
# laptop-sized version of MultiBench's AV-MNIST benchmark. Then it asks what happens
# when a sense fails at test time, and looks inside the cross-attention.

# %% tags=["parameters"]
# Parameters: papermill and `mmcourse run 05 -p name value` can change these.
seed = 0  # random seed: the data split and noise, and the first training seed
device = "auto"  # "auto" picks cuda, then mps, then cpu
num_seeds = 3  # training seeds per strategy (full sweep: 10)
steps = 150  # training steps per model (full sweep: 400 on a GPU)
batch_size = 128  # examples per training step
lr = 5e-3  # AdamW learning rate
dim = 32  # D: token width after each modality's encoder (full: 64)
num_heads = 2  # H: attention heads of the attention-based strategies
modality_dropout = 0.5  # p: probability of dropping each modality in robust training
dropout_strategies = "early,late_average,cross_attention,gated,film,tensor"  # retrained with modality dropout ("all": every fused strategy)
cpu_threads = 1  # torch threads on a CPU: 1 keeps these tiny models steady on a shared machine (0: torch's default)

# %%
import time
from dataclasses import replace

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import mmcourse
from mmcourse import utils
from mmcourse.plotting import setup_notebook

utils.positive_int(num_seeds=num_seeds, steps=steps, batch_size=batch_size, dim=dim, num_heads=num_heads)
utils.positive_float(lr=lr)
utils.non_negative_int(cpu_threads=cpu_threads)
utils.fraction(modality_dropout=modality_dropout)
if modality_dropout >= 1:
    raise ValueError(f"modality_dropout must be < 1 (some modality must remain), got {modality_dropout}")
if dim % num_heads:
    raise ValueError(f"num_heads must divide dim, got dim={dim} and num_heads={num_heads}")
from mmcourse.fusion import FUSION_STRATEGIES

robust_strategies = list(FUSION_STRATEGIES) if dropout_strategies == "all" else dropout_strategies.split(",")
for name in robust_strategies:
    utils.one_of("a name in dropout_strategies", name, FUSION_STRATEGIES)
mmcourse.seed_everything(seed)
device = mmcourse.get_device(device)
if device.type == "cpu" and cpu_threads:
    torch.set_num_threads(cpu_threads)  # for ops this small, threads mostly wait on each other when cores are busy
setup_notebook()
print("computing on", device, f"({torch.get_num_threads()} thread(s))" if device.type == "cpu" else "")

# %% [markdown]
# ## 1. Digits you can see and hear, both degraded
#
# Each AV-Digits example pairs one of scikit-learn's 1,797 real 8 × 8 handwritten digits
# with a spoken recording of the same digit (espeak-ng voices; the test split only has
# voices never heard in training). The `noisy` preset hides half of every image under a
# rectangle and buries the speech under white noise ten decibels louder than itself.

# %%
from mmcourse.data import avdigits

data_config = avdigits.AVDigitsConfig.noisy(seed=seed)
print(f"noisy preset: image_occlusion={data_config.image_occlusion}, image_noise={data_config.image_noise}, "
      f"audio_snr_db={data_config.audio_snr_db}")
splits = {name: avdigits.av_digits_tensors(name, config=data_config) for name in avdigits.SPLITS}
for name, split in splits.items():
    print(f"{name:>10}: {len(split['label'])} examples, images {tuple(split['image'].shape[1:])}, "
          f"log-mel {tuple(split['audio'].shape[1:])}, {len(set(split['voice']))} voices")
print("test voices heard in training:", set(splits["test"]["voice"]) & set(splits["train"]["voice"]) or "none")

# %%
test = splits["test"]
shown = [int((test["label"] == d).nonzero()[0]) for d in (0, 3, 5, 7, 9)]
fig, axes = plt.subplots(2, len(shown), figsize=(10, 3.6))
for col, i in enumerate(shown):
    axes[0, col].imshow(test["image"][i, 0], cmap="gray_r", interpolation="nearest")
    axes[0, col].set_title(f"digit {int(test['label'][i])}")
    axes[1, col].imshow(test["audio"][i], origin="lower", aspect="auto", cmap="magma")
    axes[1, col].set_xlabel("frame (10 ms)")
    axes[0, col].set_xticks([])
    axes[0, col].set_yticks([])
    axes[1, col].set_yticks([])
axes[0, 0].set_ylabel("image (half hidden)")
axes[1, 0].set_ylabel("log-mel (-10 dB SNR)")
fig.suptitle("AV-Digits, noisy preset: five test examples")
plt.show()

# %% [markdown]
# ## 2. One interface: every modality becomes tokens
#
# Every strategy below starts from the same place: modality $m$ as a sequence of $N_m$
# tokens of width $D$, $X_m \in \mathbb{R}^{N_m \times D}$ (chapter 01's
# $X^{(m)} = [x^{(m)}_1, \dots, x^{(m)}_{N_m}]$), and ends with $C = 10$ class logits.
#
# * image: the 8 × 8 digit cut into 2 × 2 patches, 16 raw tokens of 4 pixels;
# * audio: the log-mel spectrogram averaged over pairs of mel bands and groups of four
#   frames (which also averages some noise away), 26 raw tokens of 20 values.
#
# Each raw feature is standardised with the **training** mean and standard deviation;
# so a zero means "the average training input" - we will use that to remove a modality.
# The features are computed once, here, and reused by every model.

# %%
from mmcourse import fusion, plotting
from mmcourse.data.avdigits import av_digits_tokens, standardize

raw = {name: av_digits_tokens(s["image"], s["audio"]) for name, s in splits.items()}
image_tokens = standardize(raw["train"][0], raw["validation"][0], raw["test"][0])
audio_tokens = standardize(raw["train"][1], raw["validation"][1], raw["test"][1])
x = {name: [image_tokens[k], audio_tokens[k]] for k, name in enumerate(avdigits.SPLITS)}
y = {name: s["label"] for name, s in splits.items()}
num_tokens = tuple(t.shape[1] for t in x["train"])  # (N_1, N_2)
token_dims = tuple(t.shape[2] for t in x["train"])  # (F_1, F_2)
print("raw tokens (N_m, F_m): image", tuple(x["train"][0].shape[1:]), " audio", tuple(x["train"][1].shape[1:]))

# %% [markdown]
# A tiny encoder per modality maps each raw token $f_i$ to the model width and adds a
# learned position embedding $p_i$, so that a token knows *where* it is:
# $x_i = \mathrm{GELU}(W f_i + b + p_i)$ (`fusion.TokenEncoder`). Deliberately shallow:
# the fusion is what we compare. Every fusion module then has one signature,
#
# $$\text{logits} = \mathrm{fusion}([X_1, X_2, \dots, X_M]), \qquad X_m: (B, N_m, D) \to (B, C),$$
#
# for any number of modalities $M$. Where a strategy needs one vector per modality it
# **pools** the tokens: it flattens $X_m$ and applies one linear layer and a GELU,
# $h_m = \mathrm{pool}_m(X_m) \in \mathbb{R}^D$, which - unlike a mean over tokens - keeps
# where each feature was.
#
# Small named sizes for the checks that follow:

# %%
B, D, C = 4, 8, 10
N1, N2 = num_tokens
torch.manual_seed(seed)
X1, X2 = torch.randn(B, N1, D), torch.randn(B, N2, D)  # two modalities' tokens
print(f"B={B}, D={D}, C={C}; X1 {tuple(X1.shape)}, X2 {tuple(X2.shape)}")

# %% [markdown]
# ## 3. The strategies
#
# ### 3.1 Early fusion: concatenate, then one joint model
#
# Early fusion puts the modalities side by side as soon as possible and lets one model
# learn everything from the joint vector - 001's $z = \mathrm{Concat}(h_v, h_t)$:
#
# $$z = [h_1; h_2] \in \mathbb{R}^{2D}, \qquad \text{logits} = \mathrm{MLP}(z).$$

# %%
plotting.draw_fusion_diagram("early")
plt.show()

# %%
early = fusion.EarlyFusion(num_tokens=(N1, N2), dim=D, num_classes=C, level="features").eval()
h1, h2 = early.pools[0](X1), early.pools[1](X2)  # (B, D) each
z = torch.cat([h1, h2], dim=-1)  # (B, 2D)
logits = early.head(z)  # (B, C)
torch.testing.assert_close(logits, early([X1, X2]))
print("z", tuple(z.shape), "-> logits", tuple(logits.shape), "- equal to fusion.EarlyFusion")

# %% [markdown]
# Concatenation can also happen one level lower, on the token sequences themselves:
# 002 §4.1 joins the modalities into one input sequence,
# $X = [X^{(1)}; X^{(2)}]$, marked with a modality-type embedding $e_m$ (its "modality
# token" $m_k$), and a transformer reads it. Every image token can then attend to every
# audio token and vice versa:
#
# $$X = [X_1 + e_1;\ X_2 + e_2] \in \mathbb{R}^{(N_1 + N_2) \times D}, \qquad
#   X' = X + \mathrm{SelfAttention}(\mathrm{LN}(X)), \qquad \text{logits} = \mathrm{MLP}(\mathrm{pool}(X')).$$

# %%
plotting.draw_fusion_diagram("early_tokens")
plt.show()

# %%
early_tok = fusion.EarlyFusion(num_tokens=(N1, N2), dim=D, num_classes=C, level="tokens", num_heads=2).eval()
e = early_tok.type_embed  # (M, D): e_1, e_2
X = torch.cat([X1 + e[0], X2 + e[1]], dim=1)  # (B, N1 + N2, D): one sequence
h = early_tok.norm1(X)
X_prime = X + early_tok.attn(h, h, h, need_weights=False)[0]  # chapter 02's multi-head attention
torch.testing.assert_close(early_tok.head(early_tok.pool(X_prime)), early_tok([X1, X2]))
print("one sequence", tuple(X.shape), "- equal to fusion.EarlyFusion(level='tokens')")

# %% [markdown]
# ### 3.2 Late fusion and the additive model
#
# Late fusion keeps the modalities apart until the very end: each has its own classifier
# $\ell_m = \mathrm{head}_m(h_m) \in \mathbb{R}^C$, and only their logits are combined,
# by an average or by weights $w = \mathrm{softmax}(a)$ that are learned:
#
# $$\ell = \frac{1}{M}\sum_{m=1}^{M} \ell_m \qquad\text{or}\qquad \ell = \sum_{m=1}^{M} w_m\, \ell_m .$$
#
# The additive model of 000 §4.1, $M_\theta(x) = \sum_m M_{\theta_m}(x_m)$, is exactly the
# averaged form times $M$ - the same argmax, the same model. (000 writes it with feature
# vectors $x_t, x_v, x_a$ as inputs: the sum is over *models' outputs*, never over raw
# features of different sizes.)

# %%
plotting.draw_fusion_diagram("late")
plt.show()

# %%
late = fusion.LateFusion(num_tokens=(N1, N2), dim=D, num_classes=C, weighting="average").eval()
l1 = late.heads[0](late.pools[0](X1))  # (B, C): the image's own prediction
l2 = late.heads[1](late.pools[1](X2))  # (B, C): the audio's own prediction
torch.testing.assert_close((l1 + l2) / 2, late([X1, X2]))
additive = l1 + l2  # 000 §4.1
assert torch.equal(additive.argmax(-1), late([X1, X2]).argmax(-1))
print("late fusion = mean of the per-modality logits; the additive model predicts the same classes")

# %% [markdown]
# ### 3.3 Interactive fusion: cross-attention
#
# 002 §4.4 lets modality $A$ read modality $B$ with **cross-attention** (交叉注意力,
# chapter 02): the queries come from $A$, the keys and values from $B$,
#
# $$O^{A \leftarrow B} = \mathrm{CrossAttention}(X^A, X^B, X^B) = \mathrm{softmax}\!\Big(\frac{(X^A W^Q)(X^B W^K)^\top}{\sqrt{d_k}}\Big) X^B W^V,$$
#
# and symmetrically $O^{B \leftarrow A}$. (The source writes $O^{A \rightarrow B}$ for the
# output that "fuses information from $B$ into $A$"; we write the arrow the way the
# information flows.) We add each output to its queries as a residual,
# $Y^A = X^A + O^{A \leftarrow B}$, pool both and classify their concatenation. 002 first
# runs self-attention inside $A$; our encoders' tokens stand in for that $O^A$ (a full
# transformer block is chapter 04's). With more than two modalities, each one attends to
# the concatenated tokens of all the others.

# %%
plotting.draw_fusion_diagram("cross_attention")
plt.show()

# %% [markdown]
# The module uses chapter 02's `MultiHeadAttention`. We recompute it with PyTorch's own
# `nn.MultiheadAttention`, given the same weights, as the trusted reference:

# %%
cross = fusion.CrossAttentionFusion(num_tokens=(N1, N2), dim=D, num_classes=C, num_heads=2).eval()


def torch_attention(ours):
    """nn.MultiheadAttention holding the weights of our MultiHeadAttention."""
    ref = nn.MultiheadAttention(D, ours.num_heads, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
        ref.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        ref.out_proj.load_state_dict(ours.out_proj.state_dict())
    return ref.eval()


pooled = []
for m, (XA, XB) in enumerate([(X1, X2), (X2, X1)]):  # A <- B, then B <- A
    kv = cross.norm_kv[m](XB)
    O_AB, _ = torch_attention(cross.attn[m])(cross.norm_q[m](XA), kv, kv)  # queries from A
    pooled.append(cross.pools[m](XA + O_AB))  # Y^A = X^A + O^{A<-B}, pooled
torch.testing.assert_close(cross.head(torch.cat(pooled, -1)), cross([X1, X2]), atol=1e-5, rtol=1e-5)
maps = cross.attention_maps([X1, X2])
print("attention weights: image <- audio", tuple(maps[0].shape), ", audio <- image", tuple(maps[1].shape),
      "(B, H, queries, keys); equal to nn.MultiheadAttention")

# %% [markdown]
# ### 3.4 Gated fusion
#
# **Gated fusion** (门控融合) lets the model decide, per example and per feature, how much
# to trust each modality - the gated multimodal unit of Arevalo et al. (2017). Each
# modality proposes $\tilde h_m = \tanh(W_m h_m)$; gates computed from all modalities mix
# them:
#
# $$z = \mathrm{softmax}_m\big(W_z [h_1; \dots; h_M]\big) \in \mathbb{R}^{M \times D}, \qquad
#   h = \sum_m z_m \odot \tilde h_m, \qquad \text{logits} = \mathrm{MLP}(h).$$
#
# With two modalities the softmax is a sigmoid: $z_1 = \sigma(g_1 - g_2)$, $z_2 = 1 - z_1$.

# %%
plotting.draw_fusion_diagram("gated")
plt.show()

# %%
gated = fusion.GatedFusion(num_tokens=(N1, N2), dim=D, num_classes=C).eval()
h1, h2 = gated.pools[0](X1), gated.pools[1](X2)  # (B, D)
g1, g2 = gated.gate(torch.cat([h1, h2], -1)).chunk(2, dim=-1)  # gate logits, (B, D) each
z1 = torch.sigmoid(g1 - g2)  # the image's share of every fused feature
h = z1 * torch.tanh(gated.proj[0](h1)) + (1 - z1) * torch.tanh(gated.proj[1](h2))  # (B, D)
torch.testing.assert_close(gated.head(h), gated([X1, X2]))
torch.testing.assert_close(z1, gated.gates([X1, X2])[:, 0])
print("gates", tuple(gated.gates([X1, X2]).shape), "(B, M, D) sum to one over M - equal to fusion.GatedFusion")

# %% [markdown]
# ### 3.5 FiLM: one modality modulates another
#
# **Feature-wise linear modulation** (特征线性调制, FiLM; Perez et al. 2018) lets one
# modality *condition* how another is processed: from the image, a linear layer predicts
# a scale $\gamma$ and a shift $\beta$ for every feature of the audio tokens,
#
# $$[\Delta\gamma; \beta] = W\, h_1 + b, \qquad \gamma = 1 + \Delta\gamma, \qquad
#   \mathrm{FiLM}(X_2) = \gamma \odot X_2 + \beta,$$
#
# (the paper's layer is $\gamma \odot X + \beta$; its generator predicts the offset
# $\Delta\gamma$ rather than $\gamma$ itself, as here, so that $\gamma$ starts near 1 and
# the modulation near the identity instead of scaling every feature towards 0)
#
# the same on every audio token; the modulated audio tokens go through a GELU, a pooling
# and the classifier. The image reaches the prediction *only* through $\gamma$ and $\beta$.
# (We modulate the audio with the image; `film_target=0` does the reverse.)

# %%
plotting.draw_fusion_diagram("film")
plt.show()

# %%
film = fusion.FiLMFusion(num_tokens=(N1, N2), dim=D, num_classes=C, target=1).eval()
delta_gamma, beta = film.film(film.cond_pools["0"](X1)).chunk(2, dim=-1)  # (B, D) each, from the image
gamma = 1 + delta_gamma  # (B, D): the scale, near 1 at initialisation
X2_mod = F.gelu(gamma[:, None, :] * X2 + beta[:, None, :])  # (B, N2, D)
torch.testing.assert_close(film.head(film.pool(X2_mod)), film([X1, X2]))
print("gamma, beta", tuple(gamma.shape), "- equal to fusion.FiLMFusion")

# %% [markdown]
# ### 3.6 Tensor fusion
#
# **Tensor fusion** (张量融合; Zadeh et al. 2017) models every multiplicative interaction
# explicitly: it appends a 1 to each (small, $d$-dimensional) modality vector and takes
# the **outer product**,
#
# $$Z = \begin{bmatrix} h_1 \\ 1 \end{bmatrix} \otimes \begin{bmatrix} h_2 \\ 1 \end{bmatrix}
#     = \begin{bmatrix} h_1 h_2^\top & h_1 \\ h_2^\top & 1 \end{bmatrix} \in \mathbb{R}^{(d+1) \times (d+1)}.$$
#
# The appended 1 is the point: $Z$ contains $h_1$ and $h_2$ themselves (the unimodal
# terms), every product $h_1[i]\, h_2[j]$ (the bimodal terms), and a constant. With $M$
# modalities it has $(d+1)^M$ entries - fine for two or three small vectors, hopeless
# for many.

# %%
plotting.draw_fusion_diagram("tensor")
plt.show()

# %%
d = 3
h1, h2 = torch.randn(B, d), torch.randn(B, d)
h1_1, h2_1 = F.pad(h1, (0, 1), value=1.0), F.pad(h2, (0, 1), value=1.0)  # [h; 1], (B, d+1)
Z = torch.einsum("bi,bj->bij", h1_1, h2_1)  # (B, d+1, d+1) outer product
torch.testing.assert_close(Z.flatten(1), fusion.tensor_fusion([h1, h2]))
torch.testing.assert_close(Z[:, :d, d], h1)  # the last column holds h_1 ...
torch.testing.assert_close(Z[:, d, :d], h2)  # ... the last row h_2, and the corner the 1
print("Z", tuple(Z.shape), "- equal to fusion.tensor_fusion; it contains h1, h2, all products and 1")
h3 = torch.randn(B, d)
Z3 = torch.einsum("bi,bj,bk->bijk", h1_1, h2_1, F.pad(h3, (0, 1), value=1.0)).flatten(1)
torch.testing.assert_close(Z3, fusion.tensor_fusion([h1, h2, h3]))
print(f"three modalities: {Z3.shape[1]} = (d+1)^3 entries")

# %% [markdown]
# > **Common pitfall: fuse embeddings, never ids.** One of the source articles builds its
# > multimodal input as `torch.cat([img_features, input_ids, attention_mask])`
# > (000 §5.2). Token **ids** are row numbers in a vocabulary, not measurements: the id
# > of "seven" is not "a bit more" than the id of "six", and a linear layer that
# > multiplies ids by weights treats them as if it were. The **attention mask** is
# > bookkeeping about padding, not content. What should be fused is the **embedding**
# > each id selects - a learned vector, `nn.Embedding(vocab_size, D)(input_ids)` or a
# > text encoder's output, pooled with the mask. (The same code then feeds this to
# > `BertForTokenClassification`, a per-token tagger, for a per-example label: a
# > sequence classifier was needed.)
#
# The difference is easy to measure. AV-Digits can add a third modality, text: the
# digit's name. We write each digit as its name or, for a random half, as a numeral
# ("seven" or "7"), cut the text into words with a small vocabulary, and give a logistic
# regression the text - with and without the image - once as ids and mask (000 §5.2),
# once as embeddings: a one-hot vector per word, averaged with the mask (a one-hot
# vector times the classifier's weight matrix *is* an embedding lookup, learned with
# the classifier).

# %%
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

rng = np.random.default_rng(seed)
text_data = {}
for name in ("train", "test"):
    data = avdigits.av_digits_tensors(name, config=replace(data_config, text=True), features="waveform")
    names, labels = data["text"], data["label"].tolist()
    data["text"] = [word if rng.random() < 0.5 else str(label) for word, label in zip(names, labels, strict=True)]
    text_data[name] = data
vocab = {w: i + 1 for i, w in enumerate(sorted({w for t in text_data["train"]["text"] for w in t.split()}))}
print("vocabulary (id 0 is padding):", vocab)
print("examples:", text_data["train"]["text"][:8])


def ids_and_mask(texts):
    """Word ids padded with 0 to the longest text, and the attention mask."""
    length = max(len(t.split()) for t in texts)
    ids = torch.zeros(len(texts), length, dtype=torch.long)  # (N, L) padded with 0
    for i, t in enumerate(texts):
        words = [vocab[w] for w in t.split()]
        ids[i, : len(words)] = torch.tensor(words)
    return ids, (ids > 0).long()  # input_ids, attention_mask


def text_features(data):
    """The inputs compared: text as ids + mask or as embeddings, with and without the image."""
    ids, mask = ids_and_mask(data["text"])  # (N, L) each
    image = data["image"].flatten(1)  # (N, 64)
    one_hot = F.one_hot(ids, len(vocab) + 1).float()  # (N, L, V): one row of the identity per id
    embedded = (one_hot * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # (N, V): mean over words
    ids_mask = torch.cat([ids.float(), mask.float()], 1)  # (N, 2L)
    return {
        "text as ids + mask": ids_mask,
        "text as embeddings": embedded,
        "image only": image,
        "image + ids + mask (000 §5.2)": torch.cat([image, ids_mask], 1),
        "image + embeddings": torch.cat([image, embedded], 1),
    }


features_text = {split: text_features(data) for split, data in text_data.items()}
accuracy_text = {}
for name in features_text["train"]:
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))
    with threadpool_limits(1):
        clf.fit(features_text["train"][name].numpy(), text_data["train"]["label"].numpy())
    accuracy_text[name] = clf.score(features_text["test"][name].numpy(), text_data["test"]["label"].numpy())
    print(f"{name:>30}: test accuracy {accuracy_text[name]:.3f}")
mmcourse.record("ids_vs_embeddings_gap",
                accuracy_text["image + embeddings"] - accuracy_text["image + ids + mask (000 §5.2)"], at_least=0.2)

# %% [markdown]
# The text decides the digit, and as embeddings the classifier reads it perfectly. As ids
# it is useless on its own and adds nothing to the image: "7" and "seven" have unrelated
# ids (the vocabulary sorts numerals before words), and a linear function of a row
# number can only cut the number line into ordered intervals, one per class.
#
# > **Common pitfall: probabilities where logits are expected.** 001 §4.3 ends its model
# > with `Dense(1, activation='sigmoid')` and then compiles it with
# > `BinaryCrossentropy(from_logits=True)`, which applies a second sigmoid inside the
# > loss: training still runs but the loss is wrong (it can never go below
# > $\log(1 + e^{-1}) \approx 0.31$ per example and gradients shrink). Every head in this
# > chapter outputs **logits**, and `F.cross_entropy` takes logits. (001 §5.2 also builds
# > its model from feature *arrays*, `Model(inputs=[image_features, ...])`, where Keras
# > needs `Input` layers: a model is a function of placeholders, data only flows through it.)

# %% [markdown]
# ## 4. The experiment: which fusion wins on AV-Digits?
#
# `FusionClassifier` puts the pieces together: one `TokenEncoder` per modality the
# strategy uses, one fusion module, and modality dropout for section 5. Two **unimodal
# baselines** (`image_only`, `audio_only`) are late fusion with a single modality.
#
# Protocol, identical for every strategy (trained by the course's one loop, `fit`): the same encoders and width $D$, AdamW with
# the same learning rate, batch size and number of steps; the validation split is
# checked every ten steps and the model keeps its best weights (early stopping without
# stopping). The data are fixed; each of the `num_seeds` training seeds changes the
# initialisation and the order of the batches. Accuracy is on the test split, whose
# voices were never heard in training.

# %%
from mmcourse.finetune import param_groups
from mmcourse.fusion import FusionClassifier, FusionConfig, accuracy, classification_loss, count_parameters
from mmcourse.train import ShuffledBatches, TrainConfig, fit

strategies = ["image_only", "audio_only", *fusion.FUSION_STRATEGIES]
fused_strategies = list(fusion.FUSION_STRATEGIES)
base = FusionConfig(num_tokens=num_tokens, token_dims=token_dims, dim=dim, num_heads=num_heads, film_target=1)
# AdamW at a constant rate after a 10-step warm-up; every 10 steps the validation accuracy is
# measured and the model keeps its best weights (fit's restore_best).
train_config = TrainConfig(max_steps=steps, lr=lr, warmup_steps=10, schedule="constant", grad_clip=None,
                           eval_every=10, progress=False, device=str(device))
seeds = [seed + k for k in range(num_seeds)]
models, rows = {}, []


def train(strategy, run_seed, p=0.0):
    """Train one FusionClassifier; keep it in `models` and its test accuracy in `rows`."""
    torch.manual_seed(run_seed)
    model = FusionClassifier(replace(base, strategy=strategy, modality_dropout=p)).to(device)
    start = time.perf_counter()
    # fused=True: one AdamW kernel for all the parameters, about 3x faster for these tiny models
    optimizer = torch.optim.AdamW(param_groups(model, train_config.weight_decay), lr=lr,
                                  fused=device.type in ("cpu", "cuda"))
    fit(model, ShuffledBatches(*x["train"], y["train"], batch_size=batch_size, num_batches=steps, seed=run_seed),
        loss_fn=classification_loss, config=train_config, optimizer=optimizer,
        evaluate_fn=lambda m: {"accuracy": accuracy(m, x["validation"], y["validation"])})
    seconds = time.perf_counter() - start
    models[strategy, p, run_seed] = model
    rows.append(dict(strategy=strategy, p=p, seed=run_seed, accuracy=accuracy(model, x["test"], y["test"]),
                     params=count_parameters(model), seconds=seconds))


sweep_start = time.perf_counter()
for strategy, run_seed in tqdm([(s, r) for s in strategies for r in seeds], desc="training", mininterval=2):
    train(strategy, run_seed)
print(f"{len(strategies) * num_seeds} models trained in {time.perf_counter() - sweep_start:.0f} s")

# %%
results = pd.DataFrame(rows)
summary = (results[results.p == 0].groupby("strategy", sort=False)
           .agg(mean=("accuracy", "mean"), std=("accuracy", "std"), params=("params", "first"),
                seconds=("seconds", "mean")))
table = pd.DataFrame({
    "test accuracy": [f"{m:.3f} ± {s:.3f}" for m, s in zip(summary["mean"], summary["std"].fillna(0), strict=True)],
    "parameters": summary["params"],
    "training time (s)": summary["seconds"].round(2),
}, index=summary.index)
print(f"mean ± std over {num_seeds} seeds; chance is 0.100; time: wall-clock seconds per model on this machine")
table

# %%
colours = {"image_only": "#4C72B0", "audio_only": "#DD8452"}
fig, ax = plt.subplots(figsize=(9, 3.6))
ax.bar(summary.index, summary["mean"], yerr=summary["std"].fillna(0), capsize=3,
       color=[colours.get(s, "#55A868") for s in summary.index])
best_single = summary.loc[["image_only", "audio_only"], "mean"].max()
ax.axhline(best_single, color="0.3", ls="--", lw=1, label="best single modality")
ax.set_ylim(0.5, 1.0)
ax.set_ylabel("test accuracy")
ax.set_title(f"AV-Digits (noisy), mean ± std over {num_seeds} seeds")
ax.tick_params(axis="x", rotation=30)
ax.legend(loc="upper left")
plt.show()

# %% [markdown]
# How much does fusion buy? The margin of the best fused strategy over the best single
# modality, on average and seed by seed (same seed, same batches):

# %%
best_fused = summary.loc[fused_strategies, "mean"].idxmax()
best_unimodal = summary.loc[["image_only", "audio_only"], "mean"].idxmax()
per_seed = results[results.p == 0].pivot(index="seed", columns="strategy", values="accuracy")
margins = per_seed[best_fused] - per_seed[best_unimodal]
print(f"best fused: {best_fused} {summary.loc[best_fused, 'mean']:.3f}; best single modality: "
      f"{best_unimodal} {summary.loc[best_unimodal, 'mean']:.3f}")
print(f"margin: {margins.mean():.3f} on average, between {margins.min():.3f} and {margins.max():.3f} over seeds")
print(f"every fused strategy beats the best single modality on average: "
      f"{bool((summary.loc[fused_strategies, 'mean'] > best_single).all())}")
mmcourse.record("best_fused_accuracy", float(summary.loc[best_fused, "mean"]), at_least=0.83)
mmcourse.record("best_single_modality_accuracy", float(best_single), at_most=0.85)
mmcourse.record("fusion_margin", float(margins.mean()), at_least=0.08)
mmcourse.record("fusion_margin_worst_seed", float(margins.min()), at_least=0.05)
mmcourse.record("late_average_minus_best_fused",
                float(summary.loc["late_average", "mean"] - summary.loc[best_fused, "mean"]), at_least=-0.02)

# %% [markdown]
# Fusion helps a lot: with half of each image hidden and the speech under loud noise,
# the two senses make different mistakes. But the ranking may surprise: the simplest
# strategy, late fusion, is as good as or better than the elaborate ones. Why?
#
# AV-Digits pairs an image and a recording *only through their label*: given the digit,
# the handwriting says nothing about the voice. The modalities are **conditionally
# independent** (条件独立) given the label, and Bayes' rule then says the best possible
# fusion is a *sum*:
#
# $$\log p(y \mid x_1, x_2) = \log p(y \mid x_1) + \log p(y \mid x_2) - \log p(y) + \text{const}.$$
#
# That is late fusion, the additive model of 000 §4.1, with the per-modality heads
# playing $\log p(y \mid x_m)$ (the prior is uniform here). Cross-modal *interactions* -
# what tensor fusion, FiLM and cross-attention are built to capture - do not exist in this
# data, so their extra flexibility only costs data efficiency. We can even skip joint
# training: adding the log-probabilities of the two **separately trained** unimodal
# models is nearly as good:

# %%
ensemble = []
for run_seed in seeds:
    log_p = [fusion.predict(models[s, 0.0, run_seed], x["test"]).log_softmax(-1) for s in ("image_only", "audio_only")]
    ensemble.append(((log_p[0] + log_p[1]).argmax(-1) == y["test"]).float().mean().item())
spread = np.std(ensemble, ddof=1) if len(ensemble) > 1 else 0.0
print(f"sum of the two unimodal models' log-probabilities: {np.mean(ensemble):.3f} ± {spread:.3f}"
      f"  (late fusion trained jointly: {summary.loc['late_average', 'mean']:.3f})")

# %% [markdown]
# On data where the modalities *do* interact - "what colour is the *square*?", where the
# question decides which part of the image matters - no sum of separate opinions can
# answer, and interactive fusion earns its cost (chapter 10). The lesson is not "late
# fusion is best" but: **match the fusion to the dependence between your modalities**,
# and always measure against the unimodal baselines and the simple sum.
#
# ## 5. Robustness: when a sense fails
#
# A deployed model loses a modality: the microphone breaks, the camera is covered. We
# test two failures of each modality:
#
# * **missing** (模态缺失): the modality's standardised input is replaced by zeros - the
#   average training input - for every strategy alike (`present=[False, True]`);
# * **corrupted**: a stronger version of the noise than in training, three quarters of
#   the image hidden, or the speech at -20 dB instead of -10 dB.
#
# **Modality dropout** (模态丢弃) prepares a model for this: during training each modality
# of each example is dropped (zeroed, exactly as "missing") with probability $p$, never
# all of them at once, so the model must also learn to predict from any subset. We train
# the fusion strategies again with it (by default all but `early_tokens` and
# `late_learned`, which behave like their siblings; `dropout_strategies="all"` adds them).

# %%
corrupted = {}
for name, overrides in {"image corrupted": dict(image_occlusion=0.75), "audio corrupted": dict(audio_snr_db=-20.0)}.items():
    s = avdigits.av_digits_tensors("test", config=replace(data_config, **overrides))
    img_raw, aud_raw = av_digits_tokens(s["image"], s["audio"])
    corrupted[name] = [standardize(raw["train"][0], img_raw)[1], standardize(raw["train"][1], aud_raw)[1]]
    assert torch.equal(s["label"], y["test"])  # the same examples, only noisier
conditions = {
    "clean": (x["test"], None),
    "image missing": (x["test"], torch.tensor([False, True])),
    "audio missing": (x["test"], torch.tensor([True, False])),
    **{name: (inputs, None) for name, inputs in corrupted.items()},
}

sweep_start = time.perf_counter()
for strategy, run_seed in tqdm([(s, r) for s in robust_strategies for r in seeds], desc="modality dropout", mininterval=2):
    train(strategy, run_seed, p=modality_dropout)
print(f"{len(robust_strategies) * num_seeds} models trained in {time.perf_counter() - sweep_start:.0f} s")

# %%
def can_predict(model, present):
    """False when every modality the model reads is missing (a one-modality model without it)."""
    return present is None or bool(present[list(model.config.used)].any())


robust_rows = []
for (strategy, p, run_seed), model in models.items():
    for condition, (inputs, present) in conditions.items():
        if not can_predict(model, present):
            continue  # no input left: no prediction (the table shows NaN)
        robust_rows.append(dict(strategy=strategy, p=p, seed=run_seed, condition=condition,
                                accuracy=accuracy(model, inputs, y["test"], present=present)))
robust = pd.DataFrame(robust_rows)
robust_table = robust.pivot_table(index=["strategy", "p"], columns="condition", values="accuracy", sort=False)
robust_table = robust_table[list(conditions)].rename_axis(columns=None)
print(f"test accuracy, mean over {num_seeds} seeds; p = modality dropout in training")
robust_table.round(3)

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True, layout="constrained")
width = 0.38
where = np.arange(len(robust_strategies))
for ax, condition, reference in zip(axes, ["image missing", "audio missing"], ["audio_only", "image_only"], strict=True):
    for k, (p, label) in enumerate([(0.0, "trained on both"), (modality_dropout, f"modality dropout p={modality_dropout}")]):
        values = [robust_table.loc[(s, p), condition] for s in robust_strategies]
        ax.bar(where + (k - 0.5) * width, values, width, label=label, color=["#C44E52", "#55A868"][k])
    ax.axhline(summary.loc[reference, "mean"], color="0.3", ls="--", lw=1, label="the remaining modality's own model")
    ax.axhline(0.1, color="0.6", ls=":", lw=1, label="chance")
    ax.set_xticks(where, robust_strategies, rotation=35, ha="right")
    ax.set_title(f"{condition} at test time (dashed: {reference} model)")
axes[0].set_ylabel("test accuracy")
fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=4, fontsize=8)
plt.show()

# %%
def mean_over(p, condition):
    """Mean accuracy over the strategies trained both ways, and over the seeds."""
    sel = robust[(robust.p == p) & (robust.condition == condition) & robust.strategy.isin(robust_strategies)]
    return sel.accuracy.mean()


for condition in conditions:
    print(f"{condition:>16}: fused models {mean_over(0.0, condition):.3f} -> {mean_over(modality_dropout, condition):.3f} "
          "with modality dropout")
missing_without = np.mean([mean_over(0.0, c) for c in ("image missing", "audio missing")])
missing_with = np.mean([mean_over(modality_dropout, c) for c in ("image missing", "audio missing")])
mmcourse.record("missing_modality_accuracy_without_dropout", float(missing_without))
mmcourse.record("missing_modality_accuracy_with_dropout", float(missing_with), at_least=0.58)
mmcourse.record("modality_dropout_gain_when_missing", float(missing_with - missing_without), at_least=0.12)
mmcourse.record("clean_accuracy_cost_of_dropout",
                float(mean_over(0.0, "clean") - mean_over(modality_dropout, "clean")), at_most=0.05)

# %% [markdown]
# Trained on both modalities only, every fused model falls far when one goes missing -
# mostly below the model of the remaining modality alone, because its later layers never
# saw "audio = its average" and react unpredictably. Modality dropout brings them most of
# the way back to the unimodal models, at a small cost or none on clean inputs.
#
# Corruption is another matter. Hiding more of the image removes information, and the
# fused models stay around the audio-only model. Louder noise on the audio is worse than
# losing it, on average and above all for the models trained with modality dropout; and
# every fused model falls far below the image-only model. The standardised audio features
# show why:

# %%
for name, feats in {"training (-10 dB)": x["train"][1], "test (-10 dB)": x["test"][1],
                    "test (-20 dB)": corrupted["audio corrupted"][1]}.items():
    print(f"{name:>17}: standardised log-mel features, mean {feats.mean():+.2f}, std {feats.std():.2f}")

# %% [markdown]
# At -20 dB the whole spectrogram is louder than anything seen in training: the features
# leave the training range, the model has no way to know that the audio is broken, and it
# trusts it. Modality dropout teaches a model to cope with an *absent* modality, not with
# one that is present but wrong. That takes other tools - training over a range of noise
# levels, features normalised per recording, a gate that learns to judge each input's
# quality - and chapter 12 returns to them.
#
# Late fusion has one more way out of a missing modality, with no retraining at all: it
# can simply **skip** the head of the missing modality, since each head is a complete
# classifier:

# %%
skip = {"image missing": 1, "audio missing": 0}  # the head that is left
for condition, m in skip.items():
    accs = []
    for run_seed in seeds:
        model = models["late_average", 0.0, run_seed]
        with torch.no_grad():
            heads = model.fusion.per_modality_logits(model.encode([t.to(device) for t in x["test"]])).cpu()
        accs.append((heads[:, m].argmax(-1) == y["test"]).float().mean().item())
    print(f"late fusion (trained on both), {condition}, missing head skipped: {np.mean(accs):.3f}   "
          f"(zeroed input: {robust_table.loc[('late_average', 0.0), condition]:.3f})")

# %% [markdown]
# Skipping the head beats feeding it an average input. But the image head alone is well
# below the image-only model: trained only through the average, it never had to be right
# on its own. The sum of two *separately* trained unimodal models (section 4) has no such
# weakness - without audio it is exactly the image-only model.

# %% [markdown]
# ### Explore: degrade each sense, with and without modality dropout
#
# How much noise can each strategy take, and in which modality? Below, Gaussian noise of
# standard deviation $\sigma_m$ is added to modality $m$'s standardised tokens (so
# $\sigma = 1$ is as large as the signal), or the modality is removed ("missing"), and every
# strategy is scored on the test set - trained on both senses, or with modality dropout.
# Retraining is too slow for a slider, so the grid of the trained models' accuracies is
# **precomputed** here, for the first seed's models only (15 test-set passes each); the explorer
# only looks values up.

# %%
import ipywidgets as widgets

from mmcourse.plotting import draw_accuracy_bars
from mmcourse.widgets import explore

noise_levels = [0.0, 1.0, 2.0, "missing"]
noise_gen = torch.Generator().manual_seed(seed)
noisy_test = [[t + s * torch.randn(t.shape, generator=noise_gen) if s != "missing" else t for s in noise_levels]
              for t in x["test"]]  # per modality, per level: the test tokens
grid_accuracy = {}  # (strategy, p, image level, audio level) -> accuracy
for (strategy, p, run_seed), model in models.items():
    if run_seed != seeds[0]:
        continue
    for i, image_level in enumerate(noise_levels):
        for a, audio_level in enumerate(noise_levels):
            if image_level == audio_level == "missing":
                continue
            present = torch.tensor([image_level != "missing", audio_level != "missing"])
            if not can_predict(model, present):
                continue
            grid_accuracy[strategy, p, image_level, audio_level] = accuracy(
                model, [noisy_test[0][i], noisy_test[1][a]], y["test"], present=None if present.all() else present)


def draw_noise(fig, image_noise, audio_noise, dropout):
    if image_noise == audio_noise == "missing":
        fig.text(0.5, 0.5, "both senses missing: nothing left to classify", ha="center")
        return
    p = modality_dropout if dropout else 0.0
    shown = [s for s in strategies if (s, p, image_noise, audio_noise) in grid_accuracy]
    best_clean = max(grid_accuracy[s, 0.0, 0.0, 0.0] for s in strategies)
    training = f"modality dropout p = {modality_dropout:g}" if dropout else "trained on both"
    draw_accuracy_bars(
        fig, accuracies={s: grid_accuracy[s, p, image_noise, audio_noise] for s in shown},
        references={"chance": 0.1, "best clean accuracy, trained on both": best_clean},
        title=f"image noise {image_noise}, audio noise {audio_noise}: {training} (seed {seeds[0]})")


explore(
    draw_noise,
    figsize=(9, 3.8),
    image_noise=widgets.SelectionSlider(options=noise_levels, value=1.0, description="image σ"),
    audio_noise=widgets.SelectionSlider(options=noise_levels, value=0.0, description="audio σ"),
    dropout=widgets.Checkbox(value=False, description=f"modality dropout p = {modality_dropout:g}"),
);

# %% [markdown]
# ## 6. What does the cross-attention look at?
#
# The cross-attention model's weights show, for each image patch, which moments of the
# sound it reads, and for each audio frame, which patches. Averaged over heads and over
# the query tokens, they become one map per direction: over the 4 × 4 patch grid of the
# image and over the 26 frames of the sound.

# %%
model = models["cross_attention", 0.0, seeds[0]]
with torch.no_grad():
    maps = model.fusion.attention_maps(model.encode([t.to(device) for t in x["test"]]))
image_reads_audio = maps[0].mean(dim=(1, 2)).cpu()  # (N, 26): image queries over audio frames
audio_reads_image = maps[1].mean(dim=(1, 2)).cpu()  # (N, 16): audio queries over image patches
fig, axes = plt.subplots(3, len(shown), figsize=(11, 6.2))
for col, i in enumerate(shown):
    axes[0, col].imshow(test["image"][i, 0], cmap="gray_r", interpolation="nearest")
    axes[0, col].set_title(f"digit {int(test['label'][i])}")
    axes[1, col].imshow(audio_reads_image[i].reshape(4, 4), cmap="Reds", vmin=0, interpolation="nearest")
    axes[2, col].imshow(test["audio"][i], origin="lower", aspect="auto", cmap="magma", extent=[0, 26, 0, 40])
    axes[2, col].plot(np.arange(26) + 0.5, image_reads_audio[i] / image_reads_audio[i].max() * 38, color="cyan", lw=1.5)
    axes[2, col].set_xlabel("audio token (40 ms)")
    for ax in axes[:, col]:
        ax.set_yticks([])
        if ax is not axes[2, col]:
            ax.set_xticks([])
axes[0, 0].set_ylabel("image (test input)")
axes[1, 0].set_ylabel("audio attends to\nthe 4 x 4 patches")
axes[2, 0].set_ylabel("image attends\nto frames (cyan)")
fig.suptitle("Cross-attention on test examples (mean over heads and queries; darker red = more attention)")
plt.show()

# %% [markdown]
# Does the attention follow the signal? We rebuild the same test examples without noise
# and occlusion, to know which patches hid ink and when the word was actually spoken,
# and compare with where the attention went:

# %%
from mmcourse.modalities import patchify

clean = avdigits.av_digits_tensors("test", config=replace(data_config, image_occlusion=0.0, audio_snr_db=None))
hidden = patchify((clean["image"] != test["image"]).float(), 2).amax(-1) > 0  # (N, 16) hides ink
ink = patchify((clean["image"] > 0).float(), 2).amax(-1) > 0  # (N, 16) has ink in the clean image
for name, where in {"hides ink": hidden, "shows ink": ink & ~hidden, "blank": ~ink}.items():
    print(f"mean attention on a patch that {name:>9}: {audio_reads_image[where].mean():.4f}")
print(f"(uniform attention: {1 / 16:.4f})")
speech = av_digits_tokens(clean["image"], clean["audio"])[1].mean(-1)  # (N, 26) loudness of the clean speech
r = np.corrcoef(speech.flatten(), image_reads_audio.flatten())[0, 1]
print(f"correlation between the loudness of the (clean) speech in a frame and the attention it receives: {r:.2f}")
mmcourse.record("attention_visible_ink_over_blank",
                float(audio_reads_image[ink & ~hidden].mean() / audio_reads_image[~ink].mean()), at_least=1.2)
mmcourse.record("attention_follows_speech_correlation", float(r), at_least=0.1)

# %% [markdown]
# The audio's queries read the patches that show ink more than blank ones or ones whose
# ink is hidden, and the image's queries follow the spoken word: the attention went
# where the information is, though nobody told it where that was. Still, attention maps
# are a view into the model, not an explanation of it: they show where information was
# *read*, not whether it mattered for the answer.
#
# ## Summary
#
# * **Early fusion** concatenates features (or token sequences, with modality-type
#   embeddings) and learns one joint model; **late fusion** combines the logits of
#   per-modality classifiers - averaged, it is 000 §4.1's additive model;
#   **interactive fusion** lets the modalities read each other, here by cross-attention
#   (002 §4.4); **gated fusion** mixes them with learned per-example weights, **FiLM** lets
#   one modulate the other, **tensor fusion** multiplies them out.
# * On AV-Digits every fused model clearly beats either modality alone. Late fusion is
#   as good as anything, because the modalities are conditionally independent given
#   the label, which makes the sum of per-modality log-probabilities the optimal fusion.
# * A model trained on complete inputs can fail badly when a modality goes missing.
#   **Modality dropout** in training makes every strategy degrade gracefully; late fusion
#   can also just skip the missing head. Neither protects against a modality that is
#   present but corrupted beyond anything seen in training: the model trusts it.
# * Fuse **embeddings**, never token ids or attention masks; give losses logits when they
#   expect logits.
#
# Next, chapter 06 goes deep into contrastive learning: aligning modalities *before* any
# label is seen.
#
# ## Exercises
#
# Replace each `raise NotImplementedError` (or `...`) with your answer and run the cell;
# `check()` tells you what is right or wrong. `hint()` and `solution()` help if you are stuck.

# %%
from mmcourse.exercises.ch05 import q1, q2, q3, q4


# Exercise 1: late fusion. `logits` is a list of M tensors (B, C), one per modality;
# `weights` is None (average them) or a tensor (M,) of non-negative weights summing to 1.
def my_late_fusion(logits, weights=None):
    raise NotImplementedError  # your code here


q1.check(my_late_fusion)


# %%
# Exercise 2: tensor fusion of two modalities: h1 (B, d1), h2 (B, d2) -> (B, (d1+1)*(d2+1)),
# the flattened outer product of [h1; 1] and [h2; 1] (row-major: h1's index varies slowest).
def my_tensor_fusion(h1, h2):
    raise NotImplementedError  # your code here


q2.check(my_tensor_fusion)


# %%
# Exercise 3: a modality-dropout mask (B, M) of booleans, True = keep: drop each modality
# of each example with probability p, but never all modalities of an example.
def my_modality_dropout_mask(batch_size, num_modalities, p, generator):
    raise NotImplementedError  # your code here


q3.check(my_modality_dropout_mask)

# %%
# Exercise 4: predict before you measure. The microphone of a deployed model breaks: the
# audio is missing at test time and you cannot retrain. In which model does the image
# still go through exactly the computation it went through in training?
#   "a": early fusion trained on complete inputs
#   "b": tensor fusion trained on complete inputs
#   "c": late fusion trained on complete inputs, averaging only the heads of the present modalities
#   "d": FiLM in which the image modulates the audio tokens
answer = ...  # "a", "b", "c" or "d"
q4.check(answer)

# %%
# q1.hint(); q1.solution()
