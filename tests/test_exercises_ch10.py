"""The chapter 10 checkers pass the solutions, fail common mistakes, and say why in words."""

import torch
import torch.nn.functional as F
from exercise_checks import assert_all_pass, assert_feedback

from mmcourse import caption_metrics as cm
from mmcourse.captioning import caption_loss
from mmcourse.exercises import ch10


def _todo(*args):
    raise NotImplementedError


def _beam(lp, bs):
    K, V = lp.shape
    s, i = torch.topk((bs[:, None] + lp).flatten(), K)
    return s, i // V, i % V


def test_solutions_pass(capsys):
    answers = [
        (ch10.q1, _beam),
        (ch10.q1, ch10._beam_solution),
        (ch10.q2, ch10._clipped_solution),
        (
            ch10.q2,
            lambda h, rs, n: cm.clipped_precision([" ".join(h)], [[" ".join(r) for r in rs]], n),
        ),
        (ch10.q3, ch10._loss_solution),
        (ch10.q3, lambda z, y, m: caption_loss(z, y, m, reduction="sum")),
    ]
    assert_all_pass(answers, capsys)


def test_unattempted_is_not_an_error(capsys):
    for q in (ch10.q1, ch10.q2, ch10.q3):
        assert not q.passes(_todo)
        q.check(_todo)


def test_typical_mistakes_get_feedback(capsys):
    def per_beam(lp, bs):
        s, t = (bs[:, None] + lp).max(-1)
        return s, torch.arange(len(bs)), t

    def no_scores(lp, bs):
        K, V = lp.shape
        s, i = torch.topk(lp.flatten(), K)
        return s, i // V, i % V

    assert_feedback(ch10.q1, per_beam, "K best of all K * V", capsys)
    assert_feedback(ch10.q1, no_scores, "accumulated score", capsys)

    def unclipped(h, rs, n):
        hg = cm.ngrams(h, n)
        return sum(c for g, c in hg.items() if any(g in cm.ngrams(r, n) for r in rs)), sum(
            hg.values()
        )

    def summed(h, rs, n):
        hg = cm.ngrams(h, n)
        return sum(min(c, sum(cm.ngrams(r, n)[g] for r in rs)) for g, c in hg.items()), sum(
            hg.values()
        )

    assert_feedback(ch10.q2, unclipped, "clip each n-gram", capsys)
    assert_feedback(ch10.q2, summed, "not their sum", capsys)

    def unshifted(z, y, m):
        return (
            F.cross_entropy(z.flatten(0, 1), y.flatten(), reduction="none").view(y.shape) * m
        ).sum()

    assert_feedback(ch10.q3, unshifted, "shift by one", capsys)
    assert_feedback(ch10.q3, lambda z, y, m: caption_loss(z, y, m), "that is the mean", capsys)
