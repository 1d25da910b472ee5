"""Resample the reference onto the science pixel grid: WCS mapping, star refinement, resampling.

The pixel mapping science -> reference is evaluated exactly (through both WCSs) only on a coarse
grid of nodes, every ~32 px, and interpolated between them with a cubic-convolution kernel; a
WCS is smooth on these scales, so this costs nothing in accuracy and removes the per-pixel WCS
evaluation that makes ``reproject_interp`` slow. Stars detected in both images then fit a small
affine correction (archive WCSs are often off by 0.1-1 px), applied on the science side of the
mapping. The reference is resampled with the Keys (a = -0.5) bicubic convolution kernel; a bad
or missing reference pixel poisons every output pixel whose 4x4 kernel touches it. The per-pixel
loop is compiled with numba when it is installed (about 10x faster than the NumPy path, which
gives the same numbers).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from astropy.wcs import WCS
from scipy import ndimage
from scipy.spatial import cKDTree

from astrid.diff.background import estimate_background, nan_at_bad
from astrid.diff.stars import find_stars, match_positions
from astrid.errors import AstridError

IDENTITY_AFFINE = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


@dataclass(frozen=True)
class Alignment:
    """The reference resampled onto the science grid, and how well the two agree.

    Attributes
    ----------
    ref_on_sci : (H, W) float32 reference on the science grid; NaN where there is no data.
    footprint : (H, W) bool, True where the science pixel falls inside the reference frame
        (``ref_on_sci`` is NaN outside it, and inside it at the reference's bad pixels).
    overlap : fraction of science pixels that fall inside the reference image.
    rms_px : 2-D residual RMS of matched stars after refinement (px); NaN if not refined.
    sigma_x_px, sigma_y_px : per-axis residual scatter of matched stars (px), for ZOGY's
        astrometric noise term; NaN if not refined.
    n_matched : stars used in the final affine fit (0 when the WCS mapping was kept).
    affine : (2, 3) correction on science pixels, ``[x', y'] = A @ [x, y, 1]``; the reference
        value at science pixel (x, y) is taken where the WCS maps (x', y').
    grid_x, grid_y : (gx,), (gy,) coarse node positions in science pixels (uniform, with one
        node beyond each edge).
    map_x, map_y : (gy, gx) reference pixel coordinates of the nodes in the final mapping.
    """

    ref_on_sci: np.ndarray
    footprint: np.ndarray
    overlap: float
    rms_px: float
    sigma_x_px: float
    sigma_y_px: float
    n_matched: int
    affine: np.ndarray
    grid_x: np.ndarray | None = None
    grid_y: np.ndarray | None = None
    map_x: np.ndarray | None = None
    map_y: np.ndarray | None = None


def align_reference(ref_data: np.ndarray, ref_wcs: WCS | None, sci_shape: tuple[int, int],
                    sci_wcs: WCS | None, *, ref_mask: np.ndarray | None = None,
                    sci_data: np.ndarray | None = None, sci_mask: np.ndarray | None = None,
                    sci_rms: np.ndarray | None = None, ref_rms: np.ndarray | None = None,
                    min_overlap: float = 0.2, sci_stars: pd.DataFrame | None = None,
                    ref_stars: pd.DataFrame | None = None, grid_step_px: int = 32,
                    match_radius_px: float = 20.0, refine: bool = True) -> Alignment:
    """Resample the reference onto the science pixel grid.

    Parameters
    ----------
    ref_data : (Hr, Wr) reference image in ADU (background included or not).
    ref_wcs, sci_wcs : celestial WCSs; both None when the images already share one grid.
    sci_shape : (H, W) of the science image.
    ref_mask, sci_mask : bool masks, True at bad pixels.
    sci_data : (H, W) science image; needed (or ``sci_stars``) to refine with stars.
    sci_rms, ref_rms : background RMS maps; when given, the data are taken as
        background-subtracted, otherwise the background is estimated here.
    min_overlap : smallest accepted fraction of science pixels covered by the reference.
    sci_stars, ref_stars : catalogues from :func:`find_stars` of each image in its own pixels,
        to avoid detecting twice.
    grid_step_px : spacing of the coarse nodes where the WCS mapping is evaluated exactly.
    match_radius_px : largest WCS error (px) searched for when matching stars.
    refine : fit the affine correction from stars.

    Returns
    -------
    Alignment
    """
    ref_data = np.asarray(ref_data)
    height, width = (int(n) for n in sci_shape)
    if ref_data.ndim != 2:
        raise AstridError(f"the reference must be a 2-D image, got shape {ref_data.shape}")
    if sci_data is not None and np.shape(sci_data) != (height, width):
        raise AstridError(f"science data shape {np.shape(sci_data)} differs from sci_shape "
                          f"{(height, width)}")
    if (ref_wcs is None) != (sci_wcs is None):
        which = "reference" if ref_wcs is None else "science"
        raise AstridError(f"the {which} image has no celestial WCS, so the images cannot be "
                          "aligned (give both a WCS, or neither if they share one pixel grid)")
    grid_x = _nodes(width, grid_step_px)
    grid_y = _nodes(height, grid_step_px)
    ref_h, ref_w = ref_data.shape

    map_x, map_y = _map_nodes(grid_x, grid_y, IDENTITY_AFFINE, ref_wcs, sci_wcs)
    inside = _inside(map_x, map_y, ref_w, ref_h)[1:-1, 1:-1]
    coarse_overlap = float(inside.mean())
    if coarse_overlap < min_overlap:
        raise AstridError(f"reference and science images overlap by only {coarse_overlap:.1%} "
                          f"of the science image (minimum {min_overlap:.0%})")

    affine = IDENTITY_AFFINE.copy()
    rms_px = sigma_x = sigma_y = float("nan")
    n_matched = 0
    if refine and (sci_data is not None or sci_stars is not None):
        if sci_stars is None:
            sci_stars = _detect(sci_data, sci_mask, sci_rms)
        if ref_stars is None:
            ref_stars = _detect(ref_data, ref_mask, ref_rms)
        fit = _refine(sci_stars, ref_stars, ref_wcs, sci_wcs, match_radius_px)
        if fit is None:
            warnings.warn("too few stars matched between reference and science; keeping the "
                          "WCS mapping without refinement", stacklevel=2)
        else:
            affine, rms_px, sigma_x, sigma_y, n_matched = fit
            map_x, map_y = _map_nodes(grid_x, grid_y, affine, ref_wcs, sci_wcs)

    ref_on_sci, footprint = _warp(nan_at_bad(ref_data, ref_mask), grid_x, grid_y, map_x, map_y,
                                  (height, width))
    overlap = np.count_nonzero(footprint) / footprint.size  # a bool mean is 5x slower
    if overlap < min_overlap:
        raise AstridError(f"reference and science images overlap by only {overlap:.1%} "
                          f"of the science image (minimum {min_overlap:.0%})")
    return Alignment(ref_on_sci=ref_on_sci, footprint=footprint, overlap=overlap, rms_px=rms_px,
                     sigma_x_px=sigma_x, sigma_y_px=sigma_y, n_matched=n_matched,
                     affine=affine, grid_x=grid_x, grid_y=grid_y, map_x=map_x, map_y=map_y)


def _nodes(n_px: int, step_px: int) -> np.ndarray:
    """Uniform node positions from 0 to n_px - 1 spaced by about ``step_px``, plus one node
    beyond each end so that cubic interpolation needs no special edge case."""
    n_inner = max(2, int(np.ceil((n_px - 1) / step_px)) + 1)
    step = max(n_px - 1, 1) / (n_inner - 1)
    return step * np.arange(-1, n_inner + 1, dtype=float)


def _node_weights(nodes: np.ndarray, n_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Cubic-convolution interpolation from uniform ``nodes`` to pixels 0 .. n_px - 1.

    Returns (idx (n_px, 4) int64, weights (n_px, 4) float64): pixel p gets
    ``sum(weights[p] * values[idx[p]])``. Keys' kernel reproduces quadratics exactly, far
    better than a WCS needs across one node spacing.
    """
    step = nodes[1] - nodes[0]
    t = (np.arange(n_px, dtype=float) - nodes[0]) / step
    k = np.clip(np.floor(t).astype(np.int64), 1, len(nodes) - 3)
    idx = k[:, None] + np.arange(-1, 3)[None, :]
    return idx, np.column_stack(_keys_weights(t - k))


def _inside(x: np.ndarray, y: np.ndarray, width: int, height: int) -> np.ndarray:
    return (x >= -0.5) & (x <= width - 0.5) & (y >= -0.5) & (y <= height - 0.5)


def _apply_affine(affine: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (affine[0, 0] * x + affine[0, 1] * y + affine[0, 2],
            affine[1, 0] * x + affine[1, 1] * y + affine[1, 2])


def _sci_to_ref(x: np.ndarray, y: np.ndarray, ref_wcs: WCS | None,
                sci_wcs: WCS | None) -> tuple[np.ndarray, np.ndarray]:
    if sci_wcs is None:
        return np.asarray(x, float), np.asarray(y, float)
    world = sci_wcs.pixel_to_world_values(x, y)
    rx, ry = ref_wcs.world_to_pixel_values(*world)
    return np.asarray(rx, float), np.asarray(ry, float)


def _ref_to_sci(x: np.ndarray, y: np.ndarray, ref_wcs: WCS | None,
                sci_wcs: WCS | None) -> tuple[np.ndarray, np.ndarray]:
    return _sci_to_ref(x, y, sci_wcs, ref_wcs)


def _map_nodes(grid_x: np.ndarray, grid_y: np.ndarray, affine: np.ndarray, ref_wcs: WCS | None,
               sci_wcs: WCS | None) -> tuple[np.ndarray, np.ndarray]:
    """Reference pixel coordinates of the (corrected) science nodes, each (gy, gx)."""
    gx, gy = np.meshgrid(grid_x, grid_y)
    cx, cy = _apply_affine(affine, gx, gy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # points outside a projection's domain give NaN
        rx, ry = _sci_to_ref(cx, cy, ref_wcs, sci_wcs)
    # Nodes where the projection fails (far outside the reference) are pushed out of range.
    rx = np.where(np.isfinite(rx), rx, -1e6)
    ry = np.where(np.isfinite(ry), ry, -1e6)
    return rx, ry


def _warp(ref: np.ndarray, grid_x: np.ndarray, grid_y: np.ndarray, map_x: np.ndarray,
          map_y: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Resample ``ref`` (NaN at bad pixels) through the node mapping onto a grid of ``shape``.

    Returns (image (H, W) float32, (H, W) bool: output pixel inside the reference frame).
    """
    height, width = shape
    ref_h, ref_w = ref.shape
    col_idx, col_w = _node_weights(grid_x, width)
    row_idx, row_w = _node_weights(grid_y, height)
    # Interpolate along x once per node row (gy x W); rows are interpolated per pixel below.
    wx = np.zeros((width, len(grid_x)))
    np.put_along_axis(wx, col_idx, col_w, axis=1)
    tx = map_x @ wx.T
    ty = map_y @ wx.T
    kernel = _numba_kernel()
    if kernel is not None:
        out = np.empty(shape, np.float32)
        inside = np.empty(shape, np.bool_)
        kernel(np.ascontiguousarray(ref, np.float32), tx, ty, row_idx, row_w, out, inside)
        return out, inside
    padded = np.pad(np.asarray(ref, np.float32), _PAD, mode="edge")
    wy = np.zeros((height, len(grid_y)))
    np.put_along_axis(wy, row_idx, row_w, axis=1)
    x = (wy @ tx).astype(np.float32)
    y = (wy @ ty).astype(np.float32)
    return _resample_numpy(padded, x, y, ref_w, ref_h), _inside(x, y, ref_w, ref_h)


def _detect(data: np.ndarray, mask: np.ndarray | None, rms: np.ndarray | None) -> pd.DataFrame:
    if rms is None:
        bkg = estimate_background(data, mask)
        data, rms = np.asarray(data, np.float32) - bkg.level, bkg.rms
    return find_stars(data, rms, mask, thresh_sigma=5.0, edge_px=4)


def _refine(sci_stars: pd.DataFrame, ref_stars: pd.DataFrame, ref_wcs: WCS | None,
            sci_wcs: WCS | None, match_radius_px: float, max_stars: int = 1000,
            min_matches: int = 3):
    """Fit the affine correction from matched stars; None when too few match.

    Returns (affine (2, 3), rms_px, sigma_x_px, sigma_y_px, n_used).
    """
    sx, sy = _astrometric_stars(sci_stars, max_stars)
    rx, ry = _astrometric_stars(ref_stars, max_stars)
    if len(sx) < min_matches or len(rx) < min_matches:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        px, py = _ref_to_sci(rx, ry, ref_wcs, sci_wcs)
    ok = np.isfinite(px) & np.isfinite(py)
    pred = np.column_stack([px, py])[ok]
    xy_sci = np.column_stack([sx, sy])

    # Votes of all pairs of bright stars within the search radius find the bulk offset (robust
    # to WCS errors larger than the star spacing); then tight matches fit the affine.
    shift = _bulk_offset(xy_sci, pred, match_radius_px, min_matches)
    if shift is None:
        return None
    affine = IDENTITY_AFFINE.copy()
    affine[:, 2] = shift
    centre = xy_sci.mean(axis=0)
    radius_px = 2.0
    fit = None
    for _ in range(3):
        moved = np.column_stack(_apply_affine(affine, xy_sci[:, 0], xy_sci[:, 1]))
        ia, ib = match_positions(moved, pred, radius_px)
        if len(ia) < min_matches:
            break  # keep the previous fit, if any
        affine, keep = _fit_affine(xy_sci[ia], pred[ib], centre)
        resid = pred[ib] - np.column_stack(_apply_affine(affine, xy_sci[ia, 0], xy_sci[ia, 1]))
        fit = affine, resid[keep]
        scatter = float(np.sqrt(np.mean(np.sum(resid[keep] ** 2, axis=1))))
        radius_px = float(np.clip(5.0 * scatter, 1.0, 2.0))
    if fit is None:
        return None
    affine, resid = fit
    sigma_x = float(np.sqrt(np.mean(resid[:, 0] ** 2)))
    sigma_y = float(np.sqrt(np.mean(resid[:, 1] ** 2)))
    return affine, float(np.hypot(sigma_x, sigma_y)), sigma_x, sigma_y, len(resid)


def _astrometric_stars(stars: pd.DataFrame, max_stars: int,
                       snr_min: float = 8.0) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of the ``max_stars`` brightest sources whose centroids can be trusted
    (unsaturated, unmasked, S/N >= ``snr_min``), brightest first.

    Unlike photometry, astrometry tolerates neighbours and the image edge, and small fields
    need every usable star. In NumPy: pandas' selection and ``nlargest`` took 1.5 ms a list.
    """
    keep = np.flatnonzero(~stars["flag_saturated"].to_numpy(bool)
                          & ~stars["flag_masked"].to_numpy(bool)
                          & (stars["snr"].to_numpy() >= snr_min))
    # A stable sort keeps equal fluxes in catalogue order, as nlargest does.
    order = keep[np.argsort(-stars["flux"].to_numpy()[keep], kind="stable")[:max_stars]]
    return stars["x"].to_numpy(float)[order], stars["y"].to_numpy(float)[order]


def _bulk_offset(xy_sci: np.ndarray, pred: np.ndarray, search_px: float, min_votes: int,
                 n_bright: int = 300) -> np.ndarray | None:
    """Most common offset ``pred - xy_sci`` (px) among all pairs closer than ``search_px``.

    Both lists are sorted brightest first. Offsets are histogrammed in 1 px bins, smoothed
    3x3 so a peak split between bins still wins, and the winner refined by the median of the
    offsets within 1 px of it. None when fewer than ``min_votes`` pairs agree.
    """
    a, b = xy_sci[:n_bright], pred[:n_bright]
    groups = cKDTree(b).query_ball_point(a, search_px)
    offsets = [b[j] - a[i] for i, j in enumerate(groups) if j]
    if not offsets:
        return None
    d = np.concatenate(offsets)
    edges = np.arange(-np.ceil(search_px), np.ceil(search_px) + 1.0)
    hist, _, _ = np.histogram2d(d[:, 0], d[:, 1], bins=[edges, edges])
    hist = ndimage.uniform_filter(hist, size=3, mode="constant")
    ix, iy = np.unravel_index(np.argmax(hist), hist.shape)
    # The smoothed maximum may sit one bin beside the raw one: gather widely, then tighten.
    peak = np.array([edges[ix] + 0.5, edges[iy] + 0.5])
    peak = np.median(d[np.hypot(*(d - peak).T) < 2.5], axis=0)
    near = np.hypot(*(d - peak).T) < 1.0
    if near.sum() < min_votes:
        return None
    return np.median(d[near], axis=0)


def _fit_affine(src: np.ndarray, dst: np.ndarray, centre: np.ndarray,
                clip_sigma: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Iteratively clipped least-squares affine ``dst ~ A @ [src, 1]``.

    Fewer than 12 pairs fit a translation only (an affine from few noisy stars extrapolates
    badly to the corners). Coordinates are taken relative to ``centre`` for conditioning.
    Returns (A (2, 3), kept (K,) bool).
    """
    translation_only = len(src) < 12
    rel = src - centre
    if translation_only:
        design, target = np.ones((len(src), 1)), dst - src
    else:
        design, target = np.column_stack([rel, np.ones(len(src))]), dst
    keep = np.ones(len(src), bool)
    for _ in range(10):
        coef, *_ = np.linalg.lstsq(design[keep], target[keep], rcond=None)
        resid = target - design @ coef
        dist = np.hypot(resid[:, 0], resid[:, 1])
        sigma = np.median(dist[keep]) / 1.1774  # the median radius of a 2-D Gaussian
        # The floor stops a few very bright stars from clipping every fainter one.
        new_keep = dist <= clip_sigma * max(sigma, 0.03)
        if new_keep.sum() < max(3, design.shape[1]) or np.array_equal(new_keep, keep):
            break
        keep = new_keep
    if translation_only:
        return np.column_stack([np.eye(2), coef[0]]), keep
    linear, offset = coef[:2].T, coef[2]
    # Undo the centring: dst = L (src - c) + t = L src + (t - L c).
    return np.column_stack([linear, offset - linear @ centre]), keep


def _keys_weights(frac: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Keys (a = -0.5) cubic-convolution weights of taps -1, 0, 1, 2 for offsets ``frac`` in [0, 1)."""
    f = frac
    f2 = f * f
    f3 = f2 * f
    w_m1 = -0.5 * f3 + f2 - 0.5 * f
    w_0 = 1.5 * f3 - 2.5 * f2 + 1.0
    w_1 = -1.5 * f3 + 2.0 * f2 + 0.5 * f
    w_2 = 0.5 * f3 - 0.5 * f2
    return w_m1, w_0, w_1, w_2


def resample_cubic(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Sample ``image`` at (x, y) (0-based px, arrays of one shape) with Keys cubic convolution.

    NaN in ``image`` propagates to every output whose 4x4 kernel touches it; positions outside
    ``[-0.5, size - 0.5]`` give NaN. Taps beyond the edge repeat the edge pixel. This is the
    plain NumPy form of what ``align_reference`` does with a compiled loop.

    Returns float32 of the shape of ``x``.
    """
    height, width = image.shape
    padded = np.pad(np.asarray(image, np.float32), _PAD, mode="edge")
    return _resample_numpy(padded, np.asarray(x, np.float32), np.asarray(y, np.float32),
                           width, height)


_PAD = 2


def _resample_numpy(padded: np.ndarray, x: np.ndarray, y: np.ndarray, width: int,
                    height: int) -> np.ndarray:
    flat = padded.ravel()
    pw = width + 2 * _PAD
    outside = ~_inside(x, y, width, height)
    xc = np.clip(x, -0.5, width - 0.5)
    yc = np.clip(y, -0.5, height - 0.5)
    ix = np.floor(xc)
    iy = np.floor(yc)
    wx = [w.astype(np.float32) for w in _keys_weights(xc - ix)]
    wy = [w.astype(np.float32) for w in _keys_weights(yc - iy)]
    base = (iy.astype(np.int64) + _PAD - 1) * pw + (ix.astype(np.int64) + _PAD - 1)
    out = np.zeros(x.shape, np.float32)
    for j in range(4):
        row = np.zeros(x.shape, np.float32)
        for i in range(4):
            row += wx[i] * flat[base + (j * pw + i)]
        out += wy[j] * row
    out[outside] = np.nan
    return out


_NUMBA_KERNEL = None


def _numba_kernel():
    """The compiled warp loop, or None without numba (compiled once, cached on disk).

    Per output pixel: the reference position from the node table (4 taps per coordinate),
    then the 4x4 Keys kernel; no dense coordinate arrays are ever built, and taps beyond the
    border repeat the edge pixel (clamped indices, so no padded copy of the reference).
    """
    global _NUMBA_KERNEL
    if _NUMBA_KERNEL is not None:
        return _NUMBA_KERNEL or None
    try:
        import numba
    except ImportError:
        _NUMBA_KERNEL = False
        return None

    @numba.njit(parallel=True, cache=True, nogil=True)
    def kernel(ref, tx, ty, row_idx, row_w, out, inside):  # pragma: no cover
        n_rows, n_cols = out.shape
        height, width = ref.shape
        for r in numba.prange(n_rows):
            # This row's reference positions first, then the 4x4 Keys kernel at each.
            a0, a1, a2, a3 = row_w[r, 0], row_w[r, 1], row_w[r, 2], row_w[r, 3]
            t0, t1, t2, t3 = tx[row_idx[r, 0]], tx[row_idx[r, 1]], tx[row_idx[r, 2]], \
                tx[row_idx[r, 3]]
            u0, u1, u2, u3 = ty[row_idx[r, 0]], ty[row_idx[r, 1]], ty[row_idx[r, 2]], \
                ty[row_idx[r, 3]]
            xs, ys = np.empty(n_cols), np.empty(n_cols)
            for c in range(n_cols):
                xs[c] = a0 * t0[c] + a1 * t1[c] + a2 * t2[c] + a3 * t3[c]
                ys[c] = a0 * u0[c] + a1 * u1[c] + a2 * u2[c] + a3 * u3[c]
            o, ins = out[r], inside[r]
            for c in range(n_cols):
                xv, yv = xs[c], ys[c]
                if not (xv >= -0.5 and xv <= width - 0.5 and yv >= -0.5 and yv <= height - 0.5):
                    o[c] = np.nan
                    ins[c] = False
                    continue
                ins[c] = True
                fx0 = np.floor(xv)
                fy0 = np.floor(yv)
                f = xv - fx0
                g = yv - fy0
                f2 = f * f
                g2 = g * g
                wx0 = -0.5 * f + f2 - 0.5 * f2 * f
                wx1 = 1.0 - 2.5 * f2 + 1.5 * f2 * f
                wx2 = 0.5 * f + 2.0 * f2 - 1.5 * f2 * f
                wx3 = 0.5 * f2 * f - 0.5 * f2
                wy0 = -0.5 * g + g2 - 0.5 * g2 * g
                wy1 = 1.0 - 2.5 * g2 + 1.5 * g2 * g
                wy2 = 0.5 * g + 2.0 * g2 - 1.5 * g2 * g
                wy3 = 0.5 * g2 * g - 0.5 * g2
                ix = int(fx0) - 1
                iy = int(fy0) - 1
                if ix >= 0 and iy >= 0 and ix + 3 < width and iy + 3 < height:
                    # Away from the border (nearly every pixel): no clamping.
                    p0, p1 = ref[iy, ix:ix + 4], ref[iy + 1, ix:ix + 4]
                    p2, p3 = ref[iy + 2, ix:ix + 4], ref[iy + 3, ix:ix + 4]
                    o[c] = (wy0 * (wx0 * p0[0] + wx1 * p0[1] + wx2 * p0[2] + wx3 * p0[3])
                            + wy1 * (wx0 * p1[0] + wx1 * p1[1] + wx2 * p1[2] + wx3 * p1[3])
                            + wy2 * (wx0 * p2[0] + wx1 * p2[1] + wx2 * p2[2] + wx3 * p2[3])
                            + wy3 * (wx0 * p3[0] + wx1 * p3[1] + wx2 * p3[2] + wx3 * p3[3]))
                    continue
                c0, c1 = min(max(ix, 0), width - 1), min(max(ix + 1, 0), width - 1)
                c2, c3 = min(max(ix + 2, 0), width - 1), min(max(ix + 3, 0), width - 1)
                acc = 0.0
                for j in range(4):
                    wy = wy0 if j == 0 else (wy1 if j == 1 else (wy2 if j == 2 else wy3))
                    row = min(max(iy + j, 0), height - 1)
                    acc += wy * (wx0 * ref[row, c0] + wx1 * ref[row, c1]
                                 + wx2 * ref[row, c2] + wx3 * ref[row, c3])
                o[c] = acc

    _NUMBA_KERNEL = kernel
    return kernel
