"""The HTML report of a run: one self-contained file a person can open and read.

``write_report(run_dir)`` reads the run's state store and per-pair outputs and writes
``RUN/candidates.csv`` (every scored candidate of every pair) and ``RUN/report.html`` with its
figures embedded as base64 PNGs: run summary, per-pair quality table, completeness against the
truth when it is known, score distributions, galleries of the top candidates with their scores
(and truth), and every failure with its reason. ``astrid report RUN_DIR`` rebuilds it.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from astrid.errors import AstridError
from astrid.provenance import write_table_atomic, write_text_atomic

_QUALITY_COLUMNS = ("overlap", "fwhm_ref", "fwhm_sci", "noise_ratio", "alignment_rms_px",
                    "flux_ratio", "n_candidates", "elapsed_s")
_GALLERY_ROWS = 12


@dataclass(frozen=True)
class Headline:
    """The few numbers a run ends with (truth-dependent ones are None for real data).

    ``real_found``: real transients of the truth with a candidate scored at or above the
    threshold; ``false_positives``: candidates at or above it that are not real.
    """

    n_pairs: int
    n_failed_pairs: int
    n_candidates: int
    n_above_threshold: int
    threshold: float
    n_real_truth: int | None = None
    real_detected: int | None = None
    real_found: int | None = None
    false_positives: int | None = None

    def lines(self) -> list[str]:
        out = [f"pairs: {self.n_pairs} ({self.n_failed_pairs} failed)",
               f"candidates: {self.n_candidates} ({self.n_above_threshold} scored >= "
               f"{self.threshold:g})"]
        if self.n_real_truth is not None:
            out.append(f"real transients found: {self.real_found} of {self.n_real_truth} "
                       f"({self.real_detected} detected before scoring)")
            out.append(f"false positives at threshold {self.threshold:g}: {self.false_positives}")
        return out


@dataclass(frozen=True)
class RunData:
    """Everything the report shows, gathered from a run directory."""

    run_dir: Path
    settings: dict
    runs: list[dict]
    items: dict[str, dict]
    records: pd.DataFrame
    candidates: pd.DataFrame
    truth: pd.DataFrame
    quality: pd.DataFrame


def gather(run_dir: Path) -> RunData:
    """Read the state store and the per-pair outputs of ``run_dir``."""
    from astrid.pipeline.state import open_state

    run_dir = Path(run_dir)
    with open_state(run_dir, create=False) as state:
        runs = state.runs()
        items = state.items()
        records = pd.DataFrame([
            {"stage": r.stage, "item": r.item, "status": r.status, "error": r.error,
             "elapsed_s": r.elapsed_s, "outputs": r.outputs} for r in state.records()],
            columns=["stage", "item", "status", "error", "elapsed_s", "outputs"])
    if not runs:
        raise AstridError(f"{run_dir}: this run directory has no recorded run")
    settings = json.loads(_latest_config(run_dir, runs))
    ok = records[records["status"] == "ok"].groupby("stage")["item"].agg(set).to_dict()
    tables, truths, quality = [], [], []
    for item, data in items.items():
        pair_dir = run_dir / "pairs" / item
        table = _candidates_of(pair_dir, {s for s, done in ok.items() if item in done})
        if table is not None:
            table["pair_id"] = item
            tables.append(table)
        truth_path = Path(data["truth"]) if data.get("truth") else pair_dir / "raw" / "truth.csv"
        if truth_path.exists():
            truth = pd.read_csv(truth_path)
            truth["pair_id"] = item
            truth["truth_index"] = np.arange(len(truth))
            truths.append(truth)
        qpath = pair_dir / "diff" / "quality.json"
        row = {"pair_id": item}
        if qpath.exists():
            q = json.loads(qpath.read_text())
            row.update({k: q.get(k) for k in _QUALITY_COLUMNS})
        quality.append(row)
    candidates = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(
        columns=["pair_id", "x", "y", "snr", "score", "label", "kind"])
    truth = pd.concat(truths, ignore_index=True) if truths else pd.DataFrame()
    return RunData(run_dir, settings, runs, items, records, candidates, truth,
                   pd.DataFrame(quality))


def _candidates_of(pair_dir: Path, done: set[str]) -> pd.DataFrame | None:
    """The most complete candidate table of a pair: scored, else labelled, else detected."""
    if "score" in done and (pair_dir / "scored.csv").exists():
        return pd.read_csv(pair_dir / "scored.csv")
    if "stamps" in done and (pair_dir / "triplets").exists():
        from astrid.ml.data import load_dataset

        table = load_dataset(pair_dir / "triplets")[1]
    elif "diff" in done and (pair_dir / "diff" / "candidates.csv").exists():
        table = pd.read_csv(pair_dir / "diff" / "candidates.csv")
    else:
        return None
    table["score"] = np.nan
    return table


def _latest_config(run_dir: Path, runs: list[dict]) -> str:
    import sqlite3

    from astrid.pipeline.state import STATE_FILE

    db = sqlite3.connect(run_dir / STATE_FILE)
    try:
        row = db.execute("SELECT config_json FROM runs WHERE run_id = ?",
                         (runs[-1]["run_id"],)).fetchone()
    finally:
        db.close()
    return row[0] if row and row[0] else "{}"


def match_truth(candidates: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """The real transients of the truth, each with ``detected`` and ``best_score``.

    A transient is detected when a candidate was labelled real against it (the stamps stage's
    ``truth_index``, see :func:`astrid.detect.labels.label_from_truth`); ``best_score`` is
    the highest score among those candidates (NaN when none).
    """
    real = truth[truth["is_real"].astype(str).str.lower().isin(("1", "true", "1.0"))].copy()
    matched = pd.DataFrame(columns=["pair_id", "truth_index", "best_score"])
    if len(candidates) and {"truth_index", "label"} <= set(candidates.columns):
        hits = candidates[(candidates["label"] == 1) & (candidates["truth_index"] >= 0)]
        matched = (hits.groupby(["pair_id", "truth_index"])["score"].max()
                   .rename("best_score").reset_index())
    real = real.merge(matched, on=["pair_id", "truth_index"], how="left", indicator=True)
    real["detected"] = real.pop("_merge") == "both"
    return real


def headline(data: RunData) -> Headline:
    """The run's headline numbers at the configured score threshold."""
    threshold = float(data.settings.get("score", {}).get("threshold", 0.5))
    cands = data.candidates
    above = cands["score"] >= threshold if len(cands) else pd.Series(dtype=bool)
    failed_pairs = set(data.records.loc[data.records["status"] == "failed", "item"]) - {"*"}
    head = dict(n_pairs=len(data.items), n_failed_pairs=len(failed_pairs),
                n_candidates=len(cands), n_above_threshold=int(above.sum()), threshold=threshold)
    if len(data.truth) and "is_real" in data.truth:
        real = match_truth(cands, data.truth)
        labels = cands["label"] if "label" in cands else pd.Series(-1, index=cands.index)
        head.update(n_real_truth=len(real), real_detected=int(real["detected"].sum()),
                    real_found=int((real["best_score"].fillna(-1.0) >= threshold).sum()),
                    false_positives=int((above & (labels == 0)).sum()))
    return Headline(**head)


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------

def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def completeness_figure(real: pd.DataFrame, threshold: float) -> str | None:
    """Fraction of real transients detected (and kept by the model) per expected S/N bin."""
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    if real.empty or "snr" not in real:
        return None
    edges = np.array([0, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 50, 100, np.inf])
    snr = real["snr"].to_numpy(float)
    best = real["best_score"].fillna(-1.0).to_numpy(float)
    which = np.digitize(snr, edges) - 1
    centres, det, kept, counts = [], [], [], []
    for b in range(len(edges) - 1):
        sel = which == b
        if sel.sum() == 0:
            continue
        hi = edges[b + 1] if np.isfinite(edges[b + 1]) else edges[b] * 1.5
        centres.append(np.sqrt(max(edges[b], 1.0) * hi))
        counts.append(int(sel.sum()))
        det.append(real["detected"].to_numpy()[sel].mean())
        kept.append((best[sel] >= threshold).mean())
    fig, ax = plt.subplots(figsize=(6.4, 3.8), layout="constrained")
    ax.plot(centres, det, "o-", label="detected (S_corr)")
    if real["best_score"].notna().any():
        ax.plot(centres, kept, "s--", label=f"detected and score ≥ {threshold:g}")
    for c, d, n in zip(centres, det, counts, strict=True):
        ax.annotate(str(n), (c, d), textcoords="offset points", xytext=(0, 6), fontsize=7,
                    ha="center", color="grey")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks([2, 3, 5, 10, 20, 50, 100])
    ax.set_ylim(-0.03, 1.12)
    ax.set_xlabel("expected S/N of the transient in the difference")
    ax.set_ylabel("completeness")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Completeness of real transients (numbers: transients per bin)", fontsize=9)
    return _png(fig)


def score_figure(cands: pd.DataFrame, threshold: float) -> str | None:
    """Histograms of the model score, by truth label where known."""
    import matplotlib.pyplot as plt

    if cands.empty or cands["score"].isna().all():
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.8), layout="constrained")
    bins = np.linspace(0, 1, 41)
    labels = cands["label"] if "label" in cands else pd.Series(-1, index=cands.index)
    for value, name, colour in ((1, "real", "tab:green"), (0, "bogus", "tab:red"),
                                (-1, "unlabelled", "tab:grey")):
        sel = labels == value
        if sel.any():
            ax.hist(cands.loc[sel, "score"], bins=bins, histtype="step", lw=1.6, color=colour,
                    label=f"{name} ({int(sel.sum())})")
    ax.axvline(threshold, color="k", ls=":", lw=1, label=f"threshold {threshold:g}")
    ax.set_yscale("log")
    ax.set_xlabel("real/bogus score")
    ax.set_ylabel("candidates")
    ax.legend(fontsize=8)
    ax.set_title("Score distributions", fontsize=9)
    return _png(fig)


def gallery_figure(run_dir: Path, cands: pd.DataFrame, n: int = _GALLERY_ROWS) -> str | None:
    """The ``n`` highest-scoring candidates as science / reference / difference rows.

    Drawn as one mosaic image (each stamp zscaled on its own) with one axes, which renders
    an order of magnitude faster than a grid of small axes.
    """
    import matplotlib.pyplot as plt
    from astropy.visualization import ZScaleInterval

    from astrid.ml.data import load_dataset

    if cands.empty or "triplet_id" not in cands:
        return None
    # Unscored runs (no score stage) show their most significant candidates instead.
    key = "score" if cands["score"].notna().any() else "snr"
    top = cands.sort_values(key, ascending=False).head(n)
    datasets: dict[str, tuple] = {}
    tiles, captions = [], []
    zscale = ZScaleInterval()
    for _, cand in top.iterrows():
        pair = cand["pair_id"]
        if pair not in datasets:
            datasets[pair] = load_dataset(run_dir / "pairs" / pair / "triplets")
        cube, meta = datasets[pair]
        where = np.flatnonzero(meta["triplet_id"].to_numpy() == cand["triplet_id"])
        if not len(where):
            continue
        stamp = np.asarray(cube[int(where[0])], dtype=np.float64)
        row = []
        for channel in stamp:
            finite = np.isfinite(channel)
            lo, hi = zscale.get_limits(channel[finite]) if finite.sum() > 10 else (0.0, 1.0)
            row.append(np.clip((np.where(finite, channel, lo) - lo) / max(hi - lo, 1e-12), 0, 1))
        tiles.append(row)
        label = {1: "real", 0: "bogus"}.get(int(cand.get("label", -1)), "")
        kind = cand.get("kind", "")
        truth = f"  truth: {label} {kind if isinstance(kind, str) else ''}".rstrip() if label else ""
        score = "unscored" if np.isnan(cand["score"]) else f"score {cand['score']:.3f}"
        captions.append(f"{pair}  {score}  S/N {cand.get('snr', np.nan):.1f}{truth}")
    if not tiles:
        return None
    size, gap = tiles[0][0].shape[0], 4
    mosaic = np.ones((len(tiles) * (size + gap), 3 * (size + gap)))
    for i, row in enumerate(tiles):
        for j, tile in enumerate(row):
            mosaic[i * (size + gap):i * (size + gap) + size, j * (size + gap):j * (size + gap) + size] = tile
    height, width = mosaic.shape
    text_px = 7 * size  # room for the captions right of the stamps
    fig = plt.figure(figsize=(8.0, 8.0 * (height + 14) / (width + text_px)))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(mosaic, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    for j, name in enumerate(("sci", "ref", "diff")):
        ax.text(j * (size + gap) + size / 2, -2, name, ha="center", va="bottom", fontsize=8)
    for i, text in enumerate(captions):
        ax.text(3 * (size + gap) + 4, i * (size + gap) + size / 2, text, va="center", fontsize=7.5)
    ax.set_xlim(-0.5, width + text_px)
    ax.set_ylim(height, -14)
    ax.axis("off")
    return _png(fig)


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1100px;
color:#222;line-height:1.4}
h1{font-size:1.6em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:1.8em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}
.big{font-size:1.1em}.fail{color:#b00}.note{color:#666;font-size:.85em}
img{max-width:100%}
"""


def _table(df: pd.DataFrame, left: tuple[str, ...] = ()) -> str:
    if df.empty:
        return "<p class='note'>none</p>"
    head = "".join(f"<th class='{'l' if c in left else ''}'>{html.escape(str(c))}</th>"
                   for c in df.columns)
    rows = []
    for _, row in df.iterrows():
        cells = []
        for c in df.columns:
            v = row[c]
            if isinstance(v, float):
                text = "" if np.isnan(v) else f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
            else:
                text = "" if v is None else str(v)
            cells.append(f"<td class='{'l' if c in left else ''}'>{html.escape(text)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _img(b64: str | None, alt: str) -> str:
    if b64 is None:
        return f"<p class='note'>{html.escape(alt)}: nothing to show.</p>"
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{b64}'>"


def _bogus_gallery(data: RunData) -> list[str]:
    """The highest-scoring bogus candidates (what fools the model), when the truth is known."""
    cands = data.candidates
    if "label" not in cands or not (cands["label"] == 0).any() or cands["score"].isna().all():
        return []
    return ["<h2>Highest-scoring bogus candidates</h2>",
            _img(gallery_figure(data.run_dir, cands[cands["label"] == 0], n=8), "bogus gallery")]


def render_html(data: RunData) -> str:
    """The report page for ``data``."""
    head = headline(data)
    threshold = head.threshold
    last_run = data.runs[-1]
    recs = data.records
    stage_counts = (recs.groupby(["stage", "status"]).size().unstack(fill_value=0).reset_index()
                    if not recs.empty else pd.DataFrame())
    quality = data.quality.copy()
    if len(data.candidates):
        above = data.candidates[data.candidates["score"] >= threshold].groupby("pair_id").size()
        quality[f"n score ≥ {threshold:g}"] = quality["pair_id"].map(above).fillna(0).astype(int)
    status = recs[recs["item"] != "*"].groupby("item")["status"].agg(
        lambda s: "failed" if (s == "failed").any() else "ok") if not recs.empty else {}
    quality["status"] = quality["pair_id"].map(status).fillna("pending")
    failures = recs.loc[recs["status"] == "failed", ["item", "stage", "error"]]
    real = (match_truth(data.candidates, data.truth)
            if len(data.truth) and "is_real" in data.truth else pd.DataFrame())
    pipeline = data.settings.get("pipeline", {})
    history = pd.DataFrame(data.runs)[["run_id", "started_utc", "finished_utc", "command",
                                       "config_hash", "status"]]
    # The report is written by the run it describes, before that run has finished; an earlier
    # run still marked running was killed.
    running = history["status"] == "running"
    last = history.index == history.index[-1]
    history.loc[running & last, "status"] = "in progress (this report)"
    history.loc[running & ~last, "status"] = "interrupted"
    versions = json.loads(last_run.get("versions_json") or "{}")
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>AstrID run report: {html.escape(data.run_dir.name)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>AstrID run report: {html.escape(data.run_dir.name)}</h1>",
        "<h2>Summary</h2><ul class='big'>",
        *[f"<li>{html.escape(line)}</li>" for line in head.lines()],
        "</ul>",
        f"<p>Run directory <code>{html.escape(str(data.run_dir))}</code>; source "
        f"<b>{html.escape(str(pipeline.get('source', '')))}</b>, executor "
        f"<b>{html.escape(str(pipeline.get('executor', '')))}</b>; config hash "
        f"<code>{html.escape(str(last_run.get('config_hash')))}</code>; versions "
        f"{html.escape(', '.join(f'{k} {v}' for k, v in versions.items()))}.</p>",
        "<h3>Stages (items per status)</h3>", _table(stage_counts, left=("stage",)),
        "<h3>Invocations of this run directory</h3>", _table(history, left=("command",)),
        "<h2>Per-pair quality</h2>",
        "<p class='note'>overlap: fraction of the science frame covered by the reference; "
        "noise_ratio: measured/expected noise of the difference in empty sky (1 is ideal); "
        "alignment_rms_px: residual of matched stars after alignment.</p>",
        _table(quality, left=("pair_id", "status")),
        "<h2>Completeness</h2>",
        _img(completeness_figure(real, threshold), "completeness (needs truth)"),
        "<h2>Score distributions</h2>", _img(score_figure(data.candidates, threshold), "scores"),
        f"<h2>Top {_GALLERY_ROWS} candidates</h2>",
        _img(gallery_figure(data.run_dir, data.candidates), "gallery"),
        *_bogus_gallery(data),
        f"<h2 class='{'fail' if len(failures) else ''}'>Failures ({len(failures)})</h2>",
        _table(failures, left=("item", "stage", "error")),
        "</body></html>",
    ]
    return "\n".join(parts)


def write_report(run_dir: str | Path) -> list[Path]:
    """Write ``RUN/candidates.csv`` and ``RUN/report.html``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    run_dir = Path(run_dir)
    data = gather(run_dir)
    table = write_table_atomic(run_dir / "candidates.csv", data.candidates)
    page = write_text_atomic(run_dir / "report.html", render_html(data))
    return [table, page]
