"""The chapter 09 checkers pass the solutions, fail common mistakes, and say why in words."""

import pytest
import torch
import torch.nn.functional as F
from exercise_checks import assert_all_pass, assert_feedback

from mmcourse import distill
from mmcourse.exercises import ch09


def _todo(*args):
    raise NotImplementedError


def _kd(
    z_s, z_t, y, T, alpha, *, t2=True, reduction="batchmean", swap=False, flip=False, ce_t=False
):
    a, b = (z_t, z_s) if swap else (z_s, z_t)
    kl = F.kl_div(F.log_softmax(a / T, -1), F.softmax(b / T, -1), reduction=reduction)
    soft = kl * T**2 if t2 else kl
    ce = F.cross_entropy(z_s / T if ce_t else z_s, y)
    return (1 - alpha) * soft + alpha * ce if flip else alpha * soft + (1 - alpha) * ce


def _hidden(hs, ht, W, b, mask, *, use_mask=True, bias=True, feature_sum=False):
    proj = hs @ W + (b if bias else 0)
    sq = (proj - ht) ** 2
    per_token = sq.sum(-1) if feature_sum else sq.mean(-1)
    m = mask.float() if use_mask else torch.ones_like(mask, dtype=torch.float32)
    return (per_token * m).sum() / m.sum()


def test_solutions_pass(capsys):
    answers = [
        (ch09.q1, lambda z, T: torch.softmax(z / T, -1)),
        (ch09.q1, distill.softmax_with_temperature),
        (ch09.q1, ch09._softmax_t_solution),
        (ch09.q2, _kd),
        (
            ch09.q2,
            lambda z_s, z_t, y, T, a: distill.kd_loss(z_s, z_t, temperature=T, alpha=a, labels=y),
        ),
        (ch09.q3, _hidden),
        (
            ch09.q3,
            lambda hs, ht, W, b, m: ((hs @ W + b - ht) ** 2).mean(-1)[m.bool()].mean(),
        ),
        (ch09.q4, "a"),
        (ch09.q4, " A "),
    ]
    assert_all_pass(answers, capsys)


def test_unattempted_is_not_an_error(capsys):
    for q in (ch09.q1, ch09.q2, ch09.q3):
        assert not q.passes(_todo)
        q.check(_todo)
    assert not ch09.q4.passes(...)
    ch09.q4.check(...)
    assert capsys.readouterr().out.count("[not attempted]") == 4


@pytest.mark.filterwarnings("ignore:reduction")
def test_mistakes_get_specific_feedback(capsys):
    checks = [
        (ch09.q1, lambda z, T: torch.softmax(z, -1), "divide the logits by T first"),
        (ch09.q1, lambda z, T: torch.softmax(z * T, -1), "you multiplied by T"),
        (
            ch09.q1,
            lambda z, T: torch.exp(z / T) / torch.exp(z / T).sum(-1, keepdim=True),
            "overflowed",
        ),
        (ch09.q1, lambda z, T: torch.softmax(z / T, 0), "wrong axis"),
        (ch09.q1, lambda z, T: None, "returned None"),
        (ch09.q2, lambda *a: _kd(*a, t2=False), "T^2"),
        (ch09.q2, lambda *a: _kd(*a, reduction="mean"), "batchmean"),
        (ch09.q2, lambda *a: _kd(*a, swap=True), "wrong way"),
        (ch09.q2, lambda *a: _kd(*a, flip=True), "alpha weighs the soft term"),
        (ch09.q2, lambda *a: _kd(*a, ce_t=True), "at T=1"),
        (
            ch09.q2,
            lambda z_s, z_t, y, T, a: F.kl_div(z_s, z_t, reduction="none"),
            "expected a scalar",
        ),
        (ch09.q3, lambda *a: _hidden(*a, use_mask=False), "padding tokens were counted"),
        (ch09.q3, lambda *a: _hidden(*a, feature_sum=True), "average them"),
        (ch09.q3, lambda *a: _hidden(*a, bias=False), "bias b is missing"),
        (ch09.q3, lambda hs, ht, W, b, m: hs @ ht, "raised an error"),
        (ch09.q4, "b", "not (b)"),
        (ch09.q4, "c", "not (c)"),
        (ch09.q4, "adam", "one of the letters"),
    ]
    for exercise, answer, phrase in checks:
        assert_feedback(exercise, answer, phrase, capsys)


def test_hints_and_solutions(capsys):
    for q in (ch09.q1, ch09.q2, ch09.q3, ch09.q4):
        q.hint()
        q.solution()
    out = capsys.readouterr().out
    assert "Hint (1/" in out
    assert "def _kd_solution" in out and "def _hidden_solution" in out
    assert "(a). Scaling the loss" in out
