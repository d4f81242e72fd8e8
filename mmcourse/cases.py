"""Application case studies: the metrics each field uses, and the data of chapter 14's studies.

Every source article ends with application scenarios (000 §6, 001 §6, 003 §6, 004 §6);
chapter 14 builds four of them end to end. This module holds what they reuse:

1. **Clinical metrics** (medical study): :func:`auroc` (the Mann-Whitney statistic) with a
   percentile :func:`bootstrap_ci`; :func:`sensitivity_at_specificity` and
   :func:`specificity_at_sensitivity`; :func:`brier_score`, :func:`reliability_curve` and
   :func:`expected_calibration_error`; split conformal prediction
   (:func:`conformal_quantile`, :func:`conformal_sets`) with guaranteed marginal coverage.
2. **Detection metrics** (security study): :func:`precision_at_k`,
   :func:`threshold_at_detection_rate` and :func:`alarms_per_hour`;
   :func:`agreement_score`, the cross-modal disagreement of two heads' class probabilities.
3. **Time-series evaluation** (finance study): :func:`walk_forward_splits` (train on the
   past, test on the future, rolling), :func:`directional_accuracy`,
   :func:`information_coefficient` (Spearman), :func:`strategy_returns` after costs and
   :func:`sharpe_ratio`; :class:`MarketConfig` / :func:`generate_market`, a regime-switching
   market with template headlines whose tone leads the regime by ``lead`` days.
4. **Retrieval metrics** (search study): :func:`recall_at_k` and
   :func:`mean_average_precision` over a similarity matrix with several relevant items per
   query; :func:`index_memory_bytes`, the memory arithmetic of a (sharded) vector index.
5. :func:`breast_cancer_views` (the real data of the medical study, as three views) and
   :func:`model_card`, a short model card as Markdown.

Scores are "higher = more positive / more anomalous / more relevant" throughout; a
prediction is positive when ``score >= threshold``.

Taught in notebooks/14_case_studies.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import rankdata

from mmcourse import utils

logger = logging.getLogger(__name__)

ArrayLike = Any  # numpy arrays, lists, torch tensors: anything np.asarray takes


# --- input checks ------------------------------------------------------------------------


def _labels_scores(y_true: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Check binary labels (0/1) and finite scores of the same length."""
    y = np.asarray(y_true)
    s = np.asarray(scores, dtype=float)
    if y.ndim != 1 or s.shape != y.shape:
        raise ValueError(
            f"expected labels and scores of the same shape (N,), got {y.shape} and {s.shape}"
        )
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 or 1, got values {np.unique(y)[:5].tolist()}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or inf")
    y = y.astype(int)
    if y.min() == y.max():
        raise ValueError("need both classes (0 and 1) among the labels, got only one")
    return y, s


def _probabilities(probs: ArrayLike, name: str = "probs") -> np.ndarray:
    p = np.asarray(probs, dtype=float)
    if not np.all((p >= 0) & (p <= 1)):
        raise ValueError(f"{name} must be probabilities in [0, 1]")
    return p


# --- 1. clinical metrics -----------------------------------------------------------------


def auroc(y_true: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve: the probability that a random positive outscores a random negative.

    AUROC = (R_+ - n_+ (n_+ + 1) / 2) / (n_+ n_-), with R_+ the sum of the positives' ranks
    among all scores (ties get their average rank, i.e. count one half): the Mann-Whitney U
    statistic divided by the number of (positive, negative) pairs.

    Args:
        y_true: (N,) labels, 1 = positive.
        scores: (N,) scores, higher = more likely positive.

    Returns:
        The AUROC in [0, 1]; 0.5 is chance.

    Taught in notebooks/14_case_studies.
    """
    y, s = _labels_scores(y_true, scores)
    ranks = rankdata(s)  # (N,) average ranks, 1..N
    n_pos, n_neg = y.sum(), (1 - y).sum()
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def bootstrap_ci(
    metric: Callable[[np.ndarray, np.ndarray], float],
    y_true: ArrayLike,
    scores: ArrayLike,
    *,
    num_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """A percentile bootstrap confidence interval of ``metric(y_true, scores)``.

    Cases are resampled with replacement, stratified by class (each resample keeps the
    numbers of positives and negatives, so a metric that needs both classes is defined).

    Args:
        metric: ``(y, s) -> float``, e.g. :func:`auroc`.
        y_true: (N,) 0/1 labels.
        scores: (N,) scores (or probabilities).
        num_resamples: bootstrap resamples.
        level: the coverage of the interval, e.g. 0.95.
        seed: seeds the resampling.

    Returns:
        ``(estimate on all data, lower, upper)``.

    Taught in notebooks/14_case_studies.
    """
    y, s = _labels_scores(y_true, scores)
    utils.positive_int(num_resamples=num_resamples)
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    values = np.empty(num_resamples)
    for b in range(num_resamples):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        values[b] = metric(y[idx], s[idx])
    lower, upper = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(metric(y, s)), float(lower), float(upper)


def _operating_points(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every distinct threshold t (each score, and +inf) with its sensitivity and specificity."""
    thresholds = np.append(np.unique(s), np.inf)  # (K,)
    pos, neg = np.sort(s[y == 1]), np.sort(s[y == 0])
    sensitivity = 1 - np.searchsorted(pos, thresholds, side="left") / len(pos)  # P(s >= t | +)
    specificity = np.searchsorted(neg, thresholds, side="left") / len(neg)  # P(s < t | -)
    return thresholds, sensitivity, specificity


def sensitivity_at_specificity(
    y_true: ArrayLike, scores: ArrayLike, specificity: float
) -> tuple[float, float]:
    """The highest sensitivity among thresholds whose specificity is at least ``specificity``.

    A case is called positive when ``score >= t``; sensitivity (recall, true-positive rate)
    = P(called positive | positive), specificity = P(called negative | negative).

    Args:
        y_true: (N,) 0/1 labels.
        scores: (N,) scores.
        specificity: the required specificity, e.g. 0.95.

    Returns:
        ``(sensitivity, threshold)``. The threshold is fitted on *these* data: report the
        sensitivity it gives on other data (see the pitfall on tuning thresholds on the test set).

    Taught in notebooks/14_case_studies.
    """
    utils.fraction(specificity=specificity)
    t, sens, spec = _operating_points(*_labels_scores(y_true, scores))
    ok = spec >= specificity - 1e-12
    best = np.flatnonzero(ok)[np.argmax(sens[ok])]
    return float(sens[best]), float(t[best])


def specificity_at_sensitivity(
    y_true: ArrayLike, scores: ArrayLike, sensitivity: float
) -> tuple[float, float]:
    """The highest specificity among thresholds whose sensitivity is at least ``sensitivity``.

    Args:
        y_true: (N,) 0/1 labels.
        scores: (N,) scores.
        sensitivity: the required sensitivity, e.g. 0.95.

    Returns:
        ``(specificity, threshold)``.

    Taught in notebooks/14_case_studies.
    """
    utils.fraction(sensitivity=sensitivity)
    t, sens, spec = _operating_points(*_labels_scores(y_true, scores))
    ok = sens >= sensitivity - 1e-12
    best = np.flatnonzero(ok)[np.argmax(spec[ok])]
    return float(spec[best]), float(t[best])


def rates_at_threshold(y_true: ArrayLike, scores: ArrayLike, threshold: float) -> dict[str, float]:
    """Sensitivity and specificity of the rule ``score >= threshold`` on these data.

    Taught in notebooks/14_case_studies.
    """
    y, s = _labels_scores(y_true, scores)
    called = s >= threshold
    return {
        "sensitivity": float(called[y == 1].mean()),
        "specificity": float((~called[y == 0]).mean()),
    }


def brier_score(y_true: ArrayLike, probs: ArrayLike) -> float:
    """The mean squared error of predicted probabilities, mean_i (p_i - y_i)^2 (lower is better).

    Taught in notebooks/14_case_studies.
    """
    y, _ = _labels_scores(y_true, probs)
    p = _probabilities(probs)
    return float(np.mean((p - y) ** 2))


def reliability_curve(y_true: ArrayLike, probs: ArrayLike, *, num_bins: int = 10) -> dict:
    """The data of a reliability diagram: per probability bin, mean prediction vs frequency.

    Bins are equal-width on [0, 1]; a probability on an inner edge goes to the bin above
    (the convention of ``sklearn.calibration.calibration_curve``).

    Args:
        y_true: (N,) 0/1 labels.
        probs: (N,) predicted probabilities of class 1.
        num_bins: the number of bins, M.

    Returns:
        dict of numpy arrays of length M: ``edges`` (M + 1,), ``confidence`` (mean predicted
        probability in the bin, NaN if empty), ``frequency`` (fraction of positives, NaN if
        empty), ``count``.

    Taught in notebooks/14_case_studies.
    """
    y, _ = _labels_scores(y_true, probs)
    p = _probabilities(probs)
    utils.positive_int(num_bins=num_bins)
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    which = np.searchsorted(edges[1:-1], p, side="right")  # (N,) bin of each prediction
    count = np.bincount(which, minlength=num_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(which, weights=p, minlength=num_bins) / count
        frequency = np.bincount(which, weights=y, minlength=num_bins) / count
    return {"edges": edges, "confidence": confidence, "frequency": frequency, "count": count}


def expected_calibration_error(y_true: ArrayLike, probs: ArrayLike, *, num_bins: int = 10) -> float:
    """ECE = sum_m (n_m / N) |frequency_m - confidence_m| over the bins of :func:`reliability_curve`.

    Taught in notebooks/14_case_studies.
    """
    curve = reliability_curve(y_true, probs, num_bins=num_bins)
    used = curve["count"] > 0
    gap = np.abs(curve["frequency"][used] - curve["confidence"][used])
    return float(np.sum(curve["count"][used] / curve["count"].sum() * gap))


def conformal_quantile(scores: ArrayLike, alpha: float) -> float:
    """The split-conformal threshold: the ceil((n + 1)(1 - alpha))-th smallest calibration score.

    If a new case's nonconformity score is exchangeable with the n calibration scores,
    P(score_new <= q_hat) >= 1 - alpha (Vovk et al.; Angelopoulos & Bates 2021). When
    ceil((n + 1)(1 - alpha)) > n no finite threshold guarantees it and +inf is returned.

    Args:
        scores: (n,) nonconformity scores of the calibration cases (higher = stranger).
        alpha: the allowed miscoverage, in (0, 1).

    Returns:
        q_hat.

    Taught in notebooks/14_case_studies.
    """
    s = np.sort(np.asarray(scores, dtype=float).ravel())
    if s.size == 0 or not np.all(np.isfinite(s)):
        raise ValueError("need at least one finite calibration score")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    k = math.ceil((s.size + 1) * (1 - alpha))
    return float(s[k - 1]) if k <= s.size else math.inf


def conformal_sets(
    cal_probs: ArrayLike, cal_labels: ArrayLike, test_probs: ArrayLike, *, alpha: float
) -> np.ndarray:
    """Split conformal prediction sets with the score 1 - p(true class).

    1) on the calibration cases, s_i = 1 - p_i(y_i);  2) q_hat = :func:`conformal_quantile`;
    3) a test case's set is every class c with 1 - p(c) <= q_hat. The sets contain the true
    class with probability >= 1 - alpha over calibration and test draws (marginal coverage),
    whatever the model, as long as the cases are exchangeable.

    Args:
        cal_probs: (n, C) class probabilities of the calibration cases.
        cal_labels: (n,) their true classes in 0..C-1.
        test_probs: (m, C) class probabilities of the test cases.
        alpha: the allowed miscoverage, e.g. 0.05.

    Returns:
        (m, C) bool, True where the class is in the set.

    Taught in notebooks/14_case_studies.
    """
    cal = _probabilities(cal_probs, "cal_probs")
    test = _probabilities(test_probs, "test_probs")
    labels = np.asarray(cal_labels)
    if cal.ndim != 2 or test.ndim != 2 or cal.shape[1] != test.shape[1]:
        raise ValueError(
            f"expected cal_probs (n, C) and test_probs (m, C), got {cal.shape} and {test.shape}"
        )
    if labels.shape != (cal.shape[0],) or not np.isin(labels, np.arange(cal.shape[1])).all():
        raise ValueError(
            f"expected cal_labels of shape ({cal.shape[0]},) with classes 0..{cal.shape[1] - 1}"
        )
    q_hat = conformal_quantile(1 - cal[np.arange(len(labels)), labels.astype(int)], alpha)
    return (1 - test) <= q_hat


# --- 2. detection --------------------------------------------------------------------------


def precision_at_k(y_true: ArrayLike, scores: ArrayLike, k: int) -> float:
    """The fraction of true positives among the k highest scores (the k alarms an analyst reads).

    Ties at the k-th score are broken by the order of the cases (stable sort).

    Taught in notebooks/14_case_studies.
    """
    y, s = _labels_scores(y_true, scores)
    utils.positive_int(k=k)
    if k > len(y):
        raise ValueError(f"k={k} is larger than the {len(y)} cases")
    top = np.argsort(-s, kind="stable")[:k]
    return float(y[top].mean())


def threshold_at_detection_rate(
    y_true: ArrayLike, scores: ArrayLike, detection_rate: float
) -> float:
    """The highest threshold t with P(score >= t | anomaly) >= ``detection_rate``.

    Taught in notebooks/14_case_studies.
    """
    y, s = _labels_scores(y_true, scores)
    if not 0 < detection_rate <= 1:
        raise ValueError(f"detection_rate must lie in (0, 1], got {detection_rate}")
    pos = np.sort(s[y == 1])[::-1]  # anomalies' scores, highest first
    k = math.ceil(detection_rate * len(pos) - 1e-9)  # how many must be caught
    return float(pos[k - 1])


def alarms_per_hour(
    y_true: ArrayLike, scores: ArrayLike, *, detection_rate: float, events_per_hour: float
) -> float:
    """False alarms per hour when the threshold catches ``detection_rate`` of the anomalies.

    The number an operator lives with: (false-positive rate at that threshold) x (normal
    events per hour). ``events_per_hour`` counts the normal events of the stream.

    Args:
        y_true: (N,) 1 = anomaly, 0 = normal.
        scores: (N,) anomaly scores.
        detection_rate: the share of anomalies that must raise an alarm, e.g. 0.9.
        events_per_hour: normal events per hour in the monitored stream.

    Returns:
        False alarms per hour.

    Taught in notebooks/14_case_studies.
    """
    utils.positive_float(events_per_hour=events_per_hour)
    t = threshold_at_detection_rate(y_true, scores, detection_rate)
    y, s = _labels_scores(y_true, scores)
    return float((s[y == 0] >= t).mean() * events_per_hour)


def agreement_score(probs_a: ArrayLike, probs_b: ArrayLike, *, eps: float = 1e-12) -> np.ndarray:
    """Cross-modal disagreement: -log sum_c p_a(c) p_b(c), higher = more anomalous.

    sum_c p_a(c) p_b(c) is the probability that the two heads, each drawing a class from its
    own prediction, name the same class. It is small when they confidently disagree (a
    spoken word that does not match the picture) and when both are unsure (an event type
    neither has seen).

    Args:
        probs_a: (N, C) class probabilities from one modality's head.
        probs_b: (N, C) from the other's.
        eps: floor inside the log.

    Returns:
        (N,) scores.

    Taught in notebooks/14_case_studies.
    """
    a, b = _probabilities(probs_a, "probs_a"), _probabilities(probs_b, "probs_b")
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"expected two (N, C) arrays of the same shape, got {a.shape}, {b.shape}")
    return -np.log(np.sum(a * b, axis=1) + eps)


# --- 3. time series ----------------------------------------------------------------------


def walk_forward_splits(
    num_samples: int,
    *,
    train_size: int,
    test_size: int,
    gap: int = 0,
    expanding: bool = False,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Rolling (or expanding) train/test index windows in time order, never looking ahead.

    Fold k tests on ``[s_k, s_k + test_size)`` with ``s_k = train_size + gap + k * test_size``
    and trains on the ``train_size`` indices before ``s_k - gap`` (all of them from 0 when
    ``expanding``). The ``gap`` drops the samples whose labels overlap the test window (a
    label that looks h steps ahead needs ``gap = h - 1``). The last fold may be shorter.

    Args:
        num_samples: N, samples in time order.
        train_size: samples in each (first) training window.
        test_size: samples in each test window; the windows tile the future without overlap.
        gap: samples left out between train and test.
        expanding: grow the training window from index 0 instead of rolling it.

    Returns:
        A list of ``(train_indices, test_indices)``.

    Taught in notebooks/14_case_studies.
    """
    utils.positive_int(num_samples=num_samples, train_size=train_size, test_size=test_size)
    utils.non_negative_int(gap=gap)
    if train_size + gap >= num_samples:
        raise ValueError(
            f"train_size + gap ({train_size} + {gap}) leaves no test samples of {num_samples}"
        )
    folds = []
    for start in range(train_size + gap, num_samples, test_size):
        train_end = start - gap
        train = np.arange(0 if expanding else train_end - train_size, train_end)
        folds.append((train, np.arange(start, min(start + test_size, num_samples))))
    return folds


def _pair(pred: ArrayLike, returns: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    p, r = np.asarray(pred, dtype=float), np.asarray(returns, dtype=float)
    if p.ndim != 1 or p.shape != r.shape:
        raise ValueError(f"expected two (T,) arrays of the same shape, got {p.shape}, {r.shape}")
    if not (np.all(np.isfinite(p)) and np.all(np.isfinite(r))):
        raise ValueError("predictions and returns must be finite")
    return p, r


def directional_accuracy(pred: ArrayLike, returns: ArrayLike) -> float:
    """The share of periods where the predicted direction sign(pred) equals sign(return).

    Periods with a zero return or a zero prediction count as misses.

    Taught in notebooks/14_case_studies.
    """
    p, r = _pair(pred, returns)
    return float(np.mean(np.sign(p) * np.sign(r) > 0))


def information_coefficient(pred: ArrayLike, returns: ArrayLike) -> float:
    """The information coefficient: Spearman's rank correlation of predictions and returns.

    Returns NaN when either side is constant (e.g. buy-and-hold has no ranking).

    Taught in notebooks/14_case_studies.
    """
    p, r = _pair(pred, returns)
    if np.ptp(p) == 0 or np.ptp(r) == 0:
        return math.nan
    return float(np.corrcoef(rankdata(p), rankdata(r))[0, 1])


def strategy_returns(positions: ArrayLike, returns: ArrayLike, *, cost: float = 0.0) -> np.ndarray:
    """Per-period returns of holding ``positions[t]`` over period t, after trading costs.

    r_t^strategy = w_t r_t - c |w_t - w_{t-1}|, with w_{-1} = 0 (the first position is
    bought). ``cost`` is the fraction of the traded amount lost to spread and fees
    (5 basis points = 0.0005); flipping from long (+1) to short (-1) trades 2 units.

    Args:
        positions: (T,) positions w_t, decided before period t's return is known.
        returns: (T,) the asset's returns over each period.
        cost: c >= 0.

    Returns:
        (T,) strategy returns.

    Taught in notebooks/14_case_studies.
    """
    w, r = _pair(positions, returns)
    if cost < 0:
        raise ValueError(f"cost must be >= 0, got {cost}")
    turnover = np.abs(np.diff(w, prepend=0.0))  # (T,) |w_t - w_{t-1}|
    return w * r - cost * turnover


def sharpe_ratio(returns: ArrayLike, *, periods_per_year: int = 252) -> float:
    """The annualised Sharpe ratio, mean / std * sqrt(periods per year) (risk-free rate 0).

    Taught in notebooks/14_case_studies.
    """
    r = np.asarray(returns, dtype=float)
    utils.positive_int(periods_per_year=periods_per_year)
    if r.ndim != 1 or r.size < 2:
        raise ValueError(f"expected (T,) returns with T >= 2, got shape {r.shape}")
    std = r.std(ddof=1)
    return 0.0 if std == 0 else float(r.mean() / std * math.sqrt(periods_per_year))


# the generated market -----------------------------------------------------------------

COMPANIES = ("Acme Corp", "Globex", "Initech", "Umbrella Group")
HEADLINES = {
    "positive": (
        "{c} beats earnings expectations",
        "{c} raises its full-year outlook",
        "analysts upgrade {c} after strong orders",
        "{c} wins a major new contract",
        "demand surges for {c} products",
    ),
    "negative": (
        "{c} misses earnings expectations",
        "{c} cuts its full-year outlook",
        "analysts downgrade {c} after weak orders",
        "{c} loses a major customer",
        "regulators open an investigation into {c}",
    ),
    "neutral": (
        "{c} to hold its annual meeting next month",
        "{c} appoints a new board member",
        "{c} moves its headquarters across town",
    ),
}


# A handful of hand-written, labelled sentences (+1 / -1 / 0) in words that never occur in
# HEADLINES: a sentiment probe trained on their MiniLM embeddings must transfer to new wording.
SENTIMENT_EXAMPLES = {
    1: (
        "profits rose sharply this quarter",
        "the company reported record sales",
        "shares jumped after the results",
        "investors cheered the strong forecast",
        "the firm signed a lucrative deal",
        "revenue grew faster than expected",
        "the outlook was raised",
        "the rating was upgraded",
    ),
    -1: (
        "profits fell sharply this quarter",
        "the company reported a heavy loss",
        "shares slumped after the results",
        "investors fled after the weak forecast",
        "the firm lost an important client",
        "revenue shrank more than expected",
        "the outlook was lowered",
        "the rating was downgraded",
        "authorities are probing the firm for fraud",
    ),
    0: (
        "the company will publish its report on Tuesday",
        "the chief executive gave a speech",
        "the firm changed its logo",
        "a new office opened downtown",
        "the board meets next week",
    ),
}


@dataclass
class MarketConfig:
    """A generated market: a two-state regime, daily returns, one template headline a day.

    Taught in notebooks/14_case_studies.
    """

    num_days: int = 2000  # T: trading days
    lead: int = 5  # a headline's tone reflects the regime this many days ahead
    stay_probability: float = 0.97  # P(regime unchanged from one day to the next)
    bull_drift: float = 0.0015  # mean daily return in the bull regime
    bear_drift: float = -0.002  # mean daily return in the bear regime
    bull_vol: float = 0.008  # daily return std in the bull regime
    bear_vol: float = 0.012  # daily return std in the bear regime
    tone_accuracy: float = 0.8  # P(a non-neutral headline's tone matches the future regime)
    neutral_share: float = 0.3  # share of headlines with no tone at all

    def __post_init__(self) -> None:
        utils.positive_int(num_days=self.num_days)
        utils.non_negative_int(lead=self.lead)
        utils.fraction(
            stay_probability=self.stay_probability,
            tone_accuracy=self.tone_accuracy,
            neutral_share=self.neutral_share,
        )
        utils.positive_float(bull_vol=self.bull_vol, bear_vol=self.bear_vol)


def generate_market(config: MarketConfig, *, seed: int = 0) -> dict[str, Any]:
    """Regime-switching returns and headlines whose tone leads the regime by ``config.lead`` days.

    1) regime z_t in {bull = 1, bear = 0}, a Markov chain that stays with probability
       ``stay_probability``; 2) return r_t ~ N(drift_{z_t}, vol_{z_t}^2); 3) headline h_t:
       with probability ``neutral_share`` a neutral template, else a positive one if
       z_{t + lead} is bull (a negative one if bear) with probability ``tone_accuracy``, the
       opposite tone otherwise. The company and the template are drawn uniformly.

    Args:
        config: the :class:`MarketConfig`.
        seed: seeds everything.

    Returns:
        dict with ``returns`` (T,), ``regime`` (T,) int, ``headline`` list of T str and
        ``tone`` (T,) int in {+1, -1, 0}.

    Taught in notebooks/14_case_studies.
    """
    utils.non_negative_int(seed=seed)
    rng = np.random.default_rng(seed)
    T, L = config.num_days, config.lead
    regime = np.empty(T + L, dtype=int)
    regime[0] = rng.integers(2)
    switch = rng.random(T + L) > config.stay_probability
    for t in range(1, T + L):
        regime[t] = 1 - regime[t - 1] if switch[t] else regime[t - 1]
    drift = np.where(regime[:T] == 1, config.bull_drift, config.bear_drift)
    vol = np.where(regime[:T] == 1, config.bull_vol, config.bear_vol)
    returns = drift + vol * rng.standard_normal(T)
    future = np.where(regime[L : T + L] == 1, 1, -1)  # (T,) the regime `lead` days ahead
    correct = rng.random(T) < config.tone_accuracy
    tone = np.where(correct, future, -future)
    tone[rng.random(T) < config.neutral_share] = 0
    names = {1: "positive", -1: "negative", 0: "neutral"}
    headlines = []
    for t in range(T):
        templates = HEADLINES[names[int(tone[t])]]
        template = templates[rng.integers(len(templates))]
        headlines.append(template.format(c=COMPANIES[rng.integers(len(COMPANIES))]))
    return {"returns": returns, "regime": regime[:T], "headline": headlines, "tone": tone}


def trailing_mean(x: ArrayLike, window: int) -> np.ndarray:
    """(T, ...) -> the mean of rows t - window + 1 .. t (fewer at the start): past only.

    Taught in notebooks/14_case_studies.
    """
    x = np.asarray(x, dtype=float)
    utils.positive_int(window=window)
    csum = np.cumsum(np.concatenate([np.zeros((1, *x.shape[1:])), x]), axis=0)  # (T + 1, ...)
    t = np.arange(1, len(x) + 1)
    start = np.maximum(0, t - window)
    count = (t - start).reshape(-1, *([1] * (x.ndim - 1)))
    return (csum[t] - csum[start]) / count


# --- 4. retrieval --------------------------------------------------------------------------


def _similarity_relevant(
    similarity: ArrayLike, relevant: ArrayLike
) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(similarity, dtype=float)
    rel = np.asarray(relevant).astype(bool)
    if s.ndim != 2 or rel.shape != s.shape:
        raise ValueError(
            f"expected similarity and relevant of the same shape (Q, G), got {s.shape}, {rel.shape}"
        )
    if not rel.any(axis=1).all():
        raise ValueError("every query needs at least one relevant gallery item")
    return s, rel


def recall_at_k(similarity: ArrayLike, relevant: ArrayLike, k: int) -> float:
    """R@k: the share of queries with at least one relevant item among their top k.

    The definition of CLIP-style retrieval papers (a hit rate); ties are broken by the
    gallery order (stable sort).

    Args:
        similarity: (Q, G) scores of every query against every gallery item.
        relevant: (Q, G) bool, True where the gallery item answers the query.
        k: how many results the user looks at.

    Returns:
        R@k in [0, 1].

    Taught in notebooks/14_case_studies.
    """
    s, rel = _similarity_relevant(similarity, relevant)
    utils.positive_int(k=k)
    top = np.argsort(-s, axis=1, kind="stable")[:, :k]  # (Q, k)
    return float(np.take_along_axis(rel, top, axis=1).any(axis=1).mean())


def average_precision(similarity: ArrayLike, relevant: ArrayLike) -> np.ndarray:
    """Per-query average precision: the mean of precision@rank over the ranks of the relevant items.

    Args:
        similarity: (Q, G) scores; relevant: (Q, G) bool.

    Returns:
        (Q,) AP values; their mean is mAP.

    Taught in notebooks/14_case_studies.
    """
    s, rel = _similarity_relevant(similarity, relevant)
    order = np.argsort(-s, axis=1, kind="stable")
    hits = np.take_along_axis(rel, order, axis=1)  # (Q, G) relevance in ranked order
    precision = np.cumsum(hits, axis=1) / np.arange(1, s.shape[1] + 1)  # (Q, G) precision@rank
    return (precision * hits).sum(axis=1) / hits.sum(axis=1)


def mean_average_precision(similarity: ArrayLike, relevant: ArrayLike) -> float:
    """mAP: the mean over queries of :func:`average_precision`.

    Taught in notebooks/14_case_studies.
    """
    return float(average_precision(similarity, relevant).mean())


def index_memory_bytes(
    num_vectors: int,
    dim: int,
    *,
    kind: str = "flat",
    hnsw_m: int = 32,
    pq_bytes: int = 64,
    nlist: int = 0,
    shards: int = 1,
) -> float:
    """Approximate memory of a vector index per shard, in bytes (the arithmetic, not a measurement).

    - ``"flat"``: N d 4 (float32 vectors);
    - ``"hnsw"``: N (d 4 + 2 M 4): the vectors plus about 2M neighbour ids (int32) per vector
      on the bottom layer (the upper layers add a few percent);
    - ``"ivfpq"``: N (m + 8) + nlist d 4: an m-byte PQ code and an int64 id per vector, plus
      the coarse centroids (the PQ codebooks, 256 d 4 bytes, are negligible);
    each divided across ``shards`` machines (only the vectors; the centroids are replicated).

    Args:
        num_vectors: N. dim: d. kind: "flat", "hnsw" or "ivfpq". hnsw_m: M.
        pq_bytes: m, bytes per PQ code. nlist: coarse cells of an IVF index. shards: machines.

    Returns:
        Bytes on each shard.

    Taught in notebooks/14_case_studies.
    """
    utils.positive_int(num_vectors=num_vectors, dim=dim, shards=shards)
    utils.one_of("kind", kind, ("flat", "hnsw", "ivfpq"))
    per_shard = num_vectors / shards
    if kind == "flat":
        return per_shard * dim * 4
    if kind == "hnsw":
        utils.positive_int(hnsw_m=hnsw_m)
        return per_shard * (dim * 4 + 2 * hnsw_m * 4)
    utils.positive_int(pq_bytes=pq_bytes)
    utils.non_negative_int(nlist=nlist)
    return per_shard * (pq_bytes + 8) + nlist * dim * 4


# --- 5. the medical data, model cards ------------------------------------------------------

VIEWS = ("mean", "se", "worst")  # the three groups of the 30 breast-cancer measurements


def breast_cancer_views() -> dict[str, Any]:
    """The Wisconsin diagnostic breast-cancer data (real, 569 cases) as three views.

    Each case has 10 measurements of the cell nuclei in a digitised image of a fine-needle
    aspirate (radius, texture, perimeter, area, smoothness, compactness, concavity, concave
    points, symmetry, fractal dimension), summarised three ways: their mean over the nuclei,
    their standard error, and the "worst" (mean of the three largest values).

    Returns:
        dict with ``X`` (569, 30) float, ``y`` (569,) int with **1 = malignant** (sklearn's
        target counts benign as 1; we flip it so that the positive class is the disease),
        ``views`` {"mean": column indices, "se": ..., "worst": ...} and ``feature_names``.

    Taught in notebooks/14_case_studies.
    """
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    names = list(data.feature_names)
    views = {
        "mean": np.array([i for i, n in enumerate(names) if n.startswith("mean ")]),
        "se": np.array([i for i, n in enumerate(names) if n.endswith(" error")]),
        "worst": np.array([i for i, n in enumerate(names) if n.startswith("worst ")]),
    }
    return {"X": data.data, "y": 1 - data.target, "views": views, "feature_names": names}


def model_card(
    name: str,
    *,
    intended_use: str,
    data: str,
    metrics: Mapping[str, str | float],
    limits: Sequence[str],
    risks: Sequence[str],
    before_deployment: Sequence[str],
) -> str:
    """A short model card (Mitchell et al. 2019) as Markdown, with the measured numbers in it.

    Args:
        name: the model's name.
        intended_use: who uses it, for what, and what it is not for.
        data: what it was trained and evaluated on, real or generated.
        metrics: {metric name: value or formatted string}, measured in this run.
        limits, risks, before_deployment: bullet points.

    Returns:
        The Markdown text.

    Taught in notebooks/14_case_studies.
    """
    if not metrics:
        raise ValueError("a model card needs at least one measured metric")

    def show(v: str | float) -> str:
        return v if isinstance(v, str) else f"{v:.3f}"

    lines = [f"### Model card: {name}", "", f"**Intended use.** {intended_use}", ""]
    lines += [f"**Data.** {data}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {show(v)} |" for k, v in metrics.items()]
    for title, items in (
        ("Limits", limits),
        ("Risks", risks),
        ("Before real deployment", before_deployment),
    ):
        lines += ["", f"**{title}.**"] + [f"- {item}" for item in items]
    return "\n".join(lines)
