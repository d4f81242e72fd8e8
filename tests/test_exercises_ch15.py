"""The chapter 15 checkers pass the solutions, fail common mistakes, and say why in words."""

import math

import numpy as np
import torch
import torch.nn.functional as F
from exercise_checks import assert_all_pass, assert_feedback

from mmcourse.contrastive import clip_loss
from mmcourse.exercises import ch15


def _todo(*args):
    raise NotImplementedError


def _local(u, v, all_u, all_v, s, rank, *, offset=True, both=True, scale=True):
    B = u.shape[0]
    labels = torch.arange(B) + (rank * B if offset else 0)
    s = s if scale else 1.0
    loss = F.cross_entropy(s * u @ all_v.T, labels)
    if both:
        loss = (loss + F.cross_entropy(s * v @ all_u.T, labels)) / 2
    return loss


def _local_via_full_matrix(u, v, all_u, all_v, s, rank):
    """Another valid answer: cut the rows out of the full (G, G) matrix."""
    B = u.shape[0]
    rows = slice(rank * B, (rank + 1) * B)
    logits = s * all_u @ all_v.T  # (G, G)
    labels = torch.arange(B) + rank * B
    return (F.cross_entropy(logits[rows], labels) + F.cross_entropy(logits.T[rows], labels)) / 2


def _largest(memory, W, local, n=4, *, round_down=True, bb=False, elements=False):
    fit = memory // (1 if elements else n)
    G = math.isqrt(fit * W * (W if bb else 1)) if local else math.isqrt(fit)
    return G - G % W if round_down else G


def _chunks_naive(image_tower, text_tower, images, texts, s, chunk):
    n = len(images.split(chunk))
    total = 0.0
    for x, t in zip(images.split(chunk), texts.split(chunk), strict=True):
        loss = clip_loss(image_tower(x), text_tower(t), s) / n
        loss.backward()
        total += loss.detach()
    return total


def _whole_batch(image_tower, text_tower, images, texts, s, chunk):
    loss = clip_loss(image_tower(images), text_tower(texts), s)
    loss.backward()
    return loss.detach()


def test_solutions_pass(capsys):
    answers = [
        (ch15.q1, _local),
        (ch15.q1, _local_via_full_matrix),
        (ch15.q2, _largest),
        (ch15.q2, lambda m, W, local, n=4: float(_largest(m, W, local, n))),
        (ch15.q3, ch15._grad_cache_solution),
        (ch15.q4, 255),
        (ch15.q4, 255.0),
        (ch15.q4, np.int64(255)),
        (ch15.q4, np.float32(255)),
        (ch15.q4, torch.tensor(255)),
    ]
    assert_all_pass(answers, capsys)


def test_unattempted_is_not_an_error(capsys):
    for q in (ch15.q1, ch15.q2, ch15.q3):
        assert not q.passes(_todo)
        q.check(_todo)
    assert not ch15.q4.passes(...)
    ch15.q4.check(...)
    assert capsys.readouterr().out.count("[not attempted]") == 4


def test_mistakes_get_specific_feedback(capsys):
    checks = [
        (ch15.q1, lambda *a: _local(*a, offset=False), "targets are arange(B)"),
        (ch15.q1, lambda u, v, au, av, s, r: clip_loss(au, av, s), "whole (G, G) matrix"),
        (ch15.q1, lambda *a: _local(*a, both=False), "only the image -> text direction"),
        (ch15.q1, lambda *a: _local(*a, scale=False), "multiplied by logit_scale"),
        (ch15.q1, lambda *a: None, "returned None"),
        (ch15.q2, lambda *a: _largest(*a, round_down=False), "round down"),
        (ch15.q2, lambda *a: _largest(*a, bb=True), "(B, B) = (G/W, G/W)"),
        (ch15.q2, lambda *a: _largest(*a, elements=True), "counted elements"),
        (ch15.q2, lambda m, W, local, n=4: _largest(m, W, local, n) + W, "more than memory_bytes"),
        (ch15.q2, lambda m, W, local, n=4: _largest(m, W, local, n) - W, "a larger global batch"),
        (ch15.q2, lambda *a: "many", "whole number of pairs"),
        (ch15.q2, lambda m, W, local, n=4: max(W, _largest(m, W, local, n)), "return 0"),
        (ch15.q3, _chunks_naive, "plain gradient accumulation"),
        (ch15.q3, _whole_batch, "on 12 rows at once"),
        (ch15.q3, lambda *a: torch.tensor(0.0), "got no gradient"),
        (ch15.q4, 31, "without the gather"),
        (ch15.q4, 256, "own caption"),
        (ch15.q4, 510, "one direction"),
        (ch15.q4, 100, "all but one"),
        (ch15.q4, "255", "whole number"),
        (ch15.q4, 255.5, "whole number"),
        (ch15.q4, True, "whole number"),
    ]
    for exercise, answer, phrase in checks:
        assert_feedback(exercise, answer, phrase, capsys)


def test_local_shares_average_to_the_global_loss():
    gen = torch.Generator().manual_seed(0)
    W, B = 3, 4
    u = F.normalize(torch.randn(W * B, 5, generator=gen), dim=-1)
    v = F.normalize(torch.randn(W * B, 5, generator=gen), dim=-1)
    shares = [
        ch15._local_clip_loss_solution(u[r * B : (r + 1) * B], v[r * B : (r + 1) * B], u, v, 9.0, r)
        for r in range(W)
    ]
    torch.testing.assert_close(torch.stack(shares).mean(), clip_loss(u, v, 9.0))


def test_hints_and_solutions(capsys):
    for q in (ch15.q1, ch15.q2, ch15.q3, ch15.q4):
        q.hint()
        q.solution()
    out = capsys.readouterr().out
    assert "Hint (1/" in out
    assert "def _local_clip_loss_solution" in out and "def _grad_cache_solution" in out
    assert "255. The gather" in out
