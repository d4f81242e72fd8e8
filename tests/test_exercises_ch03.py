"""Chapter 03's checkers pass the solutions, fail the common mistakes, and say why in words."""

import torch
from exercise_checks import assert_all_pass, assert_feedback

from mmcourse.exercises import ch03
from mmcourse.positional import apply_rotary, sinusoidal_encoding, sinusoidal_shift_matrix


def _todo(*args):
    raise NotImplementedError


def _pairs(n, d, exponent):
    """angle (N, d/2) for pair i with 10000^(exponent(i))."""
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(d // 2, dtype=torch.float64)[None, :]
    return pos, i, pos / 10000.0 ** exponent(i, d)


def _interleave(a, b):
    return torch.stack([a, b], -1).flatten(-2)


def sin_cos_swapped(n, d):
    _, _, angle = _pairs(n, d, lambda i, d: 2 * i / d)
    return _interleave(angle.cos(), angle.sin())


def i_instead_of_2i(n, d):
    _, _, angle = _pairs(n, d, lambda i, d: i / d)
    return _interleave(angle.sin(), angle.cos())


def dimension_index(n, d):
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    k = torch.arange(d, dtype=torch.float64)[None, :]
    angle = pos / 10000.0 ** (k / d)  # column k uses k/d: the source's "j is the dimension index"
    return _interleave(angle[:, 0::2].sin(), angle[:, 1::2].cos())


def concatenated(n, d):
    _, _, angle = _pairs(n, d, lambda i, d: 2 * i / d)
    return torch.cat([angle.sin(), angle.cos()], dim=1)


def from_one(n, d):
    return sinusoidal_encoding(n + 1, d)[1:]


def multiplied(n, d):
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(d // 2, dtype=torch.float64)[None, :]
    angle = pos * 10000.0 ** (2 * i / d)
    return _interleave(angle.sin(), angle.cos())


def rotary_wrong_sign(x, cos, sin):
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([x2, -x1], -1) * sin


def rotary_interleaved(x, cos, sin):
    h = x.shape[-1] // 2
    c, s = cos[..., :h], sin[..., :h]
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * c - b * s, a * s + b * c], -1).flatten(-2)


def test_solutions_pass(capsys):
    answers = [
        (ch03.q1, lambda n, d: sinusoidal_encoding(n, d)),
        (ch03.q1, lambda n, d: sinusoidal_encoding(n, d).double().numpy()),  # numpy is fine
        (ch03.q2, apply_rotary),
        (ch03.q3, sinusoidal_shift_matrix),
        (ch03.q4, 197 * 768),
    ]
    assert_all_pass(answers, capsys)


def test_unattempted_is_not_an_error(capsys):
    for q in (ch03.q1, ch03.q2, ch03.q3):
        assert not q.passes(_todo)
        q.check(_todo)
    assert not ch03.q4.passes(...)
    ch03.q4.check(...)
    assert capsys.readouterr().out.count("[not attempted]") == 4


def test_mistakes_get_specific_feedback(capsys):
    checks = [
        (ch03.q1, sin_cos_swapped, "sin and cos are swapped"),
        (ch03.q1, i_instead_of_2i, "the exponent uses i/d"),
        (ch03.q1, dimension_index, "uses the dimension index itself"),
        (ch03.q1, concatenated, "(concatenated)"),
        (ch03.q1, from_one, "positions start at 1"),
        (ch03.q1, multiplied, "you multiplied pos"),
        (ch03.q1, lambda n, d: sinusoidal_encoding(n, d).T, "positions x dimensions"),
        (ch03.q1, lambda n, d: None, "returned None"),
        (ch03.q1, lambda n, d: torch.zeros(n, d), "values differ"),
        (ch03.q2, rotary_wrong_sign, "minus the angle"),
        (ch03.q2, rotary_interleaved, "interleaved layout"),
        (ch03.q2, lambda x, c, s: x * c + x * s, "needs the rotated x"),
        (ch03.q2, lambda x, c, s: x * c, "only x * cos"),
        (ch03.q2, lambda x, c, s: x[..., :2], "expected shape"),
        (ch03.q2, lambda x, c, s: x @ c, "raised an error on x of shape (6, 8)"),
        (ch03.q3, lambda k, d: sinusoidal_shift_matrix(k, d).T, "PE(p - k)"),
        (ch03.q3, lambda k, d: torch.eye(d), "identity"),
        (ch03.q3, lambda k, d: torch.zeros(d, 2 * d), "expected shape"),
        (ch03.q4, 196 * 768, "[CLS]"),
        (ch03.q4, 197, "number of rows"),
        (ch03.q4, 0, "has parameters"),
        (ch03.q4, 2.5, "whole number"),
    ]
    for exercise, answer, phrase in checks:
        assert_feedback(exercise, answer, phrase, capsys)


def test_hints_and_solutions(capsys):
    ch03.q1.hint()
    ch03.q1.solution()
    ch03.q2.solution()
    ch03.q3.solution()
    ch03.q4.solution()
    out = capsys.readouterr().out
    assert "Hint (1/3)" in out
    assert "def _sinusoidal_solution" in out and "rotate_half" in out and "151,296" in out
