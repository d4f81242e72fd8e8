"""Micro-benchmarks of the course's building blocks against their torch counterparts.

Run one from the command line, ``python -m mmcourse.bench NAME [options]``; each prints a
table from a single run. Chapters add their benchmark to :data:`BENCHMARKS`: a name, a
function that adds its options to an ``argparse`` parser, and a function that runs it.

    python -m mmcourse.bench attention [--device auto] [--lengths 64 128 256 512 1024]
                                       [--repeats 7] [--batch 4] [--dim 256] [--heads 8]
    python -m mmcourse.bench clip [--device auto] [--batch-sizes 256 1024 2048]
                                  [--embed-dim 512] [--repeats 7] [--train-batch 128]
                                  [--width 64] [--layers 2] [--heads 4] [--projection-dim 64]
                                  [--vocab-size 64] [--text-length 16] [--warmup-steps 3]
                                  [--lr 1e-3]
    python -m mmcourse.bench generate [--device auto] [--model tiny-llama] [--new-tokens 256]
                                      [--prompt-length 16] [--batch 1] [--repeats 3]
                                      [--no-recompute] [--no-scratch] [--hidden 64]
                                      [--layers 4] [--heads 4]
                                      [--vocab-size 1024] [--seed 0]
    python -m mmcourse.bench deploy [--threads 2] [--widths 64 256 1024]
                                    [--int8 torchao torchao-weight-only torch.ao] [--repeats 15]
                                    [--compile-batch 32] [--no-compile] [--llm-layers 4]
                                    [--llm-hidden 576] [--new-tokens 48] [--requests 96]
                                    [--concurrency 16] [--window-ms 5]

``clip`` has two parts. (1) ``mmcourse.contrastive.clip_loss`` against ``transformers``'
``image_text_contrastive_loss`` on the same (G, E) embeddings, forward + backward, each
path including the normalisation and the scaled similarity matrix as ``CLIPModel.forward``
computes them (their values are checked equal first). (2) Training throughput in images/s
of our :class:`~mmcourse.clip.TinyClip` against a ``transformers`` ``CLIPModel`` built from
a ``CLIPConfig`` of the same sizes (vision: 32 x 32 images, 8 x 8 patches, ``--width``,
``--layers``, ``--heads``; text: ``--vocab-size``, the same width, layers and heads,
``--text-length`` positions; both project to ``--projection-dim``), on the same random
batch of ``--train-batch`` pairs, with AdamW at ``--lr``, in float32; one timed call is one
optimiser step. The towers are not identical (ours: a BERT-style text tower with mean
pooling; CLIP's: a causal text tower pooled at the end token), so the table also gives
the parameter counts.

``generate`` times greedy decoding of ``--new-tokens`` tokens (no stop token) from random
prompts with a ``transformers`` causal LM (``--model``, default ``tiny-llama``: a randomly
initialised ``LlamaForCausalLM`` of ``--hidden``, ``--layers``, ``--heads``,
``--vocab-size``): :func:`mmcourse.generation.generate` through ``hf_step_fn`` (the
model's KV cache) against the model's own ``generate`` (their tokens are checked equal
first), and ours again through ``recompute_step_fn`` (no cache: the whole prefix every
step). For a Llama (``tiny-llama``, ``smollm2``) it also times chapter 11's from-scratch
decoder, :class:`mmcourse.llm.CausalLM` built by ``CausalLM.from_transformers`` on the
same weights, through the same library with its own KV cache (``--no-scratch`` skips it);
its tokens are checked against ``transformers``' too. One timed call is one whole
decoding. Chapters add models to :data:`GENERATION_MODELS`.

Timing: each candidate is first warmed up, then timed in blocks of calls long enough to
beat the timer's resolution (``torch.utils.benchmark.Timer``, which also synchronises a
GPU); the candidates of one row are timed **in turn**, block after block, so that a
slowdown of the machine hits all of them alike, and each reports the **median** block.
Only the ratios are meant to be compared; on a shared CPU the times wander.

``deploy`` prints the speed ratios of chapter 13 on this machine, on the CPU: int8
quantisation against float32 over the FFN width (``--int8``: torchao's dynamic and
weight-only int8, the deprecated ``torch.ao`` dynamic int8); ``torch.compile`` (inductor, cold caches) of
a tiny CLIP's image tower, its speed-up after warm-up and break-even calls; greedy decoding
with the KV cache against without, on a randomly initialised Llama of SmolLM2's layer sizes
(``--llm-layers``; speed does not depend on the weights); and a served tiny CLIP (random
weights, 127.0.0.1 only, always stopped) under a bounded ``httpx`` load with dynamic batching
against one request per forward.

Taught in notebooks/02_attention (the cost of attention), notebooks/15_scaling_out (the
CLIP loss and training throughput), notebooks/10_captioning_and_vqa and chapter 11
(``generate``, the KV cache) and notebooks/13_efficient_inference_and_deployment (deploy).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import benchmark
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from mmcourse.attention import MultiHeadAttention, fused_attention, scaled_dot_product_attention
from mmcourse.contrastive import PairObjective, clip_loss
from mmcourse.encoders import count_parameters
from mmcourse.utils import get_device, positive_float, positive_int

logger = logging.getLogger(__name__)


# --- timing and memory --------------------------------------------------------------------


def _calibrate(timer: benchmark.Timer, min_block_s: float) -> int:
    """The number of calls per block that lasts at least ``min_block_s``."""
    number = 1
    while True:
        elapsed = timer.timeit(number).mean * number
        if elapsed >= min_block_s or number >= 1 << 20:
            return number
        number *= max(2, min(10, int(min_block_s / max(elapsed, 1e-9)) + 1))


def time_candidates(
    candidates: dict[str, Callable[[], Any]],
    *,
    repeats: int = 7,
    warmup: int = 2,
    min_block_s: float = 0.02,
) -> dict[str, float]:
    """Median seconds per call of each zero-argument function, timed in turn.

    Args:
        candidates: ``{name: fn}``; each ``fn()`` runs the operation once.
        repeats: timed blocks per candidate (the median is reported).
        warmup: untimed calls first (kernel selection, allocator, caches).
        min_block_s: a block repeats the call until it lasts at least this long.

    Returns:
        ``{name: median seconds per call}``.
    """
    positive_int(repeats=repeats)
    positive_float(min_block_s=min_block_s)
    timers = {name: benchmark.Timer("fn()", globals={"fn": fn}) for name, fn in candidates.items()}
    numbers = {}
    for name, fn in candidates.items():
        for _ in range(warmup):
            fn()
        numbers[name] = _calibrate(timers[name], min_block_s)
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, timer in timers.items():  # interleaved: noise hits every candidate alike
            samples[name].append(timer.timeit(numbers[name]).mean)
    return {name: statistics.median(times) for name, times in samples.items()}


class _LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of the tensors operators create, while they are alive; keeps the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage address -> [bytes, live tensors]
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            key = t.untyped_storage().data_ptr()
            if key == 0 or key in inputs:  # empty, a view or an in-place result of an input
                continue
            if key not in self.live:
                self.live[key] = [t.untyped_storage().nbytes(), 0]
                self.current += self.live[key][0]
                self.peak = max(self.peak, self.current)
            self.live[key][1] += 1
            weakref.finalize(t, self._release, key)
        return out


def peak_memory_bytes(fn: Callable[[], Any], *, device: torch.device | str = "cpu") -> int:
    """Peak bytes of the tensors allocated while ``fn()`` runs (its inputs not counted).

    On CUDA this is the allocator's own peak (``torch.cuda.max_memory_allocated``),
    which sees everything. Elsewhere the tensors that operators return are counted while
    they are alive; scratch buffers that a fused kernel allocates and frees inside one
    call (a few small blocks per thread on a CPU) are not seen.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        del result
        return torch.cuda.max_memory_allocated(device) - start
    with torch.no_grad(), _LiveTensorBytes() as counter:
        result = fn()
        del result
    return counter.peak


# --- the attention benchmark --------------------------------------------------------------


@dataclass
class AttentionRow:
    """Timings (seconds per call) of one sequence length; ratios are against torch."""

    length: int  # L = S, tokens per sequence
    torch_sdpa: float  # F.scaled_dot_product_attention
    reference: float  # mmcourse.attention.scaled_dot_product_attention
    fused: float  # mmcourse.attention.fused_attention
    torch_mha: float  # nn.MultiheadAttention, need_weights=False: its F.sdpa path
    torch_mha_native: float  # the same in eval mode: its native "fast path" op
    mha_fused: float  # MultiHeadAttention(use_sdpa=True), need_weights=False
    mha_reference: float  # MultiHeadAttention(use_sdpa=False), need_weights=False

    def ratios(self) -> dict[str, float]:
        return {
            "reference / sdpa": self.reference / self.torch_sdpa,
            "fused / sdpa": self.fused / self.torch_sdpa,
            "MHA fused / nn.MHA": self.mha_fused / self.torch_mha,
            "MHA fused / native": self.mha_fused / self.torch_mha_native,
            "MHA ref. / nn.MHA": self.mha_reference / self.torch_mha,
        }


def attention_timings(
    lengths: Sequence[int],
    *,
    batch: int = 4,
    dim: int = 256,
    heads: int = 8,
    repeats: int = 7,
    device: str | torch.device = "auto",
    dtype: torch.dtype = torch.float32,
    min_block_s: float = 0.02,
    seed: int = 0,
) -> list[AttentionRow]:
    """Time attention forward passes (no gradient) over sequence lengths.

    The functions get (B, H, L, Dh) tensors; the modules get (B, L, D) and do
    self-attention with ``need_weights=False``. ``nn.MultiheadAttention`` is timed twice:
    in train mode (dropout 0), where it projects and calls ``F.scaled_dot_product_attention``
    as ours does, and in eval mode, where without autograd it takes its native "fast path"
    (``torch._native_multi_head_attention``).

    Args:
        lengths: sequence lengths L (= S) to time.
        batch, dim, heads: B, D and H (Dh = D / H).
        repeats, min_block_s: see :func:`time_candidates`.
        device: where to run (``"auto"``: cuda, mps, cpu).
        dtype: float32 by default.
        seed: for the random inputs and weights.

    Returns:
        One :class:`AttentionRow` per length.
    """
    for L in lengths:
        positive_int(length=L)
    positive_int(batch=batch, dim=dim, heads=heads)
    if dim % heads:
        raise ValueError(f"heads={heads} must divide dim={dim}")
    device = get_device(device)
    torch.manual_seed(seed)
    theirs = nn.MultiheadAttention(dim, heads, batch_first=True).to(device, dtype)
    native = nn.MultiheadAttention(dim, heads, batch_first=True).to(device, dtype).eval()
    native.load_state_dict(theirs.state_dict())
    ours = {
        use_sdpa: MultiHeadAttention.from_torch(theirs, use_sdpa=use_sdpa).eval()
        for use_sdpa in (True, False)
    }
    rows = []
    for L in lengths:
        x = torch.randn(batch, L, dim, device=device, dtype=dtype)  # (B, L, D)
        q, k, v = (
            torch.randn(batch, heads, L, dim // heads, device=device, dtype=dtype) for _ in range(3)
        )  # (B, H, L, Dh)

        def run(fn, *args, **kwargs):
            def call():
                with torch.no_grad():
                    return fn(*args, **kwargs)

            return call

        times = time_candidates(
            {
                "torch_sdpa": run(F.scaled_dot_product_attention, q, k, v),
                "reference": run(scaled_dot_product_attention, q, k, v),
                "fused": run(fused_attention, q, k, v),
                "torch_mha": run(theirs, x, x, x, need_weights=False),
                "torch_mha_native": run(native, x, x, x, need_weights=False),
                "mha_fused": run(ours[True], x, need_weights=False),
                "mha_reference": run(ours[False], x, need_weights=False),
            },
            repeats=repeats,
            min_block_s=min_block_s,
        )
        rows.append(AttentionRow(length=L, **times))
        logger.info("L=%d: %s", L, times)
    return rows


def format_attention_table(rows: Sequence[AttentionRow]) -> str:
    """The table printed by ``python -m mmcourse.bench attention``."""
    names = list(rows[0].ratios()) if rows else []
    header = f"{'L':>5} {'sdpa ms':>9} {'nn.MHA ms':>10} " + " ".join(f"{n:>19}" for n in names)
    lines = [header, "-" * len(header)]
    for row in rows:
        ratios = " ".join(f"{r:>19.2f}" for r in row.ratios().values())
        lines.append(
            f"{row.length:>5} {row.torch_sdpa * 1e3:>9.3f} {row.torch_mha * 1e3:>10.3f} {ratios}"
        )
    return "\n".join(lines)


def _attention_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=[64, 128, 256, 512, 1024], help="L = S"
    )
    parser.add_argument("--repeats", type=int, default=7, help="timed blocks per candidate")
    parser.add_argument("--batch", type=int, default=4, help="B")
    parser.add_argument("--dim", type=int, default=256, help="D (model width)")
    parser.add_argument("--heads", type=int, default=8, help="H (D / H per head)")
    parser.add_argument(
        "--min-block", type=float, default=0.02, help="seconds per timed block, at least"
    )


def _attention_main(args: argparse.Namespace) -> None:
    device = get_device(args.device)
    rows = attention_timings(
        args.lengths,
        batch=args.batch,
        dim=args.dim,
        heads=args.heads,
        repeats=args.repeats,
        device=device,
        min_block_s=args.min_block,
    )
    print(
        f"attention forward, no gradient: B={args.batch}, D={args.dim}, H={args.heads} "
        f"(Dh={args.dim // args.heads}), float32, device {device}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats} blocks"
    )
    print(
        "ratios are time / torch's time (< 1: faster than torch); sdpa = "
        "F.scaled_dot_product_attention, nn.MHA = nn.MultiheadAttention (train mode, no "
        "dropout: projections + F.sdpa), native = nn.MultiheadAttention's eval-mode fast path"
    )
    print(format_attention_table(rows))


# --- the CLIP benchmark -------------------------------------------------------------------


@dataclass
class ClipLossRow:
    """Seconds per forward + backward of the CLIP loss on (G, E) embeddings."""

    batch: int  # G, pairs in the batch (the logits are G x G)
    ours: float  # mmcourse.contrastive.clip_loss
    transformers: float  # transformers' image_text_contrastive_loss, as in CLIPModel.forward

    @property
    def ratio(self) -> float:
        return self.ours / self.transformers


def _time_clip_losses(
    u: torch.Tensor, v: torch.Tensor, s: torch.Tensor, *, repeats: int, min_block_s: float
) -> dict[str, float]:
    """Seconds per forward + backward of our CLIP loss and transformers' on u, v, s."""
    from transformers.models.clip.modeling_clip import image_text_contrastive_loss

    def theirs_loss() -> torch.Tensor:  # CLIPModel.forward: normalise, s * text @ image^T
        text, image = F.normalize(v, dim=-1), F.normalize(u, dim=-1)
        return image_text_contrastive_loss(s * text @ image.T)  # (G, G) text x image

    ours_value, theirs_value = clip_loss(u, v, s), theirs_loss()
    if not torch.allclose(ours_value, theirs_value, atol=1e-4, rtol=1e-5):
        raise AssertionError(
            f"G={u.shape[0]}: our loss {ours_value} != transformers' {theirs_value}"
        )

    def step(loss_fn: Callable[[], torch.Tensor]) -> Callable[[], Any]:
        return lambda: torch.autograd.grad(loss_fn(), (u, v, s))

    return time_candidates(
        {"ours": step(lambda: clip_loss(u, v, s)), "transformers": step(theirs_loss)},
        repeats=repeats,
        min_block_s=min_block_s,
    )


def clip_loss_timings(
    batch_sizes: Sequence[int],
    *,
    embed_dim: int = 512,
    repeats: int = 7,
    device: str | torch.device = "auto",
    min_block_s: float = 0.02,
    seed: int = 0,
) -> list[ClipLossRow]:
    """Time our CLIP loss against transformers', forward and backward, over batch sizes.

    Both start from the same unnormalised (G, E) image and text embeddings and a logit
    scale; transformers' path is ``CLIPModel.forward``'s: normalise, ``s * text @ image^T``,
    ``image_text_contrastive_loss``. Both values are checked equal before timing.

    Args:
        batch_sizes: the G to time.
        embed_dim: E.
        repeats, min_block_s: see :func:`time_candidates`.
        device: where to run.
        seed: for the random embeddings.

    Returns:
        One :class:`ClipLossRow` per batch size.
    """
    for G in batch_sizes:
        positive_int(batch_size=G)
    positive_int(embed_dim=embed_dim)
    device = get_device(device)
    torch.manual_seed(seed)
    rows = []
    for G in batch_sizes:
        u = torch.randn(G, embed_dim, device=device, requires_grad=True)  # (G, E) images
        v = torch.randn(G, embed_dim, device=device, requires_grad=True)  # (G, E) texts
        s = torch.tensor(1 / 0.07, device=device, requires_grad=True)
        times = _time_clip_losses(u, v, s, repeats=repeats, min_block_s=min_block_s)
        rows.append(ClipLossRow(batch=G, **times))
        logger.info("G=%d: %s", G, times)
    return rows


@dataclass
class ClipTrainingResult:
    """Training throughput of our tiny CLIP and of transformers' CLIPModel of the same sizes."""

    batch: int  # B, pairs per optimiser step
    ours_images_per_second: float  # TinyClip (its own logit scale) + clip_loss
    transformers_images_per_second: float  # CLIPModel(return_loss=True)
    ours_parameters: int  # trainable parameters, the learned logit scale included
    transformers_parameters: int


def clip_training_throughput(
    *,
    batch: int = 128,
    width: int = 64,
    layers: int = 2,
    heads: int = 4,
    projection_dim: int = 64,
    vocab_size: int = 64,
    text_length: int = 16,
    lr: float = 1e-3,
    warmup_steps: int = 3,
    repeats: int = 5,
    device: str | torch.device = "auto",
    min_block_s: float = 0.0,
    seed: int = 0,
) -> ClipTrainingResult:
    """Images per second of one AdamW training step: our TinyClip against transformers' CLIPModel.

    Both models see the same random batch: (B, 3, 32, 32) images and (B, L) token ids
    ``[CLS] w_1 .. w_{L-2} [SEP]`` (transformers' text tower pools at ``[SEP]``, its
    ``eos_token_id``). Float32; the steps of the two models are timed in turn.

    Args:
        batch: B.
        width, layers, heads: of both towers of both models (FFN width 4 x width).
        projection_dim: E, the shared embedding width.
        vocab_size: V (>= 6), L = ``text_length`` (>= 3) tokens per caption.
        lr: AdamW's learning rate (both).
        warmup_steps: untimed steps first.
        repeats, min_block_s: see :func:`time_candidates` (0: one step per block).
        device: where to run.
        seed: for the weights and the batch.

    Returns:
        :class:`ClipTrainingResult`.
    """
    from transformers import CLIPConfig, CLIPModel

    from mmcourse.clip import TinyClip, TinyClipConfig

    positive_int(batch=batch, width=width, layers=layers, heads=heads, repeats=repeats)
    positive_int(projection_dim=projection_dim, warmup_steps=warmup_steps)
    positive_float(lr=lr)
    if width % heads:
        raise ValueError(f"heads={heads} must divide width={width}")
    if vocab_size < 6 or text_length < 3:
        raise ValueError(
            f"need vocab_size >= 6 and text_length >= 3, got {vocab_size} and {text_length}"
        )
    device = get_device(device)
    torch.manual_seed(seed)
    ours = TinyClip(
        TinyClipConfig(
            embed_dim=projection_dim,
            vision_dim=width,
            vision_layers=layers,
            vision_heads=heads,
            vocab_size=vocab_size,
            max_text_length=text_length,
            text_dim=width,
            text_layers=layers,
            text_heads=heads,
        )
    ).to(device)
    ours_loss = PairObjective()  # clip_loss with the model's own logit scale
    shared = {
        "hidden_size": width,
        "intermediate_size": 4 * width,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
    }
    theirs = CLIPModel(
        CLIPConfig(
            vision_config={**shared, "image_size": 32, "patch_size": 8},
            text_config={
                **shared,
                "vocab_size": vocab_size,
                "max_position_embeddings": text_length,
                "pad_token_id": 0,
                "bos_token_id": 2,
                "eos_token_id": 3,  # our tokenizer's [SEP], where CLIP's text tower pools
            },
            projection_dim=projection_dim,
        )
    ).to(device)
    images = torch.rand(batch, 3, 32, 32, device=device)  # (B, 3, 32, 32)
    words = torch.randint(5, vocab_size, (batch, text_length - 2), device=device)
    cls = torch.full((batch, 1), 2, device=device)
    sep = torch.full((batch, 1), 3, device=device)
    input_ids = torch.cat([cls, words, sep], dim=1)  # (B, L)
    attention_mask = torch.ones_like(input_ids)
    text = {"input_ids": input_ids, "attention_mask": attention_mask}
    ours_optimizer = torch.optim.AdamW(ours.parameters(), lr=lr)
    theirs_optimizer = torch.optim.AdamW(theirs.parameters(), lr=lr)
    ours.train()
    theirs.train()

    def ours_step() -> None:
        ours_optimizer.zero_grad(set_to_none=True)
        ours_loss(ours, (images, text)).backward()
        ours_optimizer.step()

    def theirs_step() -> None:
        theirs_optimizer.zero_grad(set_to_none=True)
        out = theirs(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=images,
            return_loss=True,
        )
        out.loss.backward()
        theirs_optimizer.step()

    times = time_candidates(
        {"ours": ours_step, "transformers": theirs_step},
        repeats=repeats,
        warmup=warmup_steps,
        min_block_s=max(min_block_s, 1e-9),
    )
    return ClipTrainingResult(
        batch=batch,
        ours_images_per_second=batch / times["ours"],
        transformers_images_per_second=batch / times["transformers"],
        ours_parameters=count_parameters(ours),
        transformers_parameters=count_parameters(theirs),
    )


def _clip_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[256, 1024, 2048], help="G of the loss"
    )
    parser.add_argument("--embed-dim", type=int, default=512, help="E of the loss's embeddings")
    parser.add_argument("--repeats", type=int, default=7, help="timed blocks per candidate")
    parser.add_argument(
        "--min-block", type=float, default=0.02, help="seconds per timed block of the loss"
    )
    parser.add_argument("--train-batch", type=int, default=128, help="B of the training step")
    parser.add_argument("--width", type=int, default=64, help="tower width (both towers)")
    parser.add_argument("--layers", type=int, default=2, help="blocks per tower")
    parser.add_argument("--heads", type=int, default=4, help="attention heads per block")
    parser.add_argument("--projection-dim", type=int, default=64, help="shared embedding E")
    parser.add_argument("--vocab-size", type=int, default=64, help="V of the text towers")
    parser.add_argument("--text-length", type=int, default=16, help="L tokens per caption")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed training steps")
    parser.add_argument("--train-repeats", type=int, default=5, help="timed training steps")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (both)")


def _clip_main(args: argparse.Namespace) -> None:
    device = get_device(args.device)
    rows = clip_loss_timings(
        args.batch_sizes,
        embed_dim=args.embed_dim,
        repeats=args.repeats,
        device=device,
        min_block_s=args.min_block,
    )
    print(
        f"CLIP loss, forward + backward on (G, {args.embed_dim}) embeddings, float32, device "
        f"{device}, {torch.get_num_threads()} threads, median of {args.repeats} blocks"
    )
    print("ratio = our time / transformers' time (< 1: faster than transformers)")
    header = f"{'G':>6} {'ours ms':>9} {'transformers ms':>16} {'ratio':>7}"
    print(header + "\n" + "-" * len(header))
    for row in rows:
        print(
            f"{row.batch:>6} {row.ours * 1e3:>9.3f} {row.transformers * 1e3:>16.3f} "
            f"{row.ratio:>7.2f}"
        )
    result = clip_training_throughput(
        batch=args.train_batch,
        width=args.width,
        layers=args.layers,
        heads=args.heads,
        projection_dim=args.projection_dim,
        vocab_size=args.vocab_size,
        text_length=args.text_length,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        repeats=args.train_repeats,
        device=device,
    )
    print()
    print(
        f"CLIP training step (AdamW, float32), B={args.train_batch}, 32x32 images, 8x8 "
        f"patches, width {args.width}, {args.layers} layers, {args.heads} heads per tower, "
        f"L={args.text_length}, median of {args.train_repeats} steps"
    )
    header = f"{'model':<24} {'parameters':>11} {'images/s':>10}"
    print(header + "\n" + "-" * len(header))
    print(
        f"{'ours (TinyClip)':<24} {result.ours_parameters:>11,} "
        f"{result.ours_images_per_second:>10.0f}"
    )
    print(
        f"{'transformers CLIPModel':<24} {result.transformers_parameters:>11,} "
        f"{result.transformers_images_per_second:>10.0f}"
    )
    ratio = result.ours_images_per_second / result.transformers_images_per_second
    print(f"throughput ratio ours / transformers: {ratio:.2f} (> 1: ours trains faster)")


# --- the generation benchmark (python -m mmcourse.bench generate) -------------------------


def _tiny_llama(args: argparse.Namespace) -> nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` of the sizes in ``args`` (no stop token)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    positive_int(
        hidden=args.hidden, layers=args.layers, heads=args.heads, vocab_size=args.vocab_size
    )
    if args.hidden % args.heads:
        raise ValueError(f"heads={args.heads} must divide hidden={args.hidden}")
    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.prompt_length + args.new_tokens,
        bos_token_id=0,
        eos_token_id=None,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


# name -> a function that builds the model from the parsed options. Chapter 11 adds its own
# (a pretrained SmolLM2) here; the timing below works for any transformers causal LM.
def _smollm2(args: argparse.Namespace) -> nn.Module:
    """SmolLM2-135M-Instruct from the bundled GGUF file (chapter 11), hash-checked, offline."""
    from mmcourse.pretrained import load_language_model

    return load_language_model()[1]


GENERATION_MODELS: dict[str, Callable[[argparse.Namespace], nn.Module]] = {
    "tiny-llama": _tiny_llama,
    "smollm2": _smollm2,
}


@dataclass
class GenerationTimings:
    """Seconds per greedy ``generate`` call of B prompts, ``new_tokens`` new tokens each."""

    batch: int  # B prompts
    prompt_length: int  # T0 tokens per prompt
    new_tokens: int  # tokens generated per prompt (no stop token: always all of them)
    ours_cached: float  # mmcourse.generation.generate with hf_step_fn (the model's KV cache)
    transformers: float  # model.generate(do_sample=False, num_beams=1)
    ours_recompute: float | None  # the same through recompute_step_fn (no cache); None: skipped
    scratch_cached: float | None = None  # our from-scratch CausalLM, its KV cache; None: skipped

    def tokens_per_second(self, seconds: float) -> float:
        return self.batch * self.new_tokens / seconds


def generation_timings(
    model: nn.Module,
    *,
    prompt_length: int = 16,
    new_tokens: int = 256,
    batch: int = 1,
    repeats: int = 3,
    recompute: bool = True,
    scratch: bool = True,
    device: str | torch.device = "auto",
    seed: int = 0,
) -> GenerationTimings:
    """Time our cached greedy decoding against ``transformers``' ``generate`` on one model.

    Both decode the same random prompts greedily for exactly ``new_tokens`` tokens (the
    stop token is switched off); their sequences are checked equal before timing. With
    ``recompute``, ours is also timed without the cache (:func:`~mmcourse.generation.
    recompute_step_fn`: the whole prefix every step).

    Args:
        model: a ``transformers`` causal LM (moved to ``device``, put in eval mode).
        prompt_length, new_tokens, batch: T0, the new tokens and B.
        repeats: timed calls per candidate, in turn (the median is reported), after one
            untimed call each (the equality check).
        recompute: also time decoding without the cache.
        scratch: also time chapter 11's from-scratch decoder on the same weights
            (``CausalLM.from_transformers``; a ``LlamaForCausalLM`` only, skipped otherwise).
        device: where to run.
        seed: for the random prompts.

    Returns:
        A :class:`GenerationTimings`.
    """
    import copy

    from mmcourse.generation import GenerationConfig, generate, hf_step_fn, recompute_step_fn

    positive_int(prompt_length=prompt_length, new_tokens=new_tokens, batch=batch, repeats=repeats)
    device = get_device(device)
    model = model.to(device).eval()
    vocab = model.get_output_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, prompt_length), generator=generator).to(device)
    mask = torch.ones_like(ids)
    theirs_config = copy.deepcopy(model.generation_config)  # the model's own stays as it was
    theirs_config.update(
        do_sample=False, num_beams=1, max_new_tokens=new_tokens, min_new_tokens=None,
        eos_token_id=None, top_k=None, top_p=None, temperature=None,
    )  # fmt: skip
    if theirs_config.pad_token_id is None:
        theirs_config.pad_token_id = 0
    ours_config = GenerationConfig(max_new_tokens=new_tokens)
    step_fn, slow_step_fn = hf_step_fn(model), recompute_step_fn(hf_step_fn(model))

    def ours() -> torch.Tensor:
        return generate(step_fn, ids, attention_mask=mask, config=ours_config).sequences

    def theirs() -> torch.Tensor:
        with torch.no_grad():
            return model.generate(ids, attention_mask=mask, generation_config=theirs_config)

    def ours_recompute() -> torch.Tensor:
        return generate(slow_step_fn, ids, attention_mask=mask, config=ours_config).sequences

    ours_tokens, theirs_tokens = ours(), theirs()
    if not torch.equal(ours_tokens, theirs_tokens):
        raise AssertionError(
            "our greedy decoding and transformers' generate chose different tokens"
        )
    candidates = {"ours": ours, "transformers": theirs}
    if scratch and type(model).__name__ == "LlamaForCausalLM":
        from mmcourse.llm import CausalLM

        scratch_model = CausalLM.from_transformers(model)

        def ours_scratch() -> torch.Tensor:
            return generate(
                scratch_model.step_fn, ids, attention_mask=mask, config=ours_config
            ).sequences

        differ = (ours_scratch() != theirs_tokens).sum().item()
        if differ:  # float rounding can differ between the two implementations
            logger.warning("the from-scratch decoder chose %d different tokens", differ)
        candidates["scratch"] = ours_scratch
    if recompute:
        differ = (ours_recompute() != ours_tokens).sum().item()
        if differ:  # float rounding can differ between the two paths on a large model
            logger.warning("decoding without the cache chose %d different tokens", differ)
        candidates["recompute"] = ours_recompute
    times = _time_long_calls(candidates, repeats=repeats, device=device)
    return GenerationTimings(
        batch=batch,
        prompt_length=prompt_length,
        new_tokens=new_tokens,
        ours_cached=times["ours"],
        transformers=times["transformers"],
        ours_recompute=times.get("recompute"),
        scratch_cached=times.get("scratch"),
    )


def _time_long_calls(
    candidates: dict[str, Callable[[], Any]], *, repeats: int, device: torch.device
) -> dict[str, float]:
    """Median seconds of calls long enough to time one by one, the candidates in turn.

    (:func:`time_candidates` adds warm-up calls inside ``Timer.timeit``: too many for calls
    of a second; the callers here have already run each candidate once.)
    """
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():  # interleaved: noise hits every candidate alike
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in samples.items()}


def _generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument(
        "--model", default="tiny-llama", choices=sorted(GENERATION_MODELS), help="the model"
    )
    parser.add_argument("--new-tokens", type=int, default=256, help="tokens generated per prompt")
    parser.add_argument("--prompt-length", type=int, default=16, help="T0 tokens per prompt")
    parser.add_argument("--batch", type=int, default=1, help="B prompts decoded together")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per candidate")
    parser.add_argument("--no-recompute", action="store_true", help="skip the no-cache timing")
    parser.add_argument(
        "--no-scratch", action="store_true", help="skip chapter 11's from-scratch decoder"
    )
    parser.add_argument("--hidden", type=int, default=64, help="tiny-llama: hidden size")
    parser.add_argument("--layers", type=int, default=4, help="tiny-llama: decoder layers")
    parser.add_argument("--heads", type=int, default=4, help="tiny-llama: attention heads")
    parser.add_argument("--vocab-size", type=int, default=1024, help="tiny-llama: V")
    parser.add_argument("--seed", type=int, default=0, help="weights and prompts")


def _generate_main(args: argparse.Namespace) -> None:
    positive_int(new_tokens=args.new_tokens, prompt_length=args.prompt_length)
    device = get_device(args.device)
    model = GENERATION_MODELS[args.model](args)
    t = generation_timings(
        model,
        prompt_length=args.prompt_length,
        new_tokens=args.new_tokens,
        batch=args.batch,
        repeats=args.repeats,
        recompute=not args.no_recompute,
        scratch=not args.no_scratch,
        device=device,
        seed=args.seed,
    )
    parameters = count_parameters(model)
    print(
        f"Greedy decoding, model {args.model} ({parameters:,} parameters), B={t.batch}, "
        f"prompt {t.prompt_length} tokens, {t.new_tokens} new tokens, device {device}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats} calls"
    )
    print("the same tokens from ours and transformers (checked before timing)")
    header = f"{'decoder':<36} {'ms/call':>10} {'tokens/s':>10}"
    print(header + "\n" + "-" * len(header))
    rows = [
        ("ours, KV cache (hf_step_fn)", t.ours_cached),
        ("transformers generate", t.transformers),
    ]
    if t.scratch_cached is not None:
        rows.append(("ours, from-scratch CausalLM, KV cache", t.scratch_cached))
    if t.ours_recompute is not None:
        rows.append(("ours, no cache (recompute_step_fn)", t.ours_recompute))
    for name, seconds in rows:
        print(f"{name:<36} {seconds * 1e3:>10.1f} {t.tokens_per_second(seconds):>10.1f}")
    print(f"ratio ours / transformers: {t.ours_cached / t.transformers:.2f} (< 1: ours is faster)")
    if t.scratch_cached is not None:
        print(
            f"ratio from-scratch decoder / transformers: {t.scratch_cached / t.transformers:.2f} "
            "(the same weights; < 1: ours is faster)"
        )
    if t.ours_recompute is not None:
        print(
            f"speed-up from the KV cache (no cache / cache): {t.ours_recompute / t.ours_cached:.2f}"
        )


# --- the deployment benchmark (chapter 13) ------------------------------------------------


# --int8 choices -> mmcourse.deploy.INT8_METHODS names
INT8_CHOICES = {
    "torchao": "torchao dynamic",
    "torchao-weight-only": "torchao weight-only",
    "torch.ao": "torch.ao dynamic (deprecated)",
}


def deploy_speed_ratios(
    *,
    threads: int = 2,
    widths: Sequence[int] = (64, 256, 1024),
    int8_methods: Sequence[str] = ("torchao", "torchao-weight-only", "torch.ao"),
    repeats: int = 15,
    compile_batch: int = 32,
    run_compile: bool = True,
    llm_layers: int = 4,
    llm_hidden: int = 576,
    new_tokens: int = 48,
    num_requests: int = 96,
    concurrency: int = 16,
    batch_window_ms: float = 5.0,
    seed: int = 0,
) -> dict[str, Any]:
    """The speed ratios of chapter 13 on this CPU (see the module docstring).

    Returns:
        ``{"int8_speedup": [(method, width, rows, ratio), ...], "compile": CompileResult | None,
        "kv_cache_speedup", "dynamic_batching_throughput_ratio"}``.
    """
    import tempfile

    from mmcourse import deploy, serve
    from mmcourse.clip import TinyClip, TinyClipConfig, WordTokenizer

    positive_int(threads=threads, repeats=repeats, compile_batch=compile_batch)
    positive_int(new_tokens=new_tokens, num_requests=num_requests, concurrency=concurrency)
    if llm_hidden % 9:
        raise ValueError(f"llm_hidden={llm_hidden} must be a multiple of SmolLM2's 9 heads")
    out: dict[str, Any] = {}
    with deploy.fixed_threads(threads):
        methods = [INT8_CHOICES[m] for m in int8_methods]
        rows = deploy.int8_width_sweep(
            widths, batch_sizes=(1, 64), methods=methods, repeats=repeats, seed=seed
        )
        out["int8_speedup"] = [
            (r["method"], r["width"], r["batch_size"], r["speedup"]) for r in rows
        ]
        torch.manual_seed(seed)
        tokenizer = WordTokenizer.from_texts(["a small red circle on the left", "a big square"])
        clip = TinyClip(TinyClipConfig(vocab_size=len(tokenizer))).eval()
        images = torch.rand(max(compile_batch, num_requests), 3, 32, 32)
        out["compile"] = (
            deploy.measure_compile(clip.encode_image, images[:compile_batch], repeats=repeats)
            if run_compile
            else None
        )
        lm = deploy.random_llama(num_layers=llm_layers, seed=seed, hidden_size=llm_hidden)
        prompt = torch.randint(3, 1000, (1, 20), generator=torch.Generator().manual_seed(seed))
        times = {
            use_cache: sum(
                deploy.greedy_decode(
                    lm, prompt, max_new_tokens=new_tokens, use_cache=use_cache
                ).step_s
            )
            for use_cache in (True, False)
        }
        out["kv_cache_speedup"] = times[False] / times[True]
        labels = ["red circle", "big square", "blue star"]
        payloads = [{"image": images[i].tolist(), "labels": labels} for i in range(num_requests)]
        throughput = {}
        with tempfile.TemporaryDirectory() as folder:
            serve.save_clip_bundle(folder, clip, tokenizer)
            for batching in (False, True):
                config = serve.ServeConfig(
                    dynamic_batching=batching, batch_window_ms=batch_window_ms
                )
                with serve.serving(serve.create_app(folder, config)) as url:
                    serve.run_load(url, payloads[:concurrency], concurrency=concurrency)
                    load = serve.run_load(url, payloads, concurrency=concurrency)
                if load.errors:
                    raise RuntimeError(f"{load.errors} of the benchmark's requests failed")
                throughput[batching] = load.throughput
        out["dynamic_batching_throughput_ratio"] = throughput[True] / throughput[False]
    return out


def _deploy_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    parser.add_argument(
        "--widths", type=int, nargs="+", default=[64, 256, 1024], help="FFN widths for int8"
    )
    parser.add_argument(
        "--int8",
        nargs="+",
        choices=sorted(INT8_CHOICES),
        default=list(INT8_CHOICES),
        help="int8 versions to time against float32",
    )
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per candidate")
    parser.add_argument("--compile-batch", type=int, default=32, help="images per compiled call")
    parser.add_argument(
        "--no-compile", action="store_true", help="skip torch.compile (a cold compile: ~20 s)"
    )
    parser.add_argument("--llm-layers", type=int, default=4, help="layers of the random Llama")
    parser.add_argument(
        "--llm-hidden", type=int, default=576, help="its width (SmolLM2: 576; 9 heads)"
    )
    parser.add_argument("--new-tokens", type=int, default=48, help="tokens to generate")
    parser.add_argument("--requests", type=int, default=96, help="requests of each load")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    parser.add_argument("--window-ms", type=float, default=5.0, help="dynamic batching window (ms)")


def _deploy_main(args: argparse.Namespace) -> None:
    result = deploy_speed_ratios(
        threads=args.threads,
        widths=args.widths,
        int8_methods=args.int8,
        repeats=args.repeats,
        compile_batch=args.compile_batch,
        run_compile=not args.no_compile,
        llm_layers=args.llm_layers,
        llm_hidden=args.llm_hidden,
        new_tokens=args.new_tokens,
        num_requests=args.requests,
        concurrency=args.concurrency,
        batch_window_ms=args.window_ms,
    )
    print(
        f"chapter 13 speed ratios on the CPU, {args.threads} threads, p50 of {args.repeats} "
        "calls; > 1 means the technique is faster (random weights: speed does not need training)"
    )
    header = f"{'int8 version':<30} {'FFN width':>10} {'rows':>5} {'float32 / int8':>15}"
    print(header + "\n" + "-" * len(header))
    for method, width, rows, ratio in result["int8_speedup"]:
        print(f"{method:<30} {width:>10} {rows:>5} {ratio:>15.2f}")
    compiled = result["compile"]
    if compiled is None:
        print("torch.compile: skipped (--no-compile)")
    else:
        print(
            f"compile_speedup_after_warmup: {compiled.speedup:.2f} (compile {compiled.compile_s:.1f} "
            f"s, eager {compiled.eager_ms:.2f} ms, compiled {compiled.compiled_ms:.2f} ms per call "
            f"of {args.compile_batch} images)"
        )
        print(f"compile_break_even_calls: {compiled.break_even_calls}")
    print(
        f"kv_cache_speedup: {result['kv_cache_speedup']:.2f} ({args.new_tokens} tokens, random "
        f"Llama, {args.llm_layers} layers of width {args.llm_hidden})"
    )
    print(
        f"dynamic_batching_throughput_ratio: {result['dynamic_batching_throughput_ratio']:.2f} "
        f"({args.requests} requests, {args.concurrency} in flight, {args.window_ms:g} ms window)"
    )


@dataclass(frozen=True)
class Benchmark:
    """One sub-command of ``python -m mmcourse.bench``."""

    help: str  # one line, shown by --help
    add_arguments: Callable[[argparse.ArgumentParser], None]  # adds its options
    main: Callable[[argparse.Namespace], None]  # runs it and prints the table


BENCHMARKS: dict[str, Benchmark] = {
    "attention": Benchmark(
        help="our attention (reference, fused, MultiHeadAttention) against torch's",
        add_arguments=_attention_arguments,
        main=_attention_main,
    ),
    "clip": Benchmark(
        help="our CLIP loss and tiny CLIP training against transformers' CLIP",
        add_arguments=_clip_arguments,
        main=_clip_main,
    ),
    "generate": Benchmark(
        help="our cached greedy decoding against transformers' generate, and without the cache",
        add_arguments=_generate_arguments,
        main=_generate_main,
    ),
    "deploy": Benchmark(
        help="chapter 13's speed ratios: int8, torch.compile, KV cache, dynamic batching",
        add_arguments=_deploy_arguments,
        main=_deploy_main,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mmcourse.bench", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="benchmark", required=True)
    for name, bench in BENCHMARKS.items():
        bench.add_arguments(sub.add_parser(name, help=bench.help))
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        BENCHMARKS[args.benchmark].main(args)
    except ValueError as err:
        print(f"python -m mmcourse.bench {args.benchmark}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
