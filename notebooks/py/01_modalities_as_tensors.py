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
# # 01 · Modalities as tensors
#
# A multimodal model reads text, images and sound. A neural network reads none of them: it
# reads **tensors**. This chapter follows each modality from the raw signal to a sequence
# of vectors - the common currency every later chapter spends - and ends by training the
# smallest possible model that puts two modalities into one **shared embedding space**
# (共享嵌入空间).
#
# The source articles call this *modal representation* (模态表示, 002 §2.1): mapping text,
# images, audio and video "into the same vector space, so that data of different modalities
# can be computed with together". Their input-representation section (002 §4.1) writes
# every modality $m$ as a sequence of vectors
#
# $$X^{(m)} = [x^{(m)}_1, x^{(m)}_2, \dots, x^{(m)}_{L_m}], \qquad x^{(m)}_i \in \mathbb{R}^{D},$$
#
# with $L_m$ the sequence length of modality $m$. Here we compute $X^{(m)}$ for text
# (tokens), images (patches) and audio (spectrogram frames), with real data throughout.

# %% tags=["parameters"]
# Parameters: papermill and `mmcourse run 01 -p name value` can change these.
seed = 0  # random seed for every generator
device = "auto"  # "auto" picks cuda, then mps, then cpu
patch_size = 32  # P: side of an image patch in pixels (the photo is 224 x 224)
n_mels = 40  # J: number of mel bands of the audio features
embed_dim = 32  # D: width of the shared embedding space
align_steps = 250  # training steps of the shared space (full: 2000 on a GPU)
batch_size = 128  # pairs per training step
lr = 3e-3  # AdamW learning rate

# %%
import math

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

import mmcourse
from mmcourse import utils
from mmcourse.plotting import setup_notebook

utils.positive_int(patch_size=patch_size, n_mels=n_mels, embed_dim=embed_dim)
utils.positive_int(align_steps=align_steps, batch_size=batch_size)
utils.positive_float(lr=lr)
if 224 % patch_size:
    raise ValueError(f"patch_size must divide the 224-pixel photo, got {patch_size}")
mmcourse.seed_everything(seed)
device = mmcourse.get_device(device)
setup_notebook()
print("computing on", device)

# %% [markdown]
# ## 1. Text → tokens → vectors
#
# Text becomes a sequence of **tokens** (词元): pieces of words from a fixed vocabulary.
# The course's pretrained text encoder, all-MiniLM-L6-v2, uses BERT's **WordPiece**
# vocabulary of 30,522 lower-cased pieces. Frequent words are one piece; rare words are
# split into pieces, continuation pieces marked `##`. So no word is ever "unknown".

# %%
from mmcourse.pretrained import encode_sentences, load_text_encoder, mean_pooling

tokenizer, text_model = load_text_encoder()
text_model = text_model.to(device)
for sentence in ["A red circle on the left.", "Multimodal transformers read spectrograms."]:
    print(sentence, "->", tokenizer.tokenize(sentence))

# %% [markdown]
# The tokenizer also adds the special tokens `[CLS]` (start) and `[SEP]` (end), maps every
# piece to its integer **id**, and pads a batch to one length, with an **attention mask**
# that marks the real tokens (1) and the padding (0):

# %%
captions = ["a red circle", "a crimson disk on the left", "a big blue square"]
batch = tokenizer(captions, padding=True, return_tensors="pt")
for i, caption in enumerate(captions):
    print(f"{caption!r:32} ids {batch['input_ids'][i].tolist()}")
    print(f"{'':32} mask {batch['attention_mask'][i].tolist()}")
print("tokens of the first caption:", tokenizer.convert_ids_to_tokens(batch["input_ids"][0]))

# %% [markdown]
# > **Common pitfall: token ids are not features.** An id is a row number in a table, not
# > a measurement: id 4418 ("circle") is not "bigger" than id 2417 ("red"), and averaging ids is
# > meaningless. One of the source articles builds its multimodal input by concatenating
# > `input_ids` and the `attention_mask` with image features (000 §5.2). What should be
# > fused is the **embeddings** the ids select - the vectors below - never the ids.
#
# ### From ids to vectors
#
# The model's first layer turns ids into vectors. For BERT, the input vector of token $i$
# adds three learned tables - the word embedding of its id $w_i$, a position embedding for
# position $i$, and a segment (token-type) embedding $t_i$ - then normalises:
#
# $$h^{0}_i = \mathrm{LayerNorm}\big(E^{\text{word}}_{w_i} + E^{\text{pos}}_{i} + E^{\text{type}}_{t_i}\big) \in \mathbb{R}^{384}.$$
#
# We compute it by hand from the model's tables and check it against the model's own
# embedding layer:

# %%
emb = text_model.embeddings
ids = batch["input_ids"].to(device)  # (B, N)
B, N = ids.shape
positions = torch.arange(N, device=device)  # (N,)
types = torch.zeros_like(ids)  # (B, N): one segment
with torch.no_grad():
    h0 = emb.word_embeddings(ids) + emb.position_embeddings(positions) + emb.token_type_embeddings(types)
    h0 = emb.LayerNorm(h0)  # (B, N, 384)
    reference = emb(input_ids=ids)
print("word-embedding table:", tuple(emb.word_embeddings.weight.shape), "  h0:", tuple(h0.shape))
torch.testing.assert_close(h0, reference)
print("our h0 equals BertEmbeddings' output")

# %% [markdown]
# These first vectors know nothing of context: "disk" has the same $E^{\text{word}}$ in
# "a crimson disk" and "a hard disk". The six transformer layers (chapters 02-04) mix the
# tokens so that each output vector depends on the whole sentence. One vector per
# **sentence** comes from averaging the output tokens, ignoring padding (*mean pooling*,
# as sentence-transformers does), then scaling to unit length:
#
# $$s = \frac{\sum_i m_i\, h^{L}_i}{\sum_i m_i}, \qquad \hat s = \frac{s}{\lVert s \rVert}.$$

# %%
with torch.no_grad():
    out = text_model(**batch.to(device)).last_hidden_state  # (B, N, 384)
s = F.normalize(mean_pooling(out, batch["attention_mask"]), dim=-1)  # (B, 384)
torch.testing.assert_close(s, encode_sentences(captions, tokenizer, text_model))
print("sentence vectors", tuple(s.shape), "- equal to mmcourse.pretrained.encode_sentences")

# %% [markdown]
# The model was fine-tuned on a billion sentence pairs so that sentences with similar
# meaning get similar vectors. Does that hold for Shapes-world captions written with
# synonyms? The cosine similarity $\hat s_a \cdot \hat s_b$ of every pair answers it:

# %%
sentences = [
    "a red circle", "a crimson disk", "a scarlet round shape",
    "a blue square", "a navy box", "an azure block",
    "the digit seven", "someone says seven",
]
S = encode_sentences(sentences, tokenizer, text_model).cpu()
sim = S @ S.T  # (8, 8) cosine similarities
fig, ax = plt.subplots(figsize=(5.5, 4.5))
im = ax.imshow(sim, cmap="viridis", vmin=0, vmax=1)
ax.set_xticks(range(len(sentences)), sentences, rotation=60, ha="right")
ax.set_yticks(range(len(sentences)), sentences)
for (r, c), v in np.ndenumerate(sim.numpy()):
    ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if v < 0.6 else "k")
fig.colorbar(im, label="cosine similarity")
ax.set_title("MiniLM sentence embeddings")
plt.show()

groups = [0, 0, 0, 1, 1, 1, 2, 2]
same = [sim[i, j] for i in range(8) for j in range(8) if i < j and groups[i] == groups[j]]
diff = [sim[i, j] for i in range(8) for j in range(8) if i < j and groups[i] != groups[j]]
print(f"mean similarity, same meaning: {np.mean(same):.2f};  different meaning: {np.mean(diff):.2f}")
mmcourse.record("text_synonym_margin", float(np.mean(same) - np.mean(diff)), at_least=0.1)
a, b, c = sentences.index("a red circle"), sentences.index("a crimson disk"), sentences.index("a blue square")
verdict = "closer to" if sim[a, c] > sim[a, b] else "further from"
print(f"but 'a red circle' is {verdict} 'a blue square' ({sim[a, c]:.2f}) than 'a crimson disk' ({sim[a, b]:.2f})")

# %% [markdown]
# On average, same-meaning captions are closer, so a pretrained text tower gives a head
# start. But it is no thesaurus: short captions that share a *template* ("a ⟨colour⟩
# ⟨shape⟩") can be closer than true synonyms. Chapter 06 measures what this means for
# zero-shot recognition, and how training on image-caption pairs fixes it.
#
# ## 2. Image → patches
#
# An image is a tensor of shape $(C, H, W)$ - channels, height, width - of pixel values.
# A Vision Transformer (ViT) reads it as a sequence: it cuts the image into
# non-overlapping $P \times P$ **patches** (图像块) and flattens each one into a vector of
# $P \cdot P \cdot C$ numbers. The image becomes $L = (H/P)(W/P)$ tokens.
#
# We use a real photograph shipped with scikit-learn, cropped to 224 × 224 pixels (the
# classic ViT input size).

# %%
from sklearn.datasets import load_sample_images

photo = load_sample_images().images[0]  # (427, 640, 3) uint8: a temple in China
crop = photo[100:324, 200:424]  # (224, 224, 3)
image = torch.tensor(crop).permute(2, 0, 1).float() / 255  # (C, H, W) in [0, 1]
C, H, W = image.shape
P = patch_size
print(f"image (C, H, W) = {tuple(image.shape)}; P = {P}; L = (H/P)(W/P) = {(H // P) * (W // P)} patches "
      f"of P*P*C = {P * P * C} values")

# %% [markdown]
# Cutting into patches is two reshapes around one permutation: split $H$ into
# $(H/P, P)$ and $W$ into $(W/P, P)$, move the grid axes to the front, flatten each patch
# as (row in patch, column in patch, channel):

# %%
x = image.unsqueeze(0)  # (B, C, H, W) with B = 1
x = x.reshape(1, C, H // P, P, W // P, P)  # (B, C, h, P, w, P)
x = x.permute(0, 2, 4, 3, 5, 1)  # (B, h, w, P, P, C)
patches = x.reshape(1, (H // P) * (W // P), P * P * C)  # (B, L, P*P*C)
print("patches:", tuple(patches.shape))

from mmcourse.modalities import patchify, unpatchify

assert torch.equal(patches, patchify(image.unsqueeze(0), P))
assert torch.equal(patches, rearrange(image[None], "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=P, p2=P))
assert torch.equal(unpatchify(patches, patch_size=P, height=H, width=W), image[None])
print("equal to mmcourse.modalities.patchify and to einops; unpatchify restores the image")

# %%
grid = H // P
fig = plt.figure(figsize=(10, 4))
ax = fig.add_subplot(1, 2, 1)
ax.imshow(crop)
for k in range(1, grid):
    ax.axhline(k * P - 0.5, color="w", lw=0.8)
    ax.axvline(k * P - 0.5, color="w", lw=0.8)
ax.set_title(f"224 x 224 photo cut into {grid} x {grid} patches of {P} x {P}")
ax.axis("off")
shown = min(16, patches.shape[1])
for k in range(shown):
    sub = fig.add_subplot(4, 2 * 8, (k // 8) * 16 + 9 + k % 8)
    sub.imshow(patches[0, k].reshape(P, P, C).numpy())
    sub.set_title(f"token {k}", fontsize=6)
    sub.axis("off")
fig.suptitle("An image becomes a sequence: patches in reading order (the first 16 shown)")
plt.show()

# %% [markdown]
# A ViT then maps each flattened patch to the model width with one linear layer,
# $x_i = W p_i + b$. Because patches do not overlap, that is exactly a convolution with
# kernel size and stride $P$ - which is how most implementations write it. The two agree:

# %%
D_model = 64
conv = torch.nn.Conv2d(C, D_model, kernel_size=P, stride=P)
linear = torch.nn.Linear(P * P * C, D_model)
with torch.no_grad():
    linear.weight.copy_(rearrange(conv.weight, "d c p1 p2 -> d (p1 p2 c)"))
    linear.bias.copy_(conv.bias)
    tokens_linear = linear(patches)  # (1, L, D)
    tokens_conv = rearrange(conv(image[None]), "b d h w -> b (h w) d")  # (1, L, D)
torch.testing.assert_close(tokens_linear, tokens_conv, atol=1e-4, rtol=1e-4)
print(f"linear on patches == Conv2d(stride={P}): image tokens of shape {tuple(tokens_linear.shape)}")

# %% [markdown]
# ## 3. Audio → waveform → log-mel spectrogram
#
# Sound is a **waveform** (波形): air pressure sampled at a fixed rate, here 8,000 samples
# per second. A spoken "seven" from AV-Digits is a vector of 8,000 numbers:

# %%
from mmcourse import audio
from mmcourse.data import avdigits

spoken = avdigits.load_spoken_digits()
sr = spoken.sample_rate
k = int(np.flatnonzero((spoken.digits == 7) & (spoken.speeds == 170))[0])
wave = torch.from_numpy(spoken.waveforms[k].astype(np.float32) / 32768.0)  # (T,)
print(f"'seven', voice {spoken.voices[k]}: {wave.shape[0]} samples at {sr} Hz = {wave.shape[0] / sr:.2f} s")

# %% [markdown]
# Raw samples are a poor input: what we hear is *which frequencies* are present *when*.
# The **short-time Fourier transform** (短时傅里叶变换) cuts the waveform into overlapping
# frames of $N$ samples every $H$ samples, multiplies each by a window $w$, and takes its
# discrete Fourier transform:
#
# $$X[m, k] = \sum_{n=0}^{N-1} x[n + mH]\, w[n]\, e^{-2\pi i k n / N}, \qquad S[k, m] = |X[m, k]|^2 .$$
#
# With $N = 256$ (32 ms) and $H = 80$ (10 ms) a 1-second clip gives 101 frames of
# $N/2 + 1 = 129$ frequency bins. We write it with `torch.stft` and check the package:

# %%
n_fft, hop = 256, 80
window = torch.hann_window(n_fft)
X = torch.stft(wave, n_fft=n_fft, hop_length=hop, window=window, center=True,
               pad_mode="reflect", return_complex=True)  # (K, M) complex
S = X.abs() ** 2  # (K, M) power
torch.testing.assert_close(S, audio.power_spectrogram(wave, n_fft=n_fft, hop_length=hop))
print("power spectrogram S:", tuple(S.shape), "(frequency bins, frames)")

# %% [markdown]
# Human hearing resolves low frequencies finely and high ones coarsely. The **mel scale**
# (梅尔刻度) models this (in the HTK form used here), $\mathrm{mel}(f) = 2595 \log_{10}(1 + f/700)$, and a bank of $J$
# triangular filters, evenly spaced in mel, pools the $K$ bins into $J$ bands:
# $M = F^\top S$ with $F \in \mathbb{R}^{K \times J}$. Finally a logarithm (decibels) matches
# loudness perception and tames the huge dynamic range:
# $L = 10 \log_{10}(\max(M, \epsilon))$ - the **log-mel spectrogram** (对数梅尔频谱).

# %%
F_mel = audio.mel_filter_bank(num_frequency_bins=n_fft // 2 + 1, num_mel_filters=n_mels,
                              min_frequency=0.0, max_frequency=sr / 2, sampling_rate=sr)  # (K, J)
L = 10 * torch.log10(torch.clamp(F_mel.T @ S, min=1e-10))  # (J, M)
torch.testing.assert_close(L, audio.log_mel_spectrogram(wave, sample_rate=sr, n_fft=n_fft,
                                                         hop_length=hop, n_mels=n_mels))

# The trusted reference: transformers' own (numpy) audio utilities.
from transformers.audio_utils import mel_filter_bank, spectrogram, window_function

F_ref = mel_filter_bank(num_frequency_bins=n_fft // 2 + 1, num_mel_filters=n_mels, min_frequency=0.0,
                        max_frequency=sr / 2, sampling_rate=sr, mel_scale="htk")
L_ref = spectrogram(wave.numpy(), window_function(n_fft, "hann"), frame_length=n_fft, hop_length=hop,
                    power=2.0, mel_filters=F_ref, log_mel="dB", reference=1.0, min_value=1e-10)
print(f"log-mel {tuple(L.shape)}; largest difference from transformers.audio_utils: "
      f"{np.abs(L.numpy() - L_ref).max():.1e} dB")
assert np.allclose(L.numpy(), L_ref, atol=1e-3)

# %%
t = np.arange(wave.shape[0]) / sr
fig, axes = plt.subplots(1, 4, figsize=(13, 3))
axes[0].plot(t, wave, lw=0.5)
axes[0].set(title="waveform", xlabel="time (s)", ylabel="amplitude")
axes[1].imshow(10 * torch.log10(S + 1e-10), origin="lower", aspect="auto", cmap="magma",
               extent=[0, t[-1], 0, sr / 2])
axes[1].set(title="power spectrogram (dB)", xlabel="time (s)", ylabel="frequency (Hz)")
freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
axes[2].plot(freqs, F_mel[:, ::3], lw=0.8)
axes[2].set(title=f"mel filters (every 3rd of {n_mels})", xlabel="frequency (Hz)", ylabel="weight")
axes[3].imshow(L, origin="lower", aspect="auto", cmap="magma", extent=[0, t[-1], 0, n_mels])
axes[3].set(title="log-mel spectrogram (dB)", xlabel="time (s)", ylabel="mel band")
plt.show()

# %% [markdown]
# The clip is zero-padded to one second; where there is only silence the log-mel sits at
# its floor, $10 \log_{10} \epsilon = -100$ dB (the black block on the right).
#
# The log-mel spectrogram is a $(J, M)$ image. A model can read it as $M$ tokens of $J$
# values each (one token per frame or two: Whisper runs two small convolutions over the
# frames, the second with stride 2, giving one token per 20 ms), or cut it into patches like a photo (as the Audio Spectrogram Transformer
# does). Either way audio, too, has become $X^{(\text{audio})} = [x_1, \dots, x_{L}]$.
#
# | modality | raw tensor | as a sequence $X^{(m)}$ |
# |---|---|---|
# | text | string | $L$ WordPiece tokens → $(L, 384)$ |
# | image | $(3, 224, 224)$ | $(224/P)^2$ patches → $(L, P^2 \cdot 3)$ |
# | audio | $(8000,)$ samples | 101 frames → $(101, J)$ |

# %% [markdown]
# ### Explore the two knobs
#
# The patch size $P$ sets how many tokens an image becomes, $L = (H/P)(W/P)$, and how much
# each one holds ($P^2 C$ numbers); the number of mel bands $J$ sets how finely each audio
# frame describes the spectrum. Move them and watch both sequences change (the same photo
# and the same spoken "seven" as above; without a running kernel you see the figure for the
# parameters of this run).

# %%
import ipywidgets as widgets

from mmcourse.plotting import draw_patches_and_mel
from mmcourse.widgets import explore

explore(
    draw_patches_and_mel,
    figsize=(11, 3.6),
    fixed={"image": image, "wave": wave, "sample_rate": sr, "n_fft": n_fft, "hop_length": hop},
    patch_size=widgets.SelectionSlider(options=sorted({8, 14, 16, 28, 32, 56, 112, patch_size}), value=patch_size,
                                       description="P"),
    n_mels=widgets.IntSlider(value=n_mels, min=8, max=128, step=8, description="J (mel bands)"),
);

# %% [markdown]
# ## 4. A first shared embedding space
#
# The three sequences above live in unrelated spaces: nothing makes patch vectors and
# frame vectors comparable. The goal of modal representation is one space where a picture
# of a 7 and the spoken word "seven" are **close**. We build the smallest such model on
# AV-Digits: two small towers $f$ (images) and $g$ (log-mel spectrograms), each a two-layer
# MLP ending in a $D$-dimensional vector scaled to unit length.
#
# It is trained **contrastively** (chapter 06 goes deep): for a batch of $B$ matching
# pairs $(u_i, v_i) = (f(\text{image}_i), g(\text{audio}_i))$, the $B \times B$ matrix of
# similarities $s \cdot u_i^\top v_j$ should be largest on the diagonal. Each row is a
# $B$-way classification of "which clip goes with this image", and each column the
# reverse:
#
# $$\mathcal{L} = \frac{1}{2B}\sum_{i=1}^{B}\Big[-\log\frac{e^{s\,u_i^\top v_i}}{\sum_j e^{s\,u_i^\top v_j}} - \log\frac{e^{s\,u_i^\top v_i}}{\sum_j e^{s\,u_j^\top v_i}}\Big],$$
#
# where $s$ is a learned inverse temperature. The test split speaks with **voices never
# heard in training**.

# %%
from mmcourse.contrastive import clip_loss
from mmcourse.train import ShuffledBatches, TrainConfig, fit
from mmcourse.modalities import SharedSpace, SharedSpaceConfig, retrieval_accuracy

config = avdigits.AVDigitsConfig(seed=seed)
train = avdigits.av_digits_tensors("train", config=config, n_mels=n_mels)
test = avdigits.av_digits_tensors("test", config=config, n_mels=n_mels)
mu, sigma = train["audio"].mean(), train["audio"].std()  # standardise with training statistics
train_audio, test_audio = (train["audio"] - mu) / sigma, (test["audio"] - mu) / sigma
print(f"train: {len(train['label'])} pairs, images {tuple(train['image'].shape[1:])}, "
      f"log-mels {tuple(train['audio'].shape[1:])}; test: {len(test['label'])} pairs")
print("test voices:", sorted(set(test["voice"])), "- none in train:",
      not set(test["voice"]) & set(train["voice"]))

model = SharedSpace(SharedSpaceConfig(image_dim=64, audio_dim=train_audio[0].numel(), embed_dim=embed_dim)).to(device)


@torch.no_grad()
def embed_test(model):
    model.eval()
    u = model.encode_image(test["image"].to(device)).cpu()
    v = model.encode_audio(test_audio.to(device)).cpu()
    model.train()
    return u, v


before = embed_test(model)
s_before = model.logit_scale().item()  # s at initialisation

# %% [markdown]
# The training loop is the standard one: draw a batch, compute the loss, step AdamW. The
# course runs every training through one implementation of it, `mmcourse.train.fit`: we give
# it the model, the batches (`ShuffledBatches`: a fresh shuffle of the pairs every epoch) and
# a **loss function** of the model and one batch; it does the rest (the optimiser, the
# learning-rate schedule, moving batches to the device). Chapter 08 takes it apart.

# %%
def align_loss(model, batch):
    """The CLIP loss of one batch of (image, clip) pairs."""
    images, clips = batch
    u, v, scale = model(images, clips)  # (B, d), (B, d), the learned s
    return clip_loss(u, v, scale)


pairs = ShuffledBatches(train["image"], train_audio, batch_size=batch_size, seed=seed)
align_fit = fit(model, pairs, loss_fn=align_loss,
                config=TrainConfig(max_steps=align_steps, lr=lr, schedule="constant", grad_clip=None,
                                   progress=False, device=str(device)))
losses = [row["loss"] for row in align_fit.history]
scale = model.logit_scale()
u_test, v_test = embed_test(model)

# %% [markdown]
# We measure **cross-modal retrieval** (跨模态检索) on the test split: for each image,
# is the nearest clip in the shared space a recording of the same digit? And for each
# clip, the nearest image? Chance is 10%.

# %%
y = test["label"]
acc_i2a = retrieval_accuracy(u_test, v_test, y, y)
acc_a2i = retrieval_accuracy(v_test, u_test, y, y)
acc_before = retrieval_accuracy(*before, y, y)
print(f"image -> audio top-1: {acc_i2a:.1%}   audio -> image top-1: {acc_a2i:.1%}   "
      f"(before training: {acc_before:.1%}, chance 10%)   final logit scale s = {scale.item():.1f}")
mmcourse.record("retrieval_image_to_audio", acc_i2a, at_least=0.5)
mmcourse.record("retrieval_audio_to_image", acc_a2i, at_least=0.5)
# Why the loss starts above ln B: at initialisation the scaled similarities s u_i^T v_j of a row
# are not all equal; for random logits of spread sigma, the loss is about ln B + sigma^2 / 2.
row_spread = (s_before * before[0] @ before[1].T).std(dim=1).mean().item()
print(f"first step's loss {losses[0]:.2f};  ln B = ln {batch_size} = {math.log(batch_size):.2f};  "
      f"spread of s u_i^T v_j in a row at initialisation (test split, s = {s_before:.0f}): {row_spread:.2f}, "
      f"ln B + spread^2 / 2 = {math.log(batch_size) + row_spread**2 / 2:.2f}")
mmcourse.record("first_loss_minus_ln_B", losses[0] - math.log(batch_size), at_least=0.0)

# %%
# One test image and one test clip per digit: the similarity matrix before and after.
first = [int((y == d).nonzero()[0]) for d in range(10)]
second = [int((y == d).nonzero()[1]) for d in range(10)]
fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
axes[0].plot(losses, lw=0.8)
axes[0].set(title="training loss", xlabel="step", ylabel="CLIP loss")
for ax, (u, v), title in [(axes[1], before, "before training"), (axes[2], (u_test, v_test), "after training")]:
    im = ax.imshow(u[first] @ v[second].T, cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set(title=f"cosine similarity, {title}", xlabel="spoken digit (test voice)", ylabel="handwritten digit")
    ax.set_xticks(range(10))
    ax.set_yticks(range(10))
fig.colorbar(im, ax=axes[1:], label="cosine similarity")
plt.show()

# %% [markdown]
# The loss does not start at $\ln B$, the loss of a uniform guess among the batch, but
# above it (the line printed above gives both numbers). At initialisation the scaled
# similarities $s\,u_i^\top v_j$ of a row are random numbers with some spread $\sigma$,
# not all equal, and the log-sum-exp in the denominator is pulled up by the largest wrong
# ones: the log of a mean of exponentials is at least the mean (Jensen), so random logits
# cost more than $\ln B$ on average, about $\ln B + \sigma^2/2$ for Gaussian ones. The
# printed estimate from the initial spread is rough (measured on the test split without
# dropout, while the first loss is one training batch with dropout) and falls short of
# the first loss, but it shows the direction and the size of the effect. The loss may sit
# up there for a while before it falls. After training the diagonal
# lights up: the image of a digit and the
# sound of its name point the same way. A 2-D view of the space (principal components of
# all test embeddings) shows both modalities meeting in ten clusters:

# %%
both = torch.cat([u_test, v_test])  # (2 * N_test, D)
centred = both - both.mean(0)
_, _, V = torch.linalg.svd(centred, full_matrices=False)
xy = centred @ V[:2].T  # (2 * N_test, 2)
n_test = len(y)
fig, ax = plt.subplots(figsize=(5.5, 4.5))
sc = ax.scatter(xy[:n_test, 0], xy[:n_test, 1], c=y, cmap="tab10", marker="o", s=12, label="image")
ax.scatter(xy[n_test:, 0], xy[n_test:, 1], c=y, cmap="tab10", marker="x", s=12, label="audio")
fig.colorbar(sc, label="digit")
ax.legend()
ax.set(title="The shared space (test split, first two principal components)", xlabel="PC 1", ylabel="PC 2")
plt.show()

# %% [markdown]
# ## Summary
#
# * **Text** → WordPiece tokens → ids → embedding vectors ($h^0$: word + position + type,
#   normalised); a pretrained encoder makes them contextual, and mean pooling gives one
#   vector per sentence.
# * **Images** → $P \times P$ patches → flattened vectors; a linear patch embedding equals a
#   strided convolution.
# * **Audio** → waveform → STFT power → mel filters → log-mel frames.
# * Every modality becomes $X^{(m)} = [x_1, \dots, x_{L_m}]$; a contrastive loss can pull two
#   modalities into one **shared space**, where retrieval across modalities works for
#   voices never heard in training.
#
# Next, chapter 02 opens the box that mixes these tokens: attention.
#
# ## Exercises
#
# Replace each `raise NotImplementedError` with your answer and run the cell; `check()`
# tells you what is right or wrong. `hint()` and `solution()` help if you are stuck.

# %%
from mmcourse.exercises.ch01 import q1, q2, q3, q4


# Exercise 1: cut a batch of images (B, C, H, W) into patches (B, L, P*P*C), ViT layout.
def my_patchify(images, patch_size):
    raise NotImplementedError  # your code here


q1.check(my_patchify)

# %%
# Exercise 2: how many tokens does a 224 x 224 RGB image become with 16 x 16 patches?
num_tokens = ...  # your answer, an int
q2.check(num_tokens)


# %%
# Exercise 3: convert frequencies (a tensor, Hz) to mels with the HTK formula.
def my_hz_to_mel(f):
    raise NotImplementedError  # your code here


q3.check(my_hz_to_mel)


# %%
# Exercise 4: the (B, M) cosine-similarity matrix between embeddings a (B, D) and b (M, D).
def my_similarity(a, b):
    raise NotImplementedError  # your code here


q4.check(my_similarity)

# %%
# q1.hint(); q1.solution()
