"""Exercises for notebooks/13_efficient_inference_and_deployment."""

from __future__ import annotations

import math
import numbers

import numpy as np

from mmcourse.exercises import Exercise, Mismatch, call

# --- 1. p95 from raw timings ---------------------------------------------------------------


def _p95_solution(times_ms: list[float], warmup: int) -> float:
    steady = sorted(times_ms[warmup:])  # 1) drop the warm-up calls, 2) sort
    rank = (len(steady) - 1) * 0.95  # 3) the fractional rank of the 95th percentile
    lo, hi = math.floor(rank), math.ceil(rank)
    return steady[lo] + (steady[hi] - steady[lo]) * (rank - lo)  # 4) interpolate


def _check_p95(fn) -> None:
    rng = np.random.default_rng(13)
    cases = [
        ([100.0, *rng.exponential(5.0, size=37).round(3).tolist()], 1),
        ([50.0, 20.0] + [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0], 2),
        ([9.0, 1.0, 4.0, 2.0, 8.0, 3.0, 7.0, 5.0, 6.0, 10.0, 12.0], 0),
        ([30.0, 3.0], 1),
    ]
    for times, warmup in cases:
        what = f"{len(times)} timings with {warmup} warm-up call(s)"
        got = call(fn, list(times), warmup, what=what)
        expected = _p95_solution(times, warmup)
        if not isinstance(got, numbers.Real):
            raise Mismatch(f"{what}: expected a number (milliseconds), got {type(got).__name__}")
        if abs(got - expected) <= 1e-9 * max(1.0, abs(expected)):
            continue
        steady = times[warmup:]
        if abs(got - _p95_solution(times, 0)) < 1e-9 and warmup:
            raise Mismatch(f"{what}: drop the first `warmup` timings before taking the percentile")
        if abs(got - float(np.mean(steady))) < 1e-9:
            raise Mismatch(f"{what}: that is the mean; p95 is the value 95 % of calls stay under")
        if abs(got - max(steady)) < 1e-9:
            raise Mismatch(f"{what}: that is the maximum; p95 interpolates below it")
        nearest = sorted(steady)[min(len(steady) - 1, math.ceil(0.95 * len(steady)) - 1)]
        if abs(got - nearest) < 1e-9:
            raise Mismatch(
                f"{what}: you took the nearest rank; interpolate linearly between the two "
                "sorted timings around rank (n - 1) * 0.95, as numpy.percentile does"
            )
        if abs(got - (steady[math.floor((len(steady) - 1) * 0.95)])) < 1e-9:
            raise Mismatch(f"{what}: sort the timings first")
        raise Mismatch(f"{what}: expected {expected:.4g} ms, got {got:.4g}")


q1 = Exercise(
    name="Exercise 1: p95 latency from raw timings",
    checker=_check_p95,
    hints=[
        "The first `warmup` calls are slow for reasons a served model does not have; drop them.",
        "Sort what is left; the 95th percentile sits at fractional rank r = (n - 1) * 0.95 "
        "(0-based).",
        "Interpolate: s[floor(r)] + (s[ceil(r)] - s[floor(r)]) * (r - floor(r)).",
    ],
    solution_fn=_p95_solution,
)


# --- 2. the memory of a KV cache -----------------------------------------------------------


def _kv_cache_solution(config: dict, seq_len: int, batch: int, bytes_per_value: int) -> int:
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    return (
        2  # K and V
        * config["num_hidden_layers"]
        * config["num_key_value_heads"]  # grouped-query attention caches only these
        * head_dim
        * seq_len
        * batch
        * bytes_per_value
    )


SMOLLM2_CONFIG = {
    "hidden_size": 576,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "num_hidden_layers": 30,
    "vocab_size": 49152,
}


def _check_kv_cache(fn) -> None:
    cases = [
        (SMOLLM2_CONFIG, 2048, 1, 4),
        (SMOLLM2_CONFIG, 512, 8, 2),
        (
            {
                "hidden_size": 4096,
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
                "num_hidden_layers": 32,
                "vocab_size": 128256,
            },
            8192,
            1,
            2,
        ),
        (
            {
                "hidden_size": 64,
                "num_attention_heads": 4,
                "num_key_value_heads": 4,
                "num_hidden_layers": 2,
                "vocab_size": 100,
            },
            10,
            3,
            4,
        ),
    ]
    for config, T, B, nbytes in cases:
        what = (
            f"{config['num_hidden_layers']} layers, {config['num_attention_heads']} heads "
            f"({config['num_key_value_heads']} KV), width {config['hidden_size']}, "
            f"{T} tokens, batch {B}, {nbytes} bytes per value"
        )
        got = call(fn, dict(config), T, B, nbytes, what=what)
        expected = _kv_cache_solution(config, T, B, nbytes)
        if got == expected:
            continue
        if not isinstance(got, numbers.Real):
            raise Mismatch(f"{what}: expected a number of bytes, got {type(got).__name__}")
        gqa = config["num_attention_heads"] / config["num_key_value_heads"]
        if gqa != 1 and abs(got - expected * gqa) < 0.5:
            raise Mismatch(
                f"{what}: with grouped-query attention only the num_key_value_heads heads "
                "are cached, not every query head"
            )
        if abs(got * 2 - expected) < 0.5:
            raise Mismatch(f"{what}: half the answer; both K and V are cached")
        if abs(got * config["num_hidden_layers"] - expected) < 0.5:
            raise Mismatch(f"{what}: every layer keeps its own keys and values")
        if abs(got * nbytes - expected) < 0.5:
            raise Mismatch(f"{what}: that is a count of values; multiply by bytes_per_value")
        raise Mismatch(f"{what}: expected {expected:,} bytes, got {got:,}")


q2 = Exercise(
    name="Exercise 2: the memory of a KV cache from a model's config",
    checker=_check_kv_cache,
    hints=[
        "Each layer caches one key and one value vector per token, per KV head, per sequence.",
        "head_dim = hidden_size // num_attention_heads; the cache has num_key_value_heads heads.",
        "2 x layers x KV heads x head_dim x tokens x batch x bytes per value.",
    ],
    solution_fn=_kv_cache_solution,
)


# --- 3. when does compiling pay? -----------------------------------------------------------


def _break_even_solution(compile_s: float, eager_ms: float, compiled_ms: float) -> float:
    saved_s = (eager_ms - compiled_ms) / 1e3  # seconds saved per call, after compiling
    if saved_s <= 0:
        return math.inf  # never pays back
    return math.ceil(compile_s / saved_s)


def _check_break_even(fn) -> None:
    cases = [(20.0, 31.0, 10.3), (5.0, 2.1, 1.7), (1.0, 1.0, 2.0), (12.5, 0.83, 0.29), (3.0, 4, 4)]
    for compile_s, eager_ms, compiled_ms in cases:
        what = f"compile {compile_s} s, eager {eager_ms} ms, compiled {compiled_ms} ms per call"
        got = call(fn, compile_s, eager_ms, compiled_ms, what=what)
        expected = _break_even_solution(compile_s, eager_ms, compiled_ms)
        if got == expected:
            continue
        if expected == math.inf:
            raise Mismatch(
                f"{what}: compiling does not make a call faster here, so it never pays "
                "back: return math.inf"
            )
        if not isinstance(got, numbers.Real):
            raise Mismatch(f"{what}: expected a whole number of calls, got {type(got).__name__}")
        if abs(got - compile_s / ((eager_ms - compiled_ms) / 1e3)) < 1e-6:
            raise Mismatch(f"{what}: round up to a whole number of calls (math.ceil)")
        if abs(got - math.ceil(compile_s / (eager_ms - compiled_ms))) < 0.5:
            raise Mismatch(f"{what}: the per-call times are in milliseconds, compile_s in seconds")
        if abs(got - math.ceil(compile_s / (eager_ms / 1e3))) < 0.5:
            raise Mismatch(
                f"{what}: a compiled call still costs compiled_ms; divide by the time *saved*"
            )
        raise Mismatch(f"{what}: expected {expected} calls, got {got}")


q3 = Exercise(
    name="Exercise 3: the number of calls after which torch.compile pays back",
    checker=_check_break_even,
    hints=[
        "After n calls, eager has spent n * eager and compiled compile + n * compiled.",
        "Solve n * eager >= compile + n * compiled for the smallest whole n; mind the units.",
        "If the compiled call is not faster, it never pays back: math.inf.",
    ],
    solution_fn=_break_even_solution,
)
