"""The chapter 14 checkers pass the solutions, fail common mistakes, and say why in words."""

import numpy as np
from exercise_checks import assert_all_pass, assert_feedback

from mmcourse import cases
from mmcourse.exercises import ch14


def _todo(*args):
    raise NotImplementedError


def _sens(y, s, spec, *, flip=False, both_ways=False):
    y, s = np.asarray(y), np.asarray(s, dtype=float)
    if flip:
        y = 1 - y
    best = 0.0
    for t in [*np.unique(s), np.inf, -np.inf]:
        called = s >= t
        negative = s[y == 0] <= t if both_ways else ~called[y == 0]
        if negative.mean() >= spec:
            best = max(best, called[y == 1].mean())
    return best


def _walk(n, train, test, gap, *, expanding=False, step=None, future=False, no_gap=False):
    folds = []
    for start in range(train + gap, n, step or test):
        end = start if no_gap else start - gap
        tr = np.arange(0 if expanding else end - train, end)
        if future:
            tr = tr + 1
        folds.append((tr, np.arange(start, min(start + test, n))))
    return folds


def _recall(ranking, relevant, k, *, count=False, precision=False, share=False, offset=0):
    values = []
    for r, rel in zip(ranking, relevant, strict=True):
        found = len(set(r[: k + offset]) & rel)
        values.append(found / k if precision else found / len(rel) if share else found > 0)
    return sum(values) if count else sum(values) / len(values)


def test_solutions_pass(capsys):
    answers = [
        (ch14.q1, lambda y, s, spec: cases.sensitivity_at_specificity(y, s, spec)[0]),
        (ch14.q1, ch14._sens_at_spec_solution),
        (ch14.q1, _sens),
        (
            ch14.q2,
            lambda n, tr, te, g: cases.walk_forward_splits(n, train_size=tr, test_size=te, gap=g),
        ),
        (ch14.q2, ch14._walk_forward_solution),
        (ch14.q3, ch14._recall_from_ranking_solution),
        (ch14.q3, _recall),
    ]
    assert_all_pass(answers, capsys)


def test_unattempted_is_not_an_error(capsys):
    for q in (ch14.q1, ch14.q2, ch14.q3):
        assert not q.passes(_todo)
        q.check(_todo)
    assert capsys.readouterr().out.count("[not attempted]") == 3


def test_mistakes_get_specific_feedback(capsys):
    checks = [
        (
            ch14.q1,
            lambda y, s, spec: cases.specificity_at_sensitivity(y, s, spec)[0],
            "specificity at a fixed sensitivity",
        ),
        (ch14.q1, lambda y, s, spec: _sens(y, s, spec, flip=True), "label 0 as the positive"),
        (ch14.q1, lambda y, s, spec: _sens(y, s, spec, both_ways=True), "cannot also count"),
        (ch14.q1, lambda y, s, spec: cases.sensitivity_at_specificity(y, s, spec), "not a tuple"),
        (ch14.q1, lambda y, s, spec: None, "returned None"),
        (ch14.q1, lambda y, s, spec: 1 / 0, "raised an error"),
        (ch14.q2, lambda n, tr, te, g: _walk(n, tr, te, g, future=True), "looking into the future"),
        (ch14.q2, lambda n, tr, te, g: _walk(n, tr, te, g, no_gap=True), "fewer than gap"),
        (ch14.q2, lambda n, tr, te, g: _walk(n, tr, te, g, step=max(1, te // 2)), "overlap"),
        (ch14.q2, lambda n, tr, te, g: _walk(n, tr, te, g, expanding=True), "rolling window"),
        (ch14.q2, lambda n, tr, te, g: None, "returned None"),
        (ch14.q3, lambda r, rel, k: _recall(r, rel, k, count=True), "returned a count"),
        (ch14.q3, lambda r, rel, k: _recall(r, rel, k, precision=True), "precision@k"),
        (ch14.q3, lambda r, rel, k: _recall(r, rel, k, share=True), "share of relevant items"),
        (ch14.q3, lambda r, rel, k: _recall(r, rel, k, offset=-1), "off by one"),
        (ch14.q3, lambda r, rel, k: None, "returned None"),
    ]
    for exercise, answer, phrase in checks:
        assert_feedback(exercise, answer, phrase, capsys)


def test_hints_and_solutions(capsys):
    for q in (ch14.q1, ch14.q2, ch14.q3):
        q.hint()
        q.solution()
    out = capsys.readouterr().out
    assert "Hint (1/" in out
    assert "def _sens_at_spec_solution" in out and "def _recall_from_ranking_solution" in out
