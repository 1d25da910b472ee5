"""The real/bogus metrics equal scikit-learn's on fixed examples, and the bootstrap behaves."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve

from astrid.ml import metrics as m


def _examples():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 400)
    # informative but imperfect scores, with ties (rounded) to exercise tie handling
    score = np.round(np.clip(0.35 * y + rng.normal(0.4, 0.2, 400), 0, 1), 2)
    yield y, score
    yield np.array([0, 0, 1, 1, 0, 1, 0, 1]), np.array([0.1, 0.4, 0.35, 0.8, 0.8, 0.9, 0.05, 0.35])
    yield np.array([1, 0, 1, 0]), np.array([0.5, 0.5, 0.5, 0.5])


@pytest.mark.parametrize("y,score", list(_examples()))
def test_ranking_metrics_equal_sklearn(y, score):
    assert m.average_precision(y, score) == pytest.approx(skm.average_precision_score(y, score), abs=1e-12)
    assert m.roc_auc(y, score) == pytest.approx(skm.roc_auc_score(y, score), abs=1e-12)
    fpr, tpr, thr = m.roc_curve(y, score)
    sk_fpr, sk_tpr, sk_thr = skm.roc_curve(y, score, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_allclose(thr[1:], sk_thr[1:])


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.62])
def test_threshold_report_equals_sklearn(threshold):
    y, score = next(_examples())
    rep = m.threshold_report(y, score, threshold)
    pred = (score >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y, pred).ravel()
    assert (rep.tn, rep.fp, rep.fn, rep.tp) == (tn, fp, fn, tp)
    assert rep.precision == pytest.approx(skm.precision_score(y, pred))
    assert rep.recall == pytest.approx(skm.recall_score(y, pred))
    assert rep.f1 == pytest.approx(skm.f1_score(y, pred))


def test_operating_points_on_a_hand_checked_example():
    # 100 bogus with scores 0..0.99, 10 reals: 9 above every bogus, one at 0.975.
    bogus = np.arange(100) / 100
    real = np.r_[np.full(9, 2.0), 0.975]
    y = np.r_[np.zeros(100, int), np.ones(10, int)]
    s = np.r_[bogus, real]
    fnr, thr = m.fnr_at_fpr(y, s, 0.01)
    # FPR <= 1% allows one bogus (0.99) above threshold: threshold 0.99 keeps 9 reals of 10
    assert thr == pytest.approx(0.99) and fnr == pytest.approx(0.1)
    fpr, thr = m.fpr_at_fnr(y, s, 0.01)
    # keeping every real needs threshold 0.975: bogus 0.98 and 0.99 pass -> FPR 2%
    assert thr == pytest.approx(0.975) and fpr == pytest.approx(0.02)


def test_reliability_curve_and_ece_match_sklearn():
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, 2000)
    y = (rng.uniform(0, 1, 2000) < p ** 2).astype(int)  # over-confident probabilities
    rel = m.reliability_curve(y, p, n_bins=10)
    frac, mean = calibration_curve(y, p, n_bins=10, strategy="uniform")
    filled = rel["count"] > 0
    np.testing.assert_allclose(rel["frac_real"][filled], frac)
    np.testing.assert_allclose(rel["mean_prob"][filled], mean)
    assert rel["ece"] > 0.05
    assert m.log_loss(y, p) == pytest.approx(skm.log_loss(y, p), rel=1e-6)


def test_temperature_scaling_recovers_a_known_temperature():
    rng = np.random.default_rng(1)
    true_logit = rng.normal(0, 2, 20000)
    y = (rng.uniform(size=true_logit.size) < m.sigmoid(true_logit)).astype(int)
    # a network 3x over-confident: logits multiplied by 3
    assert m.fit_temperature(3 * true_logit, y) == pytest.approx(3.0, rel=0.05)


def test_calibrate_gives_the_temperature_and_the_threshold_at_one_percent_fpr():
    rng = np.random.default_rng(1)
    true_logit = rng.normal(0, 2, 20000)
    y = (rng.uniform(size=true_logit.size) < m.sigmoid(true_logit)).astype(int)
    temperature, threshold = m.calibrate(3 * true_logit, y)
    assert temperature == pytest.approx(m.fit_temperature(3 * true_logit, y))
    prob = m.sigmoid(3 * true_logit / temperature)
    assert np.mean(prob[y == 0] >= threshold) <= 0.01
    assert np.mean(prob[y == 0] >= threshold - 0.01) > 0.01  # the loosest such threshold
    assert m.calibrate(true_logit[:50], np.ones(50, int))[1] == 0.5  # one class: no FPR
    # every bogus above every real: no threshold keeps a real at 1% FPR; 1.0, not +inf
    logits = np.r_[np.full(20, 5.0), np.linspace(-3, 3, 80)]
    labels = np.r_[np.zeros(20, int), np.ones(80, int)]
    assert m.fnr_at_fpr(labels, m.sigmoid(logits), 0.01)[1] == np.inf
    assert m.calibrate(logits, labels)[1] == 1.0


def test_grouped_bootstrap_is_wider_when_groups_are_correlated():
    rng = np.random.default_rng(2)
    groups = np.repeat(np.arange(20), 50)
    # each group has its own offset: triplets within a group are not independent
    offset = rng.normal(0, 0.3, 20)[groups]
    y = rng.integers(0, 2, groups.size)
    s = 0.3 * y + offset + rng.normal(0, 0.2, groups.size)
    v, lo, hi = m.bootstrap_ci(m.roc_auc, y, s, n_boot=300)
    vg, glo, ghi = m.bootstrap_ci(m.roc_auc, y, s, groups=groups, n_boot=300)
    assert v == vg and lo < v < hi and glo < v < ghi
    assert ghi - glo > hi - lo


def test_classification_metrics_dict():
    y, s = next(_examples())
    out = m.classification_metrics(y, s, n_boot=50)
    assert out["n"] == len(y) and out["n_real"] == int(y.sum())
    lo, hi = out["aucpr"]["ci95"]
    assert lo <= out["aucpr"]["value"] <= hi
    assert 0 <= out["fnr_at_fpr1"]["value"] <= 1


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        m.roc_auc([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError):
        m.average_precision([0, 2], [0.1, 0.2])
