"""The chapter 11 checkers pass the solutions, fail common mistakes, and say why in words."""

import math

import torch
from exercise_checks import assert_all_pass, assert_feedback

from mmcourse.exercises import ch11
from mmcourse.vlm import VisionLanguageModel  # noqa: F401  (the package version exists)


def _todo(*args):
    raise NotImplementedError


def test_solutions_pass(capsys):
    answers = [
        (
            ch11.q1,
            lambda ids, roles: [
                i if r == "answer" else -100 for i, r in zip(ids, roles, strict=True)
            ],
        ),
        (ch11.q2, lambda e, ids, im, t: e.masked_scatter((ids == t)[..., None], im)),
        (ch11.q3, ch11._cached_step_solution),
    ]
    assert_all_pass(answers, capsys)


def test_unattempted_is_not_an_error(capsys):
    for q in (ch11.q1, ch11.q2, ch11.q3):
        assert not q.passes(_todo)
        q.check(_todo)
    assert capsys.readouterr().out.count("[not attempted]") == 3


def _step(scale=True, own_only=False, prepend=False):
    def fn(q, k_new, v_new, k_cache, v_cache):
        k = torch.cat([k_new, k_cache] if prepend else [k_cache, k_new], dim=2)
        v = torch.cat([v_new, v_cache] if prepend else [v_cache, v_new], dim=2)
        if own_only:
            return v_new, k, v
        s = q @ k.transpose(-2, -1) / (math.sqrt(q.shape[-1]) if scale else 1.0)
        return s.softmax(-1) @ v, k, v

    return fn


def test_mistakes_get_specific_feedback(capsys):
    checks = [
        (ch11.q1, lambda ids, roles: list(ids), "every token carries a label"),
        (
            ch11.q1,
            lambda ids, roles: [
                i if r != "prompt" else -100 for i, r in zip(ids, roles, strict=True)
            ],
            "an image position carries a label",
        ),
        (ch11.q1, lambda ids, roles: [-100] * len(ids), "no token carries a label"),
        (
            ch11.q2,
            lambda e, ids, im, t: e.masked_scatter((ids == t)[..., None], im.flip(1)),
            "reverse order",
        ),
        (ch11.q3, _step(scale=False), "sqrt(Dh)"),
        (ch11.q3, _step(own_only=True), "attends only to itself"),
        (ch11.q3, _step(prepend=True), "in front of the cache"),
        (ch11.q3, lambda *a: a[0], "return a tuple"),
    ]
    for q, answer, words in checks:
        assert_feedback(q, answer, words, capsys)
