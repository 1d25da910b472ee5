"""Stars: detection and measurement (sep), cross-matching, and the photometric flux ratio.

``find_stars`` gives the catalogue that alignment, PSF measurement and the flux ratio share;
``match_positions`` pairs two catalogues; ``fit_flux_ratio`` turns matched fluxes into the
photometric scale F_n / F_r that ZOGY needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import pandas as pd
import sep
from scipy.spatial import cKDTree

from astrid.diff import sep_nogil
from astrid.diff.background import bad_pixels, sep_array
from astrid.errors import AstridError

STAR_COLUMNS = ("x", "y", "flux", "flux_err", "snr", "fwhm_px", "ellipticity", "peak",
                "flag_saturated", "flag_edge", "flag_masked", "isolated")

# sep's default detection filter, a 3x3 approximation of a Gaussian of FWHM 2 px.
_DETECT_KERNEL = np.array([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]])

# Frames at least this large (px a side) are searched for stars on a 2x2-binned S/N image.
BINNED_DETECTION_MIN_PX = 1024

# sep's pixel stack (active pixels above threshold): its default (300,000) first, larger
# ones for crowded 4k frames.
_PIXSTACKS = (300_000, 3_000_000, 30_000_000)
sep.set_sub_object_limit(4096)


@dataclass(frozen=True)
class FluxRatio:
    """Photometric scale between two images: ``value`` = F_sci / F_ref.

    Attributes
    ----------
    value : flux ratio science / reference (dimensionless).
    err : its 1-sigma uncertainty.
    n_stars : stars offered to the fit (finite, positive fluxes and errors).
    n_used : stars kept after outlier rejection.
    chi2_red : reduced chi^2 of the kept stars (about 1 when the errors are right).
    """

    value: float
    err: float
    n_stars: int
    n_used: int
    chi2_red: float = float("nan")


def find_stars(data: np.ndarray, rms: np.ndarray | float, mask: np.ndarray | None = None, *,
               thresh_sigma: float = 5.0, saturation: float | None = None, minarea: int = 5,
               edge_px: int = 16, isolation_px: float | None = None,
               aperture_radius_px: float | None = None) -> pd.DataFrame:
    """Detect and measure sources with sep.

    Detection runs on the S/N image ``data / rms`` with a scalar threshold, which is what sep's
    ``err=`` mode computes but at half the cost; frames of ``BINNED_DETECTION_MIN_PX`` or more
    a side are searched on that image binned 2x2. Everything measured (centroids, fluxes, peaks,
    shapes) comes from the full-resolution ``data``.

    Parameters
    ----------
    data : (H, W) background-subtracted image in ADU; NaN pixels are treated as masked.
    rms : (H, W) background RMS in ADU, or a scalar.
    mask : (H, W) bool, True at bad pixels, or None.
    thresh_sigma : detection threshold in units of ``rms``.
    saturation : level (in the units of ``data``, i.e. above the background) at or above which a
        source's peak counts as saturated; None when unknown (masked cores are still flagged).
    minarea : minimum number of connected pixels above threshold.
    edge_px : sources closer than this to the image border get ``flag_edge``.
    isolation_px : a source with another detection closer than this is not ``isolated``;
        default ``max(8, 4 * median FWHM)``.
    aperture_radius_px : radius of the photometric aperture; default ``2 * median FWHM``
        (at least 3 px).

    Returns
    -------
    DataFrame, one row per source: ``x, y`` (0-based windowed centroid, px), ``flux``,
    ``flux_err`` (circular aperture, ADU), ``snr``, ``fwhm_px`` (from the area above half the
    peak; a few per cent per star, use the PSF model for an accurate value),
    ``ellipticity`` (1 - b/a, windowed second moments), ``peak`` (brightest pixel, ADU above
    background), ``flag_saturated``, ``flag_edge``, ``flag_masked`` (aperture touches a bad
    pixel), ``isolated`` (no other detection within ``isolation_px``, not deblended).
    """
    data = np.asarray(data)
    if data.ndim != 2:
        raise AstridError(f"find_stars needs a 2-D image, got shape {data.shape}")
    bad = bad_pixels(data, mask)
    # No zero-filled copy: every bad pixel is masked for sep, which then ignores its value.
    work = sep_array(data)
    err = _error_map(rms, data.shape)
    bad_u8 = bad.view(np.uint8)  # sep's mask type, without a copy
    step = 2 if min(data.shape) >= BINNED_DETECTION_MIN_PX else 1
    objects = _detect(work, err, bad, thresh_sigma, minarea, step)
    if len(objects) == 0:
        return pd.DataFrame({c: pd.Series(dtype=float) for c in STAR_COLUMNS})

    x0, y0 = objects["x"].astype(float), objects["y"].astype(float)
    a = objects["a"].astype(float)
    fwhm_px, peak, ellipticity = _shape(work, bad, x0, y0, a)
    median_fwhm = float(np.median(fwhm_px))
    sig = np.clip(fwhm_px, 1.0, 4.0 * median_fwhm) / 2.355
    # 5x5 sub-pixels at the window's edge (sep's default is SExtractor's 11x11): the same
    # centroids to 1e-5 px on simulated stars, at a third of the cost.
    x, y, wflag = sep_nogil.winpos(work, x0, y0, sig, mask=bad_u8, subpix=5)
    moved = (wflag != 0) | ~np.isfinite(x) | ~np.isfinite(y) | (np.hypot(x - x0, y - y0) > 2.0)
    x, y = np.where(moved, x0, x), np.where(moved, y0, y)

    radius = float(aperture_radius_px) if aperture_radius_px else max(3.0, 2.0 * median_fwhm)
    flux, flux_err, flag_masked = _sum_circle(work, err, bad_u8, x, y, radius)

    height, width = data.shape
    flag_saturated = np.zeros(len(objects), bool)
    if saturation is not None:
        flag_saturated |= peak >= saturation
    # A core masked by the reader (saturated or bleeding) shows up as flag_masked instead.
    flag_edge = ((x < edge_px) | (y < edge_px) | (x > width - 1 - edge_px)
                 | (y > height - 1 - edge_px))
    iso_px = float(isolation_px) if isolation_px else max(8.0, 4.0 * median_fwhm)
    isolated = _isolated(np.column_stack([x, y]), iso_px) & ((objects["flag"] & sep.OBJ_MERGED) == 0)

    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.where(flux_err > 0, flux / flux_err, 0.0)
    return pd.DataFrame({
        "x": x, "y": y, "flux": flux, "flux_err": flux_err, "snr": snr, "fwhm_px": fwhm_px,
        "ellipticity": ellipticity, "peak": peak, "flag_saturated": flag_saturated,
        "flag_edge": flag_edge, "flag_masked": flag_masked, "isolated": isolated,
    })


def sep_extract(data: np.ndarray, thresh: float, **kwargs) -> np.ndarray:
    """``sep.extract`` with a pixel stack that grows only when a crowded frame fills it.

    sep allocates its whole stack on every call (~40 ms per million pixels, most of the cost
    of finding stars on a 2048^2 frame at the 3-million size crowded 4k frames need), so the
    default size is tried first. Other failures become an AstridError. Without ``err`` or
    ``var`` the extraction runs with the GIL released (:mod:`astrid.diff.sep_nogil`).
    """
    extract = sep.extract if {"err", "var"} & kwargs.keys() else sep_nogil.extract
    for pixstack in _PIXSTACKS:
        sep.set_extract_pixstack(pixstack)
        try:
            return extract(data, thresh, **kwargs)
        except Exception as exc:  # sep signals overflows with a bare Exception
            if "pixel buffer full" not in str(exc) or pixstack == _PIXSTACKS[-1]:
                raise AstridError(f"source extraction failed: {exc}") from exc
    raise AssertionError("unreachable")


def _detect(work: np.ndarray, err: np.ndarray, bad: np.ndarray, thresh_sigma: float,
            minarea: int, step: int) -> np.ndarray:
    """sep detection on the unit-noise S/N image ``work / err``; ``x, y, a`` returned in
    full-resolution px.

    With ``step`` > 1 the S/N image is binned step x step first (sums divided by ``step``, so
    the noise stays 1), band by band so that no full-size S/N image is built: sep's scan is
    single-threaded, and binning makes it ``step**2`` times smaller. Stars are still found to
    the same S/N (their flux adds up over the bin); centroids, shapes and fluxes are measured
    on the full-resolution image afterwards.
    """
    snr_image = np.empty((work.shape[0] // step, work.shape[1] // step), np.float32)
    binned_bad = np.empty(snr_image.shape, bool)
    _binned_snr(work, err, bad, step, snr_image, binned_bad)
    bad = binned_bad
    if step > 1:
        minarea = max(2, -(-minarea // step**2))
    # sep normalises the detection filter, which lowers the noise of the unit-noise S/N image
    # to sqrt(sum k^2) / sum k of a pixel's: scaling the threshold by it puts ``thresh_sigma``
    # in units of the filtered noise, as sep's err= mode does.
    filtered_noise = float(np.sqrt(np.sum(_DETECT_KERNEL**2)) / np.sum(_DETECT_KERNEL))
    objects = sep_extract(sep_array(snr_image), thresh_sigma * filtered_noise,
                          mask=sep_array(bad, np.uint8), minarea=minarea,
                          filter_kernel=_DETECT_KERNEL, deblend_cont=0.005, clean=True)
    if step > 1:
        # Binned pixel k spans full-resolution pixels step*k ... step*k + step - 1.
        for name in ("x", "y"):
            objects[name] = objects[name] * step + (step - 1) / 2
        objects["a"] = objects["a"] * step
    return objects


def _sum_circle(work: np.ndarray, err: np.ndarray, bad_u8: np.ndarray, x: np.ndarray,
                y: np.ndarray, radius_px: float):
    if x.size == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0, bool)
    flux, flux_err, flag = sep_nogil.sum_circle(work, x, y, radius_px, err=err, mask=bad_u8,
                                                subpix=5)
    flag_masked = (flag & (sep.APER_HASMASKED | sep.APER_TRUNC)) != 0
    return flux, flux_err, flag_masked


def _shape(work: np.ndarray, bad: np.ndarray, x: np.ndarray, y: np.ndarray, a: np.ndarray,
           half: int = 7) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FWHM (px), peak (ADU) and ellipticity of sources, from full-resolution cutouts.

    The FWHM is from the area above half the peak, the peak found to sub-pixel accuracy by a
    parabola through the logarithm of the brightest pixel and its four neighbours (exact for a
    Gaussian core), so an off-centre star is not given the lower threshold of its brightest
    pixel. The ellipticity comes from second moments in a Gaussian window of that FWHM.
    Falls back on the isophotal size ``a`` where the core is not usable.
    """
    height, width = work.shape
    ix = np.clip(np.rint(x).astype(int), half, width - half - 1)
    iy = np.clip(np.rint(y).astype(int), half, height - half - 1)
    offsets = np.arange(-half, half + 1)
    rows = iy[:, None, None] + offsets[None, :, None]
    cols = ix[:, None, None] + offsets[None, None, :]
    cut = np.where(bad[rows, cols], np.nan, work[rows, cols]).astype(float)
    n = len(x)
    flat = np.nan_to_num(cut[:, half - 1:half + 2, half - 1:half + 2], nan=-np.inf).reshape(n, 9)
    k = np.argmax(flat, axis=1)
    py, px = half - 1 + k // 3, half - 1 + k % 3
    idx = np.arange(n)
    c = cut[idx, py, px]
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        floor = 1e-3 * np.abs(c)[:, None]
        lc = np.log(np.clip(c, floor[:, 0], None))
        ly0 = np.log(np.clip(cut[idx, py - 1, px], floor[:, 0], None))
        ly1 = np.log(np.clip(cut[idx, py + 1, px], floor[:, 0], None))
        lx0 = np.log(np.clip(cut[idx, py, px - 1], floor[:, 0], None))
        lx1 = np.log(np.clip(cut[idx, py, px + 1], floor[:, 0], None))
        curv_y, curv_x = ly0 + ly1 - 2 * lc, lx0 + lx1 - 2 * lc
        peak_log = lc - (ly1 - ly0) ** 2 / (8 * curv_y) - (lx1 - lx0) ** 2 / (8 * curv_x)
        peak = np.where((curv_x < 0) & (curv_y < 0), np.exp(peak_log), c)
        peak = np.clip(peak, c, 2.0 * c)
        near = (xx**2 + yy**2)[None] <= (np.clip(3.0 * a, 2.0, half)[:, None, None]) ** 2
        area = np.sum((cut > 0.5 * peak[:, None, None]) & near, axis=(1, 2))
        fwhm_px = 2.0 * np.sqrt(area / np.pi)
        fwhm_px = np.where(np.isfinite(fwhm_px) & (area > 0) & (c > 0), fwhm_px, 2.355 * a)
        # Windowed second moments about the brightest pixel's sub-pixel peak.
        cy = (ly0 - ly1) / (2 * curv_y)
        cx = (lx0 - lx1) / (2 * curv_x)
        cx = np.where(np.abs(cx) <= 1, cx, 0.0) + (px - half)
        cy = np.where(np.abs(cy) <= 1, cy, 0.0) + (py - half)
        dx = xx[None] - cx[:, None, None]
        dy = yy[None] - cy[:, None, None]
        s2 = (np.clip(fwhm_px, 1.0, 2.0 * half) / 2.355)[:, None, None] ** 2
        wgt = np.nan_to_num(cut) * np.exp(-(dx**2 + dy**2) / (2 * s2))
        norm = wgt.sum(axis=(1, 2))
        mxx = (wgt * dx * dx).sum(axis=(1, 2)) / norm
        myy = (wgt * dy * dy).sum(axis=(1, 2)) / norm
        mxy = (wgt * dx * dy).sum(axis=(1, 2)) / norm
        tr = mxx + myy
        diff = np.sqrt((mxx - myy) ** 2 + 4 * mxy**2)
        lam1, lam2 = (tr + diff) / 2, (tr - diff) / 2
        ellipticity = np.where((norm > 0) & (lam2 > 0), 1.0 - np.sqrt(lam2 / lam1), 1.0)
    return fwhm_px, np.where(np.isfinite(c), c, 0.0), ellipticity


def _error_map(rms: np.ndarray | float, shape: tuple[int, int]) -> np.ndarray:
    """Writable float32 noise map for sep; unusable values become infinite (zero weight).

    A background RMS map that is already usable is returned as it is: sep only reads it, and
    a copy of a 4k frame costs as much as the detection's binning.
    """
    if isinstance(rms, np.ndarray) and rms.shape == shape and rms.dtype == np.float32 \
            and rms.flags.c_contiguous and rms.flags.writeable:
        lo, hi = rms.min(), rms.max()  # NaN makes lo > 0 false
        if lo > 0 and np.isfinite(hi):
            return rms
    err = np.array(np.broadcast_to(np.asarray(rms, dtype=np.float32), shape), dtype=np.float32)
    err[~(np.isfinite(err) & (err > 0))] = np.inf
    return err


def _isolated(xy: np.ndarray, radius_px: float) -> np.ndarray:
    """True for points with no other point within ``radius_px``."""
    if len(xy) < 2:
        return np.ones(len(xy), bool)
    dist, _ = cKDTree(xy).query(xy, k=2)
    return dist[:, 1] > radius_px


def good_stars(stars: pd.DataFrame, *, snr_min: float = 10.0) -> pd.DataFrame:
    """Stars fit for photometry and astrometry: unsaturated, unmasked, off the edge, isolated."""
    keep = (~stars["flag_saturated"].astype(bool) & ~stars["flag_edge"].astype(bool)
            & ~stars["flag_masked"].astype(bool) & stars["isolated"].astype(bool)
            & (stars["snr"] >= snr_min))
    return stars[keep]


def match_positions(xy_a: np.ndarray, xy_b: np.ndarray,
                    radius_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Mutual nearest neighbours of two point lists within ``radius_px``.

    Parameters
    ----------
    xy_a : (N, 2) positions (x, y) in px.
    xy_b : (M, 2) positions in the same frame.
    radius_px : largest accepted separation.

    Returns
    -------
    idx_a, idx_b : (K,) int arrays; ``xy_a[idx_a[k]]`` matches ``xy_b[idx_b[k]]``, each point
    used at most once, each the other's nearest neighbour.
    """
    xy_a = np.asarray(xy_a, float).reshape(-1, 2)
    xy_b = np.asarray(xy_b, float).reshape(-1, 2)
    if len(xy_a) == 0 or len(xy_b) == 0:
        return np.zeros(0, int), np.zeros(0, int)
    dist_ab, near_b = cKDTree(xy_b).query(xy_a, distance_upper_bound=radius_px)
    _, near_a = cKDTree(xy_a).query(xy_b, distance_upper_bound=radius_px)
    idx_a = np.flatnonzero(np.isfinite(dist_ab))
    idx_b = near_b[idx_a]
    mutual = near_a[idx_b] == idx_a
    return idx_a[mutual], idx_b[mutual]


def fit_flux_ratio(flux_sci: np.ndarray, flux_ref: np.ndarray, err_sci: np.ndarray,
                   err_ref: np.ndarray, *, clip_sigma: float = 3.0, systematic_frac: float = 0.0,
                   max_iter: int = 20) -> FluxRatio:
    """Robust fit of ``flux_sci = value * flux_ref`` through the origin.

    Errors in both variables enter through the effective variance
    ``err_sci**2 + value**2 * err_ref**2`` (plus ``systematic_frac`` of each flux, for PSF and
    aperture systematics that Poisson errors miss). Stars whose normalised residual exceeds
    ``clip_sigma`` times the robust (MAD) scatter are rejected, and the fit is iterated until
    the set of kept stars no longer changes, so variable stars and blends do not pull the scale.

    Parameters
    ----------
    flux_sci, flux_ref : (N,) matched fluxes in ADU of each image.
    err_sci, err_ref : (N,) their 1-sigma errors in ADU.

    Returns
    -------
    FluxRatio; ``err`` is the formal error scaled up by sqrt(reduced chi^2) when that exceeds 1.
    """
    fs, fr = np.asarray(flux_sci, float), np.asarray(flux_ref, float)
    es, er = np.asarray(err_sci, float), np.asarray(err_ref, float)
    ok = (np.isfinite(fs) & np.isfinite(fr) & np.isfinite(es) & np.isfinite(er)
          & (es > 0) & (er > 0) & (fr > 0))
    fs, fr, es, er = fs[ok], fr[ok], es[ok], er[ok]
    n_stars = int(fs.size)
    if n_stars < 3:
        raise AstridError(f"flux ratio: only {n_stars} matched stars with usable photometry "
                          "(need at least 3)")
    value = float(np.median(fs / fr))
    keep = np.ones(n_stars, bool)
    for _ in range(max_iter):
        var = es**2 + value**2 * er**2 + systematic_frac**2 * (fs**2 + (value * fr) ** 2)
        w = 1.0 / var
        value = float(np.sum(w[keep] * fs[keep] * fr[keep]) / np.sum(w[keep] * fr[keep] ** 2))
        chi = (fs - value * fr) * np.sqrt(w)
        scale = max(1.0, 1.4826 * float(np.median(np.abs(chi[keep] - np.median(chi[keep])))))
        new_keep = np.abs(chi) < clip_sigma * scale
        if new_keep.sum() < 3 or np.array_equal(new_keep, keep):
            break
        keep = new_keep
    var = es**2 + value**2 * er**2 + systematic_frac**2 * (fs**2 + (value * fr) ** 2)
    w = 1.0 / var
    n_used = int(keep.sum())
    chi2_red = float(np.sum(w[keep] * (fs[keep] - value * fr[keep]) ** 2) / max(n_used - 1, 1))
    err = float(np.sqrt(1.0 / np.sum(w[keep] * fr[keep] ** 2)) * np.sqrt(max(chi2_red, 1.0)))
    return FluxRatio(value=value, err=err, n_stars=n_stars, n_used=n_used, chi2_red=chi2_red)


@numba.njit(cache=True, nogil=True)
def _binned_snr(work, err, bad, step, snr_out, bad_out):  # pragma: no cover (compiled)
    """``work / err`` summed over step x step blocks and divided by ``step`` (unit noise
    again), and whether a block holds a bad pixel; in one pass, without the GIL."""
    hb, wb = snr_out.shape
    scale = np.float32(step)
    for i in range(hb):
        for j in range(wb):
            total = np.float32(0.0)
            any_bad = False
            for a in range(step):
                y = i * step + a
                for b in range(step):
                    x = j * step + b
                    total += work[y, x] / err[y, x]
                    any_bad |= bad[y, x]
            snr_out[i, j] = total / scale if step > 1 else total
            bad_out[i, j] = any_bad
