"""Candidates: significant peaks of |S_corr|, deblended and measured on D and S.

Detection works on the thresholded pixels only (a few thousand in a 4k frame), never on a full
image filter: local maxima are found by comparing each pixel above threshold with its eight
neighbours, peaks closer than ``deblend_min_sep_px`` keep the brighter one, and two peaks of one
connected region are kept apart only if S_corr dips between them (a saddle), so that noise
ripples on a bright residual do not split it. The loops are compiled in
:mod:`astrid.detect.peak_kernels`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from astrid.config import DetectSettings
from astrid.diff.zogy_core import (
    MASK_EDGE,
    MASK_NO_OVERLAP,
    MASK_REF_BAD,
    MASK_SATURATED,
    MASK_SCI_BAD,
)

if TYPE_CHECKING:
    from astrid.diff.high_level import DiffResult

CANDIDATE_COLUMNS = ("x", "y", "ra", "dec", "snr", "sign", "flux", "flux_err", "fwhm_px",
                     "elongation", "sharpness", "neg_fraction", "ref_source_dist_px",
                     "flag_edge", "flag_saturated", "flag_masked")

_SADDLE_DIP_SIGMA = 1.0  # a secondary peak must stand this far above the saddle ...
_SADDLE_DIP_FRACTION = 0.1  # ... and this fraction of its own height, to count as separate
_NEG_PIXEL_SIGMA = 1.5  # |D| above this counts a pixel as positive/negative for neg_fraction


def find_peaks(scorr: np.ndarray, threshold_sigma: float = 5.0,
               min_sep_px: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Deblended peaks of |S_corr| at or above the threshold.

    Parameters
    ----------
    scorr : (H, W) float, S_corr in sigma; NaN pixels are ignored.
    threshold_sigma : detection threshold on |S_corr|.
    min_sep_px : peaks closer than this keep only the most significant one.

    Returns
    -------
    iy, ix : (K,) int arrays of peak rows and columns, by decreasing |S_corr|.
    """
    from astrid.detect import peak_kernels

    scorr = np.asarray(scorr)
    flat = peak_kernels.above_threshold(scorr, scorr.dtype.type(threshold_sigma))
    if flat.size == 0:
        return np.zeros(0, int), np.zeros(0, int)
    # Local maxima of sign * S_corr among the 8 neighbours (ties go to the first pixel in
    # raster order), and the 8-connected same-sign region of each thresholded pixel.
    is_max, region = peak_kernels.maxima_and_regions(scorr, flat)
    peaks = np.flatnonzero(is_max)
    iy, ix = np.divmod(flat[peaks], scorr.shape[1])
    value = scorr[iy, ix]
    sign = np.sign(value)
    height = value * sign
    order = np.argsort(-height, kind="stable")
    iy, ix, height, sign = iy[order], ix[order], height[order], sign[order]
    keep = peak_kernels.deblend(scorr, iy, ix, height, sign, region[peaks][order],
                                float(min_sep_px), float(max(min_sep_px, 1.0, 4 * min_sep_px + 8)),
                                _SADDLE_DIP_SIGMA, _SADDLE_DIP_FRACTION)
    return iy[keep], ix[keep]


def find_candidates(result: DiffResult, settings: DetectSettings | None = None) -> pd.DataFrame:
    """Detect and measure candidates in a difference result.

    Parameters
    ----------
    result : DiffResult from :func:`astrid.diff.zogy` or :func:`astrid.diff.gaussian_baseline`.
    settings : DetectSettings (threshold, deblending separation, edge margin).

    Returns
    -------
    DataFrame, one row per detection (positive and negative), by decreasing ``snr``, with
    ``CANDIDATE_COLUMNS``: ``x, y`` (0-based sub-pixel peak of the score, px), ``ra, dec``
    (ICRS deg, NaN without WCS), ``snr`` (|S_corr| at the peak), ``sign`` (+1 brighter in the
    science image, -1 fainter), ``flux, flux_err`` (PSF flux, science ADU, signed),
    ``fwhm_px``, ``elongation`` (a/b) from Gaussian-weighted moments of sign*D with the PSF
    deconvolved from the weight, ``sharpness`` (central pixel of sign*D over its 3x3 sum:
    ~1 for a cosmic ray, ~0.1-0.2 for a point source), ``neg_fraction`` (share of |D| within
    the aperture in pixels of the opposite sign, above 1.5 sigma: ~0.5 for a dipole),
    ``ref_source_dist_px`` (to the nearest reference star, NaN if none), ``flag_edge``,
    ``flag_saturated``, ``flag_masked`` (a saturated / bad or uncovered pixel within the
    aperture).
    """
    settings = settings or DetectSettings()
    iy, ix = find_peaks(result.scorr, settings.threshold_sigma, settings.deblend_min_sep_px)
    return measure_candidates(result, iy, ix, settings)


def _fwhm_estimate(result) -> float:
    q = result.quality or {}
    vals = [q.get("fwhm_sci"), q.get("fwhm_ref")]
    vals = [float(v) for v in vals if v is not None and np.isfinite(v) and v > 0]
    return max(vals) if vals else 3.0


def measure_candidates(result: DiffResult, iy: np.ndarray, ix: np.ndarray,
                       settings: DetectSettings | None = None) -> pd.DataFrame:
    """Measure candidates at integer peak positions ``(iy, ix)``; see :func:`find_candidates`."""
    settings = settings or DetectSettings()
    n = int(np.size(iy))
    if n == 0:
        return pd.DataFrame({c: pd.Series(dtype=_column_dtype(c)) for c in CANDIDATE_COLUMNS})
    iy, ix = np.asarray(iy, int), np.asarray(ix, int)
    scorr, diff, flux_map = result.scorr, result.diff, result.flux
    h, w = scorr.shape
    value = scorr[iy, ix].astype(float)
    sign = np.where(value >= 0, 1, -1)

    x = np.clip(ix + _parabola_offset(flux_map, iy, ix, sign, axis=1), 0, w - 1)
    y = np.clip(iy + _parabola_offset(flux_map, iy, ix, sign, axis=0), 0, h - 1)

    fwhm_psf = _fwhm_estimate(result)
    radius = int(np.clip(np.ceil(1.5 * fwhm_psf), 3, 12))
    d = np.arange(-radius, radius + 1)
    sy = iy[:, None, None] + d[None, :, None]
    sx = ix[:, None, None] + d[None, None, :]
    inside = (sy >= 0) & (sy < h) & (sx >= 0) & (sx < w)
    cy, cx = np.clip(sy, 0, h - 1), np.clip(sx, 0, w - 1)
    stamp = diff[cy, cx].astype(float) * sign[:, None, None]
    rr2 = (d[None, :, None] ** 2 + d[None, None, :] ** 2).astype(float)
    in_ap = inside & (rr2 <= radius ** 2)
    good = in_ap & np.isfinite(stamp)
    s = np.where(good, stamp, 0.0)

    fwhm_px, elongation = _weighted_shape(s, d, fwhm_psf)
    centre = radius
    core = s[:, centre - 1:centre + 2, centre - 1:centre + 2].sum(axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        sharpness = np.where(core > 0, s[:, centre, centre] / core, np.nan)
        strong = np.abs(s) > _NEG_PIXEL_SIGMA
        neg = np.where(strong & (s < 0), -s, 0.0).sum(axis=(1, 2))
        tot = np.where(strong, np.abs(s), 0.0).sum(axis=(1, 2))
        neg_fraction = np.where(tot > 0, neg / tot, 0.0)

    mask = result.mask
    bits = np.where(in_ap, mask[cy, cx], 0)
    bits_any = np.bitwise_or.reduce(bits.reshape(n, -1), axis=1)
    flag_saturated = (bits_any & MASK_SATURATED) != 0
    flag_masked = (bits_any & (MASK_SCI_BAD | MASK_REF_BAD | MASK_NO_OVERLAP)) != 0
    edge = settings.edge_px
    flag_edge = ((x < edge) | (y < edge) | (x > w - 1 - edge) | (y > h - 1 - edge)
                 | ((mask[iy, ix] & MASK_EDGE) != 0))

    ref_xy = np.asarray(result.ref_sources, float).reshape(-1, 2)
    if len(ref_xy):
        ref_dist, _ = cKDTree(ref_xy).query(np.column_stack([x, y]))
    else:
        ref_dist = np.full(n, np.nan)

    if result.wcs is not None:
        ra, dec = result.wcs.pixel_to_world_values(x, y)
        ra, dec = np.asarray(ra, float), np.asarray(dec, float)
    else:
        ra = dec = np.full(n, np.nan)

    table = pd.DataFrame({
        "x": x, "y": y, "ra": ra, "dec": dec, "snr": np.abs(value), "sign": sign.astype(int),
        "flux": result.flux[iy, ix].astype(float), "flux_err": result.flux_err[iy, ix].astype(float),
        "fwhm_px": fwhm_px, "elongation": elongation, "sharpness": sharpness,
        "neg_fraction": neg_fraction, "ref_source_dist_px": ref_dist,
        "flag_edge": flag_edge, "flag_saturated": flag_saturated, "flag_masked": flag_masked,
    })
    return table.sort_values("snr", ascending=False, kind="stable").reset_index(drop=True)


def _column_dtype(name: str):
    if name == "sign":
        return int
    if name.startswith("flag_"):
        return bool
    return float


def _parabola_offset(image, iy, ix, sign, axis) -> np.ndarray:
    """Sub-pixel offset of a peak along one axis from a parabola through three pixels."""
    h, w = image.shape
    if axis == 1:
        lo, hi = np.clip(ix - 1, 0, w - 1), np.clip(ix + 1, 0, w - 1)
        a, b, c = image[iy, lo], image[iy, ix], image[iy, hi]
    else:
        lo, hi = np.clip(iy - 1, 0, h - 1), np.clip(iy + 1, 0, h - 1)
        a, b, c = image[lo, ix], image[iy, ix], image[hi, ix]
    a, b, c = (np.asarray(v, float) * sign for v in (a, b, c))
    curv = a - 2 * b + c
    with np.errstate(divide="ignore", invalid="ignore"):
        off = np.where(curv < 0, 0.5 * (a - c) / curv, 0.0)
    off = np.where(np.isfinite(off), off, 0.0)
    return np.clip(off, -0.5, 0.5)


def _weighted_shape(s: np.ndarray, d: np.ndarray, fwhm_psf: float):
    """FWHM (px) and elongation a/b of each stamp from Gaussian-weighted second moments.

    The weight is a circular Gaussian with the PSF's sigma; for a Gaussian source the measured
    covariance C_m relates to the true one by C_true = (C_m^-1 - C_w^-1)^-1, which we invert.
    """
    sigma_w = max(fwhm_psf, 1.0) / 2.3548
    yy, xx = np.meshgrid(d, d, indexing="ij")
    weight = np.exp(-(xx ** 2 + yy ** 2) / (2 * sigma_w ** 2))
    sw = s * weight
    tot = sw.sum(axis=(1, 2))
    n = s.shape[0]
    fwhm = np.full(n, np.nan)
    elong = np.full(n, np.nan)
    ok = tot > 0
    if not ok.any():
        return fwhm, elong
    t = tot[ok]
    m = sw[ok]
    mx = (m * xx).sum(axis=(1, 2)) / t
    my = (m * yy).sum(axis=(1, 2)) / t
    cxx = (m * xx ** 2).sum(axis=(1, 2)) / t - mx ** 2
    cyy = (m * yy ** 2).sum(axis=(1, 2)) / t - my ** 2
    cxy = (m * xx * yy).sum(axis=(1, 2)) / t - mx * my
    # Deconvolve the weight: C_true^-1 = C_m^-1 - I / sigma_w^2.
    det = cxx * cyy - cxy ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        ixx, iyy, ixy = cyy / det, cxx / det, -cxy / det
        ixx, iyy = ixx - 1 / sigma_w ** 2, iyy - 1 / sigma_w ** 2
        idet = ixx * iyy - ixy ** 2
        txx, tyy, txy = iyy / idet, ixx / idet, -ixy / idet
        tr, dd = txx + tyy, txx * tyy - txy ** 2
        disc = np.sqrt(np.maximum(tr ** 2 / 4 - dd, 0))
        l1, l2 = tr / 2 + disc, tr / 2 - disc
        valid = (det > 0) & (idet > 0) & (l2 > 0)
        f = np.where(valid, 2.3548 * np.sqrt(np.sqrt(l1 * l2)), 0.0)
        e = np.where(valid, np.sqrt(l1 / l2), np.nan)
    # Moments too wide to deconvolve mean the source is at least as broad as the weight;
    # moments narrower than a pixel (det <= 0 or l2 <= 0 with tiny C_m) mean a spike.
    narrow = (~valid) & (cxx + cyy < sigma_w ** 2)
    f = np.where(valid, f, np.where(narrow, 0.5, 2 * fwhm_psf))
    fwhm[ok] = f
    elong[ok] = np.where(np.isfinite(e), e, 1.0)
    return fwhm, elong
