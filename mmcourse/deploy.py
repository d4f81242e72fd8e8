"""Efficient inference, measured: timing, precision, compilation, kernels, export, checkpoints.

Each technique that the source articles only name ("inference acceleration", "deployment")
is applied here to the course's own models and measured against the float32 eager baseline
of the same run:

1. Timing done right (``time_calls``, ``percentile``, ``LatencyStats``): warm-up calls first,
   the device synchronised around every timed call, a fixed number of threads
   (``fixed_threads``), the median (p50) and 95th percentile (p95) latency and throughput,
   candidates timed in turn so that a slowdown of the machine hits all of them alike
   (``sweep``); ``draw_sweep_point`` draws one point of a sweep (the chapter's explorer).
2. Precision: bf16 autocast (``autocast_bf16``) and int8 quantisation, through
   ``torchao``'s ``quantize_`` (``quantize_torchao``: dynamic int8 activations and int8
   weights, or int8 weights only; the maintained path), through
   ``torch.ao.quantization.quantize_dynamic`` (``quantize_int8``; deprecated in torch 2.13,
   kept as a comparison) and ONNX Runtime's ``quantize_dynamic`` (``quantize_onnx_int8``);
   ``int8_width_sweep`` shows at which layer width int8 starts to beat float32 on a CPU;
   ``serialized_bytes`` measures the size on disk.
3. ``torch.compile``: ``measure_compile`` reports the compile time on its own, the speed-up
   after it and the number of calls that pay it back.
4. Attention kernels: ``attention_backend_timings`` times ``F.scaled_dot_product_attention``
   with each SDPA backend this device has, against chapter 02's reference attention.
5. Generation with and without the KV cache (``greedy_decode``, ``hf_generate``,
   ``kv_cache_bytes``) on a Llama decoder: SmolLM2-135M's real weights (``load_smollm2``) or
   a randomly initialised Llama of SmolLM2's layer sizes (``random_llama``; the same cost
   per layer). ``greedy_decode`` drives a ``transformers`` causal LM (its own cache) or
   chapter 11's from-scratch :class:`mmcourse.llm.CausalLM` (``CausalLM.from_transformers``
   on the same weights) through :mod:`mmcourse.generation`; ``hf_generate`` times
   ``transformers``' own ``generate`` on the same prompt.
6. Export: ``export_onnx`` (``torch.onnx.export(..., dynamo=True)``, the exporter torch 2.13
   recommends) of the CLIP towers (``ImageTower``, ``TextTower``), run with ONNX Runtime
   (``onnx_session``, ``run_onnx``); ``checkpoint_load_times`` compares safetensors with
   ``torch.save``/``torch.load(weights_only=True)``, load time = load + touch every weight.

Axis letters: B batch, N tokens, D width, E shared embedding width, H heads, Dh head width,
L query length, S key length, T generated tokens.

Taught in notebooks/13_efficient_inference_and_deployment.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmcourse.attention import scaled_dot_product_attention
from mmcourse.encoders import count_parameters
from mmcourse.generation import GenerationConfig, generate, hf_step_fn, recompute_step_fn
from mmcourse.pretrained import load_language_model
from mmcourse.utils import get_device, non_negative_int, one_of, positive_int

logger = logging.getLogger(__name__)

# --- 1. timing done right -----------------------------------------------------------------


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile of ``samples`` with linear interpolation (numpy's default).

    Sort the n samples; the percentile sits at fractional rank r = (n - 1) q / 100 and is
    interpolated between the samples at floor(r) and ceil(r).

    Args:
        samples: at least one number.
        q: the percentile, in [0, 100] (50: the median, p50; 95: p95).

    Returns:
        The percentile, in the samples' unit.
    """
    if len(samples) == 0:
        raise ValueError("need at least one sample to take a percentile of, got none")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    ordered = sorted(float(s) for s in samples)
    rank = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(rank), math.ceil(rank)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


@dataclass
class LatencyStats:
    """Per-call latencies of one candidate at one batch size, and what they imply.

    Taught in notebooks/13_efficient_inference_and_deployment.
    """

    samples_s: list[float]  # seconds of each timed call, warm-up excluded
    batch_size: int = 1  # items per call, for the throughput

    @property
    def p50_ms(self) -> float:
        """Median latency in milliseconds."""
        return 1e3 * percentile(self.samples_s, 50)

    @property
    def p95_ms(self) -> float:
        """95th-percentile latency in milliseconds: 1 call in 20 is slower."""
        return 1e3 * percentile(self.samples_s, 95)

    @property
    def mean_ms(self) -> float:
        return 1e3 * sum(self.samples_s) / len(self.samples_s)

    @property
    def throughput(self) -> float:
        """Items per second at the median latency, ``batch_size / p50``."""
        return self.batch_size / percentile(self.samples_s, 50)


def synchronize(device: torch.device | str) -> None:
    """Wait until the device has finished the work queued so far (no-op on a CPU).

    CUDA (and MPS) kernels run asynchronously: without this, a timer measures how long it
    took to *queue* the work, not to do it.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@contextlib.contextmanager
def fixed_threads(num_threads: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(num_threads)``, then restore the setting."""
    positive_int(num_threads=num_threads)
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def time_calls(
    fn: Callable[[], Any],
    *,
    warmup: int = 3,
    repeats: int = 20,
    device: torch.device | str = "cpu",
    batch_size: int = 1,
) -> LatencyStats:
    """Time ``fn()`` call by call: ``warmup`` untimed calls, then ``repeats`` timed ones.

    Every timed call is bracketed by :func:`synchronize`, so on a GPU it measures the work
    itself. The first calls of a model are slower (memory allocation, kernel selection,
    lazy initialisation, caches): they are the warm-up and are not counted.

    Args:
        fn: runs the operation once.
        warmup: untimed calls first.
        repeats: timed calls.
        device: the device ``fn`` runs on (to synchronise).
        batch_size: items per call, for :attr:`LatencyStats.throughput`.

    Returns:
        :class:`LatencyStats` of the timed calls.

    Taught in notebooks/13_efficient_inference_and_deployment.
    """
    non_negative_int(warmup=warmup)
    positive_int(repeats=repeats, batch_size=batch_size)
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - start)
    return LatencyStats(samples_s=samples, batch_size=batch_size)


def sweep(
    candidates: Mapping[str, Callable[[Tensor], Any]],
    make_batch: Callable[[int], Any],
    batch_sizes: Sequence[int],
    *,
    warmup: int = 2,
    repeats: int = 10,
    device: torch.device | str = "cpu",
) -> list[dict[str, Any]]:
    """p50, p95 and throughput of every candidate at every batch size, timed in turn.

    At each batch size the candidates are warmed up, then called round-robin (one call of
    each, ``repeats`` times), so that noise from the rest of the machine spreads evenly.

    Args:
        candidates: ``{name: fn}``, ``fn(batch)`` runs the model on one batch.
        make_batch: ``make_batch(B)`` returns the input of batch size B.
        batch_sizes: the B to measure.
        warmup, repeats: untimed and timed calls per candidate and batch size.
        device: to synchronise.

    Returns:
        One row per (candidate, B): ``{"candidate", "batch_size", "p50_ms", "p95_ms",
        "throughput"}`` (throughput in items per second).

    Taught in notebooks/13_efficient_inference_and_deployment.
    """
    for B in batch_sizes:
        positive_int(batch_size=B)
    positive_int(repeats=repeats)
    non_negative_int(warmup=warmup)
    rows = []
    for B in batch_sizes:
        batch = make_batch(B)
        for fn in candidates.values():
            for _ in range(warmup):
                fn(batch)
        samples: dict[str, list[float]] = {name: [] for name in candidates}
        for _ in range(repeats):
            for name, fn in candidates.items():
                synchronize(device)
                start = time.perf_counter()
                fn(batch)
                synchronize(device)
                samples[name].append(time.perf_counter() - start)
        for name, times in samples.items():
            stats = LatencyStats(times, batch_size=B)
            rows.append(
                {
                    "candidate": name,
                    "batch_size": B,
                    "p50_ms": stats.p50_ms,
                    "p95_ms": stats.p95_ms,
                    "throughput": stats.throughput,
                }
            )
    return rows


def draw_sweep_point(
    fig: Any,
    *,
    table: Sequence[Mapping[str, Any]],
    batch: int,
    candidate: str,
    baseline: str = "float32 eager",
) -> None:
    """The explorer of chapter 13: one (batch size, candidate) of a :func:`sweep` table.

    Left: its p50 and p95 latency per call; right: its throughput against the baseline's
    at the same batch size. Nothing is re-timed: the numbers are the table's.

    Args:
        fig: a matplotlib figure (cleared and filled).
        table: the rows of :func:`sweep` (or a DataFrame's ``to_dict("records")``).
        batch: one of the table's batch sizes.
        candidate: one of its candidates.
        baseline: the candidate to compare the throughput with.

    Taught in notebooks/13_efficient_inference_and_deployment.
    """

    def row(name: str) -> Mapping[str, Any]:
        for r in table:
            if r["candidate"] == name and r["batch_size"] == batch:
                return r
        batches = sorted({r["batch_size"] for r in table})
        names = list(dict.fromkeys(r["candidate"] for r in table))
        raise ValueError(
            f"no row for candidate {name!r} at batch size {batch}; the table has batch sizes "
            f"{batches} and candidates {names}"
        )

    chosen, base = row(candidate), row(baseline)
    fig.clear()
    left, right = fig.subplots(1, 2)
    left.bar(["p50", "p95"], [chosen["p50_ms"], chosen["p95_ms"]], color=["C0", "C3"])
    left.set(ylabel="ms per call", title=f"{candidate}, B = {batch}")
    right.bar(
        [baseline, candidate], [base["throughput"], chosen["throughput"]], color=["gray", "C2"]
    )
    ratio = chosen["throughput"] / base["throughput"]
    right.set(ylabel="items / s", title=f"throughput: {ratio:.2f}x {baseline}")
    right.tick_params(axis="x", labelsize=7)


# --- 2. precision: bf16 autocast and int8 -------------------------------------------------


def autocast_bf16(device: torch.device | str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to bfloat16 on ``device`` (matmuls in bf16, reductions in float32)."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16)


def quantize_int8(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` dynamically quantised to int8 (CPU).

    Dynamic quantisation stores each Linear's weight as int8 with one float scale per
    tensor; at run time it quantises each incoming activation batch to uint8 with a scale
    measured on that batch, multiplies in integers (fbgemm / oneDNN kernels) and rescales the
    int32 result to float32. Other layers (embeddings, norms, convolutions) stay float32.

    This is ``torch.ao.quantization.quantize_dynamic``, which torch 2.13 still ships but
    marks deprecated (its warning points to ``torchao``'s ``quantize_`` API, the maintained
    path: :func:`quantize_torchao`); the warning is silenced here. Its quantised Linear is
    one fused C++ call (fbgemm), which is why it is still the fastest eager int8 on a CPU.

    Args:
        model: a float32 model on the CPU; it is not modified.

    Returns:
        The quantised copy, in eval mode.

    Taught in notebooks/13_efficient_inference_and_deployment.
    """
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("int8 dynamic quantisation runs on the CPU; move the model there first")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8)


TORCHAO_MODES = ("dynamic", "weight-only")


def _import_torchao() -> Any:
    """``torchao.quantization`` (its import notices are filtered by ``mmcourse/__init__``)."""
    try:
        import torchao.quantization as quantization
    except ImportError as err:
        raise ImportError(
            "quantize_torchao needs torchao (pip install torchao==0.18.0, the version the "
            "course pins)"
        ) from err
    return quantization


def quantize_torchao(model: nn.Module, *, mode: str = "dynamic") -> nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` quantised to int8 by ``torchao``.

    ``torchao.quantization.quantize_`` swaps each Linear's weight for a tensor subclass
    (``Int8Tensor``) that holds int8 values and one float scale per output row
    (W ~ s_W W_q, symmetric); its ``linear`` is re-implemented for that subclass:

    * ``mode="dynamic"`` (``Int8DynamicActivationInt8WeightConfig``): each activation row
      (token) is quantised to int8 with its own scale measured at run time, the product is an
      int8 x int8 -> int32 matmul (``torch._int_mm``), rescaled by s_x s_W;
    * ``mode="weight-only"`` (``Int8WeightOnlyConfig``): the activations stay float32 and
      the int8 weight is converted back to float32 for a float matmul; it saves memory and,
      where reading the weights is the bottleneck (decoding one token on a GPU), time.

    Both run eagerly as several separate ops per Linear (quantise, matmul, rescale),
    dispatched through the tensor subclass in Python; torchao relies on ``torch.compile``
    to fuse them.

    Args:
        model: a float32 model on the CPU; it is not modified.
        mode: one of :data:`TORCHAO_MODES`.

    Returns:
        The quantised copy, in eval mode; ``torch.save`` of its ``state_dict`` stores the
        int8 weights, and ``torch.load(..., weights_only=True)`` reads them back.

    Taught in notebooks/13_efficient_inference_and_deployment.
    """
    one_of("mode", mode, TORCHAO_MODES)
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("quantize_torchao is used on the CPU here; move the model there first")
    quantization = _import_torchao()
    # set_inductor_config=False: quantize_ would otherwise change torch.compile's global
    # settings for the whole process (torchao's recommended ones for its kernels)
    config = (
        quantization.Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
        if mode == "dynamic"
        else quantization.Int8WeightOnlyConfig(set_inductor_config=False)
    )
    quantized = copy.deepcopy(model).eval()
    quantization.quantize_(quantized, config)
    return quantized


# the int8 variants that int8_width_sweep can compare, by name
INT8_METHODS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "torchao dynamic": lambda m: quantize_torchao(m, mode="dynamic"),
    "torchao weight-only": lambda m: quantize_torchao(m, mode="weight-only"),
    "torch.ao dynamic (deprecated)": quantize_int8,
}


def serialized_bytes(model_or_state: nn.Module | Mapping[str, Any]) -> int:
    """Bytes of ``torch.save(state_dict)``: the size of the checkpoint on disk.

    Works inside ``torch.inference_mode()`` too (saving torchao's int8 tensors there fails).
    """
    buffer = io.BytesIO()
    with torch.inference_mode(False):
        is_model = isinstance(model_or_state, nn.Module)
        state = model_or_state.state_dict() if is_model else model_or_state
        torch.save(state, buffer)
    return buffer.getbuffer().nbytes


def linear_weight_fraction(model: nn.Module) -> float:
    """The fraction of ``model``'s parameters that are ``nn.Linear`` weights (what int8 shrinks)."""
    total = count_parameters(model)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    return linear / max(1, total)


def int8_width_sweep(
    widths: Sequence[int],
    *,
    batch_sizes: Sequence[int] = (1, 64),
    methods: Sequence[str] = ("torch.ao dynamic (deprecated)",),
    repeats: int = 10,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Float32 vs int8 latency of a transformer FFN, ``D -> 4D -> D``, over widths.

    Int8 saves memory traffic and multiplies faster, but each call pays to quantise the
    activations and to dequantise the result (and, for torchao's tensor subclasses, to
    dispatch several ops from Python): at small D and B that fixed cost wins.

    Args:
        widths: the D to measure.
        batch_sizes: rows per call (tokens) to measure at each width.
        methods: names in :data:`INT8_METHODS`, each timed against float32.
        repeats: timed calls per candidate (after 2 warm-up calls), median reported; all
            candidates of one (D, B) are timed in turn.
        seed: for the weights and inputs.

    Returns:
        One row per (D, B, method): ``{"width", "batch_size", "method", "float32_ms",
        "int8_ms", "speedup", "max_abs_diff"}`` with speedup = float32 time / int8 time
        (> 1: int8 faster) and the largest |int8 - float32| output on the timed input.

    Taught in notebooks/13_efficient_inference_and_deployment.
    """
    if isinstance(methods, str) or not methods:
        raise ValueError(f"methods must be a non-empty list of names, got {methods!r}")
    for method in methods:
        one_of("method", method, tuple(INT8_METHODS))
    rows = []
    gen = torch.Generator().manual_seed(seed)
    for D in widths:
        positive_int(width=D)
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
            ffn = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D)).eval()
        models = {"float32": ffn, **{m: INT8_METHODS[m](ffn) for m in methods}}

        def run(model: nn.Module) -> Callable[[Tensor], Tensor]:
            def call(x: Tensor) -> Tensor:
                with torch.inference_mode():
                    return model(x)

            return call

        inputs = {B: torch.randn(B, D, generator=gen) for B in batch_sizes}  # (B, D)
        table = sweep(
            {name: run(model) for name, model in models.items()},
            inputs.__getitem__,
            batch_sizes,
            repeats=repeats,
        )
        p50 = {(r["candidate"], r["batch_size"]): r["p50_ms"] for r in table}
        for B in batch_sizes:
            with torch.inference_mode():
                reference = ffn(inputs[B])
                for method in methods:
                    diff = (models[method](inputs[B]) - reference).abs().max().item()
                    f32, i8 = p50[("float32", B)], p50[(method, B)]
                    rows.append(
                        {
                            "width": D,
                            "batch_size": B,
                            "method": method,
                            "float32_ms": f32,
                            "int8_ms": i8,
                            "speedup": f32 / i8,
                            "max_abs_diff": diff,
                        }
                    )
    return rows


# --- 3. torch.compile ---------------------------------------------------------------------


@dataclass
class CompileResult:
    """What ``torch.compile`` costs and buys for one function at one input shape.

    Taught in notebooks/13_efficient_inference_and_deployment.
    """

    compile_s: float  # first compiled call minus one steady compiled call: the compilation
    eager_ms: float  # p50 of the eager function after warm-up
    compiled_ms: float  # p50 of the compiled function after warm-up
    max_abs_diff: float  # largest |compiled - eager| on the example input

    @property
    def speedup(self) -> float:
        """Eager time / compiled time after warm-up (> 1: compiled is faster)."""
        return self.eager_ms / self.compiled_ms

    @property
    def break_even_calls(self) -> float:
        """Calls after which the compile time is paid back: compile_s / (eager - compiled).

        ``math.inf`` when the compiled function is not faster.
        """
        saved_s = (self.eager_ms - self.compiled_ms) / 1e3
        return math.inf if saved_s <= 0 else math.ceil(self.compile_s / saved_s)


def measure_compile(
    fn: Callable[[Tensor], Tensor],
    example: Tensor,
    *,
    mode: str | None = None,
    backend: str = "inductor",
    cold: bool = True,
    repeats: int = 20,
    device: torch.device | str = "cpu",
) -> CompileResult:
    """Compile ``fn`` with ``torch.compile``, time the compilation, then both versions.

    Args:
        fn: the function to compile, e.g. ``model.encode_image``.
        example: its (fixed-shape) input; a new shape would compile again.
        mode: ``torch.compile``'s mode (None: the default).
        backend: ``torch.compile``'s backend ("inductor" generates C++/OpenMP on a CPU,
            Triton on a GPU).
        cold: disable inductor's on-disk caches, so that the compile time is what a first
            run on a fresh machine pays (a warm cache makes later runs much faster).
        repeats: timed calls of each version after warm-up.
        device: to synchronise.

    Returns:
        :class:`CompileResult`.

    Taught in notebooks/13_efficient_inference_and_deployment.
    """
    import torch._dynamo
    import torch._inductor.config as inductor_config

    positive_int(repeats=repeats)
    torch._dynamo.reset()
    compiled = torch.compile(fn, mode=mode, backend=backend)
    patch = inductor_config.patch(force_disable_caches=True) if cold else contextlib.nullcontext()
    with torch.inference_mode():
        expected = fn(example)
        synchronize(device)
        with patch, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="dynamo_pgo force disabled")
            start = time.perf_counter()
            got = compiled(example)
            synchronize(device)
            first_s = time.perf_counter() - start

        def run(f: Callable[[Tensor], Tensor]) -> Callable[[], Tensor]:
            return lambda: f(example)

        # the two versions in turn, so that noise hits both alike
        eager, fast = [], []
        for _ in range(3):
            fn(example), compiled(example)
        for _ in range(repeats):
            eager += time_calls(run(fn), warmup=0, repeats=1, device=device).samples_s
            fast += time_calls(run(compiled), warmup=0, repeats=1, device=device).samples_s
    compiled_ms = 1e3 * percentile(fast, 50)
    return CompileResult(
        compile_s=max(0.0, first_s - compiled_ms / 1e3),
        eager_ms=1e3 * percentile(eager, 50),
        compiled_ms=compiled_ms,
        max_abs_diff=(got.float() - expected.float()).abs().max().item(),
    )


# --- 4. attention kernels -----------------------------------------------------------------

SDPA_BACKENDS = ("MATH", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")


def attention_backend_timings(
    lengths: Sequence[int],
    *,
    batch: int = 4,
    heads: int = 4,
    head_dim: int = 32,
    repeats: int = 10,
    device: torch.device | str = "auto",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Attention forward time over sequence length: chapter 02's reference vs each SDPA backend.

    ``F.scaled_dot_product_attention`` dispatches to one of several kernels: MATH (the
    formula in ATen ops, everywhere), FLASH_ATTENTION (tiled, never stores the L x S
    weights; CPU and recent GPUs), EFFICIENT_ATTENTION and CUDNN_ATTENTION (CUDA). Each
    backend is forced with ``torch.nn.attention.sdpa_kernel``; one the device lacks is
    reported as unavailable (NaN). Every output is checked against the reference first.

    Args:
        lengths: L = S to measure.
        batch, heads, head_dim: B, H and Dh of the (B, H, L, Dh) inputs.
        repeats: timed calls per candidate (after 2 warm-up calls), median reported.
        device: where to run.
        dtype: of the inputs.
        seed: for the inputs.

    Returns:
        One row per L: ``{"length", "reference_ms", "sdpa_default_ms", "<BACKEND>_ms", ...}``.

    Taught in notebooks/13_efficient_inference_and_deployment.
    """
    positive_int(batch=batch, heads=heads, head_dim=head_dim, repeats=repeats)
    device = get_device(device)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for L in lengths:
        positive_int(length=L)
        q, k, v = (
            torch.randn(batch, heads, L, head_dim, generator=gen).to(device, dtype)
            for _ in range(3)
        )  # (B, H, L, Dh)
        times, unavailable = _time_attention(q, k, v, repeats=repeats, device=device)
        row: dict[str, Any] = {"length": L}
        row.update({f"{name}_ms": ms for name, ms in times.items()})
        row.update({f"{name}_ms": math.nan for name in unavailable})
        rows.append(row)
    return rows


def _time_attention(
    q: Tensor, k: Tensor, v: Tensor, *, repeats: int, device: torch.device
) -> tuple[dict[str, float], list[str]]:
    """p50 ms of the reference and of each SDPA backend on q, k, v; the backends missing here."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.inference_mode():
        reference = scaled_dot_product_attention(q, k, v)[0]  # (B, H, L, Dh)
    candidates: dict[str, Callable[[], Tensor]] = {
        "reference": lambda: scaled_dot_product_attention(q, k, v)[0],
        "sdpa_default": lambda: F.scaled_dot_product_attention(q, k, v),
    }
    unavailable = []
    for name in SDPA_BACKENDS:
        backend = getattr(SDPBackend, name)

        def forced(backend: SDPBackend = backend) -> Tensor:
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v)

        try:
            with torch.inference_mode():
                out = forced()
        except RuntimeError:  # "No available kernel": this device has no such backend
            unavailable.append(name)
            continue
        tol = 1e-4 if q.dtype == torch.float32 else 2e-2
        if not torch.allclose(out.float(), reference.float(), atol=tol, rtol=tol):
            raise AssertionError(
                f"SDPA backend {name} disagrees with the reference at L={q.shape[-2]}"
            )
        candidates[name] = forced

    def no_grad(fn: Callable[[], Tensor]) -> Callable[[Any], Tensor]:
        def call(_: Any) -> Tensor:
            with torch.inference_mode():
                return fn()

        return call

    table = sweep(
        {name: no_grad(fn) for name, fn in candidates.items()},
        lambda _: None,
        [1],
        repeats=repeats,
        device=device,
    )
    return {r["candidate"]: r["p50_ms"] for r in table}, unavailable


# --- 5. generation and the KV cache -------------------------------------------------------


def load_smollm2(*, verify: bool = True) -> tuple[nn.Module, Any]:
    """SmolLM2-135M-Instruct as a float32 ``transformers`` Llama and its tokenizer (offline).

    :func:`mmcourse.pretrained.load_language_model` (hash-checked, the weights de-quantised
    from the GGUF file to float32), with the pair in this module's (model, tokenizer) order.

    Returns:
        ``(model, tokenizer)``, the model in eval mode on the CPU.

    Raises:
        ModelFileError: the package is missing or the file's SHA-256 is not the expected one.
    """
    tokenizer, model = load_language_model(verify=verify)
    return model.eval(), tokenizer


# SmolLM2-135M's sizes (its config.json); the cost of a layer depends on these, not on weights.
SMOLLM2_SIZES = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 8192,
    "rope_theta": 100000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
}


def random_llama(*, num_layers: int = 4, seed: int = 0, **sizes: Any) -> nn.Module:
    """A randomly initialised ``transformers`` Llama with SmolLM2-135M's layer sizes.

    For timing: a layer costs the same with random weights as with trained ones, so a
    Llama of SmolLM2's width with fewer layers measures the KV cache's effect per layer at
    a fraction of the load time. Its text is gibberish.

    Args:
        num_layers: decoder layers (SmolLM2 has 30).
        seed: for the weights.
        sizes: overrides of :data:`SMOLLM2_SIZES` (e.g. a tiny ``hidden_size`` in tests).

    Returns:
        ``LlamaForCausalLM`` in eval mode.
    """
    positive_int(num_layers=num_layers)
    config = {**SMOLLM2_SIZES, **sizes, "num_hidden_layers": num_layers}
    with torch.random.fork_rng():
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(**config)).eval()


def kv_cache_bytes(
    *,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    seq_len: int,
    batch: int = 1,
    bytes_per_value: int = 4,
) -> int:
    """Memory of a KV cache: 2 (K and V) x layers x KV heads x Dh x tokens x batch x bytes.

    With grouped-query attention only the ``num_key_value_heads`` heads are cached, not the
    query heads (SmolLM2: 3 of 9).

    Taught in notebooks/13_efficient_inference_and_deployment.
    """
    positive_int(
        num_layers=num_layers,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        seq_len=seq_len,
        batch=batch,
        bytes_per_value=bytes_per_value,
    )
    return 2 * num_layers * num_kv_heads * head_dim * seq_len * batch * bytes_per_value


@dataclass
class DecodeResult:
    """Greedy decoding of one prompt, timed.

    Taught in notebooks/13_efficient_inference_and_deployment.
    """

    tokens: list[int]  # the T generated token ids
    step_s: list[float] = field(default_factory=list)  # seconds of each step (step 0: prompt)
    wall_s: float = 0.0  # seconds of the whole decoding call

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second of the whole call (prompt included in the time)."""
        return len(self.tokens) / self.wall_s


def _check_prompt(prompt_ids: Tensor, max_new_tokens: int) -> None:
    positive_int(max_new_tokens=max_new_tokens)
    if not isinstance(prompt_ids, Tensor) or prompt_ids.dim() != 2 or prompt_ids.shape[0] != 1:
        got = tuple(prompt_ids.shape) if isinstance(prompt_ids, Tensor) else type(prompt_ids)
        raise ValueError(f"expected prompt_ids of shape (1, N), got {got}")


@torch.inference_mode()
def greedy_decode(
    model: nn.Module, prompt_ids: Tensor, *, max_new_tokens: int, use_cache: bool = True
) -> DecodeResult:
    """Greedy decoding, timed token by token, with or without the KV cache.

    Without the cache every step runs the model on the whole sequence so far (prompt and
    answer), so step t costs O(prompt + t) tokens of compute. With the cache the first step
    runs the prompt once and keeps every layer's keys and values; each later step runs one
    token and attends to the cached keys and values.

    Args:
        model: chapter 11's from-scratch :class:`mmcourse.llm.CausalLM` (its
            ``step_fn``, its own KV cache) or a ``transformers`` causal LM (through
            :func:`~mmcourse.generation.hf_step_fn`, the model's cache), decoded by
            :func:`mmcourse.generation.generate`; without the cache through
            :func:`~mmcourse.generation.recompute_step_fn`. Each step is timed.
        prompt_ids: (1, N) token ids.
        max_new_tokens: T, tokens to generate (no early stop at an end token, so that both
            paths do the same work).
        use_cache: keep the keys and values of earlier tokens.

    Returns:
        :class:`DecodeResult`; the tokens equal ``model.generate(prompt_ids, do_sample=False,
        max_new_tokens=T, min_new_tokens=T)`` of the ``transformers`` model.

    Taught in notebooks/13_efficient_inference_and_deployment.
    """
    from mmcourse.llm import CausalLM

    _check_prompt(prompt_ids, max_new_tokens)
    step = model.step_fn if isinstance(model, CausalLM) else hf_step_fn(model)
    if not use_cache:
        step = recompute_step_fn(step)  # (1, N + t): the whole sequence every step
    result = DecodeResult(tokens=[])

    def timed_step(input_ids: Tensor, state: Any, attention_mask: Tensor) -> tuple[Tensor, Any]:
        start = time.perf_counter()
        out = step(input_ids, state, attention_mask)
        result.step_s.append(time.perf_counter() - start)
        return out

    start = time.perf_counter()
    out = generate(timed_step, prompt_ids, config=GenerationConfig(max_new_tokens=max_new_tokens))
    result.wall_s = time.perf_counter() - start
    result.tokens = out.generated[0].tolist()
    return result


@torch.inference_mode()
def hf_generate(
    model: nn.Module, prompt_ids: Tensor, *, max_new_tokens: int, use_cache: bool = True
) -> DecodeResult:
    """``transformers``' own greedy ``generate``, timed as one call (no per-step times).

    Exactly ``max_new_tokens`` tokens (``min_new_tokens`` too, so no early stop), greedy,
    with or without the model's KV cache (``use_cache``).

    Returns:
        :class:`DecodeResult` with ``tokens`` and ``wall_s``.

    Taught in notebooks/13_efficient_inference_and_deployment.
    """
    _check_prompt(prompt_ids, max_new_tokens)
    model.generate(prompt_ids, max_new_tokens=1, do_sample=False, pad_token_id=0)  # warm-up
    start = time.perf_counter()
    out = model.generate(
        prompt_ids,
        attention_mask=torch.ones_like(prompt_ids),
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        use_cache=use_cache,
        pad_token_id=0,
    )
    wall_s = time.perf_counter() - start
    return DecodeResult(tokens=out[0, prompt_ids.shape[1] :].tolist(), wall_s=wall_s)


# --- 6. export: ONNX and checkpoints ------------------------------------------------------


class ImageTower(nn.Module):
    """A CLIP's image side as one module for export: (B, 3, S, S) images -> (B, E) embeddings."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, images: Tensor) -> Tensor:
        return self.clip.encode_image(images)


class TextTower(nn.Module):
    """A CLIP's text side for export: (B, N) ids and mask -> (B, E) embeddings."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.clip.encode_text({"input_ids": input_ids, "attention_mask": attention_mask})


def export_onnx(
    module: nn.Module,
    example_inputs: tuple[Tensor, ...],
    path: str | Path,
    *,
    input_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    overwrite: bool = False,
) -> Path:
    """Export ``module`` to an ONNX file with ``torch.onnx.export(..., dynamo=True)``.

    The dynamo exporter (the one torch 2.13 recommends) captures the graph with
    ``torch.export`` and translates it with onnxscript.

    Args:
        module: the model, in eval mode.
        example_inputs: one example of each positional input.
        path: the ``.onnx`` file to write.
        input_names: the graph's input names, one per example input.
        dynamic_axes: ``{input_name: {axis: dim_name}}``, axes whose size may change
            (e.g. the batch), others are fixed to the example's.
        overwrite: replace an existing file (otherwise refuse).

    Returns:
        The path written.

    Taught in notebooks/13_efficient_inference_and_deployment.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    if len(input_names) != len(example_inputs):
        raise ValueError(
            f"need one input name per example input, got {len(input_names)} names for "
            f"{len(example_inputs)} inputs"
        )
    unknown = set(dynamic_axes or {}) - set(input_names)
    if unknown:
        raise ValueError(f"dynamic_axes names inputs {sorted(unknown)} not in {list(input_names)}")
    dims: dict[str, Any] = {}  # one torch.export.Dim per name, shared by the inputs using it
    dynamic_shapes = None
    if dynamic_axes:  # in the order of the positional inputs
        dynamic_shapes = tuple(
            {
                axis: dims.setdefault(dim, torch.export.Dim(dim))
                for axis, dim in dynamic_axes.get(name, {}).items()
            }
            for name in input_names
        )
    module.eval()
    with warnings.catch_warnings(), _quiet_onnx_logs():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            tuple(example_inputs),
            input_names=list(input_names),
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            verbose=False,
        )
    program.save(str(path))
    return path


@contextlib.contextmanager
def _quiet_onnx_logs() -> Iterator[None]:
    """Silence the exporter's progress lines and torchvision notices."""
    names = ["torch.onnx", "torch.onnx._internal.exporter._registration", "torch.export"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def onnx_session(path: str | Path, *, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU inference session on ``path`` (``threads``: intra-op threads)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        positive_int(threads=threads)
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session: Any, inputs: Mapping[str, Tensor]) -> Tensor:
    """Run an ONNX Runtime session on named torch inputs; the first output as a tensor."""
    expected = {i.name for i in session.get_inputs()}
    if set(inputs) != expected:
        raise ValueError(f"the ONNX graph takes inputs {sorted(expected)}, got {sorted(inputs)}")
    feeds = {name: t.detach().cpu().numpy() for name, t in inputs.items()}
    return torch.from_numpy(session.run(None, feeds)[0])


def quantize_onnx_int8(source: str | Path, target: str | Path, *, overwrite: bool = False) -> Path:
    """ONNX Runtime's dynamic int8 quantisation of the MatMul/Gemm weights of a model file.

    Args:
        source: the float32 ``.onnx`` file.
        target: where to write the int8 model.
        overwrite: replace an existing ``target``.

    Returns:
        ``target``.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to run shape pre-processing first, on the root logger
    try:
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    return target


def _untie(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The state dict with tensors that share memory (tied weights) copied apart."""
    seen: set[int] = set()
    out = {}
    for name, tensor in state.items():
        ptr = tensor.untyped_storage().data_ptr()
        out[name] = tensor.detach().clone() if ptr in seen else tensor.detach().contiguous()
        seen.add(ptr)
    return out


def touch_all(state: Mapping[str, Tensor]) -> float:
    """Read every weight once (a sum per tensor), so that lazily mapped files are really read."""
    return float(sum(t.float().sum() for t in state.values()))


def checkpoint_load_times(
    state: Mapping[str, Tensor], folder: str | Path, *, repeats: int = 3
) -> list[dict[str, Any]]:
    """Save ``state`` as safetensors and with ``torch.save``; time load + touch of each.

    ``torch.load(weights_only=True)`` unpickles with a restricted unpickler that only builds
    tensors and plain containers; a pickle from an untrusted source must never be loaded
    without it (a pickle can run any code). Safetensors is a JSON header and raw bytes: no
    code at all, and it can be memory-mapped.

    Args:
        state: the tensors (tied weights are saved as separate copies).
        folder: an existing folder for the two files (``weights.safetensors``,
            ``weights.pt``), which must not exist yet.
        repeats: timed loads of each (median reported).

    Returns:
        Two rows ``{"format", "bytes", "load_ms"}``; the loaded tensors are checked equal.

    Taught in notebooks/13_efficient_inference_and_deployment.
    """
    from safetensors.torch import load_file, save_file

    positive_int(repeats=repeats)
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"folder {folder} does not exist")
    files = {"safetensors": folder / "weights.safetensors", "torch.save": folder / "weights.pt"}
    for path in files.values():
        if path.exists():
            raise FileExistsError(f"{path} exists; give an empty folder")
    state = _untie(state)
    save_file(state, str(files["safetensors"]))
    torch.save(state, files["torch.save"])
    loaders = {
        "safetensors": lambda: load_file(str(files["safetensors"])),
        "torch.save": lambda: torch.load(files["torch.save"], weights_only=True),
    }
    rows = []
    for name, load in loaders.items():
        loaded = load()
        if loaded.keys() != state.keys() or any(
            not torch.equal(loaded[k], state[k]) for k in state
        ):
            raise AssertionError(f"{name} did not give back the saved tensors")
        del loaded
        stats = time_calls(lambda load=load: touch_all(load()), warmup=1, repeats=repeats)
        rows.append({"format": name, "bytes": files[name].stat().st_size, "load_ms": stats.p50_ms})
    return rows
