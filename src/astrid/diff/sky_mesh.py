"""SExtractor's mesh background (as sep computes it), compiled with numba and free of the GIL.

The estimator is sep's: per mesh cell a 2-sigma-clipped mean and sigma set a histogram, whose
3-sigma-clipped mode (``2.5 median - 1.5 mean`` when the two are close, else the median)
and sigma are the cell's level and noise; cells with under half their pixels usable take the
mean of their nearest usable neighbours; a median filter smooths the mesh, and a natural
bicubic spline through the cell centres gives each pixel its value. Written here rather than
called from sep because sep holds the GIL: with these loops both images of a pair are
estimated truly side by side, the spline is evaluated straight at full resolution whatever grid
the cells were measured on, and the subtraction is fused into that evaluation.

All functions take the full-resolution image and sample every ``step``-th pixel, so no
subsampled copy is made. Positions are in mesh units: cell ``j`` of ``box`` samples has its
centre at full-resolution pixel ``step * (j * box + (box - 1) / 2)``.
"""

from __future__ import annotations

import numba
import numpy as np

BAD_MESH = np.float32(-1e30)  # a cell with too few usable pixels, before it is filled in
_NSIGMA = 5.0  # the histogram spans the clipped mean +- 5 sigma
_MAX_LEVELS = 4096
_LEVELS_PER_PIXEL = np.sqrt(2 / np.pi) * _NSIGMA / 4.0  # sep: at least 4 pixels per mode bin
_MIN_GOOD_FRACTION = 0.5


def mesh_statistics(image, mask, skip, step: int, box: int, parallel: bool = False):
    """Level and sigma of each mesh cell of ``image[::step, ::step]``.

    image : (H, W) float32; NaN pixels are skipped.
    mask : (H, W) bool, True at bad pixels, or (0, 0) for none.
    skip : (h, w) bool on the sampled grid, more pixels to leave out (sources), or (0, 0).
    parallel : spread the mesh rows over numba's threads (only from one Python thread at a
        time: numba's fallback threading layer aborts on concurrent launches).
    Returns two (ny, nx) float32 arrays, ``BAD_MESH`` where a cell has too few pixels.
    """
    hs = (image.shape[0] - 1) // step + 1
    ws = (image.shape[1] - 1) // step + 1
    level = np.empty(((hs - 1) // box + 1, (ws - 1) // box + 1), np.float32)
    sigma = np.empty_like(level)
    (_mesh_rows_parallel if parallel else _mesh_rows)(image, mask, skip, step, box, level,
                                                      sigma)
    return level, sigma


@numba.njit(cache=True, nogil=True)
def _mesh_rows(image, mask, skip, step, box, level, sigma):  # pragma: no cover (compiled)
    for j in range(level.shape[0]):
        _mesh_row(image, mask, skip, step, box, j, level, sigma)


@numba.njit(cache=True, nogil=True, parallel=True)
def _mesh_rows_parallel(image, mask, skip, step, box, level,
                        sigma):  # pragma: no cover (compiled)
    for j in numba.prange(level.shape[0]):
        _mesh_row(image, mask, skip, step, box, j, level, sigma)


@numba.njit(cache=True, nogil=True)
def _mesh_row(image, mask, skip, step, box, j, level, sigma):  # pragma: no cover (compiled)
    """The cells of mesh row ``j``."""
    hs = (image.shape[0] - 1) // step + 1
    ws = (image.shape[1] - 1) // step + 1
    values = np.empty(box * box, np.float32)
    histogram = np.zeros(_MAX_LEVELS + 1, np.int64)
    use_mask, use_skip = mask.shape[0] > 0, skip.shape[0] > 0
    none = np.zeros(box, np.bool_)
    r0, r1 = j * box, min(hs, (j + 1) * box)
    for i in range(level.shape[1]):
        c0, c1 = i * box, min(ws, (i + 1) * box)
        n = 0
        for rs in range(r0, r1):
            r = rs * step
            row = image[r, c0 * step:c1 * step:step]
            bad = mask[r, c0 * step:c1 * step:step] if use_mask else none[:row.size]
            other = skip[rs, c0:c1] if use_skip else none[:row.size]
            for q in range(row.size):
                v = row[q]
                if np.isfinite(v) and not bad[q] and not other[q]:
                    values[n] = v
                    n += 1
        if n < (r1 - r0) * (c1 - c0) * _MIN_GOOD_FRACTION:
            level[j, i] = BAD_MESH
            sigma[j, i] = BAD_MESH
        else:
            level[j, i], sigma[j, i] = _cell_mode(values[:n], histogram)


@numba.njit(cache=True, nogil=True)
def _mean_std(values, lo, hi):  # pragma: no cover (compiled)
    total, total2, n = 0.0, 0.0, 0
    for v in values:
        if lo <= v <= hi:
            total += v
            total2 += v * v
            n += 1
    if n == 0:
        return 0.0, 0.0, 0
    mean = total / n
    var = total2 / n - mean * mean
    return mean, np.sqrt(var) if var > 0 else 0.0, n


@numba.njit(cache=True, nogil=True)
def _cell_mode(values, histogram):  # pragma: no cover (compiled)
    """sep's ``backstat`` + ``backhisto`` + ``backguess`` for one cell's usable pixels."""
    mean, std, _ = _mean_std(values, -np.inf, np.inf)
    lcut, hcut = np.float32(mean - 2.0 * std), np.float32(mean + 2.0 * std)
    mean, std, n = _mean_std(values, lcut, hcut)
    nlevels = min(int(_LEVELS_PER_PIXEL * n + 1), _MAX_LEVELS)
    qscale = np.float32(2 * _NSIGMA * std / nlevels if std > 0 else 1.0)
    qzero = np.float32(mean - _NSIGMA * std)
    offset = np.float32(0.499999) - qzero / qscale
    histogram[:nlevels + 1] = 0
    for v in values:
        b = int(v / qscale + offset)  # truncation toward zero, as C's cast
        if 0 <= b < nlevels:
            histogram[b] += 1

    # Clip at 3 sigma around the median until sigma settles (sep's backguess), with prefix
    # sums in place of its loops over the bins: the same integers, so the same numbers.
    counts, moment1, moment2 = _prefix_sums(histogram, nlevels)
    lo_cut, hi_cut, top = 0, nlevels - 1, nlevels - 1
    sig, sig_prev, mea, med = 10.0 * top, 1.0, 0.0, 0.0
    for _ in range(100):
        if sig < 0.1 or abs(sig / sig_prev - 1.0) <= 1e-4:
            break
        sig_prev = sig
        total = counts[hi_cut + 1] - counts[lo_cut]
        mea = float(moment1[hi_cut + 1] - moment1[lo_cut])
        sig = float(moment2[hi_cut + 1] - moment2[lo_cut])
        med = _walk_median(histogram, counts, lo_cut, hi_cut)
        if total > 0:
            mea /= total
            sig = sig / total - mea * mea
        sig = np.sqrt(sig) if sig > 0 else 0.0
        lo_cut = int(med - 3.0 * sig + 0.5) if med - 3.0 * sig > 0 else 0
        up = med + 3.0 * sig
        hi_cut = (int(up + 0.5) if up > 0 else int(up - 0.5)) if up < top else top
    if sig > 0:
        mode = 2.5 * med - 1.5 * mea if abs((mea - med) / sig) < 0.3 else med
    else:
        mode = mea
    return np.float32(qzero + mode * qscale), np.float32(sig * qscale)


@numba.njit(cache=True, nogil=True)
def _prefix_sums(histogram, nlevels):  # pragma: no cover (compiled)
    """Cumulative counts, first and second moments (in bins) of ``histogram[:nlevels]``."""
    counts = np.zeros(nlevels + 1, np.int64)
    moment1 = np.zeros(nlevels + 1, np.int64)
    moment2 = np.zeros(nlevels + 1, np.int64)
    for k in range(nlevels):
        counts[k + 1] = counts[k] + histogram[k]
        moment1[k + 1] = moment1[k] + histogram[k] * k
        moment2[k + 1] = moment2[k] + histogram[k] * k * k
    return counts, moment1, moment2


@numba.njit(cache=True, nogil=True)
def _walk_median(histogram, counts, lo_cut, hi_cut):  # pragma: no cover (compiled)
    """sep's interpolated median of bins ``lo_cut..hi_cut``, without its walk.

    sep walks in from both ends, each step taking a bin on the side with the smaller sum
    (the high side on ties), until the two meet. That is a merge of two sorted sequences,
    the sums a_i of the lowest i bins and b_j of the highest j, so where they meet follows
    from binary searches: a_i is taken at step i + #{j: b_j <= a_i}.
    """
    n_bins = hi_cut - lo_cut + 1
    end = counts[hi_cut + 1]
    lo, hi = 0, n_bins  # the number of low-side steps: the largest i taken before n_bins
    while lo < hi:
        i = (lo + hi) // 2
        a = counts[lo_cut + i] - counts[lo_cut]
        jl, jh = 0, n_bins  # the largest j with b_j <= a
        while jl < jh:
            j = (jl + jh + 1) // 2
            if end - counts[hi_cut + 1 - j] <= a:
                jl = j
            else:
                jh = j - 1
        if i + jl + 1 < n_bins:
            lo = i + 1
        else:
            hi = i
    low = lo_cut + lo  # first bin of the high side; the low side ends at low - 1
    high = low - 1
    if high < 0:
        return 0.0
    low_sum = counts[low] - counts[lo_cut]
    high_sum = end - counts[low]
    peak = max(histogram[low], histogram[high])
    if peak == 0:
        return high + 0.5
    return high + 0.5 + (high_sum - low_sum) / (2.0 * peak)


@numba.njit(cache=True, nogil=True)
def fill_and_filter(level, sigma, half):  # pragma: no cover (compiled)
    """Bad cells take the mean of their nearest good cells; then a (2 half + 1)^2 median
    filter, its window shrunk symmetrically at the mesh edges (sep's ``filterback``).

    Returns new (level, sigma); (0, 1) everywhere when no cell is good.
    """
    ny, nx = level.shape
    lev, sig = level.copy(), sigma.copy()
    for j in range(ny):
        for i in range(nx):
            if level[j, i] > BAD_MESH:
                continue
            best, n, lsum, ssum = np.inf, 0, 0.0, 0.0
            for jj in range(ny):
                for ii in range(nx):
                    if level[jj, ii] <= BAD_MESH:
                        continue
                    d2 = (jj - j) ** 2 + (ii - i) ** 2
                    if d2 < best:
                        best, n, lsum, ssum = d2, 1, level[jj, ii], sigma[jj, ii]
                    elif d2 == best:
                        n += 1
                        lsum += level[jj, ii]
                        ssum += sigma[jj, ii]
            lev[j, i] = lsum / n if n else 0.0
            sig[j, i] = ssum / n if n else 1.0
    out_lev, out_sig = np.empty_like(lev), np.empty_like(sig)
    window_l = np.empty((2 * half + 1) ** 2, np.float32)
    window_s = np.empty((2 * half + 1) ** 2, np.float32)
    for j in range(ny):
        hy = min(half, j, ny - 1 - j)
        for i in range(nx):
            hx = min(half, i, nx - 1 - i)
            n = 0
            for jj in range(j - hy, j + hy + 1):
                for ii in range(i - hx, i + hx + 1):
                    window_l[n] = lev[jj, ii]
                    window_s[n] = sig[jj, ii]
                    n += 1
            out_lev[j, i] = np.median(window_l[:n])
            out_sig[j, i] = np.median(window_s[:n])
    return out_lev, out_sig


@numba.njit(cache=True, nogil=True)
def _natural_d2(y, d2, u):  # pragma: no cover (compiled)
    """Second derivatives (over 6) of the natural cubic spline through unit-spaced ``y``,
    into ``d2``, by sep's recurrence (``u`` is scratch of the same length)."""
    n = y.size
    d2[:] = 0.0
    if n < 3:
        return
    u[0] = 0.0
    for k in range(1, n - 1):
        t = -1.0 / (d2[k - 1] + 4.0)
        d2[k] = t
        u[k] = t * (u[k - 1] - 6.0 * (y[k + 1] + y[k - 1] - 2.0 * y[k]))
    d2[n - 1] = 0.0
    for k in range(n - 2, 0, -1):
        d2[k] = (d2[k] * d2[k + 1] + u[k]) / 6.0


@numba.njit(cache=True, nogil=True)
def spline_d2(values):  # pragma: no cover (compiled)
    """:func:`_natural_d2` down each column of a mesh."""
    d2 = np.zeros(values.shape)
    scratch = np.empty(values.shape[0])
    column = np.empty(values.shape[0])
    out = np.empty(values.shape[0])
    for col in range(values.shape[1]):
        column[:] = values[:, col]
        _natural_d2(column, out, scratch)
        d2[:, col] = out
    return d2


@numba.njit(cache=True, nogil=True)
def _interval(t, n):  # pragma: no cover (compiled)
    """Spline interval and offset of mesh coordinate ``t`` (extrapolating past the ends)."""
    if n < 2:
        return 0, 0.0
    k = min(max(int(np.floor(t)), 0), n - 2)
    return k, t - k


@numba.njit(cache=True, nogil=True)
def _row_nodes(values, d2, t, nodes):  # pragma: no cover (compiled)
    """The spline along axis 0 at mesh row coordinate ``t``, for every mesh column."""
    n = values.shape[0]
    if n < 2:
        nodes[:] = values[0]
        return
    k, dy = _interval(t, n)
    cdy = 1.0 - dy
    a, b = cdy * cdy * cdy - cdy, dy * dy * dy - dy
    for col in range(values.shape[1]):
        nodes[col] = (cdy * values[k, col] + dy * values[k + 1, col]
                      + a * d2[k, col] + b * d2[k + 1, col])


@numba.njit(cache=True, nogil=True)
def _column_weights(n_nodes, coords):  # pragma: no cover (compiled)
    """Spline weights of each column coordinate (increasing), and where each interval's
    columns start: interval ``k`` covers columns ``starts[k]:starts[k + 1]``."""
    m = coords.size
    weights = np.empty((4, m), np.float32)
    starts = np.zeros(max(n_nodes, 2), np.int64)
    starts[-1] = m
    for c in range(m):
        k, dx = _interval(coords[c], n_nodes)
        for later in range(k + 1, starts.size - 1):
            starts[later] = c + 1
        cdx = 1.0 - dx
        weights[0, c], weights[1, c] = cdx, dx
        weights[2, c], weights[3, c] = cdx * cdx * cdx - cdx, dx * dx * dx - dx
    return weights, starts


@numba.njit(cache=True, nogil=True)
def _spline_row(values, d2, t, weights, starts, nodes, node_d2, scratch,
                out):  # pragma: no cover (compiled)
    """One row of the bicubic spline (mesh row coordinate ``t``) into ``out`` (float32):
    the spline down each mesh column at ``t`` gives the row's nodes, and a spline through
    those is evaluated interval by interval (a loop the compiler vectorises)."""
    _row_nodes(values, d2, t, nodes)
    if nodes.size < 2:
        out[:] = nodes[0]
        return
    _natural_d2(nodes, node_d2, scratch)
    for k in range(nodes.size - 1):
        a0, a1 = np.float32(nodes[k]), np.float32(nodes[k + 1])
        a2, a3 = np.float32(node_d2[k]), np.float32(node_d2[k + 1])
        # Slices indexed from 0: numba then drops its negative-index wraparound, which
        # otherwise keeps LLVM from vectorising the loop (5x slower).
        s, e = starts[k], starts[k + 1]
        o, w0, w1 = out[s:e], weights[0, s:e], weights[1, s:e]
        w2, w3 = weights[2, s:e], weights[3, s:e]
        for c in range(e - s):
            o[c] = w0[c] * a0 + w1[c] * a1 + w2[c] * a2 + w3[c] * a3


@numba.njit(cache=True, nogil=True)
def evaluate_into(values, d2, rows, cols, out):  # pragma: no cover (compiled)
    """The bicubic spline through the mesh at mesh coordinates ``rows`` x ``cols``, into
    ``out`` (float32, ``(rows.size, cols.size)``)."""
    nx = values.shape[1]
    nodes, node_d2, scratch = np.empty(nx), np.empty(nx), np.empty(nx)
    weights, starts = _column_weights(nx, cols)
    for r in range(rows.size):
        _spline_row(values, d2, rows[r], weights, starts, nodes, node_d2, scratch, out[r])


@numba.njit(cache=True, nogil=True)
def evaluate_points(values, d2, rows, cols, out):  # pragma: no cover (compiled)
    """The bicubic spline through the mesh at the points ``(rows[k], cols[k])``, into
    ``out`` (float32, ``(rows.size,)``)."""
    nx = values.shape[1]
    nodes, node_d2, scratch = np.empty(nx), np.empty(nx), np.empty(nx)
    for k in range(rows.size):
        weights, starts = _column_weights(nx, cols[k:k + 1])
        _spline_row(values, d2, rows[k], weights, starts, nodes, node_d2, scratch,
                    out[k:k + 1])


def evaluate(values, d2, rows, cols) -> np.ndarray:
    """:func:`evaluate_into` a new array. numpy allocates it: numpy asks the kernel for huge
    pages, numba's allocator does not, and faulting in a 64 MB map page by page costs
    more than computing it."""
    out = np.empty((rows.size, cols.size), np.float32)
    evaluate_into(values, d2, rows, cols, out)
    return out


def subtract(image, mask, level, level_d2, sigma, sigma_d2, rows, cols, out, rms,
             parallel: bool = False) -> None:
    """``out = image - level`` (NaN at masked or non-finite pixels) and ``rms = sigma`` at
    full resolution, in one pass; ``rows``/``cols`` are each pixel's mesh coordinates, and
    ``parallel`` as for :func:`mesh_statistics`."""
    args = (image, mask, level, level_d2, sigma, sigma_d2, rows, cols, out, rms)
    if parallel:
        _subtract_parallel(*args)
    else:
        _subtract_rows(*args, 0, rows.size)


_ROWS_PER_TASK = 64


@numba.njit(cache=True, nogil=True, parallel=True)
def _subtract_parallel(image, mask, level, level_d2, sigma, sigma_d2, rows, cols, out,
                       rms):  # pragma: no cover (compiled)
    n_tasks = (rows.size + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for t in numba.prange(n_tasks):
        _subtract_rows(image, mask, level, level_d2, sigma, sigma_d2, rows, cols, out, rms,
                       t * _ROWS_PER_TASK, min(rows.size, (t + 1) * _ROWS_PER_TASK))


@numba.njit(cache=True, nogil=True)
def _subtract_rows(image, mask, level, level_d2, sigma, sigma_d2, rows, cols, out, rms,
                   r0, r1):  # pragma: no cover (compiled)
    """Rows ``r0:r1`` of :func:`subtract`."""
    nx = level.shape[1]
    nodes, node_d2, scratch = np.empty(nx), np.empty(nx), np.empty(nx)
    weights, starts = _column_weights(nx, cols)
    row = np.empty(cols.size, np.float32)
    use_mask = mask.shape[0] > 0
    nan = np.float32(np.nan)
    for r in range(r0, r1):
        _spline_row(level, level_d2, rows[r], weights, starts, nodes, node_d2, scratch, row)
        _spline_row(sigma, sigma_d2, rows[r], weights, starts, nodes, node_d2, scratch, rms[r])
        o, v = out[r], image[r]
        # Branch-free selects (x - x is 0 only for finite x), so these loops vectorise too.
        if use_mask:
            m = mask[r]
            for c in range(cols.size):
                x = v[c] - row[c]
                o[c] = x if x - x == 0 and not m[c] else nan
        else:
            for c in range(cols.size):
                x = v[c] - row[c]
                o[c] = x if x - x == 0 else nan


def smoothed_above(residual: np.ndarray, sigma: np.ndarray, k: np.float32, out: np.ndarray,
                   parallel: bool = False) -> None:
    """``out`` = the 3x3 box mean of ``residual`` (edges replicated) > ``k * sigma``, in one
    compiled pass (the first pass's source mask; ``parallel`` as for
    :func:`mesh_statistics`)."""
    if parallel:
        _smoothed_above_parallel(residual, sigma, k, out)
    else:
        _smoothed_above_rows(residual, sigma, k, out, 0, residual.shape[0])


@numba.njit(cache=True, nogil=True, parallel=True)
def _smoothed_above_parallel(residual, sigma, k, out):  # pragma: no cover (compiled)
    n_tasks = (residual.shape[0] + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for t in numba.prange(n_tasks):
        _smoothed_above_rows(residual, sigma, k, out, t * _ROWS_PER_TASK,
                             min(residual.shape[0], (t + 1) * _ROWS_PER_TASK))


@numba.njit(cache=True, nogil=True)
def _smoothed_above_rows(residual, sigma, k, out, y0, y1):  # pragma: no cover (compiled)
    """Rows ``y0:y1`` of :func:`smoothed_above`: the 3x3 box mean with edges replicated,
    three rows summed first, then three columns, in float32."""
    h, w = residual.shape
    ninth = np.float32(1.0 / 9.0)
    column = np.empty(w + 2, np.float32)  # the three-row sums, edge columns replicated
    for y in range(y0, y1):
        up, mid, down = residual[max(y - 1, 0)], residual[y], residual[min(y + 1, h - 1)]
        for x in range(w):
            column[x + 1] = up[x] + mid[x] + down[x]
        column[0], column[w + 1] = column[1], column[w]
        s, o = sigma[y], out[y]
        for x in range(w):
            o[x] = (column[x] + column[x + 1] + column[x + 2]) * ninth > k * s[x]
