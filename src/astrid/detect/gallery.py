"""PNG galleries of triplets, grouped by label and kind, for a person to check what a model sees.

Each row is one group (e.g. "real · sn" or "bogus · cosmic_ray"); each example shows its
science, reference and difference stamps side by side. Science and reference share one
display range per example (so a source that brightened looks brighter); the difference is
shown on a symmetric range around zero so its sign is visible (white = brighter in the science).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from astrid.provenance import atomic_path, provenance

_LABEL_NAMES = {1: "real", 0: "bogus", -1: "unlabelled"}


def display_range(pixels: np.ndarray, stretch: str = "asinh") -> tuple[float, float]:
    """(vmin, vmax) for a set of pixels: IRAF zscale, or the 0.5-99.5 percentiles for asinh."""
    finite = pixels[np.isfinite(pixels)]
    if finite.size == 0:
        return 0.0, 1.0
    if stretch == "zscale":
        from astropy.visualization import ZScaleInterval

        vmin, vmax = ZScaleInterval().get_limits(finite)
    elif stretch == "asinh":
        vmin, vmax = np.percentile(finite, [0.5, 99.5])
    else:
        raise ValueError(f"unknown stretch {stretch!r} (use 'asinh' or 'zscale')")
    if not vmax > vmin:
        vmax = vmin + 1.0
    return float(vmin), float(vmax)


def _scaled(stamp: np.ndarray, vmin: float, vmax: float, stretch: str) -> np.ndarray:
    """Pixels mapped to [0, 1] (NaN kept): linear for zscale, asinh for asinh."""
    x = np.clip((stamp - vmin) / (vmax - vmin), 0, 1)
    if stretch == "asinh":
        soft = 0.1  # asinh softening: linear below ~10% of the range, logarithmic above
        x = np.arcsinh(x / soft) / np.arcsinh(1 / soft)
    return x


def group_examples(meta: pd.DataFrame, per_group: int, group_by: Sequence[str] = ("label", "kind"),
                   seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """(title, row indices) of up to ``per_group`` random examples of each group, real first."""
    rng = np.random.default_rng(seed)
    keys = [c for c in group_by if c in meta]
    if not keys:
        return [("all", np.sort(rng.permutation(len(meta))[:per_group]))]
    groups = []
    for values, rows in meta.groupby(keys, sort=True).indices.items():
        values = values if isinstance(values, tuple) else (values,)
        parts = []
        for key, value in zip(keys, values, strict=True):
            parts.append(_LABEL_NAMES.get(int(value), str(value)) if key == "label" else str(value or "?"))
        pick = np.sort(rng.choice(rows, size=min(per_group, len(rows)), replace=False))
        order = -int(values[0]) if keys[0] == "label" else 0  # real (1) first
        groups.append((order, " · ".join(parts) + f"  (n={len(rows)})", pick))
    groups.sort(key=lambda g: (g[0], g[1]))
    return [(title, rows) for _, title, rows in groups]


def save_gallery(stamps, meta: pd.DataFrame, png: str | os.PathLike, *, per_group: int = 6,
                 group_by: Sequence[str] = ("label", "kind"), stretch: str = "asinh",
                 seed: int = 0, title: str | None = None, max_groups: int = 24,
                 panel_px: int = 72) -> Path:
    """Write a PNG grid of triplets grouped by label and kind.

    The grid is composed as one RGB mosaic (one ``imshow``), so a gallery of hundreds of
    stamps takes a fraction of a second. NaN pixels (outside the image) show blue.

    Parameters
    ----------
    stamps : (N, 3, S, S) raw triplets (sci, ref, diff), any array-like that supports
        index-array indexing (e.g. the lazy array of :func:`astrid.ml.data.load_dataset`).
    meta : N rows; the ``group_by`` columns (and ``snr`` if present) are used.
    png : output path, written atomically with provenance in the PNG text chunks.
    per_group : examples shown per group (chosen at random with ``seed``).
    stretch : "asinh" or "zscale".
    max_groups : groups beyond this many (the smallest) are left out.
    panel_px : displayed size of one stamp in output pixels (approximately).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(stamps) != len(meta):
        raise ValueError(f"{len(stamps)} stamps but {len(meta)} metadata rows")
    if stretch not in ("asinh", "zscale"):
        raise ValueError(f"unknown stretch {stretch!r} (use 'asinh' or 'zscale')")
    meta = meta.reset_index(drop=True)
    groups = group_examples(meta, per_group, group_by, seed)
    if len(groups) > max_groups:
        keep = sorted(groups, key=lambda g: -len(g[1]))[:max_groups]
        groups = [g for g in groups if any(g is k for k in keep)]
    size = int(np.shape(stamps)[-1]) if len(meta) else 1
    gap = max(1, size // 16)  # between the three stamps of a triplet
    sep = 4 * gap  # between triplets
    title_h = max(size // 3, 6)  # band above each row for its title
    cell_w = 3 * size + 2 * gap
    width = per_group * cell_w + (per_group - 1) * sep
    row_h = title_h + size + gap
    height = max(len(groups), 1) * row_h
    mosaic = np.ones((height, width, 3), np.float32)
    nan_rgb = np.array([0.23, 0.36, 0.57], np.float32)
    snr = meta["snr"].to_numpy(float) if "snr" in meta else np.full(len(meta), np.nan)
    texts = []
    for r, (group_title, rows) in enumerate(groups):
        top = r * row_h + title_h
        texts.append((0, r * row_h + title_h * 0.55, group_title, 8, "left"))
        triplets = np.asarray(stamps[rows], dtype=np.float32)
        for k, triplet in enumerate(triplets):
            vmin, vmax = display_range(triplet[:2], stretch)
            finite_diff = triplet[2][np.isfinite(triplet[2])]
            half = float(np.percentile(np.abs(finite_diff), 99.5)) if finite_diff.size else 1.0
            half = half if half > 0 else 1.0
            panels = (_scaled(triplet[0], vmin, vmax, stretch), _scaled(triplet[1], vmin, vmax, stretch),
                      0.5 + 0.5 * np.clip(triplet[2] / half, -1, 1))
            left0 = k * (cell_w + sep)
            for c, panel in enumerate(panels):
                left = left0 + c * (size + gap)
                # Flip rows so that y increases upwards, as in ds9.
                rgb = np.repeat(panel[::-1, :, None], 3, axis=2)
                rgb[~np.isfinite(panel[::-1])] = nan_rgb
                mosaic[top:top + size, left:left + size] = rgb
            if np.isfinite(snr[rows[k]]):
                texts.append((left0 + cell_w, top - title_h * 0.1, f"S/N {snr[rows[k]]:.1f}", 6, "right"))
    dpi = 100
    scale = panel_px / size
    fig = plt.figure(figsize=(width * scale / dpi, (height + 2 * title_h) * scale / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, height / (height + 2 * title_h)))
    ax.imshow(np.clip(mosaic, 0, 1), interpolation="nearest", aspect="equal")
    ax.set_axis_off()
    for x, y, text, fontsize, ha in texts:
        ax.text(x, y, text, fontsize=fontsize, ha=ha, va="bottom")
    fig.text(0.005, 0.995, title or f"{len(meta)} triplets · each: sci, ref, diff · {stretch} stretch, "
             "sci/ref share a range · diff symmetric about 0 (white = brighter in sci) · "
             "blue = no data",
             fontsize=8, va="top", ha="left")
    png = Path(png)
    record = provenance(inputs=[])
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi,
                    metadata={"Software": f"astrid {record['astrid_version']}",
                              "Description": json.dumps(record)})
    plt.close(fig)
    return png
