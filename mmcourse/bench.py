"""Micro-benchmarks of the course's building blocks against their torch counterparts.

Run one from the command line, ``python -m mmcourse.bench NAME [options]``; each prints a
table from a single run. Chapters add their benchmark to :data:`BENCHMARKS`: a name, a
function that adds its options to an ``argparse`` parser, and a function that runs it.

    python -m mmcourse.bench attention [--device auto] [--lengths 64 128 256 512 1024]
                                       [--repeats 7] [--batch 4] [--dim 256] [--heads 8]

Timing: each candidate is first warmed up, then timed in blocks of calls long enough to
beat the timer's resolution (``torch.utils.benchmark.Timer``, which also synchronises a
GPU); the candidates of one row are timed **in turn**, block after block, so that a
slowdown of the machine hits all of them alike, and each reports the **median** block.
Only the ratios are meant to be compared; on a shared CPU the times wander.

Taught in notebooks/02_attention (the cost of attention); used again in chapter 13.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
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
