"""The chapter 12 checkers pass the solutions, fail common mistakes, and say why in words."""

import torch
from exercise_checks import assert_all_pass, assert_feedback

from mmcourse.exercises import ch12


def _todo(*args):
    raise NotImplementedError


def _step(x, x_adv, grad, eps, alpha, *, sign=True, up=True, ball=True, centre_x=True, clip=True):
    d = grad.sign() if sign else grad
    out = x_adv + (alpha if up else -alpha) * d
    if ball:
        c = x if centre_x else x_adv
        out = torch.min(torch.max(out, c - eps), c + eps)
    return out.clamp(0, 1) if clip else out


def test_solutions_pass(capsys):
    answers = [
        (ch12.q1, _step),
        (ch12.q1, lambda x, xa, g, e, a: (x + (xa + a * g.sign() - x).clamp(-e, e)).clamp(0, 1)),
        (ch12.q2, ch12._breaking_eps_solution),
        (
            ch12.q2,
            lambda grid, accs: next(
                (e for e, a in zip(grid, accs, strict=True) if a <= accs[0] / 2), None
            ),
        ),
        (ch12.q3, "d"),
        (ch12.q3, " D "),
    ]
    assert_all_pass(answers, capsys)


def test_unattempted_is_not_an_error(capsys):
    for q in (ch12.q1, ch12.q2):
        assert not q.passes(_todo)
        q.check(_todo)
    ch12.q3.check(...)
    assert capsys.readouterr().out.count("[not attempted]") == 3


def test_mistakes_get_specific_feedback(capsys):
    checks = [
        (ch12.q1, lambda *a: _step(*a, sign=False), "along the gradient itself"),
        (ch12.q1, lambda *a: _step(*a, up=False), "stepped down the loss"),
        (ch12.q1, lambda *a: _step(*a, ball=False), "no projection onto the ball"),
        (ch12.q1, lambda *a: _step(*a, centre_x=False), "a ball around x_adv does nothing"),
        (ch12.q1, lambda *a: _step(*a, clip=False), "values left [0, 1]"),
        (ch12.q1, lambda *a: None, "returned None"),
        (ch12.q1, lambda x, xa, g, e, a: x @ torch.ones(3), "raised an error"),
        (ch12.q2, lambda grid, accs: 0.0, "expected"),
        (
            ch12.q2,
            lambda grid, accs: next(
                (e for e, a in zip(grid, accs, strict=True) if a < accs[0] / 2), None
            ),
            "smallest",
        ),
        (
            ch12.q2,
            lambda grid, accs: next((a for a in accs if a <= accs[0] / 2), None),
            "not the accuracy",
        ),
        (ch12.q3, "a", "not (a)"),
        (ch12.q3, "b", "not (b)"),
        (ch12.q3, "c", "not (c)"),
        (ch12.q3, "maybe", "one of the letters"),
    ]
    for exercise, answer, phrase in checks:
        assert_feedback(exercise, answer, phrase, capsys)


def test_hints_and_solutions(capsys):
    for q in (ch12.q1, ch12.q2, ch12.q3):
        q.hint()
        q.solution()
    out = capsys.readouterr().out
    assert "Hint (1/" in out and "def _pgd_step_solution" in out and "(d). The clean input" in out
