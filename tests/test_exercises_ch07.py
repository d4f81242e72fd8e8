"""The chapter 07 checkers pass the solutions, fail common mistakes, and say why in words."""

import math

import torch
import torch.nn.functional as F
from exercise_checks import assert_all_pass, assert_feedback

from mmcourse.exercises import ch07


def _todo(*args):
    raise NotImplementedError


def _weights(sim, ids, *, same=True, diagonal=True, softmax_first=False, uniform=False):
    B = len(ids)
    positive = torch.zeros(B, B, dtype=torch.bool)
    if diagonal:
        positive |= torch.eye(B, dtype=torch.bool)
    if same:
        positive |= (ids[:, None] == ids[None, :]) & ~torch.eye(B, dtype=torch.bool)
    if uniform:
        w = (~positive).float()
        return w / w.sum(1, keepdim=True)
    if softmax_first:
        return sim.softmax(1).masked_fill(positive, 0.0)
    return sim.masked_fill(positive, -math.inf).softmax(1)


def test_solutions_pass(capsys):
    answers = [
        (ch07.q1, ch07._mlm_loss_solution),
        (
            ch07.q1,
            lambda logits, labels: F.cross_entropy(
                logits.transpose(1, 2), labels, ignore_index=-100
            ),
        ),
        (ch07.q2, ch07._negative_weights_solution),
        (
            ch07.q2,
            lambda sim, ids: (
                (e := sim.exp() * (ids[:, None] != ids[None, :])) / e.sum(1, keepdim=True)
            ),
        ),
        (ch07.q3, ch07._rerank_solution),
        (
            ch07.q3,
            lambda itc, itm, k, w: torch.stack(
                [
                    row[torch.argmax(s[row] + w * c[row])]
                    for row, s, c in zip(itc.topk(k, 1).indices, itm, itc, strict=True)
                ]
            ),
        ),
    ]
    assert_all_pass(answers, capsys)


def test_unattempted_is_not_an_error(capsys):
    for q in (ch07.q1, ch07.q2, ch07.q3):
        assert not q.passes(_todo)
        q.check(_todo)
    assert capsys.readouterr().out.count("[not attempted]") == 3


def test_mistakes_get_specific_feedback(capsys):
    def per_row(logits, labels):
        rows = [
            F.cross_entropy(lg[lb != -100], lb[lb != -100])
            for lg, lb in zip(logits, labels, strict=True)
            if (lb != -100).any()
        ]
        return torch.stack(rows).mean()

    def over_bn(logits, labels):
        chosen = labels != -100
        nll = -logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
        return (nll * chosen).sum() / labels.numel()

    checks = [
        (
            ch07.q1,
            lambda logits, labels: F.cross_entropy(
                logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
            ),
            "you summed",
        ),
        (ch07.q1, per_row, "averaged per caption"),
        (ch07.q1, over_bn, "wrong denominator"),
        (ch07.q1, lambda logits, labels: None, "returned None"),
        (ch07.q2, lambda s, ids: _weights(s, ids, same=False), "false negative"),
        (ch07.q2, lambda s, ids: _weights(s, ids, diagonal=False, same=False), "diagonal"),
        (ch07.q2, lambda s, ids: _weights(s, ids, softmax_first=True), "sum to 1"),
        (ch07.q2, lambda s, ids: _weights(s, ids, uniform=True), "random negatives"),
        (ch07.q2, lambda s, ids: s, "diagonal"),
        (ch07.q3, lambda itc, itm, k, w: itm.argmax(1), "over all candidates"),
        (ch07.q3, lambda itc, itm, k, w: (itm + w * itc).argmax(1), "over all candidates"),
        (
            ch07.q3,
            lambda itc, itm, k, w: ch07._rerank_solution(itc, itm, k, 0.0),
            "ITM-only re-ranking",
        ),
        (
            ch07.q3,
            lambda itc, itm, k, w: (
                itm.gather(1, top := itc.topk(k, 1).indices) + w * itc.gather(1, top)
            ).argmax(1),
            "position inside the top-k",
        ),
        (ch07.q3, lambda itc, itm, k, w: itc.topk(k, 1).indices, "expected shape"),
    ]
    for exercise, answer, phrase in checks:
        assert_feedback(exercise, answer, phrase, capsys)


def test_hints_and_solutions(capsys):
    for q in (ch07.q1, ch07.q2, ch07.q3):
        q.hint()
        q.solution()
    out = capsys.readouterr().out
    assert "Hint (1/" in out and "def _rerank_solution" in out
