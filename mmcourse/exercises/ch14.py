"""Exercises for notebooks/14_case_studies."""

from __future__ import annotations

import numpy as np

from mmcourse import cases
from mmcourse.exercises import Exercise, Mismatch, call

# --- 1. sensitivity at a fixed specificity ---------------------------------------------------


def _sens_at_spec_solution(y, scores, specificity):
    y, scores = np.asarray(y), np.asarray(scores, dtype=float)
    best = 0.0
    for t in [*np.unique(scores), np.inf]:  # every distinct rule "positive if score >= t"
        called = scores >= t
        if (~called[y == 0]).mean() >= specificity:  # specificity = P(called negative | negative)
            best = max(best, called[y == 1].mean())  # sensitivity = P(called positive | positive)
    return float(best)


def _as_float(got, what):
    if got is None:
        raise Mismatch(f"{what}: your function returned None (did you forget `return`?)")
    if isinstance(got, tuple):
        raise Mismatch(f"{what}: return one number (the sensitivity), not a tuple")
    try:
        return float(got)
    except (TypeError, ValueError) as err:
        raise Mismatch(f"{what}: return a float, got {type(got).__name__}") from err


def _check_sens_at_spec(fn) -> None:
    rng = np.random.default_rng(14)
    for n, spec, ties in [(40, 0.9, False), (100, 0.95, True), (30, 0.5, False), (60, 1.0, True)]:
        y = np.r_[np.ones(n // 2, int), np.zeros(n - n // 2, int)]
        s = y + rng.normal(0, 1.0, n)
        s = np.round(s, 1) if ties else s
        what = f"{n} cases, specificity {spec}{' (with tied scores)' if ties else ''}"
        got = _as_float(call(fn, y.copy(), s.copy(), spec, what=what), what)
        expected = cases.sensitivity_at_specificity(y, s, spec)[0]
        if abs(got - expected) < 1e-9:
            continue
        flipped = cases.sensitivity_at_specificity(1 - y, s, spec)[0]
        both_ways = max(  # ties counted as called positive *and* as called negative
            [
                (s[y == 1] >= t).mean()
                for t in [*np.unique(s), np.inf]
                if (s[y == 0] <= t).mean() >= spec
            ],
            default=0.0,
        )
        if abs(got - cases.specificity_at_sensitivity(y, s, spec)[0]) < 1e-9:
            raise Mismatch(
                f"{what}: that is the specificity at a fixed sensitivity; swap the roles"
            )
        if abs(got - flipped) < 1e-9:
            raise Mismatch(f"{what}: you treated label 0 as the positive class; 1 is the disease")
        if abs(got - both_ways) < 1e-9 and ties:
            raise Mismatch(
                f"{what}: a case scoring exactly t is called positive (score >= t), so it cannot "
                "also count as a true negative: specificity = mean(scores[y == 0] < t)"
            )
        raise Mismatch(f"{what}: expected sensitivity {expected:.4f}, got {got:.4f}")


q1 = Exercise(
    "Exercise 1: sensitivity at a fixed specificity",
    checker=_check_sens_at_spec,
    hints=[
        "Try every distinct score as the threshold t (and +inf: nobody called positive).",
        "For each t: specificity = mean(scores[y == 0] < t), sensitivity = mean(scores[y == 1] >= t). "
        "Keep the best sensitivity among the t with specificity >= the target.",
    ],
    solution_fn=_sens_at_spec_solution,
)

# --- 2. a walk-forward split -----------------------------------------------------------------


def _walk_forward_solution(n, train_size, test_size, gap):
    folds = []
    for start in range(train_size + gap, n, test_size):  # each test window starts here
        train = np.arange(start - gap - train_size, start - gap)  # the past, minus the gap
        folds.append((train, np.arange(start, min(start + test_size, n))))
    return folds


def _check_walk_forward(fn) -> None:
    for n, train, test, gap in [(20, 8, 4, 0), (23, 5, 5, 2), (100, 40, 30, 4), (12, 3, 2, 1)]:
        what = f"n={n}, train_size={train}, test_size={test}, gap={gap}"
        got = call(fn, n, train, test, gap, what=what)
        if got is None:
            raise Mismatch(f"{what}: your function returned None (did you forget `return`?)")
        expected = cases.walk_forward_splits(n, train_size=train, test_size=test, gap=gap)
        try:
            got = [(np.asarray(a).astype(int), np.asarray(b).astype(int)) for a, b in got]
        except (TypeError, ValueError) as err:
            raise Mismatch(f"{what}: return a list of (train_indices, test_indices) pairs") from err
        for k, (tr, te) in enumerate(got):
            if len(tr) and len(te) and tr.max() >= te.min():
                raise Mismatch(
                    f"{what}: fold {k} trains on index {tr.max()} but tests from {te.min()}: "
                    "that is looking into the future"
                )
            if len(tr) and len(te) and te.min() - tr.max() - 1 < gap:
                raise Mismatch(
                    f"{what}: fold {k} leaves fewer than gap={gap} samples between train and test"
                )
        if len(got) != len(expected):
            tested = sorted(i for _, te in got for i in te.tolist())
            if len(tested) != len(set(tested)):
                raise Mismatch(f"{what}: test windows overlap; step forward by test_size")
            raise Mismatch(f"{what}: expected {len(expected)} folds, got {len(got)}")
        for k, ((tr, te), (tr2, te2)) in enumerate(zip(got, expected, strict=True)):
            if not np.array_equal(te, te2):
                raise Mismatch(f"{what}: fold {k} should test on {te2.tolist()}, got {te.tolist()}")
            if not np.array_equal(tr, tr2):
                raise Mismatch(
                    f"{what}: fold {k} should train on indices {tr2.min()}..{tr2.max()} "
                    f"(a rolling window of {len(tr2)}), got {tr.tolist()[:3]}...{tr.tolist()[-3:]} "
                    f"({len(tr)} indices)"
                )


q2 = Exercise(
    "Exercise 2: a walk-forward split",
    checker=_check_walk_forward,
    hints=[
        "The first test window starts at train_size + gap; the next ones every test_size after it.",
        "For a test window starting at `start`, train on np.arange(start - gap - train_size, start - gap); "
        "the last test window may be shorter (stop at n).",
    ],
    solution_fn=_walk_forward_solution,
)

# --- 3. recall@k from a ranking ----------------------------------------------------------------


def _recall_from_ranking_solution(ranking, relevant, k):
    hits = [len(set(ranked[:k]) & rel) > 0 for ranked, rel in zip(ranking, relevant, strict=True)]
    return sum(hits) / len(hits)


def _check_recall_from_ranking(fn) -> None:
    rng = np.random.default_rng(41)
    for Q, G, k in [(6, 10, 1), (10, 20, 5), (8, 15, 3), (5, 12, 12)]:
        sim = rng.normal(size=(Q, G))
        rel = rng.random((Q, G)) < 0.15
        rel[np.arange(Q), rng.integers(0, G, Q)] = True
        ranking = [np.argsort(-row, kind="stable").tolist() for row in sim]
        relevant = [set(np.flatnonzero(r).tolist()) for r in rel]
        what = f"{Q} queries over {G} items, k={k}"
        got = _as_float(
            call(fn, [list(r) for r in ranking], [set(r) for r in relevant], k, what=what), what
        )
        expected = cases.recall_at_k(sim, rel, k)
        if abs(got - expected) < 1e-9:
            continue
        precision = np.mean(
            [len(set(r[:k]) & s) / k for r, s in zip(ranking, relevant, strict=True)]
        )
        share = np.mean(
            [len(set(r[:k]) & s) / len(s) for r, s in zip(ranking, relevant, strict=True)]
        )
        off = _recall_from_ranking_solution(ranking, relevant, k - 1)
        if abs(got - expected * Q) < 1e-9 and Q > 1:
            raise Mismatch(f"{what}: you returned a count; divide by the number of queries")
        if abs(got - precision) < 1e-9 and k > 1:
            raise Mismatch(
                f"{what}: that is precision@k; R@k asks whether *any* relevant item is in the top k"
            )
        if abs(got - share) < 1e-9:
            raise Mismatch(
                f"{what}: that is the share of relevant items found; R@k here is a hit rate "
                "(at least one relevant item in the top k)"
            )
        if abs(got - off) < 1e-9:
            raise Mismatch(f"{what}: off by one; the top k are ranking[:k]")
        raise Mismatch(f"{what}: expected {expected:.4f}, got {got:.4f}")


q3 = Exercise(
    "Exercise 3: recall@k from a ranking",
    checker=_check_recall_from_ranking,
    hints=[
        "For each query, look at its first k ids: ranking[q][:k].",
        "A query is a hit when set(ranking[q][:k]) & relevant[q] is not empty; R@k is the mean of the hits.",
    ],
    solution_fn=_recall_from_ranking_solution,
)
