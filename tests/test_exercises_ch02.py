"""The chapter 02 checkers pass the solutions, fail common mistakes, and say why in words."""

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from exercise_checks import assert_all_pass, assert_feedback

from mmcourse.exercises import ch02


def _todo(*args):
    raise NotImplementedError


def _attention(scale_by=None, softmax_dim=-1, invert=False, use_mask=True):
    """A learner's attention with one knob turned the wrong way."""

    def fn(q, k, v, mask):
        d = q.shape[-1] if scale_by is None else scale_by(q, v)
        scores = q @ k.transpose(-2, -1) / d
        if use_mask:
            scores = scores.masked_fill(mask if invert else ~mask, float("-inf"))
        return torch.softmax(scores, dim=softmax_dim) @ v

    return fn


def test_solutions_pass(capsys):
    answers = [
        (ch02.q1, lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m)),
        (ch02.q1, _attention(scale_by=lambda q, v: math.sqrt(q.shape[-1]))),
        (ch02.q2, lambda L: torch.arange(L)[None, :] <= torch.arange(L)[:, None]),
        (ch02.q3, lambda x, h: rearrange(x, "b n (h d) -> b h n d", h=h)),
        (ch02.q3, lambda x, h: x.view(*x.shape[:2], h, -1).permute(0, 2, 1, 3)),
        (ch02.q4, 64),
        (ch02.q4, 64.0),
    ]
    assert_all_pass(answers, capsys)


def test_unattempted_is_not_an_error(capsys):
    for q in (ch02.q1, ch02.q2, ch02.q3):
        assert not q.passes(_todo)
        q.check(_todo)
    assert not ch02.q4.passes(...)
    ch02.q4.check(...)
    assert capsys.readouterr().out.count("[not attempted]") == 4


def test_mistakes_get_specific_feedback(capsys):
    sqrt_dk = lambda q, v: math.sqrt(q.shape[-1])
    checks = [
        (ch02.q1, _attention(scale_by=lambda q, v: 1.0), "forgot to divide the scores by sqrt"),
        (ch02.q1, _attention(scale_by=lambda q, v: q.shape[-1]), "divided the scores by d_k"),
        (ch02.q1, _attention(scale_by=lambda q, v: math.sqrt(v.shape[-1])), "value width"),
        (ch02.q1, _attention(scale_by=sqrt_dk, softmax_dim=-2), "over the queries (dim=-2)"),
        (ch02.q1, _attention(scale_by=sqrt_dk, invert=True), "mask is inverted"),
        (ch02.q1, _attention(scale_by=sqrt_dk, use_mask=False), "mask is not applied"),
        (
            ch02.q1,
            lambda q, k, v, m: (torch.softmax(q @ k.mT / q.shape[-1] ** 0.5, -1) * m) @ v,
            "after the softmax",
        ),
        (
            ch02.q1,
            lambda q, k, v, m: torch.softmax(q @ k.mT / q.shape[-1] ** 0.5 * m, -1) @ v,
            "exp(0) = 1",
        ),
        (
            ch02.q1,
            lambda q, k, v, m: torch.softmax(
                (q @ k.mT / q.shape[-1] ** 0.5).masked_fill(~m, float("-inf")), -1
            ),
            "returned the attention weights",
        ),
        (ch02.q1, lambda q, k, v, m: q @ v, "raised an error"),
        (ch02.q1, lambda q, k, v, m: q @ k.mT, "expected shape"),
        (ch02.q2, lambda L: torch.ones(L, L).tril(), "float mask is *added*"),
        (ch02.q2, lambda L: torch.ones(L, L, dtype=torch.bool).triu(), "see the future"),
        (ch02.q2, lambda L: torch.ones(L, L, dtype=torch.bool).tril(-1), "diagonal is masked"),
        (ch02.q2, lambda L: torch.ones(L, L + 1, dtype=torch.bool), "expected shape"),
        (ch02.q3, lambda x, h: x.reshape(x.shape[0], h, x.shape[1], -1), "straight into"),
        (ch02.q3, lambda x, h: x.reshape(*x.shape[:2], h, -1), "move the head axis"),
        (ch02.q3, lambda x, h: rearrange(x, "b n (d h) -> b h n d", h=h), "consecutive"),
        (ch02.q4, 8, "standard deviation"),
        (ch02.q4, 1, "after"),
        (ch02.q4, 4096, "variances add"),
        (ch02.q4, 32, "not quite"),
        (ch02.q4, "64", "expected a number"),
    ]
    for exercise, answer, phrase in checks:
        assert_feedback(exercise, answer, phrase, capsys)


def test_hints_and_solutions(capsys):
    ch02.q1.hint()
    ch02.q1.solution()
    ch02.q4.solution()
    out = capsys.readouterr().out
    assert "Hint (1/3)" in out and "def _masked_attention_solution" in out and "64" in out
