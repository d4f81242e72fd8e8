"""The chapter 13 checkers pass the solutions, fail common mistakes, and say why in words."""

import math

import numpy as np
from exercise_checks import assert_all_pass, assert_feedback

from mmcourse import deploy
from mmcourse.exercises import ch13


def _todo(*args):
    raise NotImplementedError


def _p95_numpy(times, warmup):
    return float(np.percentile(times[warmup:], 95))


def _kv_with_deploy(config, seq_len, batch, nbytes):
    return deploy.kv_cache_bytes(
        num_layers=config["num_hidden_layers"],
        num_kv_heads=config["num_key_value_heads"],
        head_dim=config["hidden_size"] // config["num_attention_heads"],
        seq_len=seq_len,
        batch=batch,
        bytes_per_value=nbytes,
    )


def _break_even_deploy(compile_s, eager_ms, compiled_ms):
    return deploy.CompileResult(compile_s, eager_ms, compiled_ms, 0.0).break_even_calls


def test_solutions_pass(capsys):
    answers = [
        (ch13.q1, ch13._p95_solution),
        (ch13.q1, _p95_numpy),
        (ch13.q1, lambda t, w: deploy.percentile(t[w:], 95)),
        (ch13.q2, ch13._kv_cache_solution),
        (ch13.q2, _kv_with_deploy),
        (ch13.q3, ch13._break_even_solution),
        (ch13.q3, _break_even_deploy),
    ]
    assert_all_pass(answers, capsys)


def test_p95_mistakes(capsys):
    assert_feedback(ch13.q1, lambda t, w: _p95_numpy(t, 0), "drop the first", capsys)
    assert_feedback(ch13.q1, lambda t, w: float(np.mean(t[w:])), "that is the mean", capsys)
    assert_feedback(ch13.q1, lambda t, w: max(t[w:]), "that is the maximum", capsys)
    nearest = lambda t, w: sorted(t[w:])[math.ceil(0.95 * len(t[w:])) - 1]  # noqa: E731
    assert_feedback(ch13.q1, nearest, "nearest rank", capsys)
    assert_feedback(ch13.q1, lambda t, w: t[w:][int((len(t) - w - 1) * 0.95)], "sort", capsys)
    assert_feedback(ch13.q1, lambda t, w: 1 / 0, "ZeroDivisionError", capsys)
    assert not ch13.q1.passes(_todo)


def test_kv_cache_mistakes(capsys):
    def all_heads(c, T, B, n):
        return _kv_with_deploy({**c, "num_key_value_heads": c["num_attention_heads"]}, T, B, n)

    assert_feedback(ch13.q2, all_heads, "num_key_value_heads", capsys)
    half = lambda c, T, B, n: ch13._kv_cache_solution(c, T, B, n) // 2  # noqa: E731
    assert_feedback(ch13.q2, half, "both K and V", capsys)
    one_layer = lambda c, T, B, n: ch13._kv_cache_solution(c, T, B, n) // c["num_hidden_layers"]  # noqa: E731
    assert_feedback(ch13.q2, one_layer, "every layer", capsys)
    values = lambda c, T, B, n: ch13._kv_cache_solution(c, T, B, n) // n  # noqa: E731
    assert_feedback(ch13.q2, values, "bytes_per_value", capsys)


def test_break_even_mistakes(capsys):
    def no_inf(c, e, k):
        return 0 if e <= k else math.ceil(c / ((e - k) / 1e3))

    assert_feedback(ch13.q3, no_inf, "math.inf", capsys)
    unrounded = lambda c, e, k: c / ((e - k) / 1e3) if e > k else math.inf  # noqa: E731
    assert_feedback(ch13.q3, unrounded, "round up", capsys)
    units = lambda c, e, k: math.ceil(c / (e - k)) if e > k else math.inf  # noqa: E731
    assert_feedback(ch13.q3, units, "milliseconds", capsys)
    whole = lambda c, e, k: math.ceil(c / (e / 1e3)) if e > k else math.inf  # noqa: E731
    assert_feedback(ch13.q3, whole, "time *saved*", capsys)
