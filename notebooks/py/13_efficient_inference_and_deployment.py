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
# # 13 · Efficient inference and deployment, measured
#
# A trained model is only useful once it answers requests: quickly, cheaply, and reliably.
# The source article "多模态大模型：技术原理与实战 多模态大模型的部署" (001) is about
# **deployment** (部署), and 004 §5.3.2–5.3.3 lists **inference acceleration**
# (推理加速) and deployment; both only *name* the techniques. This chapter applies each
# one to models of this course, chapter 06's tiny CLIP first, and measures on this
# machine what it buys and what it costs in accuracy:
#
# * timing done right: warm-up, synchronisation, fixed threads, **p50/p95 latency**
#   (延迟) and **throughput** (吞吐量), batch size against both;
# * precision: **bf16** autocast and **int8 quantisation** (量化) with `torchao`, the
#   deprecated `torch.ao` path and ONNX Runtime, and where int8 is not faster at all;
# * **`torch.compile`** (图编译): what compiling costs, what it saves, when it pays back;
# * attention kernels: the fused SDPA backends against chapter 02's reference;
# * generation with and without the **KV cache** (KV 缓存) with chapter 11's Llama
#   decoder, and against `transformers`' `generate` on the same weights;
# * **ONNX** export and ONNX Runtime; **safetensors** against pickled checkpoints;
# * finally a real service: a FastAPI app serving zero-shot classification, retrieval and
#   chapter 10's captioner, with **dynamic batching** (动态批处理), under a real HTTP
#   client's load.
#
# Every speed number below comes from this run on this machine; on a busy shared CPU they
# wander, so the chapter records the *ratios* and checks only what does not depend on the
# machine (equal outputs, sizes, accuracy).

# %% tags=["parameters"]
# Parameters: papermill and `mmcourse run 13 -p name value` can change these.
seed = 0  # random seed: data, weights, batch order
device = "auto"  # "auto" picks cuda, then mps, then cpu (int8 and ONNX Runtime always run on the CPU)
num_train = 3000  # training scenes of the tiny CLIP (full: 20000)
num_test = 600  # test scenes for accuracy and timing (full: 2000)
clip_steps = 250  # training steps of the tiny CLIP (full: 3000 on a GPU)
batch_size = 128  # B of training
cpu_threads = 1  # torch and ONNX Runtime threads for every measurement: 1 keeps a shared machine steady (2 on an idle 2-core CPU; 0: torch default)
repeats = 15  # timed calls per candidate and setting (full: 100)
batch_sizes = [1, 8, 32, 128]  # batch sizes of the latency and throughput sweep (full: 1 to 2048)
int8_widths = [64, 256, 1024]  # FFN widths of the int8 sweep (full: 64 to 4096)
int8_compile = False  # also compile torchao's int8 FFN at the widest width (a cold compile takes over 30 s on 2 CPU cores)
compile_batch = 32  # batch size at which torch.compile is measured
run_compile = True  # measure torch.compile with inductor (a cold compile takes about 20 s on 2 CPU cores)
attention_lengths = [64, 256, 1024]  # sequence lengths of the attention-kernel sweep (full: up to 8192 on a GPU)
llm = "random"  # "random": a randomly initialised Llama of SmolLM2's layer sizes, or "smollm2": its real weights (loads in 10-17 s)
llm_layers = 4  # decoder layers of the random Llama (SmolLM2 has 30)
new_tokens = 48  # tokens generated in the KV-cache measurement (full: 512)
num_requests = 96  # requests of each bounded load on the server (full: 5000)
concurrency = 16  # requests in flight at once (full: 64)
batch_window_ms = 5.0  # how long the server's first request of a batch waits for more
caption_steps = 150  # training steps of the served captioner's decoder (full: 1500)
caption_requests = 32  # test images captioned through the service (full: 600)

# %%
import math
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

import mmcourse
from mmcourse import deploy, serve, utils
from mmcourse.plotting import setup_notebook

utils.positive_int(num_train=num_train, num_test=num_test, clip_steps=clip_steps, batch_size=batch_size, repeats=repeats,
                   compile_batch=compile_batch, llm_layers=llm_layers, new_tokens=new_tokens, num_requests=num_requests,
                   concurrency=concurrency, caption_steps=caption_steps, caption_requests=caption_requests)
utils.non_negative_int(cpu_threads=cpu_threads)
utils.positive_float(batch_window_ms=batch_window_ms)
utils.one_of("llm", llm, ("random", "smollm2"))
for name, flag in (("run_compile", run_compile), ("int8_compile", int8_compile)):
    if not isinstance(flag, bool):
        raise ValueError(f"{name} must be True or False, got {flag!r}")
for name, values in (("batch_sizes", batch_sizes), ("int8_widths", int8_widths), ("attention_lengths", attention_lengths)):
    if not values:
        raise ValueError(f"{name} must list at least one size, got {values!r}")
    utils.positive_int(**{f"{name} entry": v for v in values})
if max(num_requests, caption_requests) > num_test:
    raise ValueError(f"num_requests={num_requests} and caption_requests={caption_requests} must not exceed num_test={num_test}")
if batch_size > num_train:
    raise ValueError(f"batch_size={batch_size} must not exceed num_train={num_train}")
mmcourse.seed_everything(seed)
device = mmcourse.get_device(device)
if cpu_threads:
    torch.set_num_threads(cpu_threads)  # fixed for every measurement: a timing means nothing without it
threads = torch.get_num_threads()
setup_notebook()
workdir = Path(tempfile.mkdtemp(prefix="mmcourse13_"))  # every file this chapter writes goes here
notebook_start = time.perf_counter()
print(f"computing on {device}, {threads} torch thread(s); files in {workdir}")

# %% [markdown]
# ## 1. The model to serve: chapter 06's tiny CLIP
#
# We train chapter 06's `TinyClip` on one-object Shapes scenes (its ViT image tower and
# small BERT text tower, a shared 64-dimensional space) with `train_pairs` (chapter 06's `fit` call), and measure its
# **zero-shot** accuracy the way chapter 06 does: each of the 24 shape–colour classes is
# written into 10 size × position prompts, and an image takes the class of its best
# prompt (`ensemble="max"`). This accuracy is the yardstick for every cheaper version below.

# %%
from mmcourse.clip import (TinyClip, TinyClipConfig, WordTokenizer, encode_images, encode_texts, train_pairs,
                           zero_shot_scores)
from mmcourse.data.shapes import CLASS_NAMES, POSITION_PHRASES, POSITIONS, SIZES, ShapesConfig, shapes_tensors

shapes_config = ShapesConfig(max_objects=1)
train = shapes_tensors(num_train, split="train", config=shapes_config)
test = shapes_tensors(num_test, split="test", config=shapes_config)
tokenizer = WordTokenizer.from_texts(train["canonical_caption"])
torch.manual_seed(seed)
clip_model = TinyClip(TinyClipConfig(vocab_size=len(tokenizer)))
clip_run = train_pairs(clip_model, train["images"], tokenizer(train["canonical_caption"]), steps=clip_steps,
                       batch_size=batch_size, seed=seed, device=str(device))
clip_model = clip_model.cpu().eval()  # int8 and ONNX Runtime are CPU techniques; GPU timings move it back
templates = [f"a {size} {{}} {POSITION_PHRASES[p][0]}" for size in SIZES for p in POSITIONS]
prompt_tokens = tokenizer([t.format(name) for name in CLASS_NAMES for t in templates])  # (C * T, N)


def zero_shot_accuracy(image_embeds: torch.Tensor, prompt_embeds: torch.Tensor) -> float:
    """Top-1 of the max-prompt rule, from (N, E) image and (C * T, E) prompt embeddings."""
    P = prompt_embeds.float().reshape(len(CLASS_NAMES), len(templates), -1)  # (C, T, E)
    return (zero_shot_scores(image_embeds.float(), P, ensemble="max").argmax(-1) == test["labels"]).float().mean().item()


acc_fp32 = zero_shot_accuracy(encode_images(clip_model, test["images"]), encode_texts(clip_model, prompt_tokens))
num_params = sum(p.numel() for p in clip_model.parameters())
print(f"tiny CLIP: {num_params:,} parameters, {clip_steps} steps in {clip_run.seconds:.1f} s")
print(f"float32 zero-shot top-1 on {num_test} test scenes: {acc_fp32:.3f} (chance {1 / len(CLASS_NAMES):.3f})")

# %% [markdown]
# ## 2. Timing done right
#
# A latency is a distribution, not a number. Call the model $n$ times and sort the times
# $t_{(1)} \le \dots \le t_{(n)}$. The **p-th percentile** sits at the fractional rank
# $r = (n-1)\,p/100$ (0-based) and is interpolated between its neighbours:
#
# $$t_{p} = t_{(\lfloor r \rfloor)} + \left(t_{(\lceil r \rceil)} - t_{(\lfloor r \rfloor)}\right)(r - \lfloor r \rfloor).$$
#
# **p50** (the median) is the typical call; **p95** is what 1 call in 20 exceeds, the
# tail a user notices. With a batch of $B$ items per call, **throughput** is
# $B / t_{50}$ items per second. Four rules make the numbers mean something:
#
# 1. **warm up**: the first calls allocate memory, pick kernels, fill caches;
# 2. **synchronise**: a GPU runs kernels asynchronously, so stop the clock only after
#    `torch.cuda.synchronize()` (on a CPU there is nothing to wait for);
# 3. **fix the threads**: `torch.set_num_threads` changes the answer, so set it;
# 4. time the candidates **in turn**, so that a busy neighbour slows all of them alike.
#
# Here are the first 40 calls of the image tower on one test image, with no warm-up at all:

# %%
image_tower = clip_model.encode_image
one_image = test["images"][:1]
with torch.inference_mode():
    cold = deploy.time_calls(lambda: image_tower(one_image), warmup=0, repeats=40)
ms = np.array(cold.samples_s) * 1e3


def p95_by_hand(times: np.ndarray) -> float:
    t = np.sort(times)  # t_(0) <= ... <= t_(n-1)
    r = (len(t) - 1) * 95 / 100  # fractional rank
    lo, hi = math.floor(r), math.ceil(r)
    return t[lo] + (t[hi] - t[lo]) * (r - lo)


steady = ms[5:]
assert abs(p95_by_hand(steady) - np.percentile(steady, 95)) < 1e-9  # numpy's default "linear" rule
assert abs(p95_by_hand(steady) - deploy.percentile(steady.tolist(), 95)) < 1e-9  # the package's
fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
axes[0].plot(range(1, 41), ms, "o-", ms=3)
axes[0].set(xlabel="call number", ylabel="latency (ms)", yscale="log", title="40 calls on one image, no warm-up")
axes[1].hist(steady, bins=20, color="C1")
for q, style in ((50, "-"), (95, "--")):
    axes[1].axvline(np.percentile(steady, q), c="k", ls=style, label=f"p{q} = {np.percentile(steady, q):.3f} ms")
axes[1].set(xlabel="latency (ms)", ylabel="calls", title="Calls 6-40: the distribution")
axes[1].legend()
plt.show()
p50, p95 = np.percentile(steady, 50), np.percentile(steady, 95)
print(f"first call {ms[0]:.2f} ms, {ms[0] / p50:.1f}x the p50 of calls 6-40 ({p50:.3f} ms); "
      f"their p95 is {p95:.3f} ms, {p95 / p50:.1f}x the p50")

# %% [markdown]
# The first call pays one-off costs; later spikes are other work on the machine (a shared
# CPU, the garbage collector, the OS) taking the core for a while. p50 describes the typical
# call, p95 the spikes: report both.
#
# > **Common pitfall: timing without warm-up or synchronisation.** `t = time.time();
# > model(x); print(time.time() - t)` measures the first call, which includes one-off
# > costs (above), and on a GPU it measures only how long it took to *queue* the kernels.
# > Warm up, synchronise before reading the clock, fix the number of threads, report p50
# > and p95 over many calls, and never compare two numbers measured at different times on
# > a shared machine. `mmcourse.deploy.time_calls` does all of this.
#
# ## 3. Precision: bf16 and int8
#
# **bf16** keeps float32's 8 exponent bits and only 7 mantissa bits: the same range, about
# 3 significant digits. `torch.autocast` runs matrix multiplications in bf16 and keeps
# reductions such as softmax and layer norm in float32. It pays where the hardware has
# bf16 units (recent GPUs, CPUs with AMX or AVX-512 BF16); elsewhere it converts back and
# forth and is slower.
#
# **Int8 quantisation** stores each weight matrix $W$ as 8-bit integers with a scale per
# output row, $W \approx s_W \odot W_q$, $W_q = \mathrm{round}(W / s_W) \in [-127, 127]$:
# weights shrink 4×. **Dynamic** quantisation also quantises each activation row
# $x$ at run time with a scale $s_x$ measured on that row, multiplies in integers and
# rescales: $x W^\top \approx s_x s_W\, (x_q W_q^\top)$. **Weight-only** quantisation
# keeps $x$ in float32 and turns $W_q$ back into floats for the product: it saves memory
# (and time where reading the weights is the bottleneck, as when a GPU decodes one token)
# but not arithmetic.
#
# The maintained path in PyTorch is **`torchao`**: `torchao.quantization.quantize_(model,
# Int8DynamicActivationInt8WeightConfig())` (or `Int8WeightOnlyConfig()`) swaps every
# `nn.Linear` weight for an `Int8Tensor`, a tensor subclass whose `linear` does the above;
# `deploy.quantize_torchao` wraps it. The older `torch.ao.quantization.quantize_dynamic`
# still ships with torch 2.13 but is marked **deprecated** (its warning points to
# `torchao`); we keep it as a comparison (`deploy.quantize_int8`). ONNX Runtime's own
# dynamic quantisation follows in section 4.

# %%
with deploy.autocast_bf16("cpu"):
    acc_bf16 = zero_shot_accuracy(encode_images(clip_model, test["images"]), encode_texts(clip_model, prompt_tokens))
int8_models = {
    "int8 torchao dynamic": deploy.quantize_torchao(clip_model, mode="dynamic"),
    "int8 torchao weight-only": deploy.quantize_torchao(clip_model, mode="weight-only"),
    "int8 torch.ao dynamic (deprecated)": deploy.quantize_int8(clip_model),
}
int8_model = int8_models["int8 torchao dynamic"]  # the chapter's int8 model from here on
fp32_bytes = deploy.serialized_bytes(clip_model)
linear_share = deploy.linear_weight_fraction(clip_model)
ideal_ratio = (1 - linear_share) + linear_share / 4  # only the Linear weights shrink, 4x
x = test["images"][:256]
with torch.inference_mode():
    fp32_out = clip_model.encode_image(x)
    with deploy.autocast_bf16("cpu"):
        bf16_err = (clip_model.encode_image(x).float() - fp32_out).abs().max().item()
    int8_errs = {name: (model.encode_image(x) - fp32_out).abs().max().item() for name, model in int8_models.items()}
rows = {name: [zero_shot_accuracy(encode_images(model, test["images"]), encode_texts(model, prompt_tokens)),
               deploy.serialized_bytes(model) / 1e3, int8_errs[name]] for name, model in int8_models.items()}
precision_table = pd.DataFrame({"float32": [acc_fp32, fp32_bytes / 1e3, 0.0], "bf16 autocast": [acc_bf16, math.nan, bf16_err],
                                **rows}, index=["zero-shot top-1", "checkpoint (kB)", "max |embedding error|"]).T
acc_int8, int8_bytes = precision_table.loc["int8 torchao dynamic", "zero-shot top-1"], 1e3 * precision_table.loc["int8 torchao dynamic", "checkpoint (kB)"]
print(f"largest |image embedding| value: {fp32_out.abs().max():.2f}; Linear weights are {linear_share:.0%} of the "
      f"parameters, so int8 can shrink the checkpoint to about {ideal_ratio:.2f} of its size")
cpu_flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
print("bf16 units on this CPU:", sorted(cpu_flags & {"avx512_bf16", "amx_bf16"}) or "none found")
precision_table.round(4)

# %% [markdown]
# The three int8 versions agree closely; weight-only has the smallest error, since its
# activations are not rounded. The accuracy changes of bf16 and of `torchao`'s dynamic int8
# (the chapter's int8 model from here on) are printed below as fractions and as counts of
# test scenes; the ceilings recorded are 5 points of accuracy (a small fraction of the
# model's margin over chance) and, for the checkpoint, the ideal size ratio plus 0.1 (int8
# weights also carry their scales, and the file its bookkeeping).

# %%
assert rows["int8 torchao weight-only"][2] < rows["int8 torchao dynamic"][2], "weight-only int8 rounds no activations"
int8_drop, bf16_drop = acc_fp32 - acc_int8, acc_fp32 - acc_bf16
for name, drop in (("bf16 autocast", bf16_drop), ("int8 torchao dynamic", int8_drop)):
    print(f"{name}: accuracy {acc_fp32:.3f} -> {acc_fp32 - drop:.3f}, net {round(drop * num_test)} of {num_test} scenes lost")
print(f"int8 checkpoint: {int8_bytes / fp32_bytes:.3f} of float32 (ideal {ideal_ratio:.3f})")
mmcourse.record("int8_size_ratio", int8_bytes / fp32_bytes, at_most=ideal_ratio + 0.1)
mmcourse.record("int8_accuracy_drop", int8_drop, at_most=0.05)
mmcourse.record("bf16_accuracy_drop", bf16_drop, at_most=0.05)
assert acc_fp32 - 1 / len(CLASS_NAMES) > 0.5, "the float32 model must be far above chance for the drops to mean much"

# %% [markdown]
# ### Where int8 is faster, and where it is not
#
# The most common complaint about int8 on a CPU is that it made the model *slower*. Each
# quantised Linear pays a fixed price per call (measure the activation scales, quantise,
# rescale the int32 result; for `torchao`, also dispatching each of these ops through a
# tensor subclass in Python), and saves in proportion to the work of the matrix multiply.
# Below, a transformer FFN ($D \to 4D \to D$) in float32 and in each int8 version, over the
# width $D$, for a single row (one token, as when serving one request) and for 64 rows, all
# timed in turn.

# %%
int8_rows = pd.DataFrame(deploy.int8_width_sweep(int8_widths, batch_sizes=[1, 64], methods=list(deploy.INT8_METHODS),
                                                 repeats=repeats, seed=seed))
fig, axes = plt.subplots(1, 2, figsize=(11, 3.4), sharey=True)
for ax, (B, group) in zip(axes, int8_rows.groupby("batch_size"), strict=True):
    for method, rows_m in group.groupby("method", sort=False):
        ax.plot(rows_m["width"], rows_m["speedup"], "o-", label=method)
    ax.axhline(1, c="k", ls=":", lw=1)
    ax.set(xscale="log", yscale="log", xlabel="FFN width D", title=f"{B} row(s) per call, {threads} thread(s)")
    ax.set_xticks(int8_widths, [str(w) for w in int8_widths])
axes[0].set_ylabel("float32 time / int8 time (> 1: int8 faster)")
axes[1].legend(fontsize=7)
plt.show()
for (method, B), group in int8_rows.groupby(["method", "batch_size"], sort=False):
    wins = group[group.speedup > 1].width.tolist()
    print(f"{method:30s} {B:3d} row(s): faster than float32 at D = {wins if wins else 'none measured'}")
smallest = int8_rows[(int8_rows.width == min(int8_widths)) & (int8_rows.batch_size == 1)].set_index("method")
print(f"at D = {min(int8_widths)}, one row: float32 {smallest.float32_ms.iloc[0]:.3f} ms per FFN call; int8 adds "
      + ", ".join(f"{r.int8_ms - r.float32_ms:+.3f} ms ({m})" for m, r in smallest.iterrows()))
int8_rows.pivot_table(index=["method", "batch_size"], columns="width", values="speedup", sort=False).round(2)

# %% [markdown]
# Where each version starts to win is printed above for this run; the reasons are in how
# each one runs. The deprecated `torch.ao` path's quantised Linear is one fused C++ call
# (fbgemm), so its fixed cost is small. `torchao`'s dynamic int8 runs quantise, integer
# matmul (`torch._int_mm`) and rescale as separate ops dispatched in Python through the
# `Int8Tensor` subclass: a fixed cost per Linear (the added milliseconds at the smallest
# width), which only wide matrices and many rows pay back. `torchao`'s weight-only int8
# converts the whole weight back to float32 on every call, so eagerly on a CPU it does all
# of float32's arithmetic and more: it saves memory, not time. `torchao` is built to be
# compiled: `torch.compile` fuses those
# separate ops into one kernel (set `int8_compile=True` above to measure it at the widest
# width; compiling takes long, section 6). The tiny CLIP's towers are 64 wide: quantising
# them saves disk and memory, not time.

# %%
if int8_compile:
    D = max(int8_widths)
    torch.manual_seed(seed)
    ffn = torch.nn.Sequential(torch.nn.Linear(D, 4 * D), torch.nn.GELU(), torch.nn.Linear(4 * D, D)).eval()
    ffn_x = torch.randn(1, D)
    ffn_compiled = {name: deploy.measure_compile(model, ffn_x, repeats=repeats)
                    for name, model in (("float32", ffn), ("int8 torchao dynamic", deploy.quantize_torchao(ffn)))}
    for name, r in ffn_compiled.items():
        print(f"{name:22s} D = {D}, one row: eager {r.eager_ms:.3f} ms, compiled {r.compiled_ms:.3f} ms after "
              f"{r.compile_s:.1f} s of compiling")
    print(f"compiled int8 against eager float32: {ffn_compiled['float32'].eager_ms / ffn_compiled['int8 torchao dynamic'].compiled_ms:.2f}x")
else:
    print("torchao + torch.compile not measured (int8_compile=False)")

# %% [markdown]
# > **Common pitfall: comparing int8 at tiny shapes.** A benchmark of int8 on a toy layer
# > (a few dozen wide, one row) measures the quantise/dequantise overhead and concludes
# > that int8 is slow. Measure at the shapes you will serve. When to use it: CPU serving of
# > models whose matrices are hundreds or thousands wide (most real language and vision
# > models), and whenever the model must fit in less memory.
#
# ## 4. Export: ONNX and ONNX Runtime
#
# **ONNX** is a file format for a computation graph that many runtimes execute (ONNX
# Runtime, TensorRT, OpenVINO, browsers). torch 2.13's recommended exporter is
# `torch.onnx.export(..., dynamo=True)`: it captures the graph with `torch.export` and
# translates it op by op. We export each CLIP tower with a dynamic batch axis (and, for the
# text tower, a dynamic sequence length), run both with ONNX Runtime and compare the
# outputs with PyTorch on the whole test set. Then ONNX Runtime quantises the image tower's
# matrix multiplications to int8 (`onnxruntime.quantization.quantize_dynamic`).

# %%
export_start = time.perf_counter()
image_onnx = deploy.export_onnx(deploy.ImageTower(clip_model), (test["images"][:4],), workdir / "image_tower.onnx",
                                input_names=["images"], dynamic_axes={"images": {0: "batch"}})
example_text = tokenizer(test["canonical_caption"][:4])
text_onnx = deploy.export_onnx(deploy.TextTower(clip_model), (example_text["input_ids"], example_text["attention_mask"]),
                               workdir / "text_tower.onnx", input_names=["input_ids", "attention_mask"],
                               dynamic_axes={n: {0: "batch", 1: "tokens"} for n in ("input_ids", "attention_mask")})
export_s = time.perf_counter() - export_start
image_session = deploy.onnx_session(image_onnx, threads=threads)
text_session = deploy.onnx_session(text_onnx, threads=threads)
with torch.inference_mode():
    torch_images = clip_model.encode_image(test["images"])  # (N, E)
    torch_prompts = clip_model.encode_text(prompt_tokens)  # (C * T, E)
onnx_images = deploy.run_onnx(image_session, {"images": test["images"]})
onnx_prompts = deploy.run_onnx(text_session, dict(prompt_tokens))
onnx_diff = max((onnx_images - torch_images).abs().max().item(), (onnx_prompts - torch_prompts).abs().max().item())
image_int8_onnx = deploy.quantize_onnx_int8(image_onnx, workdir / "image_tower.int8.onnx")
image_int8_session = deploy.onnx_session(image_int8_onnx, threads=threads)
acc_onnx = zero_shot_accuracy(onnx_images, onnx_prompts)
acc_onnx_int8 = zero_shot_accuracy(deploy.run_onnx(image_int8_session, {"images": test["images"]}), onnx_prompts)
print(f"exported both towers in {export_s:.1f} s; largest |ONNX Runtime - PyTorch| over {num_test} images and "
      f"{len(torch_prompts)} prompts: {onnx_diff:.2e}")
pd.DataFrame({
    "file (kB)": [image_onnx.stat().st_size / 1e3, image_int8_onnx.stat().st_size / 1e3],
    "zero-shot top-1": [acc_onnx, acc_onnx_int8],
}, index=["image tower, float32 ONNX", "image tower, int8 ONNX (ORT dynamic)"]).round(3)

# %% [markdown]
# The exported graphs compute the same embeddings as PyTorch to float32 rounding (the
# ceiling recorded is $10^{-4}$, against embedding values of order 1, printed in section 3).

# %%
mmcourse.record("onnx_max_abs_diff", onnx_diff, at_most=1e-4)

# %% [markdown]
# ## 5. Batch size × precision: latency and throughput
#
# Batching amortises the fixed cost of a call (Python, kernel launches, reading the
# weights) over more items: throughput rises with $B$, and so does the latency of each
# call. Below, the image tower in every form measured so far, at each batch size, all
# timed in turn.

# %%
def no_grad(fn):
    def call(x):
        with torch.inference_mode():
            return fn(x)
    return call


def bf16_call(x):
    with torch.inference_mode(), deploy.autocast_bf16("cpu"):
        return clip_model.encode_image(x)


candidates = {
    "float32 eager": no_grad(clip_model.encode_image),
    "bf16 autocast": bf16_call,
    "int8 torchao": no_grad(int8_model.encode_image),
    "int8 torch.ao (deprecated)": no_grad(int8_models["int8 torch.ao dynamic (deprecated)"].encode_image),
    "ONNX Runtime float32": lambda x: image_session.run(None, {"images": x.numpy()}),
    "ONNX Runtime int8": lambda x: image_int8_session.run(None, {"images": x.numpy()}),
}
sweep_table = pd.DataFrame(deploy.sweep(candidates, lambda B: test["images"][:B].contiguous(), batch_sizes,
                                        repeats=repeats))
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
for name, group in sweep_table.groupby("candidate", sort=False):
    axes[0].plot(group["batch_size"], group["p50_ms"], "o-", label=name)
    axes[1].plot(group["batch_size"], group["throughput"], "o-", label=name)
axes[0].set(xscale="log", yscale="log", xlabel="batch size B", ylabel="p50 latency per call (ms)", title="Latency grows with B")
axes[1].set(xscale="log", yscale="log", xlabel="batch size B", ylabel="images / s", title="Throughput grows with B, then flattens")
axes[1].legend(fontsize=7)
for ax in axes:
    ax.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
plt.show()
baseline = sweep_table[sweep_table.candidate == "float32 eager"].set_index("batch_size")["p50_ms"]
sweep_table["speed-up vs float32"] = [baseline[b] / t for b, t in zip(sweep_table.batch_size, sweep_table.p50_ms, strict=True)]
sweep_table.pivot(index="candidate", columns="batch_size", values="speed-up vs float32").round(2)

# %% [markdown]
# The table gives each candidate's speed-up over float32 eager at each batch size (> 1:
# faster). Which one wins depends on the CPU and on $B$; that is the point of measuring.
# ONNX Runtime's advantage is largest where Python's per-call overhead dominates (small
# $B$). bf16 autocast pays, if at all, only at larger batches and only on hardware with bf16
# units (the flags printed in section 3); at $B = 1$ its conversions cost more than they
# save. The two int8 rows are the width sweep's lesson at the tiny CLIP's width of 64: at
# small $B$ the fixed cost per Linear dominates (most of all for `torchao`'s eager
# dispatch), so read their row against the sweep above before quantising for speed. On a
# busy shared machine a single entry can be far off (a neighbour's job lands in one timed
# call); re-run the chapter on an idle machine before trusting one cell.
#
# ### An explorer
#
# Pick a batch size and a precision: the bars show the measured p50 and p95 latency and the
# throughput from the table above (no re-timing; `deploy.draw_sweep_point`). With a Jupyter
# front end the controls redraw the figure; without one (on GitHub, or run headless) the
# figure is drawn once at the largest batch and the int8 model.

# %%
import ipywidgets as widgets

from mmcourse.widgets import explore

explore(deploy.draw_sweep_point, figsize=(9, 3), fixed={"table": sweep_table.to_dict("records")},
        batch=widgets.SelectionSlider(options=batch_sizes, value=batch_sizes[-1], description="batch"),
        candidate=widgets.Dropdown(options=list(candidates), value="int8 torchao", description="precision"));

# %% [markdown]
# ## 6. `torch.compile`: a cost paid once, a saving on every call
#
# `torch.compile` traces the model's Python into a graph (TorchDynamo) and generates fused
# kernels for it (TorchInductor: C++/OpenMP on a CPU, Triton on a GPU). The first call
# pays for all of that; later calls with the same shapes are faster. Three numbers decide
# whether it is worth it, the compile time $C$, the eager and compiled times per call
# $t_e$ and $t_c$, and so the **break-even** (回本) number of calls
#
# $$n^\star = \left\lceil \frac{C}{t_e - t_c} \right\rceil .$$
#
# We compile the image tower at batch size `compile_batch` with the default mode and
# inductor's on-disk caches disabled, so that $C$ is what a fresh machine pays.

# %%
if run_compile:
    compile_images = test["images"][:compile_batch].contiguous()
    compiled = deploy.measure_compile(clip_model.encode_image, compile_images, repeats=repeats, cold=True)
    print(f"compile time {compiled.compile_s:.1f} s; eager {compiled.eager_ms:.2f} ms, compiled {compiled.compiled_ms:.2f} ms "
          f"per call of {compile_batch} images; largest |compiled - eager| {compiled.max_abs_diff:.1e}")
    print(f"speed-up after warm-up {compiled.speedup:.2f}x; pays back after {compiled.break_even_calls} calls "
          f"({compiled.break_even_calls * compiled.eager_ms / 1e3:.0f} s of eager work)"
          if math.isfinite(compiled.break_even_calls) else f"speed-up {compiled.speedup:.2f}x: never pays back here")
    assert compiled.max_abs_diff < 1e-4
    mmcourse.record("compile_speedup_after_warmup", compiled.speedup)
    mmcourse.record("compile_break_even_calls",
                    compiled.break_even_calls if math.isfinite(compiled.break_even_calls) else "never")
else:
    print("torch.compile not measured (run_compile=False)")

# %% [markdown]
# > **Common pitfall: counting (or not counting) compile time.** A benchmark that times
# > the first compiled call reports compilation as if it were inference; one that warms up
# > and never mentions the compile time hides a cost that every new process, and every new
# > input shape, pays again. Report both, and the break-even. When to use it: a long-lived
# > server with fixed (or few, bucketed) shapes, or a training run; not a script that runs
# > the model a few hundred times.
#
# ## 7. Attention kernels: SDPA backends against the reference
#
# Chapter 02 wrote attention out, $\operatorname{softmax}(QK^\top/\sqrt{d_k})V$, storing
# the $L \times L$ weights. `F.scaled_dot_product_attention` (SDPA) dispatches to a fused
# kernel where the device has one: FLASH_ATTENTION tiles the computation and never stores
# the weights (on CPUs and recent GPUs), EFFICIENT_ATTENTION and CUDNN_ATTENTION exist on
# CUDA, MATH is the formula in ATen ops everywhere. Each backend is forced in turn and its
# output checked against chapter 02's reference first; a missing one shows as a gap.

# %%
attention_table = pd.DataFrame(deploy.attention_backend_timings(attention_lengths, batch=4, heads=4, head_dim=32,
                                                                repeats=max(3, repeats // 3), device=device))
fig, ax = plt.subplots(figsize=(6.5, 3.6))
for column in [c for c in attention_table.columns if c.endswith("_ms")]:
    if attention_table[column].notna().any():
        ax.plot(attention_table["length"], attention_table[column], "o-", label=column[:-3])
ax.set(xscale="log", yscale="log", xlabel="sequence length L = S", ylabel="p50 ms per call",
       title=f"Attention forward on {device.type}, B=4, H=4, Dh=32")
ax.legend(fontsize=7)
plt.show()
(attention_table.set_index("length").filter(like="_ms").div(attention_table.set_index("length")["reference_ms"], axis=0)
 .rename(columns=lambda c: c[:-3]).round(2))

# %% [markdown]
# The table divides each kernel's time by the reference's (< 1: faster). The fused kernel
# (FLASH_ATTENTION, which SDPA picks by default here) is several times faster than the
# reference, and more so from a few hundred tokens on, because the reference reads and
# writes the whole $L \times L$ matrix several times and returns the weights as well. When to use it: always call
# `F.scaled_dot_product_attention` (chapter 04's blocks do) and let it pick; force a
# backend only to compare or debug.
#
# ## 8. Generation: the KV cache
#
# A decoder generates one token at a time, and token $t$ attends to every earlier token.
# Without a cache each step runs the model on the whole sequence so far; with the **KV
# cache** each layer keeps the keys and values it computed, and a step runs only the new
# token. The cache costs memory,
#
# $$M_{KV} = 2 \times n_{\text{layers}} \times n_{\text{kv heads}} \times d_{\text{head}} \times T \times B \times \text{bytes per value},$$
#
# (2 for K and V; with grouped-query attention only the KV heads are cached).
#
# The decoder is chapter 11's: `mmcourse.llm.CausalLM`, the Llama written from scratch,
# built by `CausalLM.from_transformers` from a `transformers` Llama so that both hold the
# *same weights*. Ours decodes through `mmcourse.generation` (`deploy.greedy_decode`: our
# KV cache, or the whole prefix recomputed every step); `transformers`' own `generate`
# (`deploy.hf_generate`) decodes the same prompt with its cache, and every answer must be
# the same tokens. With `llm="random"` (the default, to keep the chapter
# fast) the weights are a randomly initialised Llama with SmolLM2's layer sizes (width
# 576, 9 heads, 3 KV heads, vocabulary 49,152) and `llm_layers` layers: a layer costs the
# same with random weights, but the text is gibberish (its first tokens are printed).
# `llm="smollm2"` loads SmolLM2-135M's real weights (hash-checked; the load takes
# 10-17 s, and its 30 layers cost more per token than `llm_layers`, beyond this chapter's
# budget) and decodes a real answer.

# %%
from mmcourse.llm import CausalLM

if llm == "smollm2":
    lm, lm_tokenizer = deploy.load_smollm2()
    prompt_ids = lm_tokenizer.apply_chat_template([{"role": "system", "content": ""},
                                                   {"role": "user", "content": "What colour is the sky?"}],
                                                  add_generation_prompt=True, return_tensors="pt")
    prompt_ids = prompt_ids if isinstance(prompt_ids, torch.Tensor) else prompt_ids["input_ids"]
else:
    lm, lm_tokenizer = deploy.random_llama(num_layers=llm_layers, seed=seed), None
    prompt_ids = torch.randint(3, lm.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(seed))
ours_lm = CausalLM.from_transformers(lm)  # chapter 11's decoder, the same weights
lm_config = lm.config
runs = [("transformers generate", deploy.hf_generate, lm, True), ("our CausalLM", deploy.greedy_decode, ours_lm, True),
        ("our CausalLM", deploy.greedy_decode, ours_lm, False)]
decodes = {(name, use_cache): decode(model, prompt_ids, max_new_tokens=new_tokens, use_cache=use_cache)
           for name, decode, model, use_cache in runs}
reference_tokens = decodes["transformers generate", True].tokens
same = {key: result.tokens == reference_tokens for key, result in decodes.items()}
kv_speedup = decodes["our CausalLM", False].wall_s / decodes["our CausalLM", True].wall_s
ours_vs_hf = decodes["transformers generate", True].wall_s / decodes["our CausalLM", True].wall_s
head_dim = lm_config.hidden_size // lm_config.num_attention_heads
cache_mb = deploy.kv_cache_bytes(num_layers=lm_config.num_hidden_layers, num_kv_heads=lm_config.num_key_value_heads,
                                 head_dim=head_dim, seq_len=prompt_ids.shape[1] + new_tokens) / 1e6
print(f"{'SmolLM2-135M' if llm == 'smollm2' else f'random Llama, {llm_layers} layers'}: prompt {prompt_ids.shape[1]} tokens, "
      f"{new_tokens} new")
if lm_tokenizer is not None:
    print("answer:", lm_tokenizer.decode(reference_tokens, skip_special_tokens=True))
else:
    print("first generated token ids:", reference_tokens[:10])
generation_table = pd.DataFrame([{"decoder": name, "KV cache": use_cache, "tokens / s": result.tokens_per_second,
                                  "same tokens as transformers (cached)": same[name, use_cache]}
                                 for (name, use_cache), result in decodes.items()]).set_index(["decoder", "KV cache"])
print(f"the KV cache speeds our decoder up {kv_speedup:.2f}x; our cached decoder runs at {ours_vs_hf:.2f}x the speed of "
      f"transformers' cached generate; the cache holds {cache_mb:.2f} MB at the end (float32)")
fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
for use_cache in (True, False):
    steps = np.array(decodes["our CausalLM", use_cache].step_s) * 1e3
    label = "with KV cache" if use_cache else "without (whole sequence every step)"
    axes[0].plot(range(1, new_tokens + 1), steps, label=label)
    axes[1].plot(range(1, new_tokens + 1), np.arange(1, new_tokens + 1) / np.cumsum(steps / 1e3), label=label)
axes[0].set(xlabel="generated token t", ylabel="ms for this token", yscale="log", title="Our decoder: each step (step 1 reads the prompt)")
axes[1].set(xlabel="answer length (tokens)", ylabel="tokens / s so far", title="Tokens per second as the answer grows")
axes[0].legend()
plt.show()
assert all(same.values()), "every decoder, with and without the cache, must give the same tokens"
mmcourse.record("kv_cache_speedup", kv_speedup)
mmcourse.record("scratch_decoder_speedup_vs_transformers", ours_vs_hf)
generation_table.round(2)

# %% [markdown]
# Without the cache the cost of a step grows with the sequence; with it, it stays nearly
# flat after the first step (which reads the prompt). The gap widens with the answer's
# length, and on a GPU, where one token leaves most of the chip idle, it is larger still.
# When to use it: always, for generation (`generate` does by default); the price is memory,
# which grows linearly with $T$ and $B$ (exercise 2). Our decoder and `transformers'` do
# the same matrix products on the same weights (the same tokens, checked), so the ratio of
# their speeds (printed above, recorded, and re-measured by `python -m mmcourse.bench
# generate`) is the Python each one runs around those products per step: masks,
# positions, cache bookkeeping, logits processing. It is a visible share of a small
# model's step and a smaller one as the model grows.
#
# ## 9. Checkpoints: safetensors against pickles
#
# `torch.save` writes a **pickle** (序列化): a small program that Python runs to rebuild
# the objects. **Safetensors** (安全张量格式) is a JSON header (names, dtypes, shapes,
# offsets) followed by the raw bytes: nothing runs when it is read, and the file can be
# memory-mapped. We save the Llama's weights in both and time loading, counting the time to
# touch every weight (a memory-mapped load that is never read would look free).

# %%
checkpoint_dir = workdir / "checkpoints"
checkpoint_dir.mkdir()
checkpoint_table = pd.DataFrame(deploy.checkpoint_load_times(lm.state_dict(), checkpoint_dir, repeats=3)).set_index("format")
checkpoint_table["MB"] = checkpoint_table.pop("bytes") / 1e6
checkpoint_table.round(1)

# %% [markdown]
# > **Common pitfall: `torch.load` of an untrusted file.** A pickle can run any code when it
# > is loaded. `torch.load(path, weights_only=True)` (the default since torch 2.6) uses a
# > restricted unpickler that only rebuilds tensors and plain containers; never pass
# > `weights_only=False` for a file you did not make. Safetensors avoids the question: it
# > holds no code. When to use it: ship weights as safetensors (the Hugging Face hub does),
# > keep pickles for your own training checkpoints with optimiser state.
#
# ## 10. A real service with dynamic batching
#
# `mmcourse.serve` puts the tiny CLIP behind a FastAPI app. The model is saved as
# safetensors plus a JSON config and vocabulary (`save_clip_bundle`) and loaded by the
# service (`create_app(folder)`), with no pickle anywhere. `POST /classify` takes one
# image as a (3, 32, 32) JSON list and a list of labels, and answers with the best label
# and every label's score; `POST /retrieve` takes a text and returns the closest gallery
# images.
#
# **Dynamic batching**: each request's image waits up to `batch_window_ms` for other
# requests; all that arrive in the window (up to 32) run through the image tower as one
# batch (section 5's throughput gain), and each request gets its own answer back. We start
# the server with uvicorn on 127.0.0.1 (a free port, in a background thread), send a
# bounded load with `httpx`, `num_requests` requests with `concurrency` in flight, once
# with batching and once without, and stop it.

# %%
gallery = test["images"][:200]
bundle_dir = serve.save_clip_bundle(workdir / "clip_bundle", clip_model, tokenizer,
                                    gallery_embeds=encode_images(clip_model, gallery),
                                    gallery_captions=test["canonical_caption"][:200])
payloads = [{"image": test["images"][i].tolist(), "labels": list(CLASS_NAMES), "templates": templates}
            for i in range(num_requests)]
with torch.inference_mode():
    direct = zero_shot_scores(clip_model.encode_image(test["images"][:num_requests]),
                              clip_model.encode_text(prompt_tokens).reshape(len(CLASS_NAMES), len(templates), -1),
                              ensemble="max").argmax(-1)
loads, apps, model_s = {}, {}, {}
for batching in (False, True):
    apps[batching] = serve.create_app(bundle_dir, serve.ServeConfig(dynamic_batching=batching, batch_window_ms=batch_window_ms))
    image_batcher = apps[batching].state.batchers["images"]
    with serve.serving(apps[batching]) as url:
        serve.run_load(url, payloads[:concurrency], concurrency=concurrency)  # warm-up (and the label prompts' cache)
        busy_before = image_batcher.busy_s
        loads[batching] = serve.run_load(url, payloads, concurrency=concurrency)
        model_s[batching] = image_batcher.busy_s - busy_before  # seconds inside the image tower during the load
    served = [CLASS_NAMES.index(r["label"]) for r in loads[batching].responses]
    assert loads[batching].errors == 0 and served == direct.tolist(), "the service must answer as the model does"
sizes = apps[True].state.batchers["images"].batch_sizes
load_table = pd.DataFrame({
    "requests / s": [loads[b].throughput for b in (False, True)],
    "image tower ms per request": [1e3 * model_s[b] / num_requests for b in (False, True)],
    "p50 latency (ms)": [loads[b].stats.p50_ms for b in (False, True)],
    "p95 latency (ms)": [loads[b].stats.p95_ms for b in (False, True)],
}, index=["one request per forward", f"dynamic batching ({batch_window_ms:g} ms window)"])
print(f"{num_requests} requests at concurrency {concurrency}, each server's answers equal to the model's; with batching "
      f"the image tower ran {len(sizes)} batches, {np.mean(sizes):.1f} images on average (warm-up included)")
fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
for b, name in ((False, "no batching"), (True, "dynamic batching")):
    axes[0].hist(np.array(loads[b].latencies_s) * 1e3, bins=25, alpha=0.6, label=name)
axes[0].set(xlabel="request latency (ms)", ylabel="requests", title="Latency seen by the client")
axes[0].legend()
axes[1].bar(["no batching", "dynamic batching"], load_table["requests / s"], color=["gray", "C2"])
axes[1].set(ylabel="requests / s", title=f"Throughput, {concurrency} requests in flight")
plt.show()
load_table.round(1)

# %% [markdown]
# Bad requests must get a clear 4xx answer and must not take the server down. We send an
# image of the wrong shape, an empty label list, a body that is not JSON, a request
# without labels, a ragged image and a label template without a slot, then a good request.

# %%
import httpx


def post_each(client, path, bodies):
    """POST every body (a dict as JSON, bytes as a raw JSON-typed body); {name: (status, detail)}."""
    answers = {}
    for name, body in bodies.items():
        if isinstance(body, bytes):
            response = client.post(path, content=body, headers={"Content-Type": "application/json"})
        else:
            response = client.post(path, json=body)
        answers[name] = (response.status_code, response.json()["detail"])
    return answers


with serve.serving(apps[True]) as url, httpx.Client(base_url=url, trust_env=False) as client:
    good = {"image": test["images"][0].tolist(), "labels": ["red circle", "blue square"]}
    bad = {
        "image of shape (32, 32, 3)": dict(good, image=test["images"][0].permute(1, 2, 0).tolist()),
        "empty label list": dict(good, labels=[]),
        "body that is not JSON": b"image=red circle",
        "no labels field": {"image": good["image"]},
        "ragged image": dict(good, image=[[0.1, 0.2], [0.3]]),
        "template without a slot": dict(good, templates=["a picture"]),
    }
    answers = post_each(client, "/classify", bad)
    after = client.post("/classify", json=good)
rejected = sum(400 <= code < 500 for code, _ in answers.values())
for name, (code, detail) in answers.items():
    print(f"{name:28s} -> {code}: {detail[:110]}")
print(f"then a good request -> {after.status_code}: {after.json()['label']}")
assert after.status_code == 200
mmcourse.record("server_bad_requests_rejected", rejected, at_least=len(bad))

# %% [markdown]
# Every server started above was stopped by its `with serving(...)` block (nothing listens
# any more), and it never listened on anything but 127.0.0.1.

# %%
ratio = loads[True].throughput / loads[False].throughput
print(f"dynamic batching: {ratio:.2f}x the throughput of one request per forward, p95 latency "
      f"{loads[True].stats.p95_ms:.1f} ms against {loads[False].stats.p95_ms:.1f} ms")
share = model_s[False] / loads[False].wall_s
print(f"without batching the image tower was busy {share:.0%} of the load's wall time; that share is all that "
      f"batching can shorten")
mmcourse.record("dynamic_batching_throughput_ratio", ratio)

# %% [markdown]
# How much dynamic batching gains depends on how much of a request's time is the model
# (printed above). A request here also spends time in HTTP, JSON parsing of a 3 × 32 × 32
# list, validation and Python, which batching does not shorten, and all of it competes for
# the same cores as the client; the tiny CLIP's forward on one image is cheap. When the
# model's share is small, batching cannot gain much, and its window (plus the extra hop
# through the batcher) can cost more than it saves: the ratio recorded can fall on either
# side of 1 from run to run. When the model dominates (a large tower, or a GPU that sits
# mostly idle on a batch of one), batching gains up to the per-item speed-up of section 5. When to use it: a server with
# many concurrent users and a model whose batched forward is much cheaper per item than
# single calls (section 5).

# %% [markdown]
# ### Captioning as a service
#
# The same app serves chapter 10's captioner when it is given one: `POST /caption` takes an
# image and `max_new_tokens` and answers with the greedy caption, decoded by
# `mmcourse.generation` through `captioning.generate_text`, with dynamic batching (a batch
# is decoded for its largest `max_new_tokens` and each caption cut to its own; greedy
# decoding of one row does not depend on the others). To keep the chapter fast the
# captioner reuses the tiny CLIP's trained image tower as its frozen vision encoder (the
# same ViT configuration as chapter 10's) and trains only its one-layer decoder on the
# training scenes' captions, with `mmcourse.train.fit` and chapter 10's
# `captioning.sequence_loss`. It is saved with `save_captioner_bundle` (safetensors and
# JSON) and the server loads it from that folder. The yardstick is chapter 10's
# **attribute accuracy**: the colour, shape, size and position read out of each caption
# against the scene, and against a *shuffled* baseline (each caption scored against
# another test scene), which is what a caption that ignores its image would get.

# %%
from mmcourse import caption_metrics as cm
from mmcourse.captioning import Captioner, CaptionerConfig, encode_sequences, generate_text, sequence_batches, sequence_loss
from mmcourse.generation import GenerationConfig
from mmcourse.train import TrainConfig, fit

torch.manual_seed(seed)
captioner = Captioner(CaptionerConfig(vocab_size=tokenizer.vocab_size, decoder_layers=1, max_length=24))
captioner.encoder.load_state_dict(clip_model.image_encoder.state_dict())  # the CLIP's image tower, frozen
captioner.encoder.requires_grad_(False)
with torch.inference_mode():
    caption_memory = captioner.encode(train["images"])  # (N, 16, D): computed once
encoded_captions = encode_sequences(tokenizer, train["canonical_caption"])
caption_batches = sequence_batches(caption_memory, encoded_captions, batch_size=64, num_batches=caption_steps, seed=seed,
                                   key="memory")
caption_fit = fit(captioner, caption_batches, loss_fn=sequence_loss,
                  config=TrainConfig(max_steps=caption_steps, lr=3e-3, warmup_steps=caption_steps // 20,
                                     eval_every=caption_steps, progress=False, device=str(device)))
captioner_dir = serve.save_captioner_bundle(workdir / "captioner", captioner.cpu().eval(), tokenizer)
caption_app = serve.create_app(bundle_dir, serve.ServeConfig(batch_window_ms=batch_window_ms), captioner=captioner_dir)
caption_images = test["images"][:caption_requests]
with serve.serving(caption_app) as url:
    captions_load = serve.run_load(url, [{"image": im.tolist(), "max_new_tokens": 20} for im in caption_images],
                                   path="/caption", concurrency=concurrency)
served_captions = [r["caption"] for r in captions_load.responses]
direct_captions, _ = generate_text(serve.load_captioner_bundle(captioner_dir).model, tokenizer, images=caption_images,
                                   config=GenerationConfig(max_new_tokens=20))
caption_acc = cm.attribute_accuracy(served_captions, test["objects"][:caption_requests])["overall"]
shuffled_acc = cm.attribute_accuracy(served_captions, test["objects"][1:caption_requests] + test["objects"][:1])["overall"]
print(f"captioner: decoder trained {caption_steps} steps in {caption_fit.seconds:.1f} s, final loss "
      f"{caption_fit.history[-1]['loss']:.3f}; {caption_requests} captions served at concurrency {concurrency} in "
      f"{captions_load.wall_s:.2f} s, {captions_load.errors} errors, each equal to generate_text on the loaded model: "
      f"{served_captions == direct_captions}")
for i in range(3):
    print(f"  served: {served_captions[i]!r:42s} scene: {test['canonical_caption'][i]!r}")
print(f"attribute accuracy of the served captions {caption_acc:.3f}; against shuffled scenes {shuffled_acc:.3f}")
assert captions_load.errors == 0 and served_captions == direct_captions, "the service must caption as the model does"
mmcourse.record("caption_attribute_accuracy", caption_acc, at_least=shuffled_acc + 0.2)

# %% [markdown]
# Bad caption requests: an image of the wrong shape, a body that is not JSON, a length of 0,
# a length beyond the captioner's context, a length that is not a number; then a good one.

# %%
with serve.serving(caption_app) as url, httpx.Client(base_url=url, trust_env=False) as client:
    good_caption = {"image": test["images"][0].tolist(), "max_new_tokens": 20}
    bad_captions = {
        "image of shape (3, 16, 16)": dict(good_caption, image=test["images"][0, :, :16, :16].tolist()),
        "body that is not JSON": b"{image: [0.1]",
        "max_new_tokens = 0": dict(good_caption, max_new_tokens=0),
        "max_new_tokens = 500": dict(good_caption, max_new_tokens=500),
        "max_new_tokens = 'long'": dict(good_caption, max_new_tokens="long"),
    }
    caption_answers = post_each(client, "/caption", bad_captions)
    caption_after = client.post("/caption", json=good_caption)
for name, (code, detail) in caption_answers.items():
    print(f"{name:28s} -> {code}: {detail[:110]}")
print(f"then a good request -> {caption_after.status_code}: {caption_after.json()}")
assert caption_after.status_code == 200
mmcourse.record("caption_bad_requests_rejected", sum(400 <= code < 500 for code, _ in caption_answers.values()),
                at_least=len(bad_captions))

# %% [markdown]
# ## 11. Summary
#
# The ratios of this run, against float32 eager on the same machine (re-run the chapter
# and they will move; the ones recorded are also printed by
# `python -m mmcourse.bench deploy`):

# %%
summary = pd.DataFrame([
    ("bf16 autocast", "zero-shot accuracy change", -bf16_drop, "GPUs and CPUs with bf16 units"),
    ("int8 torchao dynamic", "zero-shot accuracy change", -int8_drop, "CPU serving of wide matrices; memory"),
    ("int8 torchao dynamic", "checkpoint size ratio", int8_bytes / fp32_bytes, "smaller files and RAM"),
    ("ONNX export", "max |ORT - PyTorch|", onnx_diff, "serving outside Python; other runtimes"),
    ("torch.compile", "speed-up after warm-up", compiled.speedup if run_compile else math.nan, "long-lived processes, fixed shapes"),
    ("torch.compile", "break-even calls", float(compiled.break_even_calls) if run_compile else math.nan, "ditto"),
    ("KV cache", "generation speed-up", kv_speedup, "always, for generation"),
    ("our decoder (chapter 11)", "speed / transformers generate", ours_vs_hf, "ditto, same tokens"),
    ("safetensors", "load time / torch.load's", checkpoint_table.load_ms["safetensors"] / checkpoint_table.load_ms["torch.save"],
     "shipping weights"),
    ("dynamic batching", "server throughput ratio", ratio, "many concurrent requests"),
    ("captioning service", "attribute accuracy", caption_acc, f"greedy captions over HTTP (shuffled scenes: {shuffled_acc:.2f})"),
], columns=["technique", "measured", "value", "when to use it"])
summary["value"] = summary["value"].map(lambda v: f"{v:.3g}")
print(f"notebook ran in {time.perf_counter() - notebook_start:.0f} s on {device} with {threads} thread(s)")
summary

# %% [markdown]
# * Measure latency as a distribution (p50 and p95) after warm-up, with the device
#   synchronised and the threads fixed; compare candidates timed in turn.
# * Cheaper precisions cost little accuracy here, but speed only where the hardware and the
#   shapes allow: int8 pays on wide matrices, bf16 where there are bf16 units. `torchao`
#   is the maintained int8 path; eagerly on a CPU its per-call cost is higher than the
#   deprecated `torch.ao` kernels', and it is meant to be compiled.
# * `torch.compile` is an investment: compile time on one side, per-call savings on the
#   other; the break-even says whether it pays.
# * Fused attention kernels win more as sequences grow; the KV cache makes generation cost
#   grow with the answer instead of with its square.
# * Export to ONNX and check the outputs; ship weights as safetensors; never unpickle an
#   untrusted file.
# * A service is more than a model: validation with clear 4xx errors, a server that stays
#   up, and dynamic batching when the load is high; a captioner is served the same way,
#   its greedy decoding batched across requests.
#
# ## Exercises
#
# Replace each `raise NotImplementedError` with your answer and run the cell; `check()`
# tells you what is right or wrong. `hint()` and `solution()` help if you are stuck.

# %%
from mmcourse.exercises.ch13 import q1, q2, q3


# Exercise 1: times_ms are per-call latencies in milliseconds, in the order they were
# measured; the first `warmup` of them are warm-up calls. Return the p95 latency of the rest,
# interpolated linearly between ranks as numpy.percentile does (do not call numpy).
def my_p95(times_ms, warmup):
    raise NotImplementedError  # your code here


q1.check(my_p95)


# %%
# Exercise 2: the bytes of the KV cache of a Llama-style model. config is a dict with
# hidden_size, num_attention_heads, num_key_value_heads and num_hidden_layers.
def my_kv_cache_bytes(config, seq_len, batch, bytes_per_value):
    raise NotImplementedError  # your code here


q2.check(my_kv_cache_bytes)


# %%
# Exercise 3: compiling took compile_s seconds; a call takes eager_ms eagerly and compiled_ms
# compiled. After how many calls has compiling paid back (a whole number; math.inf if never)?
def my_break_even(compile_s, eager_ms, compiled_ms):
    raise NotImplementedError  # your code here


q3.check(my_break_even)

# %%
# q1.hint(); q1.solution()
