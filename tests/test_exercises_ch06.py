"""The chapter 06 checkers pass the solutions, fail common mistakes, and say why in words."""

import torch
import torch.nn.functional as F
from exercise_checks import assert_all_pass, assert_feedback

from mmcourse.exercises import ch06


def _todo(*args):
    raise NotImplementedError


def _clip(u, v, s, *, normalize=True, directions=2, combine="mean", divide=False):
    if normalize:
        u, v = F.normalize(u, dim=-1), F.normalize(v, dim=-1)
    logits = u @ v.T / s if divide else s * u @ v.T
    targets = torch.arange(len(u))
    losses = [F.cross_entropy(logits, targets), F.cross_entropy(logits.T, targets)][:directions]
    return sum(losses) / (len(losses) if combine == "mean" else 1)


def _recall_topk(sim, k):
    top = sim.topk(k, dim=1).indices  # (N, k)
    return (top == torch.arange(len(sim))[:, None]).any(1).float().mean().item()


def _recall(sim, k, *, transpose=False, offset=0, lowest=False, count=False):
    sim = sim.T if transpose else sim
    sim = -sim if lowest else sim
    rank = 1 + (sim > sim.diagonal()[:, None]).sum(1)
    hits = (rank <= k + offset).float()
    return hits.sum().item() if count else hits.mean().item()


def _classifier(names, templates, encode, *, norm_first=True, norm_after=True, order="class"):
    C, T = len(names), len(templates)
    if order == "class":
        prompts = [t.format(n) for n in names for t in templates]
    else:
        prompts = [t.format(n) for t in templates for n in names]
    e = encode(prompts)
    e = F.normalize(e, dim=-1) if norm_first else e
    mean = e.reshape(C, T, -1).mean(1)
    return F.normalize(mean, dim=-1) if norm_after else mean


def _multi(u, v, s, labels, *, normalize_targets=True, directions=2):
    logits = s * F.normalize(u, dim=-1) @ F.normalize(v, dim=-1).T
    same = (labels[:, None] == labels[None, :]).float()
    q = same / same.sum(1, keepdim=True) if normalize_targets else same
    losses = [
        -(q * logits.log_softmax(1)).sum(1).mean(),
        -(q * logits.T.log_softmax(1)).sum(1).mean(),
    ]
    return sum(losses[:directions]) / directions


def test_solutions_pass(capsys):
    answers = [
        (ch06.q1, _clip),
        (ch06.q1, ch06._clip_loss_solution),
        (ch06.q2, _recall),
        (ch06.q2, _recall_topk),
        (ch06.q3, _classifier),
        (ch06.q4, _multi),
        (ch06.q4, ch06._multi_positive_solution),
    ]
    assert_all_pass(answers, capsys)


def test_unattempted_is_not_an_error(capsys):
    for q in (ch06.q1, ch06.q2, ch06.q3, ch06.q4):
        assert not q.passes(_todo)
        q.check(_todo)
    assert capsys.readouterr().out.count("[not attempted]") == 4


def test_mistakes_get_specific_feedback(capsys):
    checks = [
        (ch06.q1, lambda u, v, s: _clip(u, v, s, normalize=False), "L2-normalise"),
        (ch06.q1, lambda u, v, s: _clip(u, v, s, directions=1), "one direction only"),
        (ch06.q1, lambda u, v, s: _clip(u, v, s, combine="sum"), "summed the two directions"),
        (ch06.q1, lambda u, v, s: _clip(u, v, s, divide=True), "divided by logit_scale"),
        (ch06.q1, lambda u, v, s: None, "returned None"),
        (ch06.q1, lambda u, v, s: u @ v, "raised an error"),
        (ch06.q2, lambda sim, k: _recall(sim, k, transpose=True), "text -> image"),
        (ch06.q2, lambda sim, k: _recall(sim, k, offset=-1), "off by one"),
        (ch06.q2, lambda sim, k: _recall(sim, k, lowest=True), "lowest scores first"),
        (ch06.q2, lambda sim, k: _recall(sim, k, count=True), "returned a count"),
        (ch06.q2, lambda sim, k: None, "returned None"),
        (ch06.q2, lambda sim, k: sim.diagonal(), "one number"),
        (ch06.q3, lambda n, t, e: _classifier(n, t, e, norm_first=False), "normalise each prompt"),
        (ch06.q3, lambda n, t, e: _classifier(n, t, e, norm_after=False), "re-normalise the mean"),
        (ch06.q3, lambda n, t, e: _classifier(n, t, e, order="template"), "template by template"),
        (ch06.q3, lambda n, t, e: _classifier(n, t, e)[:1], "expected shape"),
        (ch06.q3, lambda n, t, e: None, "returned None"),
        (ch06.q4, lambda u, v, s, y: _multi(u, v, s, y, normalize_targets=False), "sum to 1"),
        (ch06.q4, lambda u, v, s, y: _clip(u, v, s), "plain CLIP loss"),
        (ch06.q4, lambda u, v, s, y: _multi(u, v, s, y, directions=1), "one direction only"),
    ]
    for exercise, answer, phrase in checks:
        assert_feedback(exercise, answer, phrase, capsys)


def test_hints_and_solutions(capsys):
    for q in (ch06.q1, ch06.q2, ch06.q3, ch06.q4):
        q.hint()
        q.solution()
    out = capsys.readouterr().out
    assert "Hint (1/" in out
    assert "def _clip_loss_solution" in out and "def _multi_positive_solution" in out
