"""The chapter 05 checkers pass the solutions, fail common mistakes, and say why in words."""

import torch
import torch.nn.functional as F
from exercise_checks import assert_all_pass, assert_feedback

from mmcourse.exercises import ch05


def _todo(*args):
    raise NotImplementedError


def _mean(logits, weights=None):
    stacked = torch.stack(logits, 1)  # (B, M, C)
    return stacked.mean(1) if weights is None else (stacked * weights[None, :, None]).sum(1)


def _outer(h1, h2, *, ones=True, first=False, transpose=False, flatten=True):
    if ones:
        pad = (1, 0) if first else (0, 1)
        h1, h2 = F.pad(h1, pad, value=1.0), F.pad(h2, pad, value=1.0)
    z = h1[:, :, None] * h2[:, None, :]  # (B, d1, d2)
    if transpose:
        z = z.transpose(1, 2)
    return z.flatten(1) if flatten else z


def _redraw_mask(batch_size, num_modalities, p, generator):
    """Another valid answer: redraw the rows that lost everything until none is left."""
    keep = torch.rand(batch_size, num_modalities, generator=generator) >= p
    while not keep.any(1).all():
        empty = ~keep.any(1)
        keep[empty] = torch.rand(int(empty.sum()), num_modalities, generator=generator) >= p
    return keep


def test_solutions_pass(capsys):
    answers = [
        (ch05.q1, _mean),
        (
            ch05.q1,
            lambda logits, weights=None: (
                sum((w * lg for w, lg in zip(weights, logits, strict=True)))
                if weights is not None
                else sum(logits) / len(logits)
            ),
        ),
        (ch05.q2, _outer),
        (
            ch05.q2,
            lambda a, b: torch.einsum(
                "bi,bj->bij",
                torch.cat([a, torch.ones(len(a), 1)], 1),
                torch.cat([b, torch.ones(len(b), 1)], 1),
            ).reshape(len(a), -1),
        ),
        (ch05.q3, lambda B, M, p, g: ch05._modality_dropout_solution(B, M, p, g)),
        (ch05.q3, _redraw_mask),
        (ch05.q4, "c"),
        (ch05.q4, " C "),
    ]
    assert_all_pass(answers, capsys)


def test_unattempted_is_not_an_error(capsys):
    for q in (ch05.q1, ch05.q2, ch05.q3):
        assert not q.passes(_todo)
        q.check(_todo)
    assert not ch05.q4.passes(...)
    ch05.q4.check(...)
    assert capsys.readouterr().out.count("[not attempted]") == 4


def test_mistakes_get_specific_feedback(capsys):
    checks = [
        (ch05.q1, lambda logits, weights=None: torch.stack(logits, 1).sum(1), "you summed"),
        (
            ch05.q1,
            lambda logits, weights=None: _mean([t.softmax(-1) for t in logits], weights),
            "combined probabilities",
        ),
        (ch05.q1, lambda logits, weights=None: _mean(logits), "weights were ignored"),
        (ch05.q1, lambda logits, weights=None: torch.stack(logits, 1), "expected shape"),
        (ch05.q1, lambda logits, weights=None: None, "returned None"),
        (ch05.q2, lambda a, b: _outer(a, b, ones=False), "forgot to append the 1"),
        (ch05.q2, lambda a, b: _outer(a, b, first=True), "you put the 1 first"),
        (ch05.q2, lambda a, b: _outer(a, b, transpose=True), "flattening order is transposed"),
        (ch05.q2, lambda a, b: _outer(a, b, flatten=False), "now flatten them"),
        (ch05.q2, lambda a, b: torch.cat([a, b], 1), "expected shape"),
        (ch05.q2, lambda a, b: a @ b, "raised an error on h1 of shape (2, 3)"),
        (
            ch05.q3,
            lambda B, M, p, g: torch.rand(B, M, generator=g) >= p,
            "lost every modality",
        ),
        (
            ch05.q3,
            lambda B, M, p, g: ch05._modality_dropout_solution(B, M, 1 - p, g),
            "probability of *keeping*",
        ),
        (
            ch05.q3,
            lambda B, M, p, g: (
                (torch.rand(1, M, generator=g) >= p).expand(B, M) | (torch.arange(M) == 0)
            ),
            "same mask",
        ),
        (ch05.q3, lambda B, M, p, g: torch.ones(B, M), "boolean mask"),
        (ch05.q3, lambda B, M, p, g: torch.ones(M, B, dtype=torch.bool), "expected shape"),
        (ch05.q4, "a", "not (a)"),
        (ch05.q4, "b", "not (b)"),
        (ch05.q4, "d", "not (d)"),
        (ch05.q4, "late", "one of the letters"),
        (ch05.q4, 3, "one of the letters"),
    ]
    for exercise, answer, phrase in checks:
        assert_feedback(exercise, answer, phrase, capsys)


def test_hints_and_solutions(capsys):
    for q in (ch05.q1, ch05.q2, ch05.q3, ch05.q4):
        q.hint()
        q.solution()
    out = capsys.readouterr().out
    assert "Hint (1/" in out
    assert "def _late_fusion_solution" in out and "def _tensor_fusion_solution" in out
    assert "(c). Late fusion" in out
