"""Triplet cutouts: (science, reference, difference) stamps centred on candidates.

Stamps are cut at the nearest pixel with raw pixels (no resampling, which would smooth the
noise the classifier must learn). The true centre then lies within half a pixel of the central
pixel; that sub-pixel offset is returned so nothing is lost. A candidate near the image edge is
never shifted inwards: the missing part of its stamp is NaN and the stamp is flagged.
"""

from __future__ import annotations

import numpy as np

CHANNELS: tuple[str, ...] = ("sci", "ref", "diff")


def stamp_centres(x, y) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Central pixels and sub-pixel offsets of stamps for positions ``x, y`` (0-based pixels).

    Returns
    -------
    ix, iy : (N,) int64, the pixel holding each position (pixel centres are at integers).
    offsets : (N, 2) float64, ``(x - ix, y - iy)`` in pixels, each in [-0.5, 0.5).
    """
    x = np.atleast_1d(np.asarray(x, dtype=np.float64))
    y = np.atleast_1d(np.asarray(y, dtype=np.float64))
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D of equal length, got {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("candidate positions must be finite")
    ix = np.floor(x + 0.5).astype(np.int64)
    iy = np.floor(y + 0.5).astype(np.int64)
    return ix, iy, np.stack([x - ix, y - iy], axis=1)


def cut_stamps(image: np.ndarray, ix: np.ndarray, iy: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut ``size`` x ``size`` stamps of one image centred on pixels ``(ix, iy)``.

    Returns
    -------
    stamps : (N, size, size) float32, NaN where the stamp leaves the image.
    edge : (N,) bool, True where the stamp leaves the image.
    """
    if size < 1 or size % 2 == 0:
        raise ValueError(f"stamp size must be a positive odd number, got {size}")
    image = np.asarray(image)
    ny, nx = image.shape
    half = size // 2
    offs = np.arange(-half, half + 1)
    rows = iy[:, None] + offs[None, :]  # (N, S)
    cols = ix[:, None] + offs[None, :]
    rows_ok = (rows >= 0) & (rows < ny)
    cols_ok = (cols >= 0) & (cols < nx)
    # One vectorised gather with clipped indices; outside pixels are then blanked.
    stamps = image[np.clip(rows, 0, ny - 1)[:, :, None], np.clip(cols, 0, nx - 1)[:, None, :]]
    stamps = stamps.astype(np.float32, copy=False)
    inside = rows_ok[:, :, None] & cols_ok[:, None, :]
    edge = ~inside.all(axis=(1, 2))
    if edge.any():
        stamps[~inside] = np.nan
    return stamps, edge


def cut_triplets(sci: np.ndarray, ref: np.ndarray, diff: np.ndarray, x, y, size: int = 63, *,
                 return_offsets: bool = False):
    """Cut (science, reference, difference) triplets centred on candidates.

    Parameters
    ----------
    sci, ref, diff : (H, W) images on the same (science) pixel grid.
    x, y : candidate positions, 0-based pixels (``x`` column, ``y`` row), scalars or (N,).
    size : stamp side in pixels (odd).
    return_offsets : also return the sub-pixel offsets of the true centres.

    Returns
    -------
    stamps : (N, 3, size, size) float32 raw pixels, channels :data:`CHANNELS`, the candidate
        in the central pixel ``[size // 2, size // 2]``; NaN outside the image.
    edge : (N,) bool, True where the stamp reaches outside the image (NaN-padded, never shifted).
    offsets : (N, 2) float64 ``(dx, dy)`` pixels of the true centre from the central pixel
        (only with ``return_offsets``).
    """
    shapes = {np.shape(sci), np.shape(ref), np.shape(diff)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"sci, ref and diff must be 2-D images of one shape, got {shapes}")
    ix, iy, offsets = stamp_centres(x, y)
    out = np.empty((len(ix), 3, size, size), np.float32)
    edge = np.zeros(len(ix), bool)
    for c, image in enumerate((sci, ref, diff)):
        out[:, c], edge_c = cut_stamps(image, ix, iy, size)
        edge |= edge_c
    return (out, edge, offsets) if return_offsets else (out, edge)
