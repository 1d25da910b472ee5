"""Honest evaluation of a real/bogus model on held-out triplets (``astrid evaluate``).

Writes to the output directory:

``metrics.json``
    Overall metrics with 95% bootstrap intervals (resampling whole image pairs, since the
    triplets of one pair share PSF, depth and artefacts), the confusion matrix at the model's
    threshold, calibration (reliability curve, ECE), and the same per S/N bin, per kind (for a
    single class: its recall or its false-positive rate), per mission and per filter.
``pr.png, roc.png, reliability.png, scores.png``
    Precision-recall and ROC curves (operating point marked), reliability diagram, score
    histograms by label.
``worst_misses.png, worst_false_positives.png``
    The reals with the lowest scores and the boguses with the highest.
``summary.md``
    A short human-readable summary.

:func:`cross_evaluate` trains on some groups (missions, filters, PSF regimes of the simulated
survey) and tests on others, which measures how a model transfers to data it never saw.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from astrid.errors import AstridError
from astrid.ml import metrics as M
from astrid.ml.data import LABEL_BOGUS, LABEL_REAL, SPLITS, load_dataset
from astrid.provenance import (
    atomic_path,
    provenance,
    write_json_atomic,
    write_table_atomic,
    write_text_atomic,
)

SNR_BINS = (0.0, 5.0, 7.0, 10.0, 20.0, 50.0, np.inf)
N_BOOT = 1000


def evaluate(model_dir, dataset_path, out_dir, split: str = "test", *,
             split_override: pd.Series | None = None, backend: str = "onnx",
             n_boot: int = N_BOOT, group_col: str = "pair_id") -> dict:
    """Score a dataset split with a model and write metrics, plots and a summary.

    Parameters
    ----------
    model_dir : model directory.
    dataset_path : triplet dataset.
    out_dir : output directory (created).
    split : ``"test"``, ``"val"``, ``"train"`` or ``"all"`` (every labelled triplet).
    split_override : split column to use instead of the dataset's (aligned with its rows).
    backend : scoring backend.
    n_boot : bootstrap resamples.
    group_col : column whose groups the bootstrap resamples.

    Returns
    -------
    The ``metrics.json`` content.
    """
    from astrid.ml.score import read_model_info, resolve_model_dir, score_triplets

    model_dir = resolve_model_dir(model_dir)
    info = read_model_info(model_dir)
    stamps, meta = load_dataset(dataset_path)
    labelled = meta["label"].isin((LABEL_REAL, LABEL_BOGUS)).to_numpy()
    splits = _resolve_split(meta, labelled, model_dir, split_override)
    if split == "all":
        rows = np.flatnonzero(labelled)
    elif split in SPLITS:
        rows = np.flatnonzero(labelled & (splits == split))
    else:
        raise AstridError(f"unknown split {split!r} (use test, val, train or all)")
    if len(rows) == 0:
        raise AstridError(f"{dataset_path}: no labelled triplets in split {split!r}")
    sub = meta.iloc[rows].reset_index(drop=True)
    raw = stamps[rows]
    prob = score_triplets(raw, model_dir, backend).astype(np.float64)
    y = sub["label"].to_numpy().astype(int)
    threshold = float(info.get("threshold", 0.5))
    groups = sub[group_col].to_numpy() if group_col in sub else None

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "model": str(model_dir), "architecture": info.get("architecture"),
        "dataset": str(dataset_path), "split": split, "threshold": threshold,
        "overall": M.classification_metrics(y, prob, threshold=threshold, groups=groups,
                                            n_boot=n_boot),
        "reliability": {k: v.tolist() if isinstance(v, np.ndarray) else v
                        for k, v in M.reliability_curve(y, prob).items()},
        "by_snr": breakdown(y, prob, pd.cut(sub["snr"], SNR_BINS, right=False).astype(str),
                            threshold),
        "by_kind": breakdown(y, prob, sub["kind"].astype(str), threshold),
        "by_mission": breakdown(y, prob, sub["mission"].astype(str), threshold),
        "by_filter": breakdown(y, prob, sub["filter"].astype(str), threshold),
        "provenance": provenance(None, [model_dir, dataset_path]),
    }
    write_json_atomic(out_dir / "metrics.json", report)
    scored = sub.assign(score=prob)
    write_table_atomic(out_dir / "scores.csv", scored)
    save_plots(y, prob, threshold, out_dir, title=f"{info.get('architecture')} on {split}")
    save_mistakes(raw, scored, out_dir)
    write_text_atomic(out_dir / "summary.md", summary_markdown(report))
    return report


def _resolve_split(meta: pd.DataFrame, labelled: np.ndarray, model_dir: Path,
                   split_override: pd.Series | None) -> np.ndarray:
    """The split of each row: the override, else the dataset's saved split if it covers the
    labelled rows, else the split the model was trained with (``split.parquet``)."""
    from astrid.ml.train import SPLIT_FILE

    if split_override is not None:
        return np.asarray(split_override, dtype=object).astype(str)
    saved = meta["split"].astype(str).to_numpy()
    if np.isin(saved[labelled], SPLITS).all() or not (model_dir / SPLIT_FILE).exists():
        return saved
    used = pd.read_parquet(model_dir / SPLIT_FILE)
    mapping = dict(zip(used["triplet_id"], used["split"], strict=True))
    return meta["triplet_id"].astype(str).map(mapping).fillna("").to_numpy().astype(str)


def breakdown(y: np.ndarray, prob: np.ndarray, by: pd.Series, threshold: float) -> dict:
    """Metrics per value of ``by``: counts, recall/FPR at the threshold, AUCPR where defined."""
    out = {}
    by = np.asarray(by)
    for value in pd.unique(by):
        sel = by == value
        yy, pp = y[sel], prob[sel]
        rec: dict = {"n": int(sel.sum()), "n_real": int(yy.sum()), "n_bogus": int((1 - yy).sum())}
        if rec["n_real"]:
            rec["recall"] = float(np.mean(pp[yy == 1] >= threshold))
        if rec["n_bogus"]:
            rec["fpr"] = float(np.mean(pp[yy == 0] >= threshold))
        if rec["n_real"] and rec["n_bogus"]:
            rec["aucpr"] = M.average_precision(yy, pp)
            rec["roc_auc"] = M.roc_auc(yy, pp)
            rec["fnr_at_fpr1"] = M.fnr_at_fpr(yy, pp, 0.01)[0]
        out[str(value) if value != "" else "(none)"] = rec
    return out


def save_plots(y, prob, threshold: float, out_dir: Path, title: str = "") -> list[Path]:
    """PR, ROC, reliability and score-histogram PNGs (atomic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    two_classes = 0 < y.sum() < len(y)

    def _save(fig, name):
        path = out_dir / name
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=90, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)

    if two_classes:
        precision, recall, thr = M.pr_curve(y, prob)
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.plot(recall, precision)
        i = np.argmin(np.abs(thr - threshold))
        ax.plot(recall[i], precision[i], "o", label=f"threshold {threshold:.3f}")
        ax.set(xlabel="recall", ylabel="precision",
               title=f"{title}\nAUCPR {M.average_precision(y, prob):.4f}", ylim=(0, 1.02))
        ax.legend(loc="lower left")
        _save(fig, "pr.png")

        fpr, tpr, thr = M.roc_curve(y, prob)
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.semilogx(np.maximum(fpr, 1e-4), 1 - tpr)
        ax.axvline(0.01, color="0.6", ls=":", label="FPR = 1%")
        ax.axhline(0.01, color="0.6", ls="--", label="FNR = 1%")
        ax.set(xlabel="false-positive rate", ylabel="false-negative rate", ylim=(0, 1),
               title=f"{title}\nROC-AUC {M.roc_auc(y, prob):.4f}")
        ax.legend()
        _save(fig, "roc.png")

    rel = M.reliability_curve(y, prob)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], color="0.6", ls=":")
    ok = rel["count"] > 0
    ax.plot(rel["mean_prob"][ok], rel["frac_real"][ok], "o-")
    ax.set(xlabel="predicted probability real", ylabel="observed fraction real",
           title=f"{title}\nECE {rel['ece']:.4f}")
    _save(fig, "reliability.png")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    bins = np.linspace(0, 1, 41)
    for label, name in ((0, "bogus"), (1, "real")):
        if np.any(y == label):
            ax.hist(prob[y == label], bins, histtype="step", lw=1.5, label=f"{name} ({np.sum(y == label)})")
    ax.axvline(threshold, color="k", ls=":")
    ax.set(xlabel="score", ylabel="triplets", yscale="log", title=title)
    ax.legend()
    _save(fig, "scores.png")
    return paths


def save_mistakes(raw, scored: pd.DataFrame, out_dir: Path, n: int = 12) -> list[Path]:
    """Galleries of the lowest-scored reals and highest-scored boguses."""
    paths = []
    for name, sel, ascending in (("worst_misses.png", scored["label"] == 1, True),
                                 ("worst_false_positives.png", scored["label"] == 0, False)):
        rows = scored.index[sel.to_numpy()]
        if len(rows) == 0:
            continue
        order = scored.loc[rows, "score"].sort_values(ascending=ascending).index[:n].to_numpy()
        meta = scored.loc[order].reset_index(drop=True)
        meta["kind"] = [f"{k} s={s:.2f}" for k, s in zip(meta["kind"], meta["score"], strict=True)]
        paths.append(save_triplet_grid(np.asarray(raw[order]), meta, out_dir / name,
                                       title=name.removesuffix(".png").replace("_", " ")))
    return paths


def save_triplet_grid(stamps: np.ndarray, meta: pd.DataFrame, png: Path, title: str = "") -> Path:
    """A gallery of triplets: astrid.detect.gallery when present, else a plain grid."""
    try:
        from astrid.detect.gallery import save_gallery
    except ImportError:
        save_gallery = None
    if save_gallery is not None:
        # one group per triplet keeps the order (and the per-triplet score in its name)
        meta = meta.assign(_row=[f"{i:02d} {k}" for i, k in enumerate(meta["kind"])])
        return save_gallery(stamps, meta, png, per_group=1, group_by=("_row",), title=title,
                            max_groups=len(meta))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(stamps), 3, figsize=(4.5, 1.5 * len(stamps)), squeeze=False)
    for i, stamp in enumerate(stamps):
        for k in range(3):
            axes[i, k].imshow(stamp[k], origin="lower", cmap="gray")
            axes[i, k].set_axis_off()
        axes[i, 0].set_title(str(meta["kind"].iloc[i]), fontsize=7, loc="left")
    fig.suptitle(title)
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
    return png


def _fmt(metric: dict | None, pct: bool = False) -> str:
    if not metric:
        return "n/a"
    scale, unit = (100.0, "%") if pct else (1.0, "")
    lo, hi = metric["ci95"]
    return f"{scale * metric['value']:.2f}{unit} [{scale * lo:.2f}, {scale * hi:.2f}]"


def summary_markdown(report: dict) -> str:
    """A short Markdown summary of an evaluation report."""
    o = report["overall"]
    lines = [f"# Evaluation: {report['architecture']} on {report['dataset']} ({report['split']})", "",
             f"{o['n']} triplets: {o['n_real']} real, {o['n_bogus']} bogus. "
             "95% intervals from a bootstrap over image pairs.", "",
             "| metric | value [95% CI] |", "|---|---|",
             f"| AUCPR | {_fmt(o.get('aucpr'))} |",
             f"| ROC-AUC | {_fmt(o.get('roc_auc'))} |",
             f"| FNR at FPR = 1% | {_fmt(o.get('fnr_at_fpr1'), pct=True)} |",
             f"| FPR at FNR = 1% | {_fmt(o.get('fpr_at_fnr1'), pct=True)} |"]
    t = o["at_threshold"]
    lines += [f"| at threshold {t['threshold']:.3f}: precision / recall / F1 | "
              f"{t['precision']:.4f} / {t['recall']:.4f} / {t['f1']:.4f} |",
              f"| confusion (tp, fp, tn, fn) | {t['tp']}, {t['fp']}, {t['tn']}, {t['fn']} |"]
    if "ece" in o:
        lines.append(f"| calibration ECE | {o['ece']:.4f} |")
    lines += ["", "## By kind (recall of reals / FPR of boguses at the threshold)", "",
              "| kind | n | recall | FPR |", "|---|---|---|---|"]
    for kind, r in sorted(report["by_kind"].items()):
        lines.append(f"| {kind} | {r['n']} | {r.get('recall', float('nan')):.3f} | "
                     f"{r.get('fpr', float('nan')):.3f} |")
    lines += ["", "## By S/N", "", "| S/N | n real | recall | n bogus | FPR |", "|---|---|---|---|---|"]
    for b, r in report["by_snr"].items():
        lines.append(f"| {b} | {r['n_real']} | {r.get('recall', float('nan')):.3f} | "
                     f"{r['n_bogus']} | {r.get('fpr', float('nan')):.3f} |")
    return "\n".join(lines) + "\n"


def cross_evaluate(dataset_path, out_dir, regime, train_on, test_on, settings=None, *,
                   n_boot: int = N_BOOT) -> dict:
    """Train on some regimes and test on others (cross-mission / cross-PSF validation).

    Parameters
    ----------
    dataset_path : triplet dataset.
    out_dir : receives ``model/`` and ``eval/``.
    regime : a metadata column name (``mission``, ``filter`` ...) or a Series aligned with the
        dataset's rows (e.g. a PSF-FWHM regime per pair).
    train_on, test_on : regime values to train (with a grouped validation split) and test on.
    settings : :class:`astrid.config.TrainSettings`.

    Returns
    -------
    The test report of :func:`evaluate`, with the regimes recorded.
    """
    from astrid.config import TrainSettings
    from astrid.ml.data import grouped_split
    from astrid.ml.train import train

    settings = settings or TrainSettings()
    _, meta = load_dataset(dataset_path)
    values = (meta[regime] if isinstance(regime, str) else pd.Series(np.asarray(regime))).astype(str)
    train_on, test_on = [str(v) for v in train_on], [str(v) for v in test_on]
    if set(train_on) & set(test_on):
        raise AstridError(f"train and test regimes overlap: {sorted(set(train_on) & set(test_on))}")
    labelled = meta["label"].isin((LABEL_REAL, LABEL_BOGUS)).to_numpy()
    in_train = labelled & values.isin(train_on).to_numpy()
    in_test = labelled & values.isin(test_on).to_numpy()
    if not in_train.any() or not in_test.any():
        raise AstridError("cross evaluation needs labelled triplets in both the train and test regimes")
    split = pd.Series("", index=meta.index, dtype=object)
    val_fraction = settings.val_fraction / (1 - settings.test_fraction)
    split[in_train] = grouped_split(meta.loc[in_train], settings.group_by,
                                    (1 - val_fraction, val_fraction, 0.0), seed=settings.seed)
    split[in_test] = "test"
    out_dir = Path(out_dir)
    train(dataset_path, out_dir / "model", settings, split=split)
    report = evaluate(out_dir / "model", dataset_path, out_dir / "eval", "test",
                      split_override=split, n_boot=n_boot)
    report["cross"] = {"regime": regime if isinstance(regime, str) else "custom",
                       "train_on": train_on, "test_on": test_on}
    write_json_atomic(out_dir / "eval" / "metrics.json", report)
    return report


def evaluate_alerts(model_dir, alert_paths, out_dir, *, n_boot: int = N_BOOT,
                    drb_threshold: float = 0.5) -> dict:
    """Score real survey alerts and compare with the survey's own scores and spectroscopy.

    ZTF packets carry braai's ``drb`` (after mid-2019) and IPAC's ``rb``; Fink adds the TNS
    spectroscopic class (``x_tns``). None of these is human vetting: ``drb`` agreement measures
    how close we come to braai, and the recall of spectroscopically typed supernovae is the
    closest thing to ground truth in these samples.

    Writes ``alerts_metrics.json``, ``alerts_scores.csv`` and ``alerts_disagreements.png`` (the
    triplets where our score and ``drb`` differ most).

    Returns
    -------
    The ``alerts_metrics.json`` content.
    """
    from astrid.alerts import read_alerts
    from astrid.ml.score import read_model_info, resolve_model_dir, score_triplets

    model_dir = resolve_model_dir(model_dir)
    info = read_model_info(model_dir)
    threshold = float(info.get("threshold", 0.5))
    batch = read_alerts(alert_paths)
    prob = score_triplets(batch.stamps, model_dir).astype(np.float64)
    meta = batch.meta.assign(score=prob)
    out: dict = {"model": str(model_dir), "n_alerts": len(meta), "n_problems": len(batch.problems),
                 "threshold": threshold,
                 "by_mission": {m: int(n) for m, n in meta["mission"].value_counts().items()}}
    for ref in ("drb", "rb"):
        if ref not in meta:
            continue
        known = meta[ref].notna().to_numpy() & (meta["mission"] == "ZTF").to_numpy()
        if not known.any():
            continue
        ref_score = meta.loc[known, ref].astype(float).to_numpy()
        y = (ref_score >= drb_threshold).astype(int)
        rec = {"n": int(known.sum()), "n_real": int(y.sum()), "n_bogus": int((1 - y).sum()),
               "agreement_at_thresholds": float(np.mean((prob[known] >= threshold) == (y == 1))),
               "spearman": _spearman(prob[known], ref_score)}
        if 0 < y.sum() < len(y):
            v, lo, hi = M.bootstrap_ci(M.roc_auc, y, prob[known], n_boot=n_boot)
            rec["roc_auc"] = {"value": v, "ci95": [lo, hi]}
            v, lo, hi = M.bootstrap_ci(M.average_precision, y, prob[known], n_boot=n_boot)
            rec["aucpr"] = {"value": v, "ci95": [lo, hi]}
        out[f"vs_{ref}"] = rec
    if "x_tns" in meta:
        typed = meta["x_tns"].astype(str).str.contains("SN", na=False).to_numpy()
        if typed.any():
            out["tns_typed_sn"] = {
                "n": int(typed.sum()),
                "recall_at_threshold": float(np.mean(prob[typed] >= threshold)),
                "recall_at_0.5": float(np.mean(prob[typed] >= 0.5)),
                "scores": {str(c): float(s) for c, s in zip(meta.loc[typed, "candid"], prob[typed],
                                                              strict=True)},
                "types": {str(c): str(t) for c, t in zip(meta.loc[typed, "candid"],
                                                          meta.loc[typed, "x_tns"], strict=True)},
            }
    rubin = (meta["mission"] == "Rubin").to_numpy()
    if rubin.any() and "reliability" in meta:
        rel = meta.loc[rubin, "reliability"].astype(float).to_numpy()
        out["rubin_vs_reliability"] = {"n": int(rubin.sum()), "spearman": _spearman(prob[rubin], rel),
                                       "mean_score": float(prob[rubin].mean())}
    out["provenance"] = provenance(None, [model_dir, *map(str, alert_paths)])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cols = [c for c in ("candid", "objectId", "mission", "filter", "magpsf", "isdiffpos", "rb",
                        "drb", "reliability", "x_tns", "score", "source_file") if c in meta]
    write_table_atomic(out_dir / "alerts_scores.csv", meta[cols])
    if "drb" in meta:
        gap = np.abs(prob - meta["drb"].astype(float).to_numpy())
        order = np.argsort(-np.nan_to_num(gap, nan=-1))[:12]
        order = order[np.isfinite(gap[order])]
        if len(order):
            shown = meta.iloc[order].reset_index(drop=True)
            shown["kind"] = [f"ours {s:.2f} drb {d:.2f}" for s, d in
                             zip(shown["score"], shown["drb"].astype(float), strict=True)]
            save_triplet_grid(batch.stamps[order], shown, out_dir / "alerts_disagreements.png",
                              title="largest disagreements with braai (drb)")
    write_json_atomic(out_dir / "alerts_metrics.json", out)
    return out


def _spearman(a, b) -> float:
    from scipy.stats import spearmanr

    if len(a) < 3:
        return float("nan")
    return float(spearmanr(a, b).statistic)
