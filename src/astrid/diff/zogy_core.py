"""ZOGY image subtraction (Zackay, Ofek & Gal-Yam 2016, ApJ 830, 27) on arrays, in tiles.

The equations follow ``ZOGY.md`` (our notation): R reference, N new (science) image, both
background-subtracted on the science grid; P_r, P_n their PSFs; sigma_r, sigma_n their background
noise; F_r = 1 and F_n = the measured flux ratio N/R. Per tile we compute

* D (difference image, unit-variance white noise in empty sky),
* S (matched-filter score) and its variance V(S) = V_r (x) k_r^2 + V_n (x) k_n^2 + V_ast,
* S_corr = S / sqrt(V(S)) (detection statistic, in sigma),
* the PSF flux S / F_S and its error sqrt(V(S)) / F_S.

Everything is float32, real FFTs (``scipy.fft.rfft2``) with ``workers``; the image transforms
R-hat and N-hat are taken once per tile, the kernels k_r, k_n are built in Fourier space on a
small grid (they are compact) and their squares transformed once; the element-wise work
between the FFTs is done in compiled passes (:mod:`astrid.diff.zogy_fused`). Masked pixels
are zeroed in both the data and the variance maps before the FFT, which keeps S_corr a
unit-variance statistic next to them; the kernel footprint around them is flagged in the
output mask.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy import fft as sfft
from threadpoolctl import ThreadpoolController

from astrid.diff.zogy_fused import (
    bad_pixel_scan,
    finish_tile,
    finish_variance,
    flag_non_finite,
    score_spectra,
    variance_spectrum,
    zero_where,
)

# Output mask bits (uint8), on the science grid. See docs/interfaces.md.
MASK_SCI_BAD = 1  # bad science pixel, or within the kernel footprint of one
MASK_REF_BAD = 2  # bad reference pixel, or within the kernel footprint of one
MASK_NO_OVERLAP = 4  # the reference does not cover this pixel (or the kernel footprint of one)
MASK_SATURATED = 8  # saturated in either image, or within the kernel footprint of one
MASK_EDGE = 16  # within the kernel footprint of the image border
MASK_BAD_ANY = MASK_SCI_BAD | MASK_REF_BAD | MASK_NO_OVERLAP | MASK_SATURATED

PSFSource = np.ndarray | Callable[[float, float], np.ndarray]

_DEN2_FLOOR = 1e-12  # relative floor of the ZOGY denominator squared (avoids 0/0)
_KERNEL_GRID_MIN_PX = 64  # smallest grid on which the compact kernels k_r, k_n are built


@dataclass(frozen=True)
class ZogyTile:
    """ZOGY outputs for one tile (arrays of the tile's shape, float32).

    ``score`` is S, ``var_score`` its variance V(S) (source + background + astrometric terms),
    ``flux_zp_score`` F_S (S of a unit-flux point source), ``flux_zp_diff`` F_D and
    ``kernel_radius_px`` the radius holding 99 % of the kernels' absolute weight.
    """

    diff: np.ndarray
    score: np.ndarray
    var_score: np.ndarray
    flux_zp_score: float
    flux_zp_diff: float
    kernel_radius_px: int


@dataclass(frozen=True)
class ZogyImages:
    """ZOGY outputs for a whole image, on the science grid (float32 unless stated).

    diff : D, unit-variance white noise in empty sky.
    scorr : S_corr in sigma (NaN at bad input pixels).
    flux, flux_err : PSF flux of a point source centred on each pixel, science ADU; ``flux``
        is a :class:`FluxMap` (S_corr x flux_err, computed where indexed).
    mask : uint8 bit flags (``MASK_*``), input bits dilated by the kernel footprint plus edges.
    flux_zp_score, flux_zp_diff : F_S and F_D of the central tile.
    kernel_radius_px : footprint radius used for the mask dilation, px.
    """

    diff: np.ndarray
    scorr: np.ndarray
    flux: FluxMap
    flux_err: np.ndarray
    mask: np.ndarray
    flux_zp_score: float
    flux_zp_diff: float
    kernel_radius_px: int


class FluxMap:
    """The PSF flux map of ZOGY, ``S_corr * flux_err``, computed only where indexed.

    S_corr = S / sqrt(V(S)) and the flux is S / F_S, so the flux is S_corr times its error:
    no third full-size map (64 MB at 4096^2) is needed. Indexing returns an array like the
    map's; ``np.asarray(flux_map)`` builds the whole map (for writing it out). It stays right
    when S_corr and its error are rescaled together (``_finish``).
    """

    def __init__(self, scorr: np.ndarray, flux_err: np.ndarray):
        self.scorr, self.flux_err = scorr, flux_err
        self.shape, self.dtype, self.ndim = scorr.shape, scorr.dtype, scorr.ndim

    def __getitem__(self, idx):
        return self.scorr[idx] * self.flux_err[idx]

    def __array__(self, dtype=None, copy=None):
        out = self.scorr * self.flux_err
        return out if dtype is None else out.astype(dtype)


def embed_centered(stamp: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Place ``stamp`` (centre at index ``S // 2``) in a zero array so its centre is at (0, 0).

    This is ``ifftshift`` of the stamp padded to ``shape``: the layout FFT convolution expects.
    """
    out = np.zeros(shape, np.float32)
    sy, sx = stamp.shape
    iy = (np.arange(sy) - sy // 2) % shape[0]
    ix = (np.arange(sx) - sx // 2) % shape[1]
    out[np.ix_(iy, ix)] = stamp
    return out


def stamp_rfft2(stamp: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``rfft2(embed_centered(stamp, shape))`` as two small matrix products.

    A (S, S) stamp padded to a tile has S x S non-zero pixels, so its transform is the
    separable DFT ``F_y @ stamp @ F_x^T`` with (N, S) DFT matrices: about half the time of
    the FFT over the padded tile, whose column pass costs nearly a whole ``rfft2``.
    """
    sy, sx = stamp.shape
    ny, nx = shape
    rows = np.asarray(stamp, np.complex64) @ _dft_matrix(nx, sx, nx // 2 + 1).T
    return _dft_matrix(ny, sy, ny) @ rows


@functools.lru_cache(maxsize=16)
def _dft_matrix(n: int, size: int, n_freq: int) -> np.ndarray:
    """exp(-2 pi i k (p - size // 2) / n) for frequencies k < n_freq and stamp pixels p
    (read-only: shared between tiles and threads)."""
    phase = (np.arange(n_freq)[:, None] * (np.arange(size)[None, :] - size // 2)) % n
    out = np.exp(-2j * np.pi * phase / n).astype(np.complex64)
    out.flags.writeable = False
    return out


def _rfft_weights(shape: tuple[int, int]) -> np.ndarray:
    """Column weights turning a sum over the rfft half-plane into a sum over the full plane."""
    nx = shape[1]
    w = np.full(nx // 2 + 1, 2.0, np.float32)
    w[0] = 1.0
    if nx % 2 == 0:
        w[-1] = 1.0
    return w


def _zogy_spectra(psf_ref_hat, psf_sci_hat, sigma_ref, sigma_sci, flux_ratio):
    """den^2 and the two products that every ZOGY quantity is built from (F_r = 1)."""
    fr, fn = 1.0, float(flux_ratio)
    pr2 = (psf_ref_hat.real ** 2 + psf_ref_hat.imag ** 2).astype(np.float32)
    pn2 = (psf_sci_hat.real ** 2 + psf_sci_hat.imag ** 2).astype(np.float32)
    den2 = np.float32(sigma_sci ** 2 * fr ** 2) * pr2 + np.float32(sigma_ref ** 2 * fn ** 2) * pn2
    np.maximum(den2, np.float32(_DEN2_FLOOR * float(den2.max())), out=den2)
    return fr, fn, pr2, pn2, den2


def zogy_kernels(psf_ref: np.ndarray, psf_sci: np.ndarray, sigma_ref: float, sigma_sci: float,
                 flux_ratio: float, grid_px: int | None = None):
    """The compact ZOGY kernels on a small grid, centred at (0, 0).

    Returns
    -------
    k_ref, k_sci : (K, K) float32
        S = k_sci (x) N - k_ref (x) R (ZOGY.md, k_r and k_n).
    flux_zp_diff : float
        F_D.
    flux_zp_score : float
        F_S = F_D^2 sum |P_D-hat|^2 / K^2 = F_D^2 sum P_D^2.
    """
    shape, pr_hat, pn_hat = _kernel_grid_spectra(psf_ref, psf_sci, grid_px)
    grid = shape[0]
    fr, fn, pr2, pn2, den2 = _zogy_spectra(pr_hat, pn_hat, sigma_ref, sigma_sci, flux_ratio)
    k_ref = sfft.irfft2(fr * fn ** 2 * np.conj(pr_hat) * pn2 / den2, s=shape).astype(np.float32)
    k_sci = sfft.irfft2(fn * fr ** 2 * np.conj(pn_hat) * pr2 / den2, s=shape).astype(np.float32)
    flux_zp_diff = fr * fn / np.sqrt(sigma_sci ** 2 * fr ** 2 + sigma_ref ** 2 * fn ** 2)
    # |P_D-hat|^2 = (F_r F_n)^2 |P_r|^2 |P_n|^2 / (F_D^2 den^2)
    pd2 = (fr * fn) ** 2 * pr2 * pn2 / (flux_zp_diff ** 2 * den2)
    flux_zp_score = flux_zp_diff ** 2 * float((pd2 * _rfft_weights(shape)).sum()) / grid ** 2
    return k_ref, k_sci, float(flux_zp_diff), float(flux_zp_score)


def _kernel_grid_spectra(psf_ref: np.ndarray, psf_sci: np.ndarray, grid_px: int | None):
    """The small square grid kernels are built on (twice the PSF stamp, at least
    ``_KERNEL_GRID_MIN_PX``) and both PSFs' spectra on it: (shape, P_r-hat, P_n-hat)."""
    size = max(psf_ref.shape[0], psf_sci.shape[0])
    grid = grid_px or sfft.next_fast_len(max(_KERNEL_GRID_MIN_PX, 2 * size), real=True)
    shape = (grid, grid)
    return (shape, sfft.rfft2(embed_centered(psf_ref, shape)),
            sfft.rfft2(embed_centered(psf_sci, shape)))


def diff_kernels(psf_ref: np.ndarray, psf_sci: np.ndarray, sigma_ref: float, sigma_sci: float,
                 flux_ratio: float, grid_px: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The kernels of D on a small grid, centred at (0, 0): D = kd_sci (x) N - kd_ref (x) R.

    kd_sci-hat = F_r P_r-hat / den and kd_ref-hat = F_n P_n-hat / den; their squares convolved
    with the variance maps give the variance of D including source noise.
    """
    shape, pr_hat, pn_hat = _kernel_grid_spectra(psf_ref, psf_sci, grid_px)
    fr, fn, _, _, den2 = _zogy_spectra(pr_hat, pn_hat, sigma_ref, sigma_sci, flux_ratio)
    den = np.sqrt(den2)
    kd_sci = sfft.irfft2(fr * pr_hat / den, s=shape).astype(np.float32)
    kd_ref = sfft.irfft2(fn * pn_hat / den, s=shape).astype(np.float32)
    return kd_ref, kd_sci


def kernel_radius_px(k_ref: np.ndarray, k_sci: np.ndarray, level: float = 0.01) -> int:
    """Radius (px) beyond which both kernels (centred at 0) stay below ``level`` of their peak.

    A masked (zeroed) pixel disturbs S by at most that fraction of a full pixel's weight
    outside this radius, so the mask is dilated by it.
    """
    grid = k_ref.shape[0]
    f = np.fft.fftfreq(grid, 1 / grid)
    r = np.hypot(f[:, None], f[None, :])
    radius = 1.0
    for k in (k_ref, k_sci):
        a = np.abs(k)
        strong = a >= level * float(a.max())
        radius = max(radius, float(r[strong].max()))
    return int(np.ceil(radius))


def zogy_tile(ref: np.ndarray, sci: np.ndarray, psf_ref: np.ndarray, psf_sci: np.ndarray, *,
              sigma_ref: float, sigma_sci: float, flux_ratio: float,
              var_ref: np.ndarray | None = None, var_sci: np.ndarray | None = None,
              sigma_x_px: float = 0.0, sigma_y_px: float = 0.0,
              fft_workers: int = 1) -> ZogyTile:
    """ZOGY D, S and V(S) of one tile (PSF constant across it).

    Parameters
    ----------
    ref, sci : (H, W) float
        Background-subtracted reference (on the science grid, reference ADU, not flux-scaled)
        and science image; masked pixels already set to 0.
    psf_ref, psf_sci : (S, S) float
        PSF stamps, centred at index ``S // 2``, summing to 1.
    sigma_ref, sigma_sci : float
        Background noise (std per pixel) of each image, in its own ADU.
    flux_ratio : float
        F_n / F_r: science flux of a source divided by its reference flux.
    var_ref, var_sci : (H, W) float, optional
        Per-pixel variance (background + source Poisson), 0 at masked pixels; default the
        constant ``sigma**2``.
    sigma_x_px, sigma_y_px : float
        Residual registration noise (px) for the astrometric variance term.
    fft_workers : int
        Threads for ``scipy.fft``.
    """
    return _zogy_tile({"ref": ref, "sci": sci, "var_ref": var_ref, "var_sci": var_sci},
                      psf_ref, psf_sci, sigma_ref=sigma_ref, sigma_sci=sigma_sci,
                      flux_ratio=flux_ratio, sigma_x_px=sigma_x_px, sigma_y_px=sigma_y_px,
                      fft_workers=fft_workers)


def _zogy_tile(inputs: dict, psf_ref: np.ndarray, psf_sci: np.ndarray, *, sigma_ref: float,
               sigma_sci: float, flux_ratio: float, sigma_x_px: float, sigma_y_px: float,
               fft_workers: int) -> ZogyTile:
    """:func:`zogy_tile` with its four inputs in a dict that it empties as it transforms them:
    where the dict was their only reference, each tile-sized input is freed once used."""
    h, w = inputs["sci"].shape
    # Zero padding by half a PSF keeps the circular convolution from wrapping one edge onto
    # the other.
    pad = max(psf_ref.shape[0], psf_sci.shape[0]) // 2
    shape = (sfft.next_fast_len(h + pad, real=True), sfft.next_fast_len(w + pad, real=True))
    kw = dict(s=shape, workers=fft_workers)
    f32 = np.float32
    fr, fn = 1.0, float(flux_ratio)
    astrometric = (sigma_x_px > 0) or (sigma_y_px > 0)

    k_ref, k_sci, flux_zp_diff, flux_zp_score = zogy_kernels(
        psf_ref, psf_sci, sigma_ref, sigma_sci, flux_ratio)
    radius = kernel_radius_px(k_ref, k_sci)

    # V(S) = V_r (x) k_r^2 + V_n (x) k_n^2: one inverse FFT for both terms. It comes first,
    # before D and the scores exist: fewer tile-sized arrays are alive at once (each thread's
    # tile is most of ZOGY's memory beyond its outputs).
    # Squared kernels cropped to the PSF stamp: the weight beyond is negligible, and the small
    # stamp keeps their transforms cheap.
    half = max(psf_ref.shape[0], psf_sci.shape[0]) // 2
    c = k_ref.shape[0] // 2
    crop = np.s_[c - half:c + half + 1, c - half:c + half + 1]
    kref2 = np.fft.fftshift(k_ref ** 2)[crop]
    ksci2 = np.fft.fftshift(k_sci ** 2)[crop]
    empty_sky = sigma_ref ** 2 * float(kref2.sum()) + sigma_sci ** 2 * float(ksci2.sum())
    var_ref, var_sci = inputs.pop("var_ref"), inputs.pop("var_sci")
    if var_ref is None and var_sci is None:
        var_score = np.full((h, w), empty_sky, np.float32)
    else:
        if var_ref is None:
            var_ref = np.full((h, w), sigma_ref ** 2, np.float32)
        v_hat = sfft.rfft2(np.asarray(var_ref, np.float32), **kw)
        del var_ref
        if var_sci is None:
            var_sci = np.full((h, w), sigma_sci ** 2, np.float32)
        vn_hat = sfft.rfft2(np.asarray(var_sci, np.float32), **kw)
        del var_sci
        variance_spectrum(v_hat, stamp_rfft2(kref2, shape), vn_hat, stamp_rfft2(ksci2, shape))
        del vn_hat
        var_score = sfft.irfft2(v_hat, overwrite_x=True, **kw)[:h, :w]
        del v_hat

    # The spectra are overwritten in place (fused passes, zogy_fused.score_spectra):
    # R-hat becomes D-hat, P_r-hat S-hat and N-hat S_N-hat, the score of the science image
    # alone, which the astrometric term needs (ZOGY eq. 30-31: the gradients of each input's
    # score, S_N and S_R = S_N - S, not of their difference).
    s_hat = stamp_rfft2(psf_ref, shape)
    pn_hat = stamp_rfft2(psf_sci, shape)
    sn_hat = sfft.rfft2(np.asarray(inputs.pop("sci"), np.float32), **kw)
    d_hat = sfft.rfft2(np.asarray(inputs.pop("ref"), np.float32), **kw)
    score_spectra(s_hat, pn_hat, sn_hat, d_hat, f32(sigma_sci ** 2 * fr ** 2),
                  f32(sigma_ref ** 2 * fn ** 2), f32(fr), f32(fn), f32(_DEN2_FLOOR))
    del pn_hat
    diff = sfft.irfft2(d_hat, overwrite_x=True, **kw)[:h, :w]
    del d_hat
    score = sfft.irfft2(s_hat, overwrite_x=True, **kw)[:h, :w]
    del s_hat
    score_sci = sfft.irfft2(sn_hat, overwrite_x=True, **kw)[:h, :w] if astrometric else score
    del sn_hat

    # Zero-variance regions (all inputs masked) must not divide by ~0: floor at 1e-3 of the
    # empty-sky value. Then the astrometric term.
    finish_variance(var_score, score, score_sci, f32(1e-3 * empty_sky), f32(sigma_x_px),
                    f32(sigma_y_px))
    return ZogyTile(diff=diff, score=score, var_score=var_score,
                    flux_zp_score=flux_zp_score, flux_zp_diff=flux_zp_diff,
                    kernel_radius_px=radius)


@functools.cache
def _blas_threads() -> ThreadpoolController:
    """The BLAS libraries loaded, found once (looking them up costs ~10 ms each time)."""
    return ThreadpoolController()


def one_blas_thread():
    """Context in which BLAS runs on one thread.

    Differencing makes only small matrix products (DFT matrices, node interpolation, fits),
    which gain nothing from more threads; OpenBLAS's idle workers busy-wait after each one,
    taking a core from the FFT and numba threads (about 10% more CPU on 2 cores).
    """
    return _blas_threads().limit(limits=1, user_api="blas")


def tile_edges(n_px: int, tile_px: int) -> np.ndarray:
    """Interior tile edges along one axis: ``ceil(n / tile)`` nearly equal tiles."""
    n_tiles = max(1, int(np.ceil(n_px / tile_px)))
    return np.linspace(0, n_px, n_tiles + 1).round().astype(int)


def _psf_function(psf: PSFSource) -> Callable[[float, float], np.ndarray]:
    if callable(psf):
        return psf
    stamp = np.asarray(psf, np.float32)
    return lambda x, y: stamp


def _tile_copy(values, sl) -> np.ndarray | None:
    """A float32 tile of a map that may be changed in place: a copy of an array's slice, or
    what a map computed on indexing (a LazyVariance) returned, as it is."""
    if values is None:
        return None
    tile = np.asarray(values[sl], np.float32)
    return tile if tile.flags.owndata and tile.flags.writeable else tile.copy()


def _tile_value(value, sl) -> float:
    """A scalar for the tile: the value itself, or the median of a map over the tile."""
    if np.ndim(value) == 0:
        return float(value)
    return float(np.median(value[sl][::4, ::4]))


def footprint_flags(in_mask: np.ndarray, radius_px: int) -> np.ndarray:
    """A difference's output flags from its inputs' ``MASK_*`` flags: every bad bit dilated by
    the kernel footprint (all at once, a box OR over the uint8 flags), ``MASK_EDGE`` within it
    of the border, and any ``MASK_EDGE`` given."""
    out = dilate(in_mask & np.uint8(MASK_BAD_ANY), radius_px)
    border = max(radius_px, 1)
    out[:border, :] |= MASK_EDGE
    out[-border:, :] |= MASK_EDGE
    out[:, :border] |= MASK_EDGE
    out[:, -border:] |= MASK_EDGE
    out |= in_mask & MASK_EDGE
    return out


def dilate(flags: np.ndarray, radius_px: int) -> np.ndarray:
    """Dilate a boolean image by a (2r+1)^2 box (outside the image counts as False); a uint8
    image of bit flags has each bit dilated (a bitwise OR over the box).

    The same as ``ndimage.maximum_filter(flags, 2r + 1, mode="constant")`` (for booleans),
    but separable and by OR-ing shifted slices with doubling widths: O(log r) whole-array
    passes per axis instead of a per-pixel running maximum, several times faster on 4k frames.
    """
    flags = np.asarray(flags)
    if flags.dtype != np.uint8:
        flags = flags.astype(bool, copy=False)
    r = int(radius_px)
    if r <= 0 or not flags.any():
        return flags.copy()
    h = flags.shape[0]
    if h <= _DILATE_BAND_PX + 2 * r:
        return _dilate_axis(_dilate_axis(flags, r, 0), r, 1)
    # In bands of rows (each with the r rows around it): the temporaries stay a band's size,
    # not a few copies of a 4k frame at the peak of a difference's memory.
    out = np.empty_like(flags)
    for y0 in range(0, h, _DILATE_BAND_PX):
        y1 = min(h, y0 + _DILATE_BAND_PX)
        lo, hi = max(0, y0 - r), min(h, y1 + r)
        out[y0:y1] = _dilate_axis(_dilate_axis(flags[lo:hi], r, 0), r, 1)[y0 - lo:y1 - lo]
    return out


_DILATE_BAND_PX = 1024


def _dilate_axis(flags: np.ndarray, r: int, axis: int) -> np.ndarray:
    n = flags.shape[axis]
    pad = [(0, 0), (0, 0)]
    pad[axis] = (r, r)
    run = np.pad(flags, pad)  # run[j] covers padded j .. j + width - 1
    width, total = 1, 2 * r + 1
    # Doubling: OR with a copy shifted by the current width until the next step would overshoot.
    while 2 * width <= total:
        cut = run.shape[axis] - width
        head = run[:cut] if axis == 0 else run[:, :cut]
        tail = run[width:] if axis == 0 else run[:, width:]
        run = head | tail
        width *= 2
    # Two overlapping windows of ``width`` cover exactly ``total``.
    shift = total - width
    if axis == 0:
        return run[:n] | run[shift:shift + n]
    return run[:, :n] | run[:, shift:shift + n]


def zogy_images(ref: np.ndarray, sci: np.ndarray, psf_ref: PSFSource, psf_sci: PSFSource, *,
                sigma_ref, sigma_sci, flux_ratio: float,
                var_ref: np.ndarray | None = None, var_sci: np.ndarray | None = None,
                mask: np.ndarray | None = None, sigma_x_px: float = 0.0,
                sigma_y_px: float = 0.0, tile_px: int = 1024, overlap_px: int = 64,
                fft_workers: int = 1) -> ZogyImages:
    """ZOGY over a whole image in overlapping tiles, each with its own PSFs.

    Parameters
    ----------
    ref, sci : (H, W) float
        Background-subtracted reference (on the science grid, reference ADU) and science.
        NaN pixels are treated as masked.
    psf_ref, psf_sci : (S, S) array or callable ``(x, y) -> (S, S)``
        PSF stamp (centred, sum 1), or a function giving the PSF at a pixel position.
    sigma_ref, sigma_sci : float or (H, W) array
        Background noise per pixel; maps are reduced to their median per tile.
    flux_ratio : float
        Science flux / reference flux of the same source (F_n with F_r = 1).
    var_ref, var_sci : (H, W) float, optional
        Per-pixel variance maps (background + source Poisson).
    mask : (H, W) uint8, optional
        Input ``MASK_*`` bits. Pixels with any of ``MASK_BAD_ANY`` are zeroed before the FFT.
    sigma_x_px, sigma_y_px : float
        Registration noise for the astrometric term of V(S).
    tile_px, overlap_px : int
        Tile interior side and the margin added on each side (discarded after the FFT).
    fft_workers : int
        Threads for ``scipy.fft``.
    """
    h, w = sci.shape
    in_mask = np.zeros((h, w), np.uint8) if mask is None else np.asarray(mask, np.uint8)
    # Non-finite pixels the mask does not flag yet get flagged (prepare_pair flags them all
    # already, so this is one compiled pass that finds none).
    bad_bits = np.uint8(MASK_BAD_ANY)
    any_bad, unflagged = bad_pixel_scan(in_mask, bad_bits, sci, ref)
    if unflagged:
        in_mask = in_mask.copy()
        flag_non_finite(in_mask, bad_bits, sci, np.uint8(MASK_SCI_BAD))
        flag_non_finite(in_mask, bad_bits, ref, np.uint8(MASK_REF_BAD))
    # From here on a pixel is bad exactly where ``in_mask & bad_bits``: no full-size bad map
    # is kept (16 MB at 4096^2, at the peak of the run's memory).

    def tile_inputs(sl):
        """Tile copies of the inputs with bad pixels zeroed in the data and the variance.

        Masked pixels carry no variance, so S_corr stays unit-variance beside them. Zeroing
        per tile keeps the full-size inputs untouched and avoids full-size copies.
        """
        r, n = np.array(ref[sl], np.float32), np.array(sci[sl], np.float32)
        vr, vn = _tile_copy(var_ref, sl), _tile_copy(var_sci, sl)
        if any_bad:
            b = (in_mask[sl] & bad_bits) != 0
            if b.any():
                if vr is None:
                    vr = np.full(r.shape, np.float32(_tile_value(sigma_ref, sl) ** 2))
                if vn is None:
                    vn = np.full(n.shape, np.float32(_tile_value(sigma_sci, sl) ** 2))
                zero_where(b, r, n, vr, vn)
        if (vr is None) != (vn is None):
            if vr is None:
                vr = np.full(r.shape, np.float32(_tile_value(sigma_ref, sl) ** 2))
            else:
                vn = np.full(n.shape, np.float32(_tile_value(sigma_sci, sl) ** 2))
        return r, n, vr, vn

    psf_ref_at = _psf_function(psf_ref)
    psf_sci_at = _psf_function(psf_sci)
    diff = np.empty((h, w), np.float32)
    scorr = np.empty((h, w), np.float32)
    flux_err = np.empty((h, w), np.float32)
    edges_y, edges_x = tile_edges(h, tile_px), tile_edges(w, tile_px)
    if len(edges_y) > 2 or len(edges_x) > 2:
        # Tile interiors are exact only if the margin covers the kernels' reach.
        k_ref, k_sci, _, _ = zogy_kernels(psf_ref_at(w / 2, h / 2), psf_sci_at(w / 2, h / 2),
                                          _tile_value(sigma_ref, np.s_[:, :]),
                                          _tile_value(sigma_sci, np.s_[:, :]), flux_ratio)
        overlap_px = max(overlap_px, kernel_radius_px(k_ref, k_sci) + 2)
    def run_tile(y0, y1, x0, x1, workers):
        """ZOGY of one tile, its interior written into the outputs (disjoint per tile)."""
        py0, py1 = max(0, y0 - overlap_px), min(h, y1 + overlap_px)
        px0, px1 = max(0, x0 - overlap_px), min(w, x1 + overlap_px)
        sl = np.s_[py0:py1, px0:px1]
        xc, yc = 0.5 * (x0 + x1 - 1), 0.5 * (y0 + y1 - 1)
        # The dict is the inputs' only reference: each is freed once transformed.
        tile = _zogy_tile(
            dict(zip(("ref", "sci", "var_ref", "var_sci"), tile_inputs(sl), strict=True)),
            psf_ref_at(xc, yc), psf_sci_at(xc, yc),
            sigma_ref=_tile_value(sigma_ref, sl), sigma_sci=_tile_value(sigma_sci, sl),
            flux_ratio=flux_ratio, sigma_x_px=sigma_x_px, sigma_y_px=sigma_y_px,
            fft_workers=workers)
        inner = np.s_[y0 - py0:y1 - py0, x0 - px0:x1 - px0]
        out = np.s_[y0:y1, x0:x1]
        # S / F_S is the flux in reference units (F_r = 1); times F_n gives science ADU.
        # Bad pixels become NaN in all three outputs.
        finish_tile(tile.diff[inner], tile.score[inner], tile.var_score[inner],
                    in_mask[out], bad_bits if any_bad else np.uint8(0),
                    np.float32(flux_ratio / tile.flux_zp_score),
                    diff[out], scorr[out], flux_err[out])
        return tile.kernel_radius_px, tile.flux_zp_score, tile.flux_zp_diff

    boxes = [(y0, y1, x0, x1) for y0, y1 in zip(edges_y[:-1], edges_y[1:], strict=True)
             for x0, x1 in zip(edges_x[:-1], edges_x[1:], strict=True)]
    n_threads = min(max(1, int(fft_workers)), len(boxes))
    if n_threads > 1:
        # Whole tiles in parallel, one FFT thread each: the FFTs are as before (pocketfft
        # splits a transform into independent 1-D ones), and the element-wise work between
        # them, serial within a tile, now runs on every core too. BLAS (the PSF spectra's
        # matrix products) gets one thread per tile too: two tiles' products each spawning
        # threads would spin against each other.
        # The calling thread takes its share, so only n_threads - 1 helper threads (and
        # malloc arenas, which keep freed tile buffers) are added.
        results = [None] * len(boxes)
        with one_blas_thread(), ThreadPoolExecutor(max_workers=n_threads - 1) as pool:
            helped = {k: pool.submit(run_tile, *boxes[k], 1)
                      for k in range(len(boxes)) if k % n_threads}
            for k in range(0, len(boxes), n_threads):
                results[k] = run_tile(*boxes[k], 1)
            for k, future in helped.items():
                results[k] = future.result()
    else:
        results = [run_tile(*box, fft_workers) for box in boxes]
    radius = 0
    zp_center = None
    for (y0, y1, x0, x1), (tile_radius, zp_score, zp_diff) in zip(boxes, results, strict=True):
        radius = max(radius, tile_radius)
        if zp_center is None or (y0 <= h // 2 < y1 and x0 <= w // 2 < x1):
            zp_center = (zp_score, zp_diff)

    out_mask = footprint_flags(in_mask, radius)
    return ZogyImages(diff=diff, scorr=scorr, flux=FluxMap(scorr, flux_err), flux_err=flux_err,
                      mask=out_mask, flux_zp_score=zp_center[0], flux_zp_diff=zp_center[1],
                      kernel_radius_px=radius)
