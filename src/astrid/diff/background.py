"""Sky background and noise: sep's background/RMS maps with sources masked, and variance maps.

The background is estimated twice with sep's (SExtractor's) mesh estimator: a first pass finds
where the sources are (pixels of the smoothed, background-subtracted image above a threshold,
dilated to cover the PSF wings), and a second pass with those pixels masked gives a level and an
RMS that bright stars and galaxies do not bias upwards. The estimator itself is compiled in
:mod:`astrid.diff.sky_mesh` (the same numbers as ``sep.Background``, without the GIL).
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from astrid.diff.sky_mesh import _column_weights, _spline_row, evaluate_points
from astrid.errors import AstridError


@dataclass(frozen=True)
class Background:
    """Background level and noise of an image.

    Attributes
    ----------
    level : (H, W) float32, background level in ADU.
    rms : (H, W) float32, background noise (standard deviation per pixel) in ADU.
    sigma_adu : robust global noise per pixel in ADU (1.4826 MAD of the source-masked sky).
    sources : bool map of the pixels masked as sources for the second pass, on the grid
        the background was estimated on (every ``step``-th pixel); ``source_mask`` is it at
        full resolution, built only when asked for (differencing never does).
    step : the subsampling step of ``sources``.
    """

    level: np.ndarray
    rms: np.ndarray
    sigma_adu: float
    sources: np.ndarray
    step: int = 1

    @property
    def source_mask(self) -> np.ndarray:
        """(H, W) bool, pixels masked as sources for the second pass."""
        h, w = self.level.shape
        return np.repeat(np.repeat(self.sources, self.step, axis=0), self.step, axis=1)[:h, :w]


def sep_array(a: np.ndarray, dtype=np.float32) -> np.ndarray:
    """``a`` as a C-contiguous, native-endian array of ``dtype``, as sep requires."""
    a = np.asarray(a)
    if a.dtype.byteorder not in ("=", "|"):
        a = a.astype(a.dtype.newbyteorder("="))
    return np.ascontiguousarray(a, dtype=dtype)


def bad_pixels(data: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Bool mask of pixels that are flagged or not finite."""
    bad = ~np.isfinite(data)
    if mask is not None:
        check_mask_shape(mask, data.shape)
        bad |= mask.astype(bool)
    return bad


def check_mask_shape(mask: np.ndarray | None, shape: tuple[int, ...]) -> None:
    """A clear error when a mask does not have its image's shape."""
    if mask is not None and np.shape(mask) != tuple(shape):
        raise AstridError(f"mask shape {np.shape(mask)} differs from image shape {tuple(shape)}")


def nan_at_bad(data: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """``data`` with NaN at flagged and non-finite pixels: ``data`` itself where it already is
    so (background-subtracted images are), found in one compiled pass; a copy otherwise."""
    data = np.asarray(data, np.float32)
    check_mask_shape(mask, data.shape)
    flags = np.zeros((0, 0), bool) if mask is None else np.asarray(mask)
    if not _needs_nan(data, flags):
        return data
    return np.where(bad_pixels(data, mask), np.float32(np.nan), data)


@numba.njit(cache=True, nogil=True)
def _needs_nan(data, mask):  # pragma: no cover (compiled)
    """Whether a flagged pixel holds a number or any pixel is infinite."""
    use_mask = mask.shape[0] > 0
    h, w = data.shape
    for i in range(h):
        row = data[i]
        for j in range(w):
            v = row[j]
            if np.isinf(v) or (use_mask and mask[i, j] != 0 and v == v):
                return True
    return False


@dataclass(frozen=True)
class BackgroundMesh:
    """A background estimate on its mesh, from which the full-resolution maps are evaluated.

    Attributes
    ----------
    level, sigma : (ny, nx) float64 cell values (ADU), ``sigma`` scaled to ``sigma_adu``.
    level_d2, sigma_d2 : their spline second derivatives along the mesh columns.
    box : cell side in sampled pixels; ``step`` the sampling step (cell side ``box * step``
        full-resolution pixels).
    sigma_adu : robust global noise per pixel (1.4826 MAD of the source-masked sky).
    level_median : median of the level map over the image (ADU).
    sources : bool map of the pixels masked as sources, on the sampled grid.
    """

    level: np.ndarray
    sigma: np.ndarray
    level_d2: np.ndarray
    sigma_d2: np.ndarray
    box: int
    step: int
    sigma_adu: float
    level_median: float
    sources: np.ndarray

    def maps(self, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Full-resolution (level, rms) float32 maps of an image of ``shape``."""
        from astrid.diff import sky_mesh

        rows, cols = _mesh_coordinates(shape, self.step, self.box)
        return (sky_mesh.evaluate(self.level, self.level_d2, rows, cols),
                sky_mesh.evaluate(self.sigma, self.sigma_d2, rows, cols))

    def subtract(self, data: np.ndarray, mask: np.ndarray | None, parallel: bool = False):
        """``(data - level, rms)`` at full resolution in one pass, NaN at bad pixels
        (``parallel``: on all of numba's threads, see :func:`measure_background`)."""
        from astrid.diff import sky_mesh

        data = np.asarray(data, np.float32)
        rows, cols = _mesh_coordinates(data.shape, self.step, self.box)
        out, rms = np.empty(data.shape, np.float32), np.empty(data.shape, np.float32)
        sky_mesh.subtract(data, _mask_or_empty(mask), self.level, self.level_d2, self.sigma,
                          self.sigma_d2, rows, cols, out, rms, parallel=parallel)
        return out, rms


def _mesh_coordinates(shape, step: int, box: int, stride: int = 1):
    """Mesh coordinates of every ``stride``-th full-resolution row and column, in sep's
    convention: ``y / box - 0.5`` and ``(x + 0.5) / box - 0.5`` on the sampled grid."""
    rows = np.arange(0, shape[0], stride) / step / box - 0.5
    cols = (np.arange(0, shape[1], stride) / step + 0.5) / box - 0.5
    return rows, cols


def _mask_or_empty(mask: np.ndarray | None) -> np.ndarray:
    return np.zeros((0, 0), bool) if mask is None else np.asarray(mask, bool)


def estimate_background(data: np.ndarray, mask: np.ndarray | None = None, *, box_px: int = 64,
                        filter_px: int = 3, source_thresh_sigma: float = 2.5,
                        dilate_px: int = 3, subsample: int | None = None) -> Background:
    """Background level and RMS maps with sources masked.

    Parameters
    ----------
    data : (H, W) image in ADU; NaN pixels are treated as masked.
    mask : (H, W) bool, True at bad pixels, or None.
    box_px : side of the background mesh cell in pixels.
    filter_px : side of the median filter applied to the mesh, in cells.
    source_thresh_sigma : pixels of the 3x3-smoothed, background-subtracted image above this
        many (smoothed) sigma are taken as source pixels.
    dilate_px : source pixels are grown by this many pixels to cover PSF wings.
    subsample : estimate on every n-th pixel in each axis (default 2 for images of 1024 px or
        more a side, else 1). A mesh cell of 64^2 px still holds 1024 samples, and per-pixel
        statistics are untouched (unlike binning, which would also average correlated noise),
        so the maps are as good at a quarter of the cost.

    Returns
    -------
    Background with ``level`` and ``rms`` (H, W) float32 in ADU and the global ``sigma_adu``.
    """
    mesh = measure_background(data, mask, box_px=box_px, filter_px=filter_px,
                              source_thresh_sigma=source_thresh_sigma, dilate_px=dilate_px,
                              subsample=subsample)
    level, rms = mesh.maps(np.shape(data))
    return Background(level=level, rms=rms, sigma_adu=mesh.sigma_adu, sources=mesh.sources,
                      step=mesh.step)


def measure_background(data: np.ndarray, mask: np.ndarray | None = None, *, box_px: int = 64,
                       filter_px: int = 3, source_thresh_sigma: float = 2.5,
                       dilate_px: int = 3, subsample: int | None = None,
                       parallel: bool = False) -> BackgroundMesh:
    """The estimate of :func:`estimate_background` (same parameters) on its mesh.

    Two passes of sep's (SExtractor's) mesh estimator, compiled in :mod:`astrid.diff.sky_mesh`:
    the first finds where the sources are (pixels of the smoothed, background-subtracted
    image above a threshold, dilated to cover the PSF wings), the second, with those pixels
    masked, gives a level and an RMS that bright stars and galaxies do not bias upwards.
    Everything runs on every ``subsample``-th pixel of ``data`` without copying it, and
    without the GIL, so two images can be measured at once in two threads; or, with
    ``parallel``, one image on all of numba's threads (then from one Python thread only:
    numba's fallback threading layer aborts on concurrent parallel launches).
    """
    from astrid.diff import sky_mesh

    data = np.asarray(data, np.float32)
    if data.ndim != 2:
        raise AstridError(f"background needs a 2-D image, got shape {data.shape}")
    check_mask_shape(mask, data.shape)
    step = int(subsample) if subsample else (2 if min(data.shape) >= 1024 else 1)
    sampled = data[::step, ::step]
    small_bad = ~np.isfinite(sampled)
    if mask is not None:
        small_bad |= np.asarray(mask, bool)[::step, ::step]
    if small_bad.all():
        raise AstridError("background: every pixel of the image is masked or not finite")
    box = int(min(max(box_px // step, 8), max(8, min(sampled.shape) // 2)))
    mask_arg = _mask_or_empty(mask)
    rows, cols = _mesh_coordinates(data.shape, step, box, stride=step)

    def mesh_pass(skip):
        level, sigma = sky_mesh.mesh_statistics(data, mask_arg, skip, step, box, parallel)
        level, sigma = sky_mesh.fill_and_filter(level, sigma, filter_px // 2)
        level, sigma = level.astype(np.float64), sigma.astype(np.float64)
        return level, sigma, sky_mesh.spline_d2(level), sky_mesh.spline_d2(sigma)

    level, sigma, level_d2, sigma_d2 = mesh_pass(np.zeros((0, 0), bool))
    residual = sampled - sky_mesh.evaluate(level, level_d2, rows, cols)
    residual[small_bad] = 0
    # Smoothing by a 3x3 box divides white noise by 3, so one-pixel noise spikes rarely pass
    # the threshold while the cores and wings of real sources do.
    sources = np.empty(residual.shape, bool)
    sky_mesh.smoothed_above(residual, sky_mesh.evaluate(sigma, sigma_d2, rows, cols),
                            np.float32(source_thresh_sigma / 3.0), sources, parallel)
    sources &= ~small_bad
    sources = _open_2x2(sources)
    grow = int(np.ceil(dilate_px / step))
    if grow > 0:
        from astrid.diff.zogy_core import dilate  # zogy_core imports nothing from here

        sources = dilate(sources, grow)
    masked = small_bad | sources
    # Keep enough sky in every mesh cell; in crowded fields fall back on the first pass.
    crowded = masked.mean() >= 0.9
    if not crowded:
        level, sigma, level_d2, sigma_d2 = mesh_pass(sources)
    else:
        masked = small_bad

    # sep's 3-sigma clipping underestimates Gaussian noise by about 2%; the MAD of the
    # source-masked sky does not, so it sets the scale and the mesh the spatial variation.
    # Both maps are smooth: every other sampled pixel gives their medians.
    level_s = sky_mesh.evaluate(level, level_d2, rows[::2], cols[::2])
    sky = ~masked[::2, ::2]
    sigma_adu = _robust_sigma((sampled[::2, ::2] - level_s)[sky])
    if not np.isfinite(sigma_adu) or sigma_adu <= 0:
        raise AstridError("background: the image has no measurable noise (constant or empty?)")
    median_rms = float(np.median(sky_mesh.evaluate(sigma, sigma_d2, rows[::2], cols[::2])[sky]))
    if median_rms > 0:
        scale = sigma_adu / median_rms
        sigma, sigma_d2 = sigma * scale, sigma_d2 * scale
    return BackgroundMesh(level=level, sigma=sigma, level_d2=level_d2, sigma_d2=sigma_d2,
                          box=box, step=step, sigma_adu=sigma_adu,
                          level_median=float(np.median(level_s)), sources=sources)


def _open_2x2(mask: np.ndarray) -> np.ndarray:
    """``ndimage.binary_opening`` with a 2x2 structure, from shifted slices (several x faster).

    Drops isolated pixels and one-pixel-wide lines; pixels of any 2x2 block of sources stay.
    """
    eroded = np.zeros_like(mask)
    eroded[1:, 1:] = mask[1:, 1:] & mask[:-1, 1:] & mask[1:, :-1] & mask[:-1, :-1]
    out = eroded.copy()
    out[:-1, :] |= eroded[1:, :]
    out[:, :-1] |= eroded[:, 1:]
    out[:-1, :-1] |= eroded[1:, 1:]
    return out


def _robust_sigma(values: np.ndarray, max_samples: int = 300_000) -> float:
    """1.4826 * MAD of ``values`` (a regular subsample of at most ``max_samples``)."""
    if values.size == 0:
        return float("nan")
    values = values[:: max(1, values.size // max_samples)]
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def variance_map(data_bkgsub: np.ndarray, rms: np.ndarray, gain: float | None = None) -> np.ndarray:
    """Per-pixel variance in ADU^2: background ``rms**2`` plus source Poisson noise.

    Parameters
    ----------
    data_bkgsub : (H, W) background-subtracted image in ADU.
    rms : (H, W) background RMS in ADU (or a scalar).
    gain : electrons per ADU; the source term ``max(data, 0) / gain`` is added when known.

    Returns
    -------
    (H, W) float32 variance; NaN where ``data_bkgsub`` is NaN.
    """
    rms = np.asarray(rms, dtype=np.float32)
    shape = np.shape(data_bkgsub)
    if rms.shape == shape:
        var = np.multiply(rms, rms)  # a new float32 array: no broadcast copy needed
    else:
        var = np.broadcast_to(rms * rms, shape).astype(np.float32)
    if gain is not None and gain > 0:
        # NaN input stays NaN so masked pixels remain visible to the caller.
        source = np.maximum(np.asarray(data_bkgsub, dtype=np.float32), np.float32(0.0))
        source /= np.float32(gain)
        var += source
    return var


class LazyVariance:
    """A per-pixel variance map computed only where it is indexed.

    Indexing (a tile slice, or fancy indices at star positions) returns
    ``variance_map(data[idx], rms[idx], gain)`` with 0 at bad pixels (``bad_bits`` set in
    ``mask``, or data not finite): what ZOGY needs per tile, without holding full-size
    variance maps for the whole run. :meth:`stamps` cuts it at many positions at once.

    Parameters
    ----------
    data : (H, W) background-subtracted image, ADU.
    rms : the background RMS in ADU: the :class:`BackgroundMesh` it was measured with
        (evaluated where indexed, so no full-size RMS map is kept: 64 MB at 4096^2), an
        (H, W) map, or a scalar.
    gain : electrons per ADU, or None (no source term).
    mask, bad_bits : uint8 flag map and the bits that make a pixel bad.
    """

    def __init__(self, data: np.ndarray, rms, gain: float | None, mask: np.ndarray,
                 bad_bits: int):
        self.data, self.mask, self.shape = data, mask, data.shape
        self.bad_bits = np.uint8(bad_bits)
        self.inv_gain = np.float32(1.0 / gain if gain is not None and gain > 0 else 0.0)
        self.mesh = rms if isinstance(rms, BackgroundMesh) else None
        if self.mesh is not None:
            self.mesh_rows, self.mesh_cols = _mesh_coordinates(data.shape, rms.step, rms.box)
        else:
            self.rms = np.asarray(rms) if np.ndim(rms) else np.float32(rms)

    def _rms(self, idx) -> np.ndarray:
        """The float32 RMS at ``idx`` (fancy indices, or a window without a mesh)."""
        if self.mesh is None:
            if np.ndim(self.rms):
                return np.asarray(self.rms[idx], np.float32)
            return np.broadcast_to(self.rms, self.data[idx].shape)
        iy, ix = np.broadcast_arrays(*(np.asarray(i) for i in idx))
        out = np.empty(iy.shape, np.float32)
        evaluate_points(self.mesh.sigma, self.mesh.sigma_d2, self.mesh_rows[iy.ravel()],
                        self.mesh_cols[ix.ravel()], out.reshape(-1))
        return out

    def __getitem__(self, idx) -> np.ndarray:
        data = self.data[idx]
        out = np.empty(data.shape, np.float32)
        if self.mesh is not None and _is_window(idx):
            # The RMS row by row from the mesh's spline: no window-sized RMS array.
            _mesh_variance_into(data, self.mesh.sigma, self.mesh.sigma_d2,
                                self.mesh_rows[idx[0]], self.mesh_cols[idx[1]],
                                self.inv_gain, self.mask[idx], self.bad_bits, out)
            return out
        rows = (-1, data.shape[-1]) if data.ndim else (1, 1)  # any shape as rows of pixels
        _variance_into(data.reshape(rows), self._rms(idx).reshape(rows), self.inv_gain,
                       self.mask[idx].reshape(rows), self.bad_bits, out.reshape(rows))
        return out

    def stamps(self, y: np.ndarray, x: np.ndarray, half: int) -> np.ndarray:
        """(N, 2 half + 1, 2 half + 1) stamps of the map centred on integer pixels ``(y, x)``
        (all at least ``half`` from the border). With a mesh, each stamp takes the RMS at
        its centre: the mesh's cells are tens of pixels, so it is flat across a stamp."""
        n, size = len(y), 2 * half + 1
        out = np.empty((n * size, size), np.float32)
        centres = self._rms((np.asarray(y), np.asarray(x))) if self.mesh is not None \
            else None
        for k, (yc, xc) in enumerate(zip(y, x, strict=True)):
            window = np.s_[yc - half:yc + half + 1, xc - half:xc + half + 1]
            rms = np.broadcast_to(centres[k], (size, size)) if centres is not None \
                else self._rms(window)
            _variance_into(self.data[window], rms, self.inv_gain, self.mask[window],
                           self.bad_bits, out[k * size:(k + 1) * size])
        return out.reshape(n, size, size)


@numba.njit(cache=True, nogil=True)
def _variance_into(data, rms, inv_gain, mask, bad_bits, out):  # pragma: no cover (compiled)
    """``variance_map`` (rms^2 + max(data, 0) / gain) into ``out``, 0 at bad or non-finite
    pixels; ``inv_gain`` 0 for no source term."""
    for i in range(data.shape[0]):
        _variance_row(data[i], rms[i], inv_gain, mask[i], bad_bits, out[i])


@numba.njit(cache=True, nogil=True)
def _mesh_variance_into(data, sigma, sigma_d2, rows, cols, inv_gain, mask, bad_bits,
                        out):  # pragma: no cover (compiled)
    """:func:`_variance_into` with the RMS of each row evaluated from the mesh's spline
    (``sigma``, ``sigma_d2``) at mesh coordinates ``rows`` x ``cols``."""
    nx = sigma.shape[1]
    nodes, node_d2, scratch = np.empty(nx), np.empty(nx), np.empty(nx)
    weights, starts = _column_weights(nx, cols)
    rms = np.empty(cols.size, np.float32)
    for i in range(data.shape[0]):
        _spline_row(sigma, sigma_d2, rows[i], weights, starts, nodes, node_d2, scratch, rms)
        _variance_row(data[i], rms, inv_gain, mask[i], bad_bits, out[i])


@numba.njit(cache=True, nogil=True)
def _variance_row(d, r, inv_gain, m, bad_bits, o):  # pragma: no cover (compiled)
    """One row of :func:`_variance_into` (data ``d``, RMS ``r``, flags ``m``, out ``o``)."""
    zero = np.float32(0.0)
    for j in range(d.size):  # branch-free: the loop vectorises
        v = r[j] * r[j] + max(d[j], zero) * inv_gain
        good = ((m[j] & bad_bits) == 0) & np.isfinite(v) & np.isfinite(d[j])
        o[j] = v if good else zero


def _is_window(idx) -> bool:
    return isinstance(idx, tuple) and len(idx) == 2 and all(isinstance(i, slice) for i in idx)
