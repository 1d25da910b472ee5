"""Real/bogus metrics in plain numpy: PR/ROC, operating points, bootstrap CIs, calibration.

Conventions: ``y`` is 1 for real and 0 for bogus, ``score`` is larger for "more real". Ties in
score are handled as scikit-learn does (a threshold admits every triplet at or above it), and
:func:`average_precision` and :func:`roc_auc` equal scikit-learn's ``average_precision_score``
and ``roc_auc_score`` (tested on fixed examples).

Operating points follow the survey convention: "FNR at FPR = 1%" is the fraction of real
transients lost at the most permissive threshold whose false-positive rate is still ≤ 1%.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np


def _check(y, score) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y).astype(np.int64).ravel()
    score = np.asarray(score, dtype=np.float64).ravel()
    if y.shape != score.shape:
        raise ValueError(f"labels {y.shape} and scores {score.shape} differ in length")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (bogus) or 1 (real)")
    if not np.isfinite(score).all():
        raise ValueError("scores must be finite")
    return y, score


def binary_curve(y, score) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative counts at each distinct threshold, from the highest score down.

    Returns
    -------
    fp, tp : (T,) int arrays, false and true positives of ``score >= thresholds[i]``.
    thresholds : (T,) distinct scores in decreasing order.
    """
    y, score = _check(y, score)
    order = np.argsort(-score, kind="mergesort")
    s, yy = score[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each tied run
    tp = np.cumsum(yy)[last]
    fp = (last + 1) - tp
    return fp, tp, s[last]


def roc_curve(y, score) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), starting at (0, 0) with threshold +inf."""
    fp, tp, thr = binary_curve(y, score)
    n_pos, n_neg = tp[-1], fp[-1]
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC needs both real and bogus examples")
    return (np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos], np.r_[np.inf, thr])


def pr_curve(y, score) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, thresholds) at each distinct threshold, highest threshold first."""
    fp, tp, thr = binary_curve(y, score)
    if tp[-1] == 0:
        raise ValueError("precision-recall needs at least one real example")
    return tp / (tp + fp), tp / tp[-1], thr


def average_precision(y, score) -> float:
    """AUCPR as average precision: Σ (R_n − R_{n−1}) P_n (scikit-learn's definition)."""
    precision, recall, _ = pr_curve(y, score)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def roc_auc(y, score) -> float:
    """Area under the ROC curve (trapezoidal, ties counted half)."""
    fpr, tpr, _ = roc_curve(y, score)
    return float(np.trapezoid(tpr, fpr))


def fnr_at_fpr(y, score, fpr: float = 0.01) -> tuple[float, float]:
    """Fraction of reals missed at the lowest threshold with false-positive rate ≤ ``fpr``.

    Returns
    -------
    (fnr, threshold): reals with ``score >= threshold`` are kept.
    """
    rates, tpr, thr = roc_curve(y, score)
    ok = np.flatnonzero(rates <= fpr + 1e-12)
    i = ok[-1]  # rates grow as the threshold falls: the last admissible point is the loosest
    return float(1.0 - tpr[i]), float(thr[i])


def fpr_at_fnr(y, score, fnr: float = 0.01) -> tuple[float, float]:
    """False-positive rate at the highest threshold that loses at most ``fnr`` of the reals.

    Returns
    -------
    (fpr, threshold).
    """
    rates, tpr, thr = roc_curve(y, score)
    ok = np.flatnonzero(1.0 - tpr <= fnr + 1e-12)
    i = ok[0]
    return float(rates[i]), float(thr[i])


@dataclass(frozen=True)
class ThresholdReport:
    """Classification at one threshold (``score >= threshold`` is called real)."""

    threshold: float
    tp: int
    fp: int
    tn: int
    fn: int
    precision: float
    recall: float
    f1: float
    fpr: float
    fnr: float

    def as_dict(self) -> dict:
        return asdict(self)


def threshold_report(y, score, threshold: float = 0.5) -> ThresholdReport:
    """Confusion matrix, precision, recall and F1 at ``threshold``."""
    y, score = _check(y, score)
    pred = score >= threshold
    tp = int(np.sum(pred & (y == 1)))
    fp = int(np.sum(pred & (y == 0)))
    fn = int(np.sum(~pred & (y == 1)))
    tn = int(np.sum(~pred & (y == 0)))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return ThresholdReport(float(threshold), tp, fp, tn, fn, precision, recall, f1,
                           fp / (fp + tn) if fp + tn else 0.0, fn / (fn + tp) if fn + tp else 0.0)


def reliability_curve(y, prob, n_bins: int = 10) -> dict:
    """Reliability diagram on equal-width probability bins.

    Returns
    -------
    dict of (n_bins,) arrays: ``bin_lo``, ``bin_hi``, ``mean_prob`` (mean predicted
    probability, NaN in empty bins), ``frac_real`` (observed fraction real) and ``count``;
    and ``ece``, the expected calibration error Σ (n_b / N) |frac_real − mean_prob|.
    """
    y, prob = _check(y, prob)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(prob, edges[1:-1], right=False), 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_prob = np.bincount(idx, prob, n_bins) / count
        frac = np.bincount(idx, y.astype(float), n_bins) / count
    filled = count > 0
    ece = float(np.sum(count[filled] / len(y) * np.abs(frac[filled] - mean_prob[filled])))
    return {"bin_lo": edges[:-1], "bin_hi": edges[1:], "mean_prob": mean_prob,
            "frac_real": frac, "count": count, "ece": ece}


def expected_calibration_error(y, prob, n_bins: int = 10) -> float:
    return reliability_curve(y, prob, n_bins)["ece"]


def log_loss(y, prob, eps: float = 1e-7) -> float:
    y, prob = _check(y, prob)
    p = np.clip(prob, eps, 1 - eps)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def sigmoid(z) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -z))


def fit_temperature(logits, y) -> float:
    """Temperature T > 0 minimising the log loss of ``sigmoid(logits / T)`` (Guo et al. 2017).

    Fitted on validation data; T > 1 softens an over-confident network. The ranking (and so
    AUCPR, ROC-AUC, FNR at fixed FPR) is unchanged.
    """
    from scipy.optimize import minimize_scalar

    y = np.asarray(y, dtype=np.float64).ravel()
    z = np.asarray(logits, dtype=np.float64).ravel()

    def nll(log_t: float) -> float:
        a = z / np.exp(log_t)
        # log(1 + e^-a) for y=1, log(1 + e^a) for y=0, computed stably
        return float(np.mean(np.logaddexp(0.0, -a) * y + np.logaddexp(0.0, a) * (1 - y)))

    res = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(res.x))


def calibrate(logits, y, fpr: float = 0.01) -> tuple[float, float]:
    """Temperature fitted on ``(logits, y)`` and the probability threshold at FPR ``fpr``.

    With one class only there is no FPR to hold: the threshold is 0.5. When no threshold
    reaches ``fpr`` with any real kept (+inf), it is 1.0, which keeps (almost) nothing.
    """
    temperature = fit_temperature(logits, y)
    if len(np.unique(y)) < 2:
        return temperature, 0.5
    _, threshold = fnr_at_fpr(y, sigmoid(np.asarray(logits) / temperature), fpr)
    return temperature, min(float(threshold), 1.0)


def bootstrap_ci(metric: Callable[[np.ndarray, np.ndarray], float], y, score, *,
                 groups=None, n_boot: int = 1000, level: float = 0.95, seed: int = 0
                 ) -> tuple[float, float, float]:
    """Percentile bootstrap confidence interval of ``metric(y, score)``.

    With ``groups`` (e.g. pair or field ids) whole groups are resampled, since triplets from
    one image pair are not independent. Resamples in which the metric is undefined (a class
    missing) are dropped.

    Returns
    -------
    (value on the full data, low, high).
    """
    y, score = _check(y, score)
    rng = np.random.default_rng(seed)
    value = float(metric(y, score))
    if groups is None:
        codes = np.arange(len(y))
    else:
        codes = np.unique(np.asarray(groups).astype(str), return_inverse=True)[1].ravel()
    n_groups = int(codes.max()) + 1 if len(codes) else 0
    rows = np.arange(len(y))
    samples = []
    for _ in range(n_boot):
        # each group drawn k times contributes its rows k times
        mult = np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups)
        idx = np.repeat(rows, mult[codes])
        yb = y[idx]
        if yb.min() == yb.max():
            continue
        try:
            samples.append(metric(yb, score[idx]))
        except ValueError:
            continue
    if not samples:
        return value, float("nan"), float("nan")
    alpha = (1 - level) / 2
    lo, hi = np.quantile(np.asarray(samples, dtype=float), [alpha, 1 - alpha])
    return value, float(lo), float(hi)


def classification_metrics(y, prob, *, threshold: float = 0.5, groups=None, n_boot: int = 1000,
                           seed: int = 0) -> dict:
    """Every headline metric with 95% bootstrap intervals, as a JSON-ready dict.

    Keys: ``n, n_real, n_bogus, aucpr, roc_auc, fnr_at_fpr1, fpr_at_fnr1`` (each
    ``{"value", "ci95"}``, the operating points with their threshold), ``at_threshold``
    (confusion matrix, precision, recall, F1), ``ece``, ``log_loss``.
    """
    y, prob = _check(y, prob)
    out: dict = {"n": int(len(y)), "n_real": int(y.sum()), "n_bogus": int((1 - y).sum())}
    if out["n_real"] == 0 or out["n_bogus"] == 0:
        out["note"] = "one class only: ranking metrics undefined"
        out["at_threshold"] = threshold_report(y, prob, threshold).as_dict()
        return out
    kw = {"groups": groups, "n_boot": n_boot, "seed": seed}
    for key, fn in (("aucpr", average_precision), ("roc_auc", roc_auc)):
        v, lo, hi = bootstrap_ci(fn, y, prob, **kw)
        out[key] = {"value": v, "ci95": [lo, hi]}
    v, lo, hi = bootstrap_ci(lambda a, b: fnr_at_fpr(a, b, 0.01)[0], y, prob, **kw)
    out["fnr_at_fpr1"] = {"value": v, "ci95": [lo, hi], "threshold": fnr_at_fpr(y, prob, 0.01)[1]}
    v, lo, hi = bootstrap_ci(lambda a, b: fpr_at_fnr(a, b, 0.01)[0], y, prob, **kw)
    out["fpr_at_fnr1"] = {"value": v, "ci95": [lo, hi], "threshold": fpr_at_fnr(y, prob, 0.01)[1]}
    out["at_threshold"] = threshold_report(y, prob, threshold).as_dict()
    out["ece"] = expected_calibration_error(y, prob)
    out["log_loss"] = log_loss(y, prob)
    return out
