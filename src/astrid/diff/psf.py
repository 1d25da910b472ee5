"""Point-spread function: empirical stacks of bright isolated stars, per tile, with a Moffat fallback.

Each selected star is cut out, shifted by its sub-pixel offset in Fourier space (exact for
band-limited images, so the stack is not blurred by interpolation), normalised by its PSF-fit
amplitude and combined with a per-pixel sigma-clipped, inverse-variance weighted mean, with
neighbours masked. A circular Moffat fit to the stack gives its FWHM and the residual centre
offset, which is removed by a last Fourier shift; where the stack is noise the Moffat replaces
it, and the wings are tapered to zero at the stamp edge so that noise and neighbours there do
not enter ZOGY's kernels or the normalisation.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numba
import numpy as np
import pandas as pd
from scipy import fft, optimize
from scipy.spatial import cKDTree

from astrid.diff.background import bad_pixels, check_mask_shape
from astrid.diff.stars import find_stars
from astrid.errors import AstridError


@dataclass(frozen=True)
class PSFModel:
    """PSF of an image, constant within each tile.

    Attributes
    ----------
    stamps : (ny, nx, S, S) float32, each summing to 1 and centred on pixel (S//2, S//2).
    tile_edges_y, tile_edges_x : (ny + 1,), (nx + 1,) int pixel edges of the tiles.
    fwhm_px : median FWHM over tiles (px).
    fwhm_tiles : (ny, nx) FWHM of each tile's stamp (px).
    n_stars : stars in the global stack.
    method : "empirical" or "moffat" (fallback fit).
    n_stars_tiles : (ny, nx) stars stacked per tile (0 where the global PSF is used).
    """

    stamps: np.ndarray
    tile_edges_y: np.ndarray
    tile_edges_x: np.ndarray
    fwhm_px: float
    fwhm_tiles: np.ndarray
    n_stars: int
    method: str
    n_stars_tiles: np.ndarray | None = None

    @property
    def size_px(self) -> int:
        return int(self.stamps.shape[-1])

    @property
    def central(self) -> np.ndarray:
        """(S, S) stamp of the tile nearest the image centre."""
        yc = 0.5 * (self.tile_edges_y[0] + self.tile_edges_y[-1])
        xc = 0.5 * (self.tile_edges_x[0] + self.tile_edges_x[-1])
        return psf_at(self, xc, yc)


def psf_at(model: PSFModel, x: float, y: float) -> np.ndarray:
    """(S, S) PSF stamp of the tile containing pixel ``(x, y)`` (0-based; clipped to the image)."""
    iy = int(np.clip(np.searchsorted(model.tile_edges_y, y, side="right") - 1,
                     0, model.stamps.shape[0] - 1))
    ix = int(np.clip(np.searchsorted(model.tile_edges_x, x, side="right") - 1,
                     0, model.stamps.shape[1] - 1))
    return model.stamps[iy, ix]


def measure_psf(data_bkgsub: np.ndarray, rms: np.ndarray | float, mask: np.ndarray | None = None,
                *, size_px: int = 31, tile_px: int | None = None,
                stars: pd.DataFrame | None = None, saturation: float | None = None,
                min_stars: int = 5, max_stars: int = 300, snr_min: float = 10.0) -> PSFModel:
    """Empirical PSF from bright, isolated, unsaturated stars, per tile if ``tile_px`` is given.

    Parameters
    ----------
    data_bkgsub : (H, W) background-subtracted image in ADU.
    rms : (H, W) background RMS in ADU, or a scalar.
    mask : (H, W) bool, True at bad pixels.
    size_px : stamp side (odd; made odd if even).
    tile_px : approximate tile side; None for one PSF for the whole image. Tiles with fewer
        than ``2 * min_stars`` good stars use the global PSF.
    stars : catalogue from :func:`astrid.diff.stars.find_stars` (detected here when None).
    saturation : passed to ``find_stars`` when it runs here (ADU above background).
    min_stars : fewest good stars for an empirical stack; with fewer, a Moffat profile is fitted
        to what there is and a warning is issued.
    max_stars : brightest stars stacked per tile at most.
    snr_min : aperture S/N a star needs to enter the stack.

    Returns
    -------
    PSFModel
    """
    data = np.asarray(data_bkgsub, dtype=np.float32)
    size_px = int(size_px) | 1
    half = size_px // 2
    height, width = data.shape
    check_mask_shape(mask, data.shape)
    rms_map = np.broadcast_to(np.asarray(rms, dtype=np.float32), data.shape)
    # Cutouts are taken straight from the image (NaN at flagged and non-finite pixels and
    # beyond the edges): no padded, masked or bad-pixel full-size maps.
    image = _Image(data, None if mask is None else np.asarray(mask))
    if stars is None:
        stars = find_stars(data, rms, bad_pixels(data, mask), saturation=saturation,
                           edge_px=half + 1)
    if len(stars) == 0:
        raise AstridError("no stars found in the image to measure its PSF")

    candidates = _psf_candidates(stars, data.shape, half)
    good = candidates[candidates["snr"] >= snr_min]
    good = _clip_fwhm(good)
    edges_y = _tile_edges(height, tile_px)
    edges_x = _tile_edges(width, tile_px)
    ny, nx = len(edges_y) - 1, len(edges_x) - 1

    neighbours = _Neighbours.of(stars)
    if len(good) >= min_stars:
        good = good.nlargest(max_stars * max(1, ny * nx), "flux")
        method, n_global = "empirical", len(good)
        global_psf = None  # stacked below only if some tile lacks stars of its own
    else:
        # Relax the selection to find anything star-like to fit a profile to.
        loose = _clip_fwhm(candidates[candidates["snr"] >= 5.0])
        if len(loose) == 0:
            loose = stars[~stars["flag_saturated"].astype(bool)
                          & _inside(stars, data.shape, half)]
        if len(loose) == 0:
            raise AstridError(f"no usable stars to measure the PSF ({len(stars)} detected, all "
                              "saturated, masked or at the image edge)")
        loose = loose.nlargest(max_stars, "flux")
        warnings.warn(f"only {len(good)} good PSF stars (need {min_stars}); using a Moffat fit "
                      f"to {len(loose)} star(s)", stacklevel=2)
        stack, _ = _stack(image, rms_map, loose, size_px, taper=False, others=neighbours)
        params = _fit_moffat(stack)
        global_psf = (_normalise(_moffat_image(size_px, 1.0, 0.0, 0.0, params[3], params[4])),
                      _moffat_fwhm(params[3], params[4]))
        method, n_global = "moffat", len(loose)

    stamps = np.empty((ny, nx, size_px, size_px), np.float32)
    fwhm_tiles = np.empty((ny, nx))
    n_tiles = np.zeros((ny, nx), int)
    # Each star's tile, found once (pixel k spans k - 0.5 .. k + 0.5), in NumPy: pandas
    # selections per tile cost more than a tile's stack.
    star_tile_y = np.searchsorted(edges_y - 0.5, good["y"].to_numpy(), side="right") - 1
    star_tile_x = np.searchsorted(edges_x - 0.5, good["x"].to_numpy(), side="right") - 1
    for iy in range(ny):
        for ix in range(nx):
            inside = good.iloc[np.flatnonzero((star_tile_y == iy) & (star_tile_x == ix))]
            tiled = method == "empirical" and ny * nx > 1
            # A tile's own stack must beat the global one: ask for twice the minimum.
            if tiled and len(inside) >= 2 * min_stars:
                # ``good`` is sorted by decreasing flux here: its head is the brightest.
                stamps[iy, ix], fwhm_tiles[iy, ix] = _stack(image, rms_map,
                                                            inside.head(max_stars),
                                                            size_px, others=neighbours)
                n_tiles[iy, ix] = len(inside)
            else:  # a tile without enough stars of its own counts none
                if global_psf is None:
                    global_psf = _stack(image, rms_map, good, size_px, others=neighbours)
                stamps[iy, ix], fwhm_tiles[iy, ix] = global_psf
                n_tiles[iy, ix] = 0 if tiled else n_global
    return PSFModel(stamps=stamps, tile_edges_y=edges_y, tile_edges_x=edges_x,
                    fwhm_px=float(np.median(fwhm_tiles)), fwhm_tiles=fwhm_tiles,
                    n_stars=n_global, method=method, n_stars_tiles=n_tiles)


def psf_photometry(data_bkgsub: np.ndarray, rms: np.ndarray | float, model: PSFModel,
                   x: np.ndarray, y: np.ndarray,
                   mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """PSF-fit fluxes at fixed positions, on the flux scale of ``model`` (stamps sum to 1).

    Each star's tile PSF is shifted to its sub-pixel position and the flux fitted by linear
    least squares over the stamp with background-noise weights (source-noise weights would bias
    bright stars low). Bad pixels get zero weight.

    Parameters
    ----------
    data_bkgsub : (H, W) background-subtracted image in ADU.
    rms : (H, W) background RMS in ADU, or a scalar.
    model : PSF of this image.
    x, y : (N,) 0-based positions in px.

    Returns
    -------
    flux, flux_err : (N,) in ADU; NaN for stars off the image or entirely masked.
    """
    data = np.asarray(data_bkgsub, dtype=np.float32)
    x, y = np.atleast_1d(np.asarray(x, float)), np.atleast_1d(np.asarray(y, float))
    size_px = model.size_px
    half = size_px // 2
    check_mask_shape(mask, data.shape)
    height, width = data.shape
    rx, ry = np.rint(np.nan_to_num(x, nan=-1.0)), np.rint(np.nan_to_num(y, nan=-1.0))
    off_image = (rx < 0) | (ry < 0) | (rx > width - 1) | (ry > height - 1)
    ix = np.clip(rx, 0, width - 1).astype(int)
    iy = np.clip(ry, 0, height - 1).astype(int)
    # The mask is read at the stamps only (no full-size bad-pixel map); non-finite pixels are
    # NaN in the cutouts and get zero weight below.
    cut = _cutouts(_Image(data, None if mask is None else np.asarray(mask)), ix, iy, half)
    rms_arr = np.broadcast_to(np.asarray(rms, dtype=np.float32), data.shape)
    var = _cutouts(_Image(rms_arr), ix, iy, half) ** 2
    psf = np.stack([psf_at(model, xi, yi) for xi, yi in zip(x, y, strict=True)]) if len(x) else \
        np.zeros((0, size_px, size_px), np.float32)
    psf = fourier_shift(psf, np.where(off_image, 0.0, x - ix), np.where(off_image, 0.0, y - iy))
    w = np.where(np.isfinite(cut) & (var > 0), 1.0 / np.where(var > 0, var, 1.0), 0.0)
    d = np.nan_to_num(cut)
    num = np.sum(w * psf * d, axis=(1, 2))
    den = np.sum(w * psf * psf, axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        flux = np.where((den > 0) & ~off_image, num / den, np.nan)
        flux_err = np.where((den > 0) & ~off_image, 1.0 / np.sqrt(den), np.nan)
    return flux, flux_err


def fourier_shift(stamps: np.ndarray, dx: np.ndarray | float, dy: np.ndarray | float) -> np.ndarray:
    """Shift (N, S, S) stamps by (dx, dy) px (positive moves the content to larger x, y).

    The shift is a phase ramp in Fourier space: exact for band-limited content, periodic at the
    stamp edges (keep the content away from them).
    """
    stamps = np.asarray(stamps, dtype=np.float32)
    single = stamps.ndim == 2
    if single:
        stamps = stamps[None]
    n, sy, sx = stamps.shape
    dx = np.broadcast_to(np.asarray(dx, float), (n,))[:, None, None]
    dy = np.broadcast_to(np.asarray(dy, float), (n,))[:, None, None]
    ky = fft.fftfreq(sy)[None, :, None]
    kx = fft.rfftfreq(sx)[None, None, :]
    # The ramp is separable, and kept in single precision so the inverse FFT is too.
    phase = (np.exp(-2j * np.pi * ky * dy) * np.exp(-2j * np.pi * kx * dx)).astype(np.complex64)
    spectrum = fft.rfft2(stamps, axes=(1, 2))
    spectrum *= phase
    out = fft.irfft2(spectrum, s=(sy, sx), axes=(1, 2), overwrite_x=True)
    return out[0] if single else out


def _tile_edges(n_px: int, tile_px: int | None) -> np.ndarray:
    n_tiles = 1 if not tile_px else max(1, int(round(n_px / tile_px)))
    return np.linspace(0, n_px, n_tiles + 1).round().astype(int)


def _inside(stars: pd.DataFrame, shape: tuple[int, int], half: int) -> np.ndarray:
    """Stars whose whole stamp (plus one pixel for the shift) lies inside the image."""
    height, width = shape
    return ((stars["x"] >= half + 1) & (stars["y"] >= half + 1)
            & (stars["x"] <= width - half - 2) & (stars["y"] <= height - half - 2)).to_numpy()


def _psf_candidates(stars: pd.DataFrame, shape: tuple[int, int], half: int) -> pd.DataFrame:
    keep = (~stars["flag_saturated"].astype(bool) & ~stars["flag_masked"].astype(bool)
            & stars["isolated"].astype(bool) & (stars["ellipticity"] < 0.5)
            & (stars["flux"] > 0) & _inside(stars, shape, half))
    return stars[keep]


def _clip_fwhm(stars: pd.DataFrame) -> pd.DataFrame:
    """Keep the stellar locus: FWHM and ellipticity near their medians.

    Drops cosmic rays and hot pixels (too sharp), galaxies (too broad) and unresolved blends
    (too elongated), whatever the PSF's own size and ellipticity.
    """
    if len(stars) < 3:
        return stars
    fwhm = stars["fwhm_px"].to_numpy()
    med = np.median(fwhm)
    tol = max(3.0 * 1.4826 * np.median(np.abs(fwhm - med)), 0.15 * med)
    ell = stars["ellipticity"].to_numpy()
    med_ell = np.median(ell)
    tol_ell = max(3.0 * 1.4826 * np.median(np.abs(ell - med_ell)), 0.1)
    return stars[(np.abs(fwhm - med) <= tol) & (ell - med_ell <= tol_ell)]


@dataclass(frozen=True)
class _Image:
    """An image to cut stamps from: float32 ``data`` and optional ``bad`` (bool, or flags
    where non-zero; read as NaN)."""

    data: np.ndarray
    bad: np.ndarray | None = None


def _cutouts(image: _Image, ix: np.ndarray, iy: np.ndarray, half: int) -> np.ndarray:
    """(N, S, S) float32 cutouts centred on integer pixels (ix, iy); NaN at bad and
    non-finite pixels and beyond the image edges (only the stamps are gathered, never a
    padded copy of the image)."""
    data = image.data
    height, width = data.shape
    offsets = np.arange(-half, half + 1)
    rows = np.asarray(iy)[:, None, None] + offsets[None, :, None]
    cols = np.asarray(ix)[:, None, None] + offsets[None, None, :]
    outside = (rows < 0) | (rows >= height) | (cols < 0) | (cols >= width)
    rows, cols = np.clip(rows, 0, height - 1), np.clip(cols, 0, width - 1)
    cut = np.array(data[rows, cols], dtype=np.float32)
    outside |= ~np.isfinite(cut)
    if image.bad is not None:
        outside |= image.bad[rows, cols] != 0
    cut[outside] = np.nan
    return cut


@dataclass(frozen=True)
class _Neighbours:
    """Every detection of an image (positions, fluxes and a search tree), built once for all
    the stacks that mask them."""

    xy: np.ndarray
    flux: np.ndarray
    tree: cKDTree

    @classmethod
    def of(cls, stars: pd.DataFrame) -> _Neighbours:
        xy = stars[["x", "y"]].to_numpy(float)
        return cls(xy=xy, flux=stars["flux"].to_numpy(float), tree=cKDTree(xy))


def _stack(image: _Image, rms_map: np.ndarray, stars: pd.DataFrame,
           size_px: int, taper: bool = True,
           others: _Neighbours | None = None) -> tuple[np.ndarray, float]:
    """Normalised, sub-pixel-centred stack of the stars; returns (stamp, FWHM px).

    Stars are combined with inverse-variance weights (bright stars define the shape) after
    per-pixel rejection of values more than 3 sigma (their own noise) from the median, which
    removes cosmic rays and faint neighbours from the wings; detected neighbours (``others``,
    the full catalogue) are masked out to 3 FWHM around them. Each star's normalisation is its
    PSF-fit amplitude in the core, measured against a first stack, rather than a sum over the
    whole cutout that noise and neighbours would bias. Pixels where the stack is not
    significant (below 2-4 sigma of its own noise) are replaced by the Moffat fitted to it.
    """
    half = size_px // 2
    x, y = stars["x"].to_numpy(), stars["y"].to_numpy()
    ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
    cut = _cutouts(image, ix, iy, half)
    noise = rms_map[iy, ix]  # the RMS map is smooth on a stamp's scale
    # Stars with masked pixels in the core would bias the stack; wing holes become zero weight.
    core = np.abs(np.arange(-half, half + 1)) <= 2
    ok = np.isfinite(cut[:, core][:, :, core]).all(axis=(1, 2)) & (noise > 0)
    if ok.sum() > 0:
        cut, x, y, ix, iy, noise = cut[ok], x[ok], y[ok], ix[ok], iy[ok], noise[ok]
    holes = ~np.isfinite(cut)
    fwhm0 = float(np.median(stars["fwhm_px"])) if "fwhm_px" in stars else 3.0
    if others is not None and len(others.xy) > 1:
        _mask_neighbours(holes, x, y, ix, iy, stars["flux"].to_numpy()[ok] if ok.sum() else
                         stars["flux"].to_numpy(), others, fwhm0)
    # The cutouts and their hole masks shifted alike, in one batch of transforms.
    n = len(cut)
    shifted = fourier_shift(np.concatenate([np.nan_to_num(cut), holes.astype(np.float32)]),
                            np.tile(ix - x, 2), np.tile(iy - y, 2))
    cut, holes = shifted[:n], shifted[n:] > 0.01
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    r = np.hypot(xx, yy)
    aperture = r <= max(3.0, 2.0 * fwhm0)
    amp = np.sum(cut * aperture, axis=(1, 2))
    for _ in range(2):
        good = amp > 0
        if not good.any():
            raise AstridError("PSF stack has no positive flux (no usable stars?)")
        stamp, stamp_sigma = _clipped_mean(cut[good] / amp[good, None, None],
                                           (noise[good] / amp[good])[:, None, None],
                                           holes[good])
        fit_region = r <= max(2.0, 1.5 * fwhm0)
        model = stamp * fit_region
        amp = np.sum(cut * model, axis=(1, 2)) / max(float(np.sum(model * stamp)), 1e-30)
    params = _fit_moffat(stamp)
    fwhm_px = _moffat_fwhm(params[3], params[4])
    stamp = fourier_shift(stamp, -params[1], -params[2])
    # Where the stack is noise (the wings of a few faint stars), the fitted Moffat takes over:
    # summed over hundreds of wing pixels that noise would otherwise set the normalisation.
    moffat = _moffat_image(size_px, params[0], 0.0, 0.0, params[3], params[4])
    trust = np.clip((moffat / np.maximum(stamp_sigma, 1e-30) - 2.0) / 2.0, 0.0, 1.0)
    stamp = trust * stamp + (1.0 - trust) * moffat
    if taper:
        stamp = stamp * _taper(size_px, fwhm_px)
    return _normalise(stamp), fwhm_px


def _mask_neighbours(holes: np.ndarray, x: np.ndarray, y: np.ndarray, ix: np.ndarray,
                     iy: np.ndarray, flux: np.ndarray, others: _Neighbours,
                     fwhm_px: float) -> None:
    """Mark in ``holes`` (N, S, S) the pixels near other detections.

    The radius grows with the neighbour's flux relative to the star (from 2.4 FWHM for a
    neighbour 100x fainter to 7 FWHM for one 100x brighter) because PSF wings fall as a power
    law: a bright neighbour's wings would otherwise add a pedestal to the stacked PSF.
    """
    half = holes.shape[-1] // 2
    xy_all, flux_all = others.xy, others.flux
    near = others.tree.query_ball_point(np.column_stack([x, y]),
                                            half * np.sqrt(2) + 7.0 * fwhm_px)
    # All (star, neighbour) pairs at once, grouped by star, OR-reduced per star.
    k = np.repeat(np.arange(len(near)), [len(n) for n in near])
    j = np.fromiter((i for n in near for i in n), dtype=np.intp, count=len(k))
    dx0, dy0 = ix[k] - xy_all[j, 0], iy[k] - xy_all[j, 1]
    itself = (np.abs(x[k] - xy_all[j, 0]) < 0.5) & (np.abs(y[k] - xy_all[j, 1]) < 0.5)
    k, j, dx0, dy0 = k[~itself], j[~itself], dx0[~itself], dy0[~itself]
    if k.size == 0:
        return
    ratio = np.maximum(flux_all[j], 0.0) / np.maximum(flux[k], 1e-30)
    radius_px = fwhm_px * (2.0 + 1.25 * np.log10(1.0 + 100.0 * ratio))
    offsets = np.arange(-half, half + 1)
    dx = offsets[None, None, :] + dx0[:, None, None]
    dy = offsets[None, :, None] + dy0[:, None, None]
    covered = (dx * dx + dy * dy <= (radius_px * radius_px)[:, None, None]).view(np.uint8)
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
    holes[k[starts]] |= np.maximum.reduceat(covered, starts, axis=0).astype(bool)


def _clipped_mean(values: np.ndarray, sigma: np.ndarray, holes: np.ndarray,
                  clip_sigma: float = 3.0) -> np.ndarray:
    """Inverse-variance mean over axis 0 of (N, S, S) ``values`` with per-star noise ``sigma``
    (N, 1, 1), rejecting values beyond ``clip_sigma`` of the median and ``holes``.

    Returns (mean (S, S), its noise (S, S); infinite where no star contributes)."""
    valid = ~holes
    if len(values) >= 3:
        # NaN-aware median along axis 0 by one sort (NaN sorts last); np.nanmedian is slower.
        ordered = np.sort(np.where(valid, values, np.nan), axis=0)
        count = valid.sum(axis=0)
        lo = np.take_along_axis(ordered, np.maximum(count - 1, 0)[None] // 2, axis=0)[0]
        hi = np.take_along_axis(ordered, (count // 2)[None], axis=0)[0]
        med = np.where(count > 0, 0.5 * (lo + hi), 0.0)
    else:
        med = np.where(valid, values, 0).sum(axis=0) / np.maximum(valid.sum(axis=0), 1)
    keep = valid & (np.abs(values - med) <= clip_sigma * sigma + 0.05 * np.abs(med))
    weight = keep / sigma**2
    total = weight.sum(axis=0)
    mean = np.where(total > 0, (weight * values).sum(axis=0) / np.where(total > 0, total, 1), med)
    noise = np.where(total > 0, 1.0 / np.sqrt(np.where(total > 0, total, 1)), np.inf)
    return mean.astype(np.float32), noise.astype(np.float32)


def _taper(size_px: int, fwhm_px: float) -> np.ndarray:
    """Radial window: 1 inside ~4 FWHM, cosine roll-off to 0 at the stamp edge."""
    half = size_px // 2
    r_out = float(half)
    r_in = min(max(4.0 * fwhm_px, 3.0), r_out - 2.0)
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    r = np.hypot(xx, yy)
    w = np.clip((r_out - r) / max(r_out - r_in, 1e-6), 0.0, 1.0)
    return (0.5 - 0.5 * np.cos(np.pi * w)).astype(np.float32)


def _normalise(stamp: np.ndarray) -> np.ndarray:
    total = float(stamp.sum())
    if not np.isfinite(total) or total <= 0:
        raise AstridError("PSF stack has no positive flux (no usable stars?)")
    return (stamp / total).astype(np.float32)


def _moffat_image(size_px: int, amplitude: float, x0: float, y0: float, alpha: float,
                  beta: float) -> np.ndarray:
    half = size_px // 2
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1].astype(float)
    r2 = (xx - x0) ** 2 + (yy - y0) ** 2
    return (amplitude * (1.0 + r2 / alpha**2) ** (-beta)).astype(np.float32)


def _moffat_fwhm(alpha: float, beta: float) -> float:
    return float(2.0 * alpha * np.sqrt(2.0 ** (1.0 / beta) - 1.0))


def _fit_moffat(stamp: np.ndarray) -> np.ndarray:
    """Least-squares circular Moffat fit to a centred stamp: (amplitude, x0, y0, alpha, beta)."""
    size_px = stamp.shape[-1]
    half = size_px // 2
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1].astype(float)
    z = stamp.astype(float)
    peak = float(z.max()) if z.max() > 0 else 1.0
    # Start from the second moment of the core for a robust width guess.
    core = z * (np.hypot(xx, yy) <= min(half, 6))
    core = np.clip(core, 0, None)
    var = float((core * (xx**2 + yy**2)).sum() / max(core.sum(), 1e-12)) / 2.0
    alpha0 = max(np.sqrt(max(var, 0.25)) * 2.0, 0.5)
    # Weight the core: the PSF's wings carry little of its shape and most of the noise.
    sigma = 0.02 * peak + np.abs(z) * 0.05

    def resid(p):
        amplitude, x0, y0, alpha, beta = p
        r2 = (xx - x0) ** 2 + (yy - y0) ** 2
        return ((amplitude * (1.0 + r2 / alpha**2) ** (-beta) - z) / sigma).ravel()

    def jac(p):
        # Analytic: a finite-difference Jacobian costs five more profile evaluations a step.
        amplitude, x0, y0, alpha, beta = p
        dx, dy = xx - x0, yy - y0
        r2 = dx**2 + dy**2
        u = 1.0 + r2 / alpha**2
        f = u ** (-beta)
        g = 2.0 * amplitude * beta * f / u / alpha**2  # -d(A u^-beta)/d(r2) x 2
        return (np.stack([f, g * dx, g * dy, g * r2 / alpha, -amplitude * f * np.log(u)])
                / sigma).reshape(5, -1).T

    p0 = np.array([peak, 0.0, 0.0, alpha0, 2.5])
    lower = np.array([0.0, -3.0, -3.0, 0.2, 1.01])
    upper = np.array([np.inf, 3.0, 3.0, float(size_px), 20.0])
    try:
        # Levenberg-Marquardt, compiled: the same minimum as scipy's (MINPACK's) to 1e-5 of
        # the parameters, at a quarter of the cost (its Python callbacks were a third of a
        # PSF stack's time). The bounds are only needed when it leaves them (a stack close
        # to a Gaussian drives beta up): then scipy's bounded trust-region method.
        params, converged = _moffat_lm(p0, z.ravel(), sigma.ravel(), xx.ravel(), yy.ravel())
        if converged and np.all(params >= lower) and np.all(params <= upper):
            return params
        sol = optimize.least_squares(resid, p0, jac=jac, bounds=(lower, upper),
                                     x_scale="jac", max_nfev=200)
        return sol.x
    except (ValueError, np.linalg.LinAlgError):
        return p0


@numba.njit(cache=True, nogil=True)
def _moffat_lm(p0, z, sigma, xx, yy, max_iter=200, tol=1e-10):  # pragma: no cover (compiled)
    """Levenberg-Marquardt for the weighted Moffat residuals of :func:`_fit_moffat`, with
    Marquardt's scaling (the largest diagonal of J^T J seen, as MINPACK's ``x_scale="jac"``)
    and Nielsen's damping update. Stops when a step lowers the cost by less than ``tol`` of
    it or moves every parameter by less than ``tol`` of its scale. Returns (params,
    converged)."""
    p = p0.copy()
    jtj, jtr = np.empty((5, 5)), np.empty(5)
    trial_jtj, trial_jtr = np.empty((5, 5)), np.empty(5)
    cost = _moffat_normal_equations(p, z, sigma, xx, yy, jtj, jtr)
    scale = np.zeros(5)
    damping, growth = 1e-3, 2.0
    for _ in range(max_iter):
        for a in range(5):
            scale[a] = max(scale[a], jtj[a, a], 1e-300)
        system = jtj.copy()
        for a in range(5):
            system[a, a] += damping * scale[a]
        step = np.linalg.solve(system, -jtr)
        trial = p + step
        if not trial[3] > 0.0:  # alpha must stay positive: a shorter step
            damping *= growth
            growth *= 2.0
            continue
        trial_cost = _moffat_normal_equations(trial, z, sigma, xx, yy, trial_jtj, trial_jtr)
        predicted = 0.0
        for a in range(5):
            predicted += step[a] * (damping * scale[a] * step[a] - jtr[a])
        gain = (cost - trial_cost) / predicted if predicted > 0 else -1.0
        if gain <= 0:
            damping *= growth
            growth *= 2.0
            continue
        small_step = True
        for a in range(5):
            root = np.sqrt(scale[a])
            small_step &= abs(step[a]) * root <= tol * (abs(p[a]) * root + tol)
        decrease = cost - trial_cost
        p, cost = trial, trial_cost
        jtj[:], jtr[:] = trial_jtj, trial_jtr
        damping *= max(1.0 / 3.0, 1.0 - (2.0 * gain - 1.0) ** 3)
        growth = 2.0
        if decrease <= tol * cost or small_step:
            return p, True
    return p, False


@numba.njit(cache=True, nogil=True)
def _moffat_normal_equations(p, z, sigma, xx, yy, jtj, jtr):  # pragma: no cover (compiled)
    """Sum of squared weighted residuals of the Moffat ``p`` = (amplitude, x0, y0, alpha,
    beta), with J^T J and J^T r filled in (the Jacobian of :func:`_fit_moffat`'s ``jac``)."""
    amplitude, x0, y0, alpha, beta = p[0], p[1], p[2], p[3], p[4]
    jtj[:] = 0.0
    jtr[:] = 0.0
    inv_a2 = 1.0 / (alpha * alpha)
    g = np.empty(5)
    cost = 0.0
    for i in range(z.size):
        dx, dy = xx[i] - x0, yy[i] - y0
        r2 = dx * dx + dy * dy
        u = 1.0 + r2 * inv_a2
        log_u = np.log(u)
        f = np.exp(-beta * log_u)
        w = 1.0 / sigma[i]
        res = (amplitude * f - z[i]) * w
        slope = 2.0 * amplitude * beta * f / u * inv_a2 * w
        g[0], g[1], g[2] = f * w, slope * dx, slope * dy
        g[3], g[4] = slope * r2 / alpha, -amplitude * f * log_u * w
        cost += res * res
        for a in range(5):
            jtr[a] += g[a] * res
            for b in range(a, 5):
                jtj[a, b] += g[a] * g[b]
    for a in range(5):
        for b in range(a):
            jtj[a, b] = jtj[b, a]
    return cost
