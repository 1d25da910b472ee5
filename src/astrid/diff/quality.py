"""Quality figures of a difference: noise ratios in empty sky and residual chi^2 at stars.

* ``noise_ratio``: robust std (1.4826 MAD) of S_corr in source-free, unmasked pixels; 1 when
  the noise model is right. The same figure for D is reported as ``noise_ratio_diff``.
* ``star_residual_chi2``: chi^2 per pixel of D in PSF-sized apertures at reference stars, with
  the expected variance of D at each pixel including the stars' own Poisson noise
  (V(D) = V_n (x) kd_n^2 + V_r (x) kd_r^2); about 1 when stars subtract to the noise.
"""

from __future__ import annotations

import numba
import numpy as np

from astrid.diff.background import LazyVariance
from astrid.diff.zogy_core import diff_kernels, dilate

_ROBUST = 1.4826  # MAD -> sigma for a Gaussian


def robust_std(values: np.ndarray) -> float:
    """1.4826 x median absolute deviation of the finite values (NaN if none)."""
    v = np.asarray(values)
    if not np.issubdtype(v.dtype, np.floating):
        v = v.astype(float)
    v = v[np.isfinite(v)]  # a copy, so the deviations can be taken in place
    if v.size == 0:
        return float("nan")
    # In the input's precision and in place: on 4k frames float64 temporaries cost ~100 MB.
    np.subtract(v, np.median(v), out=v)
    np.abs(v, out=v)
    return float(_ROBUST * np.median(v))


def source_free(sci: np.ndarray, ref: np.ndarray, sigma_sci: float, sigma_ref: float, *,
                thresh_sigma: float = 3.0, grow_px: int = 8, bin_px: int = 4) -> np.ndarray:
    """Boolean map (binned by ``bin_px``) of bins away from sources in either image.

    Sources are ``bin_px`` x ``bin_px`` sums above ``thresh_sigma`` times their noise, grown by
    ``grow_px``. The binning smooths the noise, so few bins are flagged by noise alone: a
    low threshold on unbinned pixels would drop the upward noise peaks that S_corr shares with
    the science image and bias the measured noise low. Returns ``(H // bin_px, W // bin_px)``.
    """
    h, w = (sci.shape[0] // bin_px) * bin_px, (sci.shape[1] // bin_px) * bin_px

    def binned(a):
        out = np.zeros((h // bin_px, w // bin_px), np.result_type(a.dtype, np.float32))
        _nan_bin_sum(a, bin_px, out)
        return out

    sources = np.zeros((h // bin_px, w // bin_px), bool)
    for img, sigma in ((sci, sigma_sci), (ref, sigma_ref)):
        b = binned(img)
        # The binned noise is measured, not assumed: correlated noise (stacks, resampled
        # images) makes it larger than bin_px * sigma.
        noise = max(robust_std(b[::2, ::2]), sigma * bin_px)
        sources |= b > thresh_sigma * noise
    grow = max(1, int(np.ceil(grow_px / bin_px)))
    sources = dilate(sources, grow)
    return ~sources


# S_corr is correlated over the PSF, so pixels closer than a FWHM add little to its MAD:
# a 2048^2 frame at stride 4 (230,000 pixels) gives the figure of all 3.6 million to 0.1%.
_MAX_NOISE_SAMPLES = 300_000


def noise_ratios(scorr: np.ndarray, diff: np.ndarray, mask: np.ndarray, free: np.ndarray,
                 bin_px: int = 4, stride_px: int | None = None) -> tuple[float, float, int]:
    """Robust std of S_corr and of D over source-free, unmasked pixels.

    ``free`` comes from :func:`source_free` with the same ``bin_px``; every ``stride_px``-th
    pixel of the free bins is used (default 2, or ``bin_px`` where every other pixel would
    give over ``_MAX_NOISE_SAMPLES``: their medians would cost more than the figure gains).
    Returns ``(noise_ratio_scorr, noise_ratio_diff, n_pixels)``.
    """
    hb, wb = free.shape
    if stride_px is None:
        stride_px = 2 if (hb * bin_px // 2) * (wb * bin_px // 2) <= _MAX_NOISE_SAMPLES \
            else bin_px
    rep = bin_px // stride_px
    use = np.repeat(np.repeat(free, rep, axis=0), rep, axis=1)
    sub = np.s_[:hb * bin_px:stride_px, :wb * bin_px:stride_px]
    use &= mask[sub] == 0
    s, d = scorr[sub][use], diff[sub][use]
    return robust_std(s), robust_std(d), int(use.sum())


def star_residual_chi2(diff: np.ndarray, xy: np.ndarray, var_sci: np.ndarray,
                       var_ref: np.ndarray, psf_ref: np.ndarray, psf_sci: np.ndarray, *,
                       sigma_ref: float, sigma_sci: float, flux_ratio: float,
                       radius_px: float, mask: np.ndarray | None = None,
                       max_stars: int = 600) -> tuple[float, int]:
    """Chi^2 per pixel of D in circular apertures at star positions (at most ``max_stars``,
    an even subsample of the list beyond that: 600 apertures pin the figure to about 1%).

    Parameters
    ----------
    diff : (H, W) D.
    xy : (N, 2) star positions (x, y) on the science grid, px.
    var_sci, var_ref : (H, W) variance maps of N and of R (reference ADU), 0 where masked.
    psf_ref, psf_sci, sigma_ref, sigma_sci, flux_ratio : as for ZOGY (central PSFs).
    radius_px : aperture radius, px (about the PSF FWHM).
    mask : (H, W) uint8; stars whose aperture holds a flagged pixel are skipped.

    Returns
    -------
    (chi2 per pixel pooled over the apertures, number of stars used); stars more than 5
    robust sigma above the median (variables, transients on stars) are left out. NaN, 0
    without stars.
    """
    xy = np.asarray(xy, float).reshape(-1, 2)
    h, w = diff.shape
    kd_ref, kd_sci = diff_kernels(psf_ref, psf_sci, sigma_ref, sigma_sci, flux_ratio)
    # Crop the compact kernels to where they matter.
    k2_ref, k2_sci = (np.fft.fftshift(k ** 2) for k in (kd_ref, kd_sci))
    c = k2_ref.shape[0] // 2
    half = int(np.clip(np.ceil(3 * radius_px), 3, c - 1))
    k2_ref = k2_ref[c - half:c + half + 1, c - half:c + half + 1]
    k2_sci = k2_sci[c - half:c + half + 1, c - half:c + half + 1]
    # The kernels are normalised so that empty sky gives V(D) = 1; cropping loses a little.
    r = int(np.ceil(radius_px))
    ix, iy = np.rint(xy[:, 0]).astype(int), np.rint(xy[:, 1]).astype(int)
    margin = r + half
    inside = (ix >= margin) & (iy >= margin) & (ix < w - margin) & (iy < h - margin)
    ix, iy = ix[inside], iy[inside]
    if ix.size == 0:
        return float("nan"), 0
    if ix.size > max_stars:
        keep = np.linspace(0, ix.size - 1, max_stars).round().astype(int)
        ix, iy = ix[keep], iy[keep]
    dd = np.arange(-r, r + 1)
    aperture = (dd[:, None] ** 2 + dd[None, :] ** 2) <= radius_px ** 2
    ay, ax = iy[:, None, None] + dd[None, :, None], ix[:, None, None] + dd[None, None, :]
    resid = diff[ay, ax].astype(float)
    ok = np.isfinite(resid).all(axis=(1, 2))
    if mask is not None:
        ok &= (mask[ay, ax] == 0).all(axis=(1, 2))
    if not ok.any():
        return float("nan"), 0
    ix, iy, resid = ix[ok], iy[ok], resid[ok][:, aperture]
    # V(D) at the aperture pixels: V_n (x) kd_n^2 + V_r (x) kd_r^2 summed directly there
    # from a stamp of each variance map per star, not by FFTs of whole stamps.
    off_y, off_x = (np.nonzero(aperture)[k].astype(np.int64) for k in (0, 1))
    var_d = np.zeros(resid.shape)
    for var, k2 in ((var_sci, k2_sci), (var_ref, k2_ref)):
        if isinstance(var, LazyVariance):
            stamps = var.stamps(iy, ix, margin)
        else:
            d = np.arange(-margin, margin + 1)
            stamps = np.asarray(var[iy[:, None, None] + d[None, :, None],
                                    ix[:, None, None] + d[None, None, :]], np.float32)
        _add_convolved(stamps, np.ascontiguousarray(k2[::-1, ::-1], np.float32), off_y, off_x,
                       var_d)
    chi2 = resid ** 2 / np.maximum(var_d, 1e-6)
    per_star = chi2.mean(axis=1)
    # Variable stars and stars next to transients are real changes, not subtraction errors:
    # drop stars far above the bulk (robust 5-sigma, for a chi^2 with ~npix degrees of freedom).
    k = aperture.sum()
    limit = np.median(per_star) + 5 * max(robust_std(per_star), np.sqrt(2 / k))
    keep = per_star <= limit
    return float(chi2[keep].mean()), int(keep.sum())


@numba.njit(cache=True, nogil=True, fastmath=True)
def _add_convolved(stamps, flipped, off_y, off_x, out):  # pragma: no cover (compiled)
    """``out[n, p] +=`` the 'valid' convolution of ``stamps[n]`` with a kernel (given
    flipped) at output pixel ``(off_y[p], off_x[p])``."""
    k = flipped.shape[0]
    partial = np.empty(k, np.float32)
    for n in range(stamps.shape[0]):
        stamp = stamps[n]
        for p in range(off_y.size):
            y0, x0 = off_y[p], off_x[p]
            # Column sums first, reduced once at the end: a reduction per kernel row cost
            # 1.6x more. float32 and fastmath: the inner loop vectorises.
            partial[:] = 0.0
            for a in range(k):
                # Sliced so the loop indexes from 0: no wraparound check, so it vectorises.
                row, kr = stamp[y0 + a, x0:x0 + k], flipped[a]
                for b in range(k):
                    partial[b] += row[b] * kr[b]
            out[n, p] += partial.sum()


@numba.njit(cache=True, nogil=True)
def _nan_bin_sum(image, step, out):  # pragma: no cover (compiled)
    """``out`` (zeros, shape ``image.shape // step``) += sums over ``step`` x ``step`` blocks,
    NaN counted as 0, in one pass."""
    hb, wb = out.shape
    zero = np.float32(0.0)
    for ob in range(hb):
        acc = out[ob]
        for k in range(step):
            row = image[ob * step + k]
            for kk in range(step):
                # Every step-th pixel from kk: a loop over output bins, which vectorises
                # (a scatter into ``acc[j // step]`` did not: 3x slower).
                column = row[kk:wb * step:step]
                for j in range(wb):
                    v = column[j]
                    acc[j] += v if v == v else zero
