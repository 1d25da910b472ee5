"""Honest labels for candidates: from a simulation's truth, or from a catalogued SN position.

Simulated pairs: a candidate within ``match_radius_px`` of an injected real transient is real
(label 1, the transient's kind). Every other candidate is bogus (label 0) with the kind of what
it sits on: an artefact of the truth table (cosmic ray, hot pixel, bad column, trail, bleed), a
residual of a static star (``star_residual``), or nothing at all (``noise``).

Real pairs: only the candidate nearest the catalogued SN position (within a radius) is known to
be real; the others are bogus or unlabelled by rule. Random sky positions are never used as
bogus examples: a classifier must learn from what the detector actually produces.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

REAL_KINDS: tuple[str, ...] = ("sn", "sn_nuclear", "sn_hostless", "variable", "asteroid")
ARTEFACT_KINDS: tuple[str, ...] = ("cosmic_ray", "hot_pixel", "bad_column", "trail", "bleed")
STAR_RESIDUAL_RADIUS_PX = 2.0
# Artefacts are matched more loosely than real transients: a truth row gives the flux-weighted
# centre of a cosmic-ray worm, or a sample every ~2 px along a trail, and a detection on the
# artefact can sit a few pixels away. (A looser match changes only the bogus kind, never a label.)
ARTEFACT_RADIUS_PX = 3.0
# Cosmic rays include worms up to ~20 px long whose truth row is their flux-weighted centre;
# detections along a worm are deblended into several peaks up to half its length away.
COSMIC_RAY_RADIUS_PX = 11.0
# A saturated star leaves residuals (ringing, masked core, bleed stubs) well beyond 2 px.
SATURATED_STAR_RADIUS_PX = 8.0
LABEL_COLUMNS: tuple[str, ...] = ("label", "label_source", "kind", "truth_index", "truth_dist_px")


def _is_real(truth: pd.DataFrame) -> np.ndarray:
    if "is_real" in truth:
        return truth["is_real"].astype(str).str.lower().isin(("1", "true", "1.0")).to_numpy()
    return truth["kind"].isin(REAL_KINDS).to_numpy()


def _nearest(cx: np.ndarray, cy: np.ndarray, tx: np.ndarray, ty: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray]:
    """Distance (px) and index of the nearest target for each candidate (inf, -1 if none)."""
    if len(tx) == 0 or len(cx) == 0:
        return np.full(len(cx), np.inf), np.full(len(cx), -1, np.int64)
    dist, index = cKDTree(np.column_stack([tx, ty])).query(np.column_stack([cx, cy]))
    return np.asarray(dist, float), np.asarray(index, np.int64)


def _segment_distance(cx, cy, x0, y0, x1, y1) -> np.ndarray:
    """Distance (px) from points (N,) to one segment."""
    dx, dy = x1 - x0, y1 - y0
    length2 = dx * dx + dy * dy
    t = 0.0 if length2 == 0 else np.clip(((cx - x0) * dx + (cy - y0) * dy) / length2, 0, 1)
    return np.hypot(cx - (x0 + t * dx), cy - (y0 + t * dy))


def _artefact_distances(cx: np.ndarray, cy: np.ndarray, artefacts: pd.DataFrame) -> np.ndarray:
    """(N_candidates, N_artefacts) distances in px from candidates to each artefact's footprint.

    AstrID's simulator samples extended artefacts (trails, bleeds, bad columns) every couple of
    pixels along their length, so each row is a point. Truth tables from elsewhere may instead
    give a segment, ``(x0, y0)-(x1, y1)``, or ``length_px`` and ``angle_deg`` (degrees from the
    +x axis) centred on ``(x, y)``; those are used when present.
    """
    tx, ty = artefacts["x"].to_numpy(float), artefacts["y"].to_numpy(float)
    out = np.hypot(cx[:, None] - tx[None, :], cy[:, None] - ty[None, :])
    has_segment = np.zeros(len(artefacts), bool)
    if {"x0", "y0", "x1", "y1"} <= set(artefacts.columns):
        has_segment = np.isfinite(artefacts[["x0", "y0", "x1", "y1"]].to_numpy(float)).all(axis=1)
        for j in np.flatnonzero(has_segment):
            r = artefacts.iloc[j]
            out[:, j] = _segment_distance(cx, cy, r["x0"], r["y0"], r["x1"], r["y1"])
    if "length_px" in artefacts:
        length = artefacts["length_px"].to_numpy(float)
        angle = (artefacts["angle_deg"].to_numpy(float) if "angle_deg" in artefacts
                 else np.full(len(artefacts), np.nan))
        for j in np.flatnonzero(~has_segment & np.isfinite(length) & (length > 0)):
            a = np.deg2rad(angle[j] if np.isfinite(angle[j]) else 90.0)
            ux, uy = 0.5 * length[j] * np.cos(a), 0.5 * length[j] * np.sin(a)
            out[:, j] = _segment_distance(cx, cy, tx[j] - ux, ty[j] - uy, tx[j] + ux, ty[j] + uy)
    return out


def label_from_truth(candidates: pd.DataFrame, truth: pd.DataFrame,
                     static: pd.DataFrame | None = None, *, match_radius_px: float = 1.5,
                     artefact_radius_px: float = ARTEFACT_RADIUS_PX,
                     cosmic_ray_radius_px: float = COSMIC_RAY_RADIUS_PX,
                     star_radius_px: float = STAR_RESIDUAL_RADIUS_PX,
                     saturated_star_radius_px: float = SATURATED_STAR_RADIUS_PX) -> pd.DataFrame:
    """Label the candidates of a simulated pair from its truth table.

    Parameters
    ----------
    candidates : table with ``x, y`` (0-based science pixels).
    truth : ``truth.csv`` of the pair (``kind, x, y, ..., is_real``).
    static : ``static.csv`` (stars and galaxies), for ``star_residual`` labels.
    match_radius_px : a candidate this close to a real transient is real.
    artefact_radius_px : a bogus candidate this close to an artefact of the truth takes its kind
        (``cosmic_ray_radius_px`` for cosmic rays, whose truth gives only a worm's centre).
    star_radius_px : a bogus candidate this close to a static star is a star residual
        (``saturated_star_radius_px`` for stars flagged ``saturated`` in ``static``).

    Returns
    -------
    DataFrame aligned with ``candidates``: ``label`` (1 real, 0 bogus), ``label_source``
    ("truth"), ``kind``, ``truth_index`` (row of ``truth`` matched, -1 if none) and
    ``truth_dist_px``.
    """
    cx = candidates["x"].to_numpy(float)
    cy = candidates["y"].to_numpy(float)
    n = len(cx)
    label = np.zeros(n, np.int8)
    kind = np.full(n, "noise", dtype=object)
    truth_index = np.full(n, -1, np.int64)
    truth_dist = np.full(n, np.inf)
    truth = truth.reset_index(drop=True)

    real = np.flatnonzero(_is_real(truth))
    dist, near = _nearest(cx, cy, truth["x"].to_numpy(float)[real], truth["y"].to_numpy(float)[real])
    is_real = dist <= match_radius_px
    label[is_real] = 1
    kind[is_real] = truth["kind"].to_numpy(object)[real[near[is_real]]]
    truth_index[is_real] = real[near[is_real]]
    truth_dist[is_real] = dist[is_real]

    todo = ~is_real
    bogus = np.flatnonzero(~_is_real(truth))
    if len(bogus) and todo.any():
        is_cr = truth["kind"].to_numpy(object)[bogus] == "cosmic_ray"
        radius = np.where(is_cr, max(cosmic_ray_radius_px, artefact_radius_px),
                          max(artefact_radius_px, match_radius_px))
        # In chunks of candidates: (candidates x artefacts) distances stay small.
        best = np.zeros(int(todo.sum()), np.int64)
        best_dist = np.full(len(best), np.inf)
        todo_x, todo_y = cx[todo], cy[todo]
        for lo in range(0, len(best), 512):
            d = _artefact_distances(todo_x[lo:lo + 512], todo_y[lo:lo + 512], truth.iloc[bogus])
            d = np.where(d <= radius[None, :], d, np.inf)
            best[lo:lo + 512] = np.argmin(d, axis=1)
            best_dist[lo:lo + 512] = d[np.arange(len(d)), best[lo:lo + 512]]
        hit = np.isfinite(best_dist)
        rows = np.flatnonzero(todo)[hit]
        kind[rows] = truth["kind"].to_numpy(object)[bogus[best[hit]]]
        truth_index[rows] = bogus[best[hit]]
        truth_dist[rows] = best_dist[hit]
        todo[rows] = False

    if static is not None and len(static) and todo.any():
        stars = static[static["kind"] == "star"] if "kind" in static else static
        saturated = (stars["saturated"].astype(str).str.lower().isin(("1", "true", "1.0"))
                     .to_numpy() if "saturated" in stars else np.zeros(len(stars), bool))
        xy = stars[["x", "y"]].to_numpy(float)
        d, _ = _nearest(cx[todo], cy[todo], xy[:, 0], xy[:, 1])
        d_sat, _ = _nearest(cx[todo], cy[todo], xy[saturated, 0], xy[saturated, 1])
        rows = np.flatnonzero(todo)[(d <= star_radius_px) | (d_sat <= saturated_star_radius_px)]
        kind[rows] = "star_residual"

    return pd.DataFrame({"label": label, "label_source": "truth", "kind": kind,
                         "truth_index": truth_index, "truth_dist_px": truth_dist},
                        index=candidates.index)


def label_real_pair(candidates: pd.DataFrame, sn_x: float, sn_y: float, *, radius_px: float,
                    others: Literal["bogus", "unlabelled"] = "unlabelled",
                    sn_kind: str = "sn") -> pd.DataFrame:
    """Label the candidates of a real pair from the catalogued position of its supernova.

    The candidate nearest ``(sn_x, sn_y)`` (science pixels), if within ``radius_px``, is real
    (label 1, ``sn_kind``, label source "catalog"). The others are bogus (label 0, kind
    "unknown") when ``others="bogus"``, which assumes the catalogue knows every transient of
    the field, or unlabelled (label -1) otherwise.

    Returns
    -------
    DataFrame aligned with ``candidates`` with the columns of :func:`label_from_truth`.
    """
    if others not in ("bogus", "unlabelled"):
        raise ValueError(f"others must be 'bogus' or 'unlabelled', got {others!r}")
    n = len(candidates)
    dist = np.hypot(candidates["x"].to_numpy(float) - sn_x, candidates["y"].to_numpy(float) - sn_y)
    label = np.full(n, 0 if others == "bogus" else -1, np.int8)
    source = np.full(n, "catalog" if others == "bogus" else "none", dtype=object)
    kind = np.full(n, "unknown", dtype=object)
    truth_dist = np.full(n, np.inf)
    truth_index = np.full(n, -1, np.int64)
    if n and np.isfinite(dist).any():
        best = int(np.nanargmin(dist))
        if dist[best] <= radius_px:
            label[best], source[best], kind[best] = 1, "catalog", sn_kind
            truth_dist[best], truth_index[best] = dist[best], 0
    return pd.DataFrame({"label": label, "label_source": source, "kind": kind,
                         "truth_index": truth_index, "truth_dist_px": truth_dist},
                        index=candidates.index)


def unlabelled(candidates: pd.DataFrame) -> pd.DataFrame:
    """Labels for candidates nothing is known about (label -1, source "none", kind "")."""
    n = len(candidates)
    return pd.DataFrame({"label": np.full(n, -1, np.int8), "label_source": "none", "kind": "",
                         "truth_index": np.full(n, -1, np.int64), "truth_dist_px": np.inf},
                        index=candidates.index)
