"""Compiled (numba, GIL-free) loops of :func:`astrid.detect.candidates.find_peaks`.

One pass collects the pixels of |S_corr| above threshold, a second finds which of them are
local maxima and joins them into 8-connected regions of one sign (union-find over two rows
of indices: no full-size label map), and the deblending walks the peaks by decreasing
height against a grid of their positions. Same rules, in the same float32 arithmetic, as
the NumPy code they replaced, at a sixth of its time on a 4k frame.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True, parallel=True)
def above_threshold(scorr, threshold):  # pragma: no cover (compiled)
    """Flat indices (raster order) of pixels with |S_corr| >= threshold."""
    h, w = scorr.shape
    # Count per row first (a branch-free loop that vectorises), then collect each row into
    # its slot; rows on all cores (detection runs alone, after the differencing).
    per_row = np.zeros(h, np.int64)
    for y in numba.prange(h):
        row = scorr[y]
        n = 0
        for x in range(w):
            n += np.abs(row[x]) >= threshold
        per_row[y] = n
    starts = np.zeros(h + 1, np.int64)
    starts[1:] = np.cumsum(per_row)
    out = np.empty(starts[h], np.int64)
    for y in numba.prange(h):
        if per_row[y] == 0:
            continue
        row = scorr[y]
        n = starts[y]
        for x in range(w):
            if np.abs(row[x]) >= threshold:
                out[n] = y * w + x
                n += 1
    return out


@numba.njit(cache=True, nogil=True)
def _root(parent, k):  # pragma: no cover (compiled)
    while parent[k] != k:
        parent[k] = parent[parent[k]]
        k = parent[k]
    return k


@numba.njit(cache=True, nogil=True)
def maxima_and_regions(scorr, flat):  # pragma: no cover (compiled)
    """For each thresholded pixel: whether it is a local maximum of sign * S_corr among its
    eight neighbours (ties go to the first pixel in raster order; outside the image and NaN
    count as lower) and its 8-connected same-sign region label."""
    h, w = scorr.shape
    n = flat.size
    is_max = np.zeros(n, np.bool_)
    parent = np.arange(n)
    previous = np.full(w, -1, np.int64)  # index in ``flat`` of row y - 1's pixels, or -1
    current = np.full(w, -1, np.int64)
    row_of_current = -1
    for k in range(n):
        y, x = flat[k] // w, flat[k] % w
        if y != row_of_current:
            # A new row: the current row's indices become the previous row's (if adjacent).
            previous, current = current, previous
            if row_of_current != y - 1:
                previous[:] = -1
            current[:] = -1
            row_of_current = y
        current[x] = k
        value = scorr[y, x]
        sign = np.float32(1.0) if value > 0 else np.float32(-1.0)
        signed = value * sign
        peak = True
        for dy in range(-1, 2):
            for dx in range(-1, 2):
                if dy == 0 and dx == 0:
                    continue
                ny, nx = y + dy, x + dx
                if ny < 0 or ny >= h or nx < 0 or nx >= w:
                    continue
                nb = scorr[ny, nx] * sign
                later = dy > 0 or (dy == 0 and dx > 0)
                if nb > signed or (nb == signed and not later):
                    peak = False
        is_max[k] = peak
        # Join with already-seen neighbours of the same sign: left, and the row above.
        for nx, row in ((x - 1, current), (x - 1, previous), (x, previous), (x + 1, previous)):
            if nx < 0 or nx >= w:
                continue
            other = row[nx]
            if other < 0 or other == k:
                continue
            if (scorr[flat[other] // w, flat[other] % w] > 0) != (value > 0):
                continue
            a, b = _root(parent, k), _root(parent, other)
            if a != b:
                parent[max(a, b)] = min(a, b)
    region = np.empty(n, np.int64)
    for k in range(n):
        region[k] = _root(parent, k)
    return is_max, region


@numba.njit(cache=True, nogil=True)
def deblend(scorr, py, px, height, sign, region, min_sep_px, reach_px, dip_sigma,
            dip_fraction):  # pragma: no cover (compiled)
    """Keep peaks (sorted by decreasing height) farther than ``min_sep_px`` from every kept
    brighter peak and, within one region, separated from it by a saddle: S_corr along the
    straight line between them dips by ``max(dip_sigma, dip_fraction * height)``.
    Brighter peaks are looked for within ``reach_px``."""
    n = py.size
    keep = np.ones(n, np.bool_)
    if n < 2:
        return keep
    cell = max(reach_px, 1.0)
    gx = (px / cell).astype(np.int64)
    gy = (py / cell).astype(np.int64)
    nx_cells, ny_cells = gx.max() + 1, gy.max() + 1
    # Peaks bucketed by grid cell (counting sort), each bucket in increasing peak index.
    cell_of = gy * nx_cells + gx
    counts = np.zeros(nx_cells * ny_cells + 1, np.int64)
    for k in range(n):
        counts[cell_of[k] + 1] += 1
    starts = np.cumsum(counts)
    fill = starts[:-1].copy()
    members = np.empty(n, np.int64)
    for k in range(n):
        members[fill[cell_of[k]]] = k
        fill[cell_of[k]] += 1
    reach2 = reach_px * reach_px
    for j in range(1, n):
        done = False
        for cy in range(max(gy[j] - 1, 0), min(gy[j] + 2, ny_cells)):
            for cx in range(max(gx[j] - 1, 0), min(gx[j] + 2, nx_cells)):
                c = cy * nx_cells + cx
                for m in range(starts[c], starts[c + 1]):
                    i = members[m]
                    if i >= j:
                        break
                    if not keep[i]:
                        continue
                    ddx, ddy = float(px[i] - px[j]), float(py[i] - py[j])
                    if ddx * ddx + ddy * ddy > reach2:
                        continue
                    dist = np.hypot(ddx, ddy)
                    if dist < min_sep_px:
                        done = True
                        break
                    if region[i] == region[j]:
                        steps = int(np.ceil(dist)) + 1
                        saddle = np.float32(np.inf)
                        seen = False
                        for s in range(steps):
                            t = (py[i] - py[j]) / (steps - 1)
                            u = (px[i] - px[j]) / (steps - 1)
                            fy = py[i] if s == steps - 1 else s * t + py[j]
                            fx = px[i] if s == steps - 1 else s * u + px[j]
                            v = scorr[int(np.rint(fy)), int(np.rint(fx))] * sign[j]
                            if v == v:
                                seen = True
                                saddle = min(saddle, v)
                        if seen and height[j] - saddle < max(dip_sigma, dip_fraction * height[j]):
                            done = True
                            break
                if done:
                    break
            if done:
                break
        if done:
            keep[j] = False
    return keep
