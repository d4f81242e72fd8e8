"""Chapter 14's metrics equal scikit-learn / scipy / a brute-force loop; conformal sets cover."""

import math

import numpy as np
import pytest
from scipy.stats import spearmanr
from sklearn.calibration import calibration_curve
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score, roc_curve
from sklearn.model_selection import TimeSeriesSplit

from mmcourse import cases


def _data(seed, n=200, ties=False):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = y + rng.normal(0, 1.2, n)
    if ties:
        s = np.round(s, 1)
    return y, s


@pytest.mark.parametrize("ties", [False, True])
def test_auroc_equals_sklearn(ties):
    for seed in range(5):
        y, s = _data(seed, ties=ties)
        assert cases.auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_bootstrap_ci_brackets_the_estimate_and_narrows_with_data():
    y, s = _data(0, n=100)
    est, lo, hi = cases.bootstrap_ci(cases.auroc, y, s, num_resamples=300)
    assert lo <= est <= hi and est == pytest.approx(roc_auc_score(y, s))
    y2, s2 = _data(0, n=1000)
    _, lo2, hi2 = cases.bootstrap_ci(cases.auroc, y2, s2, num_resamples=300)
    assert hi2 - lo2 < hi - lo


@pytest.mark.parametrize("ties", [False, True])
def test_sensitivity_at_specificity_matches_roc_curve(ties):
    for seed in range(4):
        y, s = _data(seed, ties=ties)
        fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
        for spec in (0.5, 0.8, 0.9, 0.95, 1.0):
            sens, t = cases.sensitivity_at_specificity(y, s, spec)
            assert sens == pytest.approx(tpr[fpr <= 1 - spec + 1e-12].max())
            rates = cases.rates_at_threshold(y, s, t)
            assert rates["specificity"] >= spec - 1e-12 and rates["sensitivity"] == pytest.approx(
                sens
            )
        for target in (0.5, 0.9, 0.95, 1.0):
            spec_, t = cases.specificity_at_sensitivity(y, s, target)
            assert spec_ == pytest.approx(1 - fpr[tpr >= target - 1e-12].min())
            assert cases.rates_at_threshold(y, s, t)["sensitivity"] >= target - 1e-12


def test_sensitivity_at_specificity_brute_force_loop():
    y, s = _data(3, n=60, ties=True)
    best = 0.0
    for t in [*sorted(set(s)), math.inf]:
        called = s >= t
        if (~called[y == 0]).mean() >= 0.9:
            best = max(best, called[y == 1].mean())
    assert cases.sensitivity_at_specificity(y, s, 0.9)[0] == pytest.approx(best)


def test_brier_reliability_and_ece():
    rng = np.random.default_rng(0)
    p = rng.random(500)
    y = (rng.random(500) < p**1.5).astype(int)
    assert cases.brier_score(y, p) == pytest.approx(brier_score_loss(y, p))
    curve = cases.reliability_curve(y, p, num_bins=10)
    frequency, confidence = calibration_curve(y, p, n_bins=10, strategy="uniform")
    used = curve["count"] > 0
    np.testing.assert_allclose(curve["frequency"][used], frequency)
    np.testing.assert_allclose(curve["confidence"][used], confidence)
    ece = sum(
        np.mean((p >= lo) & ((p < hi) | (hi == 1.0)))
        * abs(
            y[(p >= lo) & ((p < hi) | (hi == 1.0))].mean()
            - p[(p >= lo) & ((p < hi) | (hi == 1.0))].mean()
        )
        for lo, hi in zip(curve["edges"][:-1], curve["edges"][1:], strict=True)
        if ((p >= lo) & ((p < hi) | (hi == 1.0))).any()
    )
    assert cases.expected_calibration_error(y, p) == pytest.approx(ece)
    perfect = (rng.random(200_000) < (q := rng.random(200_000))).astype(int)
    assert cases.expected_calibration_error(perfect, q) < 0.01


def test_conformal_quantile_is_the_textbook_order_statistic():
    s = np.arange(1, 20, dtype=float)  # n = 19
    assert cases.conformal_quantile(s, 0.1) == 18.0  # ceil(20 * 0.9) = 18th smallest
    assert cases.conformal_quantile(s, 0.01) == math.inf  # ceil(20 * 0.99) = 20 > 19


def test_conformal_sets_cover_at_least_one_minus_alpha_over_random_splits():
    rng = np.random.default_rng(0)
    n, C, alpha = 600, 3, 0.1
    logits = rng.normal(0, 1.5, (n, C))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = np.array([rng.choice(C, p=p) for p in probs])  # a calibrated model
    coverage, sizes = [], []
    for _ in range(300):
        order = rng.permutation(n)
        cal, test = order[:100], order[100:]
        sets = cases.conformal_sets(probs[cal], labels[cal], probs[test], alpha=alpha)
        coverage.append(sets[np.arange(len(test)), labels[test]].mean())
        sizes.append(sets.sum(1).mean())
    # E[coverage] is in [1 - alpha, 1 - alpha + 1/(n_cal + 1)] for continuous scores
    assert 1 - alpha - 0.005 <= np.mean(coverage) <= 1 - alpha + 1 / 101 + 0.005
    assert np.mean(sizes) < C  # not the trivial full set


def test_conformal_sets_check_inputs():
    with pytest.raises(ValueError, match="cal_labels"):
        cases.conformal_sets(np.full((3, 2), 0.5), [0, 1, 2], np.full((2, 2), 0.5), alpha=0.1)
    with pytest.raises(ValueError, match="alpha"):
        cases.conformal_quantile([0.1, 0.2], 1.5)


def test_precision_at_k_and_alarms_per_hour_brute_force():
    y, s = _data(1, n=300)
    k = 25
    top = sorted(range(len(s)), key=lambda i: -s[i])[:k]
    assert cases.precision_at_k(y, s, k) == pytest.approx(np.mean(y[top]))
    t = cases.threshold_at_detection_rate(y, s, 0.9)
    assert (s[y == 1] >= t).mean() >= 0.9
    assert (s[y == 1] >= np.nextafter(t, np.inf)).mean() < 0.9  # the highest such threshold
    expected = (s[y == 0] >= t).mean() * 360
    assert cases.alarms_per_hour(y, s, detection_rate=0.9, events_per_hour=360) == pytest.approx(
        expected
    )


def test_agreement_score():
    a = np.array([[1.0, 0.0], [0.5, 0.5], [1.0, 0.0]])
    b = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    scores = cases.agreement_score(a, b)
    assert scores[0] == pytest.approx(0.0, abs=1e-9)
    assert scores[1] == pytest.approx(math.log(2))
    assert scores[2] > 20  # confident disagreement


@pytest.mark.parametrize("expanding", [False, True])
@pytest.mark.parametrize("gap", [0, 3])
def test_walk_forward_never_leaks_and_equals_time_series_split(expanding, gap):
    n, train, test, k = 130, 40, 15, 6  # n = train + gap + k * test when gap = 0
    n = train + gap + k * test
    folds = cases.walk_forward_splits(
        n, train_size=train, test_size=test, gap=gap, expanding=expanding
    )
    assert len(folds) == k
    seen_test = []
    for tr, te in folds:
        assert tr.max() + gap < te.min()  # never a future (or gap) index in training
        assert len(tr) == (te.min() - gap if expanding else train)
        seen_test.extend(te.tolist())
    assert seen_test == list(range(train + gap, n))  # the test windows tile the future once
    sk = TimeSeriesSplit(
        n_splits=k, test_size=test, gap=gap, max_train_size=None if expanding else train
    )
    for (tr, te), (tr2, te2) in zip(folds, sk.split(np.zeros(n)), strict=True):
        np.testing.assert_array_equal(tr, tr2)
        np.testing.assert_array_equal(te, te2)


def test_walk_forward_rejects_impossible_sizes():
    with pytest.raises(ValueError, match="no test samples"):
        cases.walk_forward_splits(10, train_size=10, test_size=2)


def test_directional_accuracy_ic_and_sharpe():
    rng = np.random.default_rng(0)
    r = rng.normal(0, 0.01, 300)
    p = r + rng.normal(0, 0.02, 300)
    assert cases.directional_accuracy(p, r) == pytest.approx(np.mean(np.sign(p) == np.sign(r)))
    assert cases.information_coefficient(p, r) == pytest.approx(spearmanr(p, r).statistic)
    assert math.isnan(cases.information_coefficient(np.ones(300), r))
    w = np.sign(p)
    expected, previous = [], 0.0
    for wt, rt in zip(w, r, strict=True):  # the loop the formula replaces
        expected.append(wt * rt - 0.001 * abs(wt - previous))
        previous = wt
    got = cases.strategy_returns(w, r, cost=0.001)
    np.testing.assert_allclose(got, expected)
    assert cases.sharpe_ratio(got) == pytest.approx(
        np.mean(got) / np.std(got, ddof=1) * math.sqrt(252)
    )


def test_trailing_mean_uses_the_past_only():
    x = np.arange(10, dtype=float)
    got = cases.trailing_mean(x, 3)
    np.testing.assert_allclose(got, [np.mean(x[max(0, t - 2) : t + 1]) for t in range(10)])
    y = x.copy()
    y[7:] = 100.0  # changing the future leaves the past features unchanged
    np.testing.assert_allclose(cases.trailing_mean(y, 3)[:7], got[:7])


def test_market_headlines_lead_the_regime():
    cfg = cases.MarketConfig(num_days=3000, lead=5)
    m = cases.generate_market(cfg, seed=1)
    tone, regime = m["tone"], 2 * m["regime"] - 1
    toned = tone != 0
    ahead = np.mean(tone[:-5][toned[:-5]] == regime[5:][toned[:-5]])
    assert ahead == pytest.approx(cfg.tone_accuracy, abs=0.03)
    assert np.mean(toned) == pytest.approx(1 - cfg.neutral_share, abs=0.03)
    assert all(h.split()[0] for h in m["headline"]) and len(m["headline"]) == 3000
    again = cases.generate_market(cfg, seed=1)
    np.testing.assert_array_equal(again["returns"], m["returns"])


def test_recall_at_k_and_map():
    rng = np.random.default_rng(0)
    Q, G = 12, 40
    sim = rng.normal(size=(Q, G))
    rel = rng.random((Q, G)) < 0.1
    rel[np.arange(Q), rng.integers(0, G, Q)] = True
    for k in (1, 5, 10):
        brute = np.mean([rel[q, np.argsort(-sim[q])[:k]].any() for q in range(Q)])
        assert cases.recall_at_k(sim, rel, k) == pytest.approx(brute)
    ap = [average_precision_score(rel[q], sim[q]) for q in range(Q)]
    np.testing.assert_allclose(cases.average_precision(sim, rel), ap)
    assert cases.mean_average_precision(sim, rel) == pytest.approx(np.mean(ap))


def test_recall_at_k_equals_the_clip_retrieval_metric_on_pairs():
    import torch

    from mmcourse.contrastive import retrieval_metrics

    sim = torch.randn(30, 30, generator=torch.Generator().manual_seed(0)) + torch.eye(30)
    ref = retrieval_metrics(sim, ks=(1, 5))
    for k in (1, 5):
        assert cases.recall_at_k(sim.numpy(), np.eye(30, dtype=bool), k) == pytest.approx(
            ref[f"image_to_text_R@{k}"]
        )


def test_index_memory_matches_faiss_for_flat_and_ivfpq():
    faiss = pytest.importorskip("faiss")
    rng = np.random.default_rng(0)
    n, d = 20_000, 32
    x = rng.normal(size=(n, d)).astype("float32")
    flat = faiss.IndexFlatIP(d)
    flat.add(x)
    size = len(faiss.serialize_index(flat))
    assert size == pytest.approx(cases.index_memory_bytes(n, d, kind="flat"), rel=0.01)
    ivfpq = faiss.IndexIVFPQ(faiss.IndexFlatL2(d), d, 16, 4, 8)  # 4 bytes per code
    ivfpq.cp.min_points_per_centroid = 1  # a small, quick training set is fine for a size check
    ivfpq.pq.cp.min_points_per_centroid = 1
    ivfpq.train(x[:1024])
    ivfpq.add(x)
    size = len(faiss.serialize_index(ivfpq))
    expected = cases.index_memory_bytes(n, d, kind="ivfpq", pq_bytes=4, nlist=16)
    assert size == pytest.approx(expected, rel=0.15)
    assert cases.index_memory_bytes(n, d, kind="flat", shards=4) == n * d * 4 / 4


def test_breast_cancer_views_and_model_card():
    data = cases.breast_cancer_views()
    assert data["X"].shape == (569, 30) and data["y"].sum() == 212  # 212 malignant
    cols = np.concatenate(list(data["views"].values()))
    assert sorted(cols.tolist()) == list(range(30))
    card = cases.model_card(
        "m",
        intended_use="u",
        data="d",
        metrics={"AUROC": 0.91234},
        limits=["l"],
        risks=["r"],
        before_deployment=["b"],
    )
    assert "| AUROC | 0.912 |" in card and "- b" in card
    with pytest.raises(ValueError, match="metric"):
        cases.model_card(
            "m", intended_use="u", data="d", metrics={}, limits=[], risks=[], before_deployment=[]
        )


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="same shape"):
        cases.auroc([0, 1], [0.1])
    with pytest.raises(ValueError, match="both classes"):
        cases.auroc([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="0 or 1"):
        cases.auroc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="specificity"):
        cases.sensitivity_at_specificity([0, 1], [0.1, 0.2], 1.5)
    with pytest.raises(ValueError, match="k="):
        cases.precision_at_k([0, 1], [0.1, 0.2], 3)
    with pytest.raises(ValueError, match="relevant"):
        cases.recall_at_k(np.zeros((2, 3)), np.zeros((2, 3), dtype=bool), 1)
    with pytest.raises(ValueError, match="kind"):
        cases.index_memory_bytes(10, 4, kind="lsh")
