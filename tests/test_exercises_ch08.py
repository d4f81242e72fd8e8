"""The chapter 08 checkers pass the solutions, fail common mistakes, and say why in words."""

import torch
import torch.nn.functional as F
from exercise_checks import assert_all_pass, assert_feedback

from mmcourse.exercises import ch08
from mmcourse.train import adamw_step


def _todo(*args):
    raise NotImplementedError


def _ce(z, y, *, scale=True, sign=1.0, act="softmax"):
    p = torch.softmax(z, -1) if act == "softmax" else torch.sigmoid(z)
    g = sign * (p - F.one_hot(y, z.shape[1]).float())
    return g / len(z) if scale else g


def _autograd_ce(z, y):
    z = z.clone().requires_grad_()
    F.cross_entropy(z, y).backward()
    return z.grad


def _adamw(theta, g, m, v, t, lr, betas, eps, wd, *, l2=False, correct=True, lr_in_decay=True):
    b1, b2 = betas
    if l2:
        g, wd = g + wd * theta, 0.0
    theta = theta * (1 - (lr if lr_in_decay else 1.0) * wd)
    m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    mh, vh = (m / (1 - b1**t), v / (1 - b2**t)) if correct else (m, v)
    return theta - lr * mh / (vh.sqrt() + eps), m, v


def _lora(x, W, b, A, B, alpha, r, *, scale="alpha/r"):
    s = {"alpha/r": alpha / r, "none": 1.0, "r/alpha": r / alpha, "zero": 0.0}[scale]
    return F.linear(x, W, b) + s * F.linear(F.linear(x, A), B)


def test_solutions_pass(capsys):
    answers = [
        (ch08.q1, _ce),
        (ch08.q1, _autograd_ce),
        (ch08.q2, _adamw),
        (
            ch08.q2,
            lambda th, g, m, v, t, lr, betas, eps, wd: adamw_step(
                th, g, m, v, t=t, lr=lr, betas=betas, eps=eps, weight_decay=wd
            ),
        ),
        (ch08.q3, _lora),
        (ch08.q4, "c"),
        (ch08.q4, " C "),
    ]
    assert_all_pass(answers, capsys)


def test_unattempted_is_not_an_error(capsys):
    for q in (ch08.q1, ch08.q2, ch08.q3):
        assert not q.passes(_todo)
        q.check(_todo)
    assert not ch08.q4.passes(...)
    ch08.q4.check(...)
    assert capsys.readouterr().out.count("[not attempted]") == 4


def test_mistakes_get_specific_feedback(capsys):
    checks = [
        (ch08.q1, lambda z, y: _ce(z, y, scale=False), "divide by B"),
        (ch08.q1, lambda z, y: _ce(z, y, sign=-1.0), "sign is flipped"),
        (ch08.q1, lambda z, y: _ce(z, y, act="sigmoid"), "sigmoid"),
        (ch08.q1, lambda z, y: z, "dL/dz"),
        (ch08.q1, lambda z, y: None, "returned None"),
        (ch08.q2, lambda *a: _adamw(*a, l2=True), "Adam with L2"),
        (ch08.q2, lambda *a: _adamw(*a, correct=False), "bias correction"),
        (ch08.q2, lambda *a: _adamw(*a, lr_in_decay=False), "multiply by lr too"),
        (ch08.q2, lambda *a: a[0], "three tensors"),
        (ch08.q3, lambda *a: _lora(*a, scale="none"), "scaled by alpha / r"),
        (ch08.q3, lambda *a: _lora(*a, scale="r/alpha"), "not r / alpha"),
        (ch08.q3, lambda *a: _lora(*a, scale="zero"), "update (alpha / r) B A x is missing"),
        (ch08.q3, lambda x, W, b, A, B, alpha, r: x @ W + b, "raised an error"),
        (ch08.q4, "a", "not (a)"),
        (ch08.q4, "b", "not (b)"),
        (ch08.q4, "d", "not (d)"),
        (ch08.q4, "lora", "one of the letters"),
    ]
    for exercise, answer, phrase in checks:
        assert_feedback(exercise, answer, phrase, capsys)


def test_hints_and_solutions(capsys):
    for q in (ch08.q1, ch08.q2, ch08.q3, ch08.q4):
        q.hint()
        q.solution()
    out = capsys.readouterr().out
    assert "Hint (1/" in out and "def _ce_grad_solution" in out and "def _adamw_solution" in out
    assert "(c). LoRA" in out
