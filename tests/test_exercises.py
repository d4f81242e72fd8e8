"""The exercise checkers pass the solutions, fail common mistakes, and say why in words."""

import torch
from exercise_checks import assert_all_pass, assert_feedback
from torch import nn

from mmcourse.exercises import Exercise, Mismatch, call, ch00, ch01
from mmcourse.modalities import patchify


def _todo(*args):
    raise NotImplementedError


def test_solutions_pass(capsys):
    answers = [
        (ch00.q1, lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)),
        (ch01.q1, patchify),
        (ch01.q2, 196),
        (ch01.q3, lambda f: 1127.0 * torch.log1p(f / 700.0)),  # the same scale, written with ln
        (ch01.q4, lambda a, b: nn.functional.cosine_similarity(a[:, None], b[None], dim=-1)),
    ]
    assert_all_pass(answers, capsys)


def test_unattempted_is_not_an_error(capsys):
    for q in (ch00.q1, ch01.q1, ch01.q3, ch01.q4):
        assert not q.passes(_todo)
        q.check(_todo)
    assert not ch01.q2.passes(...)
    ch01.q2.check(...)
    assert capsys.readouterr().out.count("[not attempted]") == 5


def test_mistakes_get_specific_feedback(capsys):
    checks = [
        (ch00.q1, lambda m: sum(p.numel() for p in m.parameters()), "frozen"),
        (
            ch01.q1,
            lambda x, p: (
                x.unfold(2, p, p)
                .unfold(3, p, p)
                .permute(0, 2, 3, 1, 4, 5)
                .reshape(x.shape[0], -1, x.shape[1] * p * p)
            ),
            "channel-first",
        ),
        (ch01.q1, lambda x, p: x.reshape(x.shape[0], -1, p * p * x.shape[1]), "values differ"),
        (ch01.q1, lambda x, p: x, "expected shape"),
        (ch01.q2, 14, "one side"),
        (ch01.q3, lambda f: 2595 * torch.log(1 + f / 700), "natural log"),
        (ch01.q3, lambda f: None, "returned None"),
        (ch01.q4, lambda a, b: a @ b.T, "raw dot products"),
        (ch01.q4, lambda a, b: 1 / 0, "raised an error on a of shape (5, 8)"),
    ]
    for exercise, answer, phrase in checks:
        assert_feedback(exercise, answer, phrase, capsys)


def test_hint_cycles_and_solution_shows_code(capsys):
    ch01.q1.hint()
    ch01.q1.hint()
    ch01.q1.solution()
    ch01.q2.solution()
    out = capsys.readouterr().out
    assert "Hint (1/3)" in out and "Hint (2/3)" in out
    assert "def patchify" in out and "196" in out


def test_framework_building_blocks(capsys):
    ex = Exercise("demo", checker=lambda x: None)
    ex.hint()
    assert "no hint" in capsys.readouterr().out
    try:
        call(42)
    except Mismatch as err:
        assert "expected a function" in str(err)
    else:  # pragma: no cover
        raise AssertionError("call(42) should fail")
