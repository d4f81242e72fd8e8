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
# # 15 · Scaling out: the same CLIP on many processes
#
# The source article lists "multimodal pretraining" and "hyper-parameter settings and
# training tricks" (004 §5.2) and names compute and training efficiency as a main
# challenge (004 §8.2.1), but stops at the headings. This chapter fills them in for
# the model of chapter 06. CLIP itself was trained with a batch of 32,768 pairs spread over
# hundreds of GPUs (Radford et al. 2021, §2.5): that is **distributed training**
# (分布式训练). The simplest and most common form is **data parallelism** (数据并行):
# every process holds a full copy of the model and works on its own slice of the batch.
#
# For most losses data parallelism is a solved problem - wrap the model in
# `DistributedDataParallel` and launch it with `torchrun`. The contrastive loss is the
# exception worth a chapter: every image is compared with *every* text of the batch, so a
# process cannot compute its loss from its own slice. Here we
#
# 1. see why, on paper and in numbers;
# 2. run the chapter-06 training under `torchrun` with 2 CPU processes and show that it
#    reproduces the single-process run to float precision;
# 3. work out how it scales to many GPUs and machines, including the memory of the
#    similarity matrix;
# 4. see why gradient accumulation does *not* give a contrastive loss more negatives.

# %% tags=["parameters"]
# Parameters: papermill and `mmcourse run 15 -p name value` can change these.
seed = 0  # random seed: data, initial weights and batch order (the same in every process)
device = "auto"  # "auto" picks cuda, then mps, then cpu (for the computations in this kernel)
world_size = 2  # W: processes started by torchrun (full: one per GPU, e.g. 8)
steps = 60  # optimiser steps of both runs (full: several thousand on GPUs)
batch_size = 64  # G: the global batch, W local batches of G / W (full: 4096 and more)
num_pairs = 1024  # N: Shapes-world training pairs, generated alike by every process (full: 100_000)
width = 32  # D: width of both towers, one block each (full: 256 with more layers)
run_device = "cpu"  # torchrun processes: "cpu" (gloo) or "cuda" (nccl, needs world_size GPUs)
cpu_threads = 1  # torch threads per process on a CPU (0: torch's default)

# %%
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    import resource  # Unix: CPU time of child processes
except ImportError:  # Windows
    resource = None

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

import mmcourse
from mmcourse import utils
from mmcourse.plotting import setup_notebook

utils.positive_int(world_size=world_size, steps=steps, batch_size=batch_size, num_pairs=num_pairs, width=width)
utils.non_negative_int(cpu_threads=cpu_threads)
utils.one_of("run_device", run_device, ("cpu", "cuda"))
if batch_size % world_size:
    raise ValueError(f"batch_size={batch_size} (the global batch) must be divisible by world_size={world_size}")
if batch_size > num_pairs:
    raise ValueError(f"batch_size={batch_size} is larger than num_pairs={num_pairs}")
if width % 2:
    raise ValueError(f"width must be even (2 attention heads), got {width}")
if run_device == "cuda" and torch.cuda.device_count() < world_size:
    raise ValueError(f"run_device='cuda' needs world_size={world_size} GPUs, found {torch.cuda.device_count()}")
mmcourse.seed_everything(seed)
device = mmcourse.get_device(device)
if device.type == "cpu" and cpu_threads:
    torch.set_num_threads(cpu_threads)  # tiny ops: threads mostly wait on each other on a busy machine
setup_notebook()
print("this kernel computes on", device, "| torchrun processes on", run_device)

# %% [markdown]
# ## 1. The idea: one replica per process, and a batch that must be put back together
#
# With data parallelism, W processes each hold an identical **replica** (副本) of the model.
# Each step, the global batch of G pairs is cut into W local batches of B = G / W; process r
# (its **rank** (进程序号), 0 … W-1) runs forward and backward on its slice; an
# **all-reduce** (全归约) then averages the gradients over the processes, so that every
# replica takes the same optimiser step and the replicas stay identical. (This "rank" is a
# process's number, nothing to do with the rank r of a LoRA update in chapter 08.)
#
# CLIP adds one communication step before the loss: an **all-gather** (全收集) of the
# embeddings. Each process's towers turn its B pairs into B image and B text embeddings of
# width E (U_r and V_r, both B × E); after the gather every process holds all G image and
# all G text embeddings (U and V, G × E). Process r then scores its own B images against all
# G texts (and its B texts against all G images): a B × G strip of the G × G similarity
# matrix. Counting from 0, its local pair i (i = 0 … B-1) is pair r·B + i of the global
# batch, so the correct text of its image i sits at column r·B + i - the targets are
# **offset by rank**.

# %%
W_fig, B_fig = 4, 3
G_fig = W_fig * B_fig
colours = plt.cm.tab10.colors
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [1.3, 1]})
ax0.set_xlim(0, 10)
ax0.set_ylim(0, 10)
ax0.axis("off")


def box(x, y, text, colour, alpha=0.15):
    ax0.text(x, y, text, ha="center", va="center", fontsize=9,
             bbox={"boxstyle": "round,pad=0.4", "fc": (*colour[:3], alpha), "ec": colour})


def arrow(x0, y0, x1, y1, colour):
    ax0.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops={"arrowstyle": "->", "color": colour})


grey = (0.5, 0.5, 0.5)
for r, x in enumerate((2.2, 7.8)):
    c = colours[r]
    box(x, 9.3, f"slice {r} of the global batch\n(B = G / W pairs)", c)
    box(x, 7.5, f"replica {r}\n(identical weights)", c)
    box(x, 5.8, f"U_{r}, V_{r}: (B, E)", c)
    box(x, 2.6, f"loss L_{r}: B rows × G columns\ntargets r·B + i", c)
    arrow(x, 8.75, x, 8.05, c)
    arrow(x, 7.0, x, 6.2, c)
    arrow(x, 5.4, 5 + (x - 5) * 0.35, 4.55, c)
    arrow(5 + (x - 5) * 0.35, 3.75, x, 3.15, c)
box(5, 4.15, "all-gather (with gradient):\nU = [U_0; U_1], V = [V_0; V_1]  (G, E) on every process", grey, 0.1)
box(5, 0.7, "backward: the gather returns each process its gradients;\n"
    "DDP's all-reduce averages the weight gradients -> the same step everywhere", grey, 0.1)
for x in (2.2, 7.8):
    arrow(x, 2.05, 5 + (x - 5) * 0.45, 1.25, grey)
ax0.set_title("data parallelism for CLIP, W = 2 processes")
grid = np.zeros((G_fig, G_fig))
for r in range(W_fig):
    grid[r * B_fig:(r + 1) * B_fig] = r + 1
stripes = plt.matplotlib.colors.ListedColormap(["white", *[(*colours[r], 0.35) for r in range(W_fig)]])
ax1.imshow(grid, cmap=stripes, vmin=0, vmax=W_fig)
ax1.scatter(np.arange(G_fig), np.arange(G_fig), marker="s", s=40, c="k",
            label="target of row r·B + i (rank r, local pair i): column r·B + i")
ax1.set_yticks([r * B_fig + (B_fig - 1) / 2 for r in range(W_fig)], [f"rank {r}" for r in range(W_fig)])
ax1.set_xlabel("text j (gathered from all processes)")
ax1.set_ylabel("image rows, B per process")
ax1.set_title(f"G × G logits, W = {W_fig}, B = {B_fig}: each rank\ncomputes only its B × G strip (local_loss)")
ax1.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize=8)
plt.show()

# %% [markdown]
# ## 2. The math: why the contrastive loss needs the gather
#
# Indices count from 0 throughout: pair i = 0 … G-1 of the global batch, and process r's
# local pair i (i = 0 … B-1) is global pair r·B + i.
#
# **A per-example loss splits.** If $L(\theta) = \frac1G \sum_{i=0}^{G-1} \ell_i(\theta)$ and
# each process gets B = G / W examples, with $L_r = \frac1B\sum_{i=0}^{B-1} \ell_{rB+i}$,
# then $L = \frac1W \sum_r L_r$ and
# $$\nabla L = \frac1W \sum_{r=0}^{W-1} \nabla L_r,$$
# exactly the average that DDP's all-reduce computes. Nothing else is needed.
#
# **The CLIP loss does not split.** With L2-normalised embeddings $u_i$, $v_j$ and logit
# scale $s = 1/\tau$ (chapter 06),
# $$\ell_i = -\tfrac12\Big[\log \frac{e^{s\,u_i\cdot v_i}}{\sum_{j=0}^{G-1} e^{s\,u_i\cdot v_j}}
#  + \log \frac{e^{s\,v_i\cdot u_i}}{\sum_{j=0}^{G-1} e^{s\,v_i\cdot u_j}}\Big],$$
# and the denominators run over the **whole batch**: $\ell_i$ depends on every other pair.
# A process that computes CLIP on its own slice uses B - 1 negatives per pair instead of
# G - 1: a different (easier) objective.
#
# **With the gather.** Process r gathers $U = [U_0; \dots; U_{W-1}]$ and $V$ (both G × E),
# and computes for its own rows
# $$L_r = \frac{1}{2B}\sum_{i=0}^{B-1}\Big[\mathrm{CE}\big(s\,u_{rB+i} V^\top,\ rB+i\big)
#  + \mathrm{CE}\big(s\,v_{rB+i} U^\top,\ rB+i\big)\Big],
# \qquad L = \frac1W\sum_r L_r .$$
# This is `ClipLoss(local_loss=True)`: a B × G matrix per process instead of G × G.
#
# **The gradient.** Every embedding plays two parts. Image embedding $u_j$ is a *row* - its
# own image → text softmax, on the process that owns it - and a *column*: a candidate in
# the text → image softmax of every one of the G texts, rows that live on all W processes,
# its owner's included. $\partial L / \partial u_j$ sums both parts, and each column term
# is computed where its row is. So the all-gather must pass gradients back: its backward
# sums, over processes, the gradient each one holds for the slice of process q and hands
# the sum to q (a **reduce-scatter** (归约分散)). That is `gather_with_grad=True`.
#
# Below, W processes are **simulated in this one kernel** (the gather is a concatenation)
# to check each claim against the single-process `clip_loss` of chapter 06.

# %%
from mmcourse.contrastive import ClipLoss, clip_loss

W, B, E = 4, 8, 16  # processes, local batch, embedding width (a small example)
G = W * B
gen = torch.Generator().manual_seed(seed)
U = F.normalize(torch.randn(G, E, generator=gen), dim=-1)  # (G, E) images
V = F.normalize(torch.randn(G, E, generator=gen) + 0.8 * U, dim=-1)  # (G, E) texts
U, V = U.to(device).requires_grad_(True), V.to(device).requires_grad_(True)
s = 10.0  # logit scale


def rank_share(U, V, s, rank, W, *, gather_with_grad=True, offset_labels=True):
    """L_r: process `rank`'s local-loss CLIP on its B rows against the gathered G columns."""
    B = U.shape[0] // W
    U, V = F.normalize(U, dim=-1), F.normalize(V, dim=-1)  # each process normalises its own rows
    rows = slice(rank * B, (rank + 1) * B)
    u_r, v_r = U[rows], V[rows]  # (B, E): this process's own embeddings
    all_u, all_v = (U, V) if gather_with_grad else (U.detach(), V.detach())  # the all-gather, (G, E)
    labels = torch.arange(B, device=U.device) + (rank * B if offset_labels else 0)  # (B,): columns r*B + i
    logits_per_image = s * u_r @ all_v.T  # (B, G)
    logits_per_text = s * v_r @ all_u.T  # (B, G)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def full_matrix_copy(U, V, s, rank, W):
    """open_clip's default on process `rank`: the whole (G, G) loss, gathered copies without
    gradient except its own slice, put back with gradient (local_loss=False, gather_with_grad=False)."""
    B = U.shape[0] // W
    live = torch.zeros(U.shape[0], 1, dtype=torch.bool, device=U.device)
    live[rank * B:(rank + 1) * B] = True  # (G, 1): this process's rows
    return clip_loss(torch.where(live, U, U.detach()), torch.where(live, V, V.detach()), s)


full = clip_loss(U, V, s)  # chapter 06: one process, the whole (G, G) matrix
shares = torch.stack([rank_share(U, V, s, r, W) for r in range(W)])
local_only = torch.stack([clip_loss(U[r * B:(r + 1) * B], V[r * B:(r + 1) * B], s) for r in range(W)])
torch.testing.assert_close(shares.mean(), full)  # the gathered shares average to the whole loss
print(f"single process, G = {G}:                  L = {full.item():.4f}")
print(f"mean of the W = {W} gathered shares (B x G): L = {shares.mean().item():.4f}")
print(f"mean of W local-only losses (B x B):        L = {local_only.mean().item():.4f}  <- a different loss")
print(f"negatives per pair: {B - 1} locally, {G - 1} with the gather")

# %% [markdown]
# The gathered shares give back the single-process loss; the local-only losses do not
# (they are lower: B - 1 negatives are easier to beat than G - 1).
#
# Now the gradients. In the real run each process back-propagates its own loss and DDP
# averages the weight gradients over the processes, so in the simulation the update
# follows the gradient of the *mean* of the W processes' losses. A gather without
# gradient is a `detach()`. Three set-ups, each compared with the single-process
# gradient $\nabla L$: the best multiple $c$ (the $c$ that makes $c\,\nabla L$ closest to the
# set-up's gradient $g$), the error of $g$ against $\nabla L$ and against $c\,\nabla L$
# (largest absolute difference over the largest entry of $\nabla L$).

# %%
(true_grad,) = torch.autograd.grad(full, U)
gather_setups = {  # name: process r's loss
    "local_loss, gather_with_grad=True": lambda r: rank_share(U, V, s, r, W),
    "local_loss, gather_with_grad=False": lambda r: rank_share(U, V, s, r, W, gather_with_grad=False),
    "full G x G, own slice with gradient": lambda r: full_matrix_copy(U, V, s, r, W),
}
factors, errors, scaled_errors = {}, {}, {}
relative = lambda g, ref: ((g - ref).abs().max() / true_grad.abs().max()).item()  # noqa: E731
print(f"{'':<36} {'best c':>7} {'error vs grad L':>16} {'error vs c grad L':>18}")
for name, loss_of_rank in gather_setups.items():
    ddp_loss = torch.stack([loss_of_rank(r) for r in range(W)]).mean()  # what DDP's average follows
    (grad,) = torch.autograd.grad(ddp_loss, U)
    factors[name] = ((grad * true_grad).sum() / true_grad.square().sum()).item()  # least squares
    errors[name], scaled_errors[name] = relative(grad, true_grad), relative(grad, factors[name] * true_grad)
    print(f"{name:<36} {factors[name]:>7.4f} {errors[name]:>16.1e} {scaled_errors[name]:>18.1e}")
print(f"1 / W = {1 / W:.4f}")
exact, lost, open_clip_default = gather_setups  # the three names, in order
assert abs(factors[exact] - 1) < 1e-5 and errors[exact] < 1e-5  # the single-process gradient
assert errors[lost] > 0.1 and scaled_errors[lost] > 1e-2  # neither the gradient nor a multiple
assert abs(factors[open_clip_default] - 1 / W) < 1e-5 and scaled_errors[open_clip_default] < 1e-5  # grad L / W

wrong_labels = rank_share(U, V, s, 1, W, offset_labels=False)
print(f"rank 1's share with targets offset by rank: {shares[1].item():.3f}; "
      f"with arange(B) (no offset): {wrong_labels.item():.3f}")

# %% [markdown]
# Three different answers:
#
# * **`local_loss` with `gather_with_grad`** gives the single-process gradient, to float
#   precision.
# * **`local_loss` without it** keeps only each embedding's part as a *row*: the gathered
#   copies are constants, so the gradient each embedding receives as a *column* - a
#   candidate in the other rows' softmax, its own process's text → image rows included -
#   is lost. What is left is about half the true gradient here, and not a multiple of it:
#   even against the best multiple the error is far above rounding. Training silently
#   follows a different direction.
# * **open_clip's default** (`local_loss=False`, `gather_with_grad=False`) builds the whole
#   G × G matrix on every process and puts its own slice back with gradient: each process
#   gets the exact gradient of the *whole* loss for its own embeddings, and DDP's average
#   then divides it by W. The result is exact up to a factor 1/W (printed above) - harmless
#   for Adam, which divides every gradient by its own running scale (up to its eps), but
#   not for SGD's step size or a gradient-clipping threshold. (The logit scale is not
#   gathered: every process computes its full gradient, and the average keeps it at 1 x.)
#   And every process pays for the G × G matrix. `tests/test_contrastive.py` checks the
#   same factors with two real `gloo` processes.
#
# > **Common pitfall: forgetting `gather_with_grad`.** `torch.distributed.all_gather`
# > has no backward: the gathered tensors are constants. The memory-saving
# > `local_loss=True` needs `gather_with_grad=True` (in open_clip; here `ClipLoss`'s
# > argument of the same name), or training silently follows a different gradient.
#
# > **Common pitfall: targets not offset by rank.** Process r's pairs sit at rows and
# > columns r·B … r·B + B - 1 of the gathered batch. With `torch.arange(B)` as targets,
# > every process but rank 0 tells its images that the correct caption is one of rank 0's -
# > the loss above jumps, and the model learns nonsense on W - 1 of W processes.

# %% [markdown]
# ## 3. The real thing: `torchrun` with W processes
#
# `mmcourse.distributed` is a complete DDP training script for the tiny CLIP of chapter 06:
#
# * `init_distributed()` reads `RANK`, `LOCAL_RANK` and `WORLD_SIZE` that `torchrun` sets,
#   joins the process group with `gloo` on CPUs or `nccl` on GPUs (GPU `LOCAL_RANK` per
#   process), or does nothing when started without `torchrun`;
# * every process generates the same Shapes data and draws the same global batches from
#   the same seed (`global_batch_indices`), then keeps its contiguous slice
#   (`split_global_batch`);
# * each process runs the course's one training loop, `mmcourse.train.fit`, on its slices
#   (`LocalBatches`), with the model - which owns its learned logit scale, as in chapter
#   06 - wrapped in `DistributedDataParallel`, and chapter 06's `PairObjective` with
#   `ClipLoss(world_size=W, rank=r, local_loss=True, gather_with_grad=True)`;
# * only rank 0 logs and writes the results: per-step losses and a checksum of the final
#   weights as JSON, the weights themselves with `--save-weights`.
#
# The cell below starts it from Python, as `python -m torch.distributed.run` (the module
# behind the `torchrun` command) and prints it as a `torchrun` line: to run it yourself, run
# the printed line in a terminal (drop `--master_port …`; torchrun then uses its default).

# %%
from mmcourse.distributed import ScalingConfig, run_clip_training

config = ScalingConfig(steps=steps, batch_size=batch_size, num_pairs=num_pairs, width=width, embed_dim=width,
                       seed=seed, device=run_device, precision="fp32", threads=cpu_threads)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


workdir = Path(tempfile.mkdtemp(prefix="mmcourse15_"))
script_args = ["--steps", steps, "--batch-size", batch_size, "--num-pairs", num_pairs, "--width", width,
               "--embed-dim", width, "--seed", seed, "--device", run_device, "--precision", "fp32",
               "--threads", cpu_threads,
               "--out", workdir / "result.json", "--save-weights", workdir / "weights.pt"]
command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", world_size, "--nnodes", 1,
           "--master_addr", "127.0.0.1", "--master_port", free_port(), "-m", "mmcourse.distributed", *script_args]
command = [str(c) for c in command]
print("torchrun", " ".join(command[3:]).replace(str(workdir) + "/", ""))

# %%
def children_cpu_seconds() -> float:
    if resource is None:
        return float("nan")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


cpu_before = children_cpu_seconds()
start = time.perf_counter()
done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                      env={**os.environ, "OMP_NUM_THREADS": str(max(1, cpu_threads))})
wall = time.perf_counter() - start
cpu_children = children_cpu_seconds() - cpu_before
if done.returncode != 0:
    raise RuntimeError(f"torchrun failed ({done.returncode}):\n{done.stderr[-3000:]}")
for line in done.stderr.splitlines():  # logging goes to stderr; only rank 0 logs
    if line.startswith("[rank"):
        print(line)
print(f"torchrun: {wall:.1f} s wall, {cpu_children:.1f} s CPU in its processes (start-up and imports included)")
ddp = json.loads((workdir / "result.json").read_text())
ddp_weights = torch.load(workdir / "weights.pt")

# %% [markdown]
# The reference: the *same* function in this kernel, without `torchrun`, so W = 1 and one
# process computes the whole global batch of G pairs.

# %%
single = run_clip_training(config, save_weights=workdir / "weights_single.pt")
single_weights = torch.load(workdir / "weights_single.pt")
print(f"W = {single['world_size']}: one local batch of {single['local_batch_size']} | "
      f"W = {ddp['world_size']} ({ddp['backend']}): {ddp['world_size']} local batches of {ddp['local_batch_size']}")

# %%
loss_1, loss_W = np.array(single["losses"]), np.array(ddp["losses"])
loss_diff = np.abs(loss_W - loss_1)
weight_diff = {name: (ddp_weights[name] - single_weights[name]).abs().max().item() for name in single_weights}
zero_grad_names = [name for name in weight_diff if name.endswith("k_proj.bias")]
max_weight_diff = max(v for k, v in weight_diff.items() if k not in zero_grad_names)
table = pd.DataFrame({
    "max |Δ|": [loss_diff.max(), max_weight_diff, max(weight_diff[k] for k in zero_grad_names)],
    "largest value": [loss_1.max(), max(single_weights[k].abs().max().item() for k in weight_diff if k not in zero_grad_names),
                      max(single_weights[k].abs().max().item() for k in zero_grad_names)],
}, index=["loss, over all steps", "final weights (all but the keys' biases)", "final keys' biases (k_proj.bias)"])
print(table.to_string(float_format=lambda x: f"{x:.2e}"))
print(f"\nloss: {loss_1[0]:.3f} at step 1 -> {loss_1[-1]:.3f} at step {steps} (ln G = {math.log(batch_size):.3f} is chance)")
print("checksums (sum of all weights):", f"{single['checksum']['sum']:.5f} (W=1) vs {ddp['checksum']['sum']:.5f} (W={world_size})")
print(f"throughput: {single['images_per_second']:.0f} images/s with 1 process, {ddp['images_per_second']:.0f} with "
      f"{world_size} ({run_device}, {cpu_threads or 'default'} thread(s) each); os.cpu_count() = {os.cpu_count()}")

# %%
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 3.8))
steps_axis = np.arange(1, steps + 1)
ax0.plot(steps_axis, loss_1, lw=3, alpha=0.5, label="1 process, batch G")
ax0.plot(steps_axis, loss_W, "--", lw=1.5, label=f"{world_size} processes (torchrun), {batch_size // world_size} each")
ax0.axhline(math.log(batch_size), color="0.6", lw=0.8, ls=":", label="ln G (chance)")
ax0.set_xlabel("step")
ax0.set_ylabel("CLIP loss on the global batch")
ax0.set_title("the two runs")
ax0.legend(fontsize=8)
ax1.semilogy(steps_axis, np.where(loss_diff > 0, loss_diff, np.nan), "o", ms=4)
ax1.set_xlabel("step")
ax1.set_ylabel("|Δ loss|")
ax1.set_title(f"difference, {world_size} processes vs 1 (float32)\nno dot: equal to the last bit")
plt.show()

# %%
mmcourse.record("ddp_max_loss_difference", float(loss_diff.max()), at_most=5e-4)
mmcourse.record("ddp_max_weight_difference", float(max_weight_diff), at_most=5e-4)
mmcourse.record("clip_loss_drop", float(loss_1[0] - loss_1[-1]), at_least=0.5)
mmcourse.record("images_per_second_single_process", round(single["images_per_second"]))
mmcourse.record("images_per_second_torchrun", round(ddp["images_per_second"]))

# %% [markdown]
# The two curves lie on top of each other: the per-step losses differ only in the last
# digits of float32, and so do the final weights - with one instructive exception, the
# keys' biases, explained below the next cell.
#
# Both curves also sit near ln G for the first couple of dozen steps before they fall. That
# is the initialisation: the fresh image tower maps every image to almost the same
# direction, so each text's logits over the images are nearly equal, and it takes some
# steps before the towers tell images apart. The logit scale is not the cause: it barely
# moves from its initial 1/0.07. The next cell prints all three: the mean cosine between
# different images' initial embeddings, the first step clearly below ln G, and the scale.

# %%
from mmcourse.contrastive import PairObjective
from mmcourse.distributed import build_data, build_model, global_batch_indices

images_all, text_all, tokenizer = build_data(config)  # the data of both runs
probe = build_model(config, len(tokenizer), seed=seed).to(device)  # their initial weights
index = next(global_batch_indices(num_pairs, batch_size, 1, seed=seed))  # (G,): step 1's global batch
batch = (images_all[index].to(device), {k: v[index].to(device) for k, v in text_all.items()})
with torch.no_grad():
    u0 = F.normalize(probe(*batch)[0], dim=-1)  # (G, E) image embeddings
off_diagonal = ~torch.eye(batch_size, dtype=torch.bool, device=device)
print(f"initial weights: mean cosine between different images' embeddings = {(u0 @ u0.T)[off_diagonal].mean().item():.4f}")
below_chance = np.flatnonzero(loss_1 < math.log(batch_size) - 0.05)
print(f"first step with a loss below ln G - 0.05: {below_chance[0] + 1 if len(below_chance) else 'none'}")
print(f"logit scale s = 1/tau: {single['logit_scale'][0]:.2f} after step 1, {single['logit_scale'][-1]:.2f} after step {steps}")

probe.load_state_dict({k: v.to(device) for k, v in single_weights.items()})  # the one-process run's final weights
PairObjective()(probe, batch).backward()
key_grad = max(p.grad.abs().max().item() for n, p in probe.named_parameters() if n.endswith("k_proj.bias"))
other_grad = max(p.grad.abs().max().item() for n, p in probe.named_parameters() if not n.endswith("k_proj.bias"))
adam_eps = torch.optim.AdamW([torch.zeros(1)]).defaults["eps"]  # fit's optimiser
key_bias = max(single_weights[k].abs().max().item() for k in zero_grad_names)
print(f"largest gradient on step 1's batch, final weights: keys' biases {key_grad:.1e}, "
      f"all other weights {other_grad:.1e}; Adam's eps = {adam_eps:.0e}")
print(f"largest key bias after {steps} steps: {key_bias:.2e} = {key_bias / config.lr:.2f} x the peak learning rate {config.lr:g}")

# %% [markdown]
# The bias of the attention **keys** has a gradient of exactly zero in exact arithmetic
# ($q \cdot (k_j + b)$ adds the same $q \cdot b$ to every score of a row, which the
# softmax ignores). What reaches it is rounding noise, different in each run and many
# orders of magnitude below the other gradients (printed above). Adam divides each
# gradient by its running scale $\sqrt{\hat v} + \epsilon$, so its normalisation amplifies
# that noise - up to its eps: a gradient of the size of eps or smaller moves a weight by
# only a fraction of the learning rate per step. After all the steps the largest key bias
# is the value printed above, a few hundredths of the peak learning rate in total: small, but
# far above the noise that produced it, and different in each run. The table shows those
# biases are pure noise in *both* runs.
#
# The throughput numbers are honest too (printed together above, with the machine's CPU
# count): on a CPU two processes are not faster than one - this tiny model spends most of
# its time in communication and Python. The point of the run is that the numbers are the
# same; the speed-up comes on GPUs, where each process has its own device.
#
# > **Common pitfall: different seeds on different ranks.** Seeding each process with
# > `seed + rank` is right for dropout or augmentation, but the *batch order* must come
# > from the same seed everywhere, or the slices overlap. The cell below draws one epoch
# > both ways: with a seed per rank some pairs land twice in one global batch - duplicates
# > that the loss treats as negatives of each other (false negatives) - and many pairs are
# > never seen in the epoch.

# %%
from mmcourse.distributed import split_global_batch

one_epoch = num_pairs // batch_size
for name, seeds in (("same seed", [seed] * world_size), ("seed + rank", [seed + r for r in range(world_size)])):
    streams = [global_batch_indices(num_pairs, batch_size, one_epoch, seed=sd) for sd in seeds]
    duplicates, seen = 0, set()
    for batches in zip(*streams, strict=True):  # one step: rank r keeps its slice of ITS global batch
        gathered = torch.cat([split_global_batch(b, rank=r, world_size=world_size) for r, b in enumerate(batches)])
        duplicates += len(gathered) - len(gathered.unique())
        seen.update(gathered.tolist())
    print(f"{name:<12}: one epoch of {one_epoch} steps sees {len(seen)} of {num_pairs} pairs, "
          f"{duplicates} duplicated inside a global batch")

# %% [markdown]
# > **Common pitfall: every rank sees the same data.** Forget to split the batch (no
# > sampler, or each process loading "the" batch) and the gathered batch holds each pair W
# > times. Each caption then has W identical copies, only one of them labelled correct:
# > even perfect embeddings cannot get the loss below ln W.

# %%
perfect = torch.eye(16, device=device)[:B]  # B orthonormal embeddings: image i == text i, nothing else similar
distinct = clip_loss(perfect, perfect, 100.0)
repeated = clip_loss(perfect.repeat(W, 1), perfect.repeat(W, 1), 100.0)  # every process the same B pairs
print(f"perfect embeddings, distinct pairs: L = {distinct.item():.4f}")
print(f"perfect embeddings, each pair W = {W} times: L = {repeated.item():.4f} (ln W = {math.log(W):.4f})")

# %% [markdown]
# ## 4. Many GPUs, many machines
#
# Nothing in `mmcourse.distributed` is specific to the CPU. On GPUs the same module picks
# the `nccl` backend and puts process `LOCAL_RANK` on GPU `LOCAL_RANK`; one process per GPU
# is the rule. These commands are **not run by this notebook** (they need the GPUs):
#
# ```bash
# # one machine with 8 GPUs: 8 processes, a global batch of 4096 (512 per GPU)
# torchrun --nproc_per_node 8 -m mmcourse.distributed --device cuda \
#     --batch-size 4096 --steps 5000 --num-pairs 200000 --width 256 --layers 6 --heads 8 \
#     --out result.json
#
# # two machines with 8 GPUs each: the same command on both, node_rank 0 and 1;
# # host0 (node 0) hosts the rendezvous, where the processes find each other
# torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --rdzv_endpoint host0:29500 \
#     -m mmcourse.distributed --device cuda --batch-size 8192 ...      # on host0
# torchrun --nnodes 2 --node_rank 1 --nproc_per_node 8 --rdzv_endpoint host0:29500 \
#     -m mmcourse.distributed --device cuda --batch-size 8192 ...      # on host1
#
# # elastic variant: the c10d rendezvous assigns the node ranks itself
# torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d \
#     --rdzv_endpoint host0:29500 --rdzv_id clip15 -m mmcourse.distributed ...
# ```
#
# The **rendezvous** (会合) is the meeting point, one `host:port`, where all processes of
# a run register before the first collective operation.
# `WORLD_SIZE` is then 16 and `RANK` runs over 0 … 15, while `LOCAL_RANK` (0 … 7) picks
# the GPU on each machine. With `--precision auto` the towers run in bf16 autocast on
# CUDA and the loss in float32; with bf16 and GPU kernels that are not bitwise
# deterministic, the equivalence with one process holds to bf16 precision, not to the
# float32 digits measured above.
#
# What grows with the number of processes is the **similarity matrix**. Every process
# holds the gathered G × E embeddings (small: G · E numbers) and a logits matrix:
# G × G without `local_loss`, B × G with it, per direction. Memory here is counted in
# binary units throughout: 1 MiB = 2²⁰ bytes, 1 GiB = 2³⁰ bytes. For CLIP's batch of
# 32,768 on 256 GPUs, and a few other set-ups:

# %%
def logits_bytes(G: int, W: int, local_loss: bool, bytes_per_element: int = 4) -> int:
    """Bytes of one logits matrix on one process: (G, G), or (G / W, G) with local_loss."""
    rows = G // W if local_loss else G
    return rows * G * bytes_per_element


setups = [("CLIP paper: 32k on 256 GPUs", 32768, 256), ("32k on 8 GPUs", 32768, 8), ("4k on 8 GPUs", 4096, 8),
          ("64k on 512 GPUs", 65536, 512), ("this notebook", batch_size, world_size)]
rows = []
for name, G_s, W_s in setups:
    rows.append({"setup": name, "G": G_s, "W": W_s, "B = G/W": G_s // W_s,
                 "G x G fp32 (MiB)": logits_bytes(G_s, W_s, False) / 2**20,
                 "B x G fp32 (MiB)": logits_bytes(G_s, W_s, True) / 2**20,
                 "gathered U, V at E=768 fp32 (MiB)": 2 * G_s * 768 * 4 / 2**20})
memory = pd.DataFrame(rows).set_index("setup")
print(memory.to_string(float_format=lambda x: f"{x:,.2f}"))

# %%
fig, ax = plt.subplots(figsize=(7, 4))
Ws = 2 ** np.arange(0, 11)
for G_s, ls in ((32768, "-"), (4096, "--")):
    ax.loglog(Ws, [logits_bytes(G_s, int(w), False) / 2**30 for w in Ws], ls, color="C3", label=f"G × G, G = {G_s}")
    ax.loglog(Ws, [logits_bytes(G_s, int(w), True) / 2**30 for w in Ws], ls, color="C0", label=f"B × G (local_loss), G = {G_s}")
h100_gib = 81559 / 1024  # an "H100 80GB HBM3": nvidia-smi reports 81,559 MiB in total
ax.axhline(h100_gib, color="0.5", lw=0.8, ls=":")
ax.text(1.1, 1.15 * h100_gib, f"{h100_gib:.1f} GiB: the total memory of one H100 80GB (less is free for tensors)",
        fontsize=8, color="0.4")
ax.set_xlabel("processes W (GPUs)")
ax.set_ylabel("one logits matrix per process (GiB, fp32)")
ax.set_title("memory of the similarity matrix at a fixed global batch")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# Without `local_loss` the G × G matrix is the same size on every process however many
# there are - 4,096 MiB = 4 GiB at CLIP's batch in float32 (first row of the table), per
# direction, plus softmax outputs and gradients of the same shape. With `local_loss` it
# shrinks as 1/W, to 16 MiB on 256 processes. The arithmetic counts one matrix; the loss
# keeps a few of them alive. The cell below measures the peak memory of `clip_loss`'s
# forward pass on this kernel's device for growing G and divides it by one G × G float32
# matrix (on CUDA the allocator's own peak, `torch.cuda.max_memory_allocated`).

# %%
from mmcourse.bench import peak_memory_bytes

for G_m in (256, 512, 1024):
    u_m, v_m = torch.randn(G_m, 64, device=device), torch.randn(G_m, 64, device=device)
    peak = peak_memory_bytes(lambda u=u_m, v=v_m: clip_loss(u, v, 10.0), device=device)
    print(f"G = {G_m:>5}: peak {peak / 2**20:6.2f} MiB = {peak / logits_bytes(G_m, 1, False):.2f} x one G x G float32 matrix")

# %% [markdown]
# ### Explore: world size, batch and precision
#
# Choose the global batch $G$, the number of processes $W$ and the bytes per number (4 for
# float32, 2 for bf16): the bars are one process's G × G logits (every process builds the
# whole matrix), its B × G block with `local_loss` (B = G / W), and the gathered image and
# text embeddings at CLIP's width E = 768, against one H100's memory. Pure arithmetic, the
# formula of `logits_bytes` above; nothing runs.

# %%
import ipywidgets as widgets

from mmcourse.plotting import draw_logits_memory
from mmcourse.widgets import explore

explore(
    draw_logits_memory,
    figsize=(8, 3.6),
    fixed={"embed_dim": 768, "device_gib": h100_gib},
    global_batch=widgets.SelectionSlider(options=[2**k for k in range(8, 18)], value=32768, description="G"),
    world_size=widgets.SelectionSlider(options=[2**k for k in range(0, 11)], value=8, description="W"),
    bytes_per_element=widgets.Dropdown(options=[("float32", 4), ("bf16", 2)], value=4, description="dtype"),
);

# %% [markdown]
# The SigLIP paper (Zhai et al. 2023) goes one step further. Its sigmoid loss treats every
# pair on its own, so a process does not need all texts at once: the text chunks travel
# around a ring of processes, W steps of a B × B block each, and no process ever holds
# more than B × B logits. (`mmcourse.distributed.distributed_siglip_loss` implements the
# simpler gather version, B × G, tested against the single-process `siglip_loss`; run it
# with `--loss siglip`.)

# %% [markdown]
# ## 5. Gradient accumulation does not add negatives
#
# On one GPU, the usual way to train "with a bigger batch" is **gradient accumulation**
# (梯度累积): run K chunks of B examples, add their gradients, step once. For a
# per-example loss this is exactly the gradient of the K·B batch. For CLIP it is not: each
# chunk's softmax only sees its own chunk, so accumulating gives B - 1 negatives per pair,
# never K·B - 1. The check, on two small linear towers:

# %%
torch.manual_seed(seed)
G_acc, K = 64, 2  # a batch of 64 pairs in K chunks of 32
x_img, x_txt = torch.randn(G_acc, 20).to(device), torch.randn(G_acc, 12).to(device)
targets = torch.randint(0, 5, (G_acc,)).to(device)
image_tower, text_tower, classifier = nn.Linear(20, 16).to(device), nn.Linear(12, 16).to(device), nn.Linear(20, 5).to(device)


def gradients(loss_fn, chunks):
    """The parameter gradients of loss_fn, accumulated over `chunks` equal chunks (mean of their losses)."""
    for p in [*image_tower.parameters(), *text_tower.parameters(), *classifier.parameters()]:
        p.grad = None
    for index in torch.arange(G_acc, device=device).chunk(chunks):
        (loss_fn(index) / chunks).backward()
    params = [*image_tower.parameters(), *text_tower.parameters(), *classifier.parameters()]
    return torch.cat([p.grad.flatten() for p in params if p.grad is not None])


per_example = lambda i: F.cross_entropy(classifier(x_img[i]), targets[i])  # noqa: E731
contrastive = lambda i: clip_loss(image_tower(x_img[i]), text_tower(x_txt[i]), 10.0)  # noqa: E731
accumulation = {}
for name, loss_fn in (("per-example cross-entropy", per_example), ("CLIP loss", contrastive)):
    whole, accumulated = gradients(loss_fn, 1), gradients(loss_fn, K)
    accumulation[name] = ((accumulated - whole).norm() / whole.norm()).item()
    print(f"{name:<26} |g_accumulated - g_batch| / |g_batch| = {accumulation[name]:.2e}")
with torch.no_grad():
    chunk_losses = [contrastive(i).item() for i in torch.arange(G_acc, device=device).chunk(K)]
    print(f"CLIP loss of the batch of {G_acc}: {contrastive(torch.arange(G_acc, device=device)).item():.4f}; "
          f"mean over the {K} chunks: {np.mean(chunk_losses):.4f} (fewer negatives, lower loss)")
mmcourse.record("accumulation_error_per_example", accumulation["per-example cross-entropy"], at_most=1e-5)
mmcourse.record("accumulation_error_clip", accumulation["CLIP loss"], at_least=0.01)

# %% [markdown]
# The per-example loss accumulates to the big-batch gradient up to rounding; the CLIP loss
# does not. The fix that *is* exact on one device is **gradient caching** (梯度缓存; Gao et al.
# 2021, "GradCache"): embed the whole batch chunk by chunk without keeping the graph,
# compute the big-batch loss and its gradient with respect to the *embeddings* only,
# then run each chunk again with its graph and back-propagate the cached embedding
# gradient into the towers. It costs a second forward pass and is exercise 3.
#
# ## Summary
#
# * Data parallelism = W identical replicas, each on B = G / W examples, gradients averaged
#   by an all-reduce (DDP). For a per-example loss that is the big-batch gradient exactly.
# * The contrastive loss couples all pairs of the batch. Each process gathers every
#   process's embeddings (all-gather **with gradient**), scores its B rows against all G
#   columns with targets offset by rank, and the W shares average to the single-process
#   loss - measured above with two `torchrun` processes, same losses and weights to float
#   precision.
# * Same seed for data and initial weights on every process, a contiguous slice each; rank
#   0 logs and saves. `torchrun` supplies `RANK`, `LOCAL_RANK`, `WORLD_SIZE`; `gloo` on
#   CPUs, `nccl` on GPUs, the code unchanged.
# * Memory: G × G logits per process without `local_loss` (gigabytes at CLIP's batch),
#   B × G with it. SigLIP's ring needs only B × B.
# * Gradient accumulation does not give a contrastive loss more negatives; gradient
#   caching does.
#
# ## Exercises
#
# Replace each `raise NotImplementedError` (or `...`) with your answer and run the cell;
# `check()` tells you what is right or wrong. `hint()` and `solution()` help if you are stuck.

# %%
from mmcourse.exercises.ch15 import q1, q2, q3, q4


# Exercise 1: process `rank`'s share of the CLIP loss with local_loss. image_local and
# text_local are its own (B, D) embeddings, all_image and all_text the gathered (G, D) ones
# (all already L2-normalised); logit_scale is the multiplier s = 1/tau of chapter 06 (a
# float, already exponentiated: multiply the similarities by it). Return the mean of the
# image->text and text->image cross-entropies of its B rows against all G columns.
def my_local_clip_loss(image_local, text_local, all_image, all_text, logit_scale, rank):
    raise NotImplementedError  # your code here


q1.check(my_local_clip_loss)


# %%
# Exercise 2: the largest global batch G (a multiple of world_size) whose ONE logits matrix
# per process - (G, G), or (G / W, G) with local_loss - fits in memory_bytes. Return 0 if
# not even G = world_size (one pair per process) fits.
def my_largest_global_batch(memory_bytes, world_size, local_loss, bytes_per_element=4):
    raise NotImplementedError  # your code here


q2.check(my_largest_global_batch)


# %%
# Exercise 3: gradient caching. Leave in the towers' .grad the gradient of
# clip_loss(image_tower(images), text_tower(texts), logit_scale) on the WHOLE batch, but never
# run a tower with gradients on more than chunk_size rows at once. Return the loss.
def my_grad_cache_step(image_tower, text_tower, images, texts, logit_scale, chunk_size):
    raise NotImplementedError  # your code here


q3.check(my_grad_cache_step)

# %%
# Exercise 4: 8 GPUs, 32 pairs each, embeddings gathered across all of them. In the
# image -> text softmax, how many negatives does each image have?
answer = ...  # a whole number
q4.check(answer)

# %%
# q1.hint(); q1.solution()
