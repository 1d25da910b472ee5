"""Compiled (numba, GIL-free) element-wise passes of a ZOGY tile (:mod:`astrid.diff.zogy_core`).

Between its FFTs a tile does a dozen element-wise products over half-plane spectra and a few
over the image (the astrometric term, S_corr). As NumPy expressions each is a pass over
memory with a temporary; here each group is one pass, in float32 / complex64 like the NumPy
code. At 2048^2 that was about a quarter of ZOGY's time.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True, fastmath=True)
def score_spectra(pr_hat, pn_hat, n_hat, r_hat, a, b, fr, fn,
                  floor_rel):  # pragma: no cover (compiled)
    """D-hat, S-hat and S_N-hat of a tile, in place (ZOGY.md; our notation).

    den^2 = a |P_r|^2 + b |P_n|^2 (a = sigma_n^2 F_r^2, b = sigma_r^2 F_n^2), floored at
    ``floor_rel`` of its maximum. With D_N = F_r P_r N-hat / den:

    * ``r_hat`` becomes D-hat = D_N - F_n P_n R-hat / den,
    * ``pr_hat`` becomes S-hat = D-hat F_r F_n conj(P_r P_n) / den,
    * ``n_hat`` becomes S_N-hat = D_N F_r F_n conj(P_r P_n) / den.
    """
    ny, nx = pr_hat.shape
    top = np.float32(0.0)
    for i in range(ny):
        pr_row, pn_row = pr_hat[i], pn_hat[i]
        for j in range(nx):
            pr, pn = pr_row[j], pn_row[j]
            den2 = a * (pr.real * pr.real + pr.imag * pr.imag) \
                + b * (pn.real * pn.real + pn.imag * pn.imag)
            top = max(top, den2)
    floor = floor_rel * top
    frn = fr * fn
    # 1 / den first, row by row, into a buffer: a loop of its own vectorises (sqrt and
    # division 8 at a time); inside the complex loop below it did not (3x slower).
    inv = np.empty(nx, np.float32)
    for i in range(ny):
        pr_row, pn_row, n_row, r_row = pr_hat[i], pn_hat[i], n_hat[i], r_hat[i]
        for j in range(nx):
            pr, pn = pr_row[j], pn_row[j]
            den2 = a * (pr.real * pr.real + pr.imag * pr.imag) \
                + b * (pn.real * pn.real + pn.imag * pn.imag)
            inv[j] = np.float32(1.0) / np.sqrt(max(den2, floor))
        for j in range(nx):
            pr, pn, inv_den = pr_row[j], pn_row[j], inv[j]
            d_sci = (fr * inv_den) * pr * n_row[j]
            d = d_sci - (fn * inv_den) * pn * r_row[j]
            to_score = (frn * inv_den) * np.conj(pr * pn)
            r_row[j] = d
            pr_row[j] = d * to_score
            n_row[j] = d_sci * to_score


@numba.njit(cache=True, nogil=True, fastmath=True)
def variance_spectrum(vr_hat, kr2_hat, vn_hat, kn2_hat):  # pragma: no cover (compiled)
    """``vr_hat`` becomes V_r-hat k_r^2-hat + V_n-hat k_n^2-hat (in place)."""
    ny, nx = vr_hat.shape
    for i in range(ny):
        vr_row, kr_row, vn_row, kn_row = vr_hat[i], kr2_hat[i], vn_hat[i], kn2_hat[i]
        for j in range(nx):
            vr_row[j] = vr_row[j] * kr_row[j] + vn_row[j] * kn_row[j]


@numba.njit(cache=True, nogil=True, fastmath=True)
def finish_variance(var, score, score_sci, floor, sx, sy):  # pragma: no cover (compiled)
    """V(S) in place: floored, plus the astrometric term (ZOGY eq. 30-31) if sx or sy > 0.

    The term is sx^2 [(d_x S_N)^2 + (d_x S_R)^2] + sy^2 [(d_y S_N)^2 + (d_y S_R)^2] with
    S_R = S_N - S, by central differences (0 on the first and last row and column).
    """
    h, w = var.shape
    half = np.float32(0.5)
    sx2, sy2 = sx * sx, sy * sy
    for i in range(h):
        row = var[i]
        if sx > 0:
            # The floor and the x term in one pass (the floor alone at the end columns).
            sn, s = score_sci[i], score[i]
            row[0], row[w - 1] = max(row[0], floor), max(row[w - 1], floor)
            for j in range(1, w - 1):
                gn = half * (sn[j + 1] - sn[j - 1])
                gr = gn - half * (s[j + 1] - s[j - 1])
                row[j] = max(row[j], floor) + sx2 * (gn * gn + gr * gr)
        else:
            for j in range(w):
                row[j] = max(row[j], floor)
        if sy > 0 and 0 < i < h - 1:
            up_n, down_n, up, down = score_sci[i - 1], score_sci[i + 1], score[i - 1], score[i + 1]
            for j in range(w):
                gn = half * (down_n[j] - up_n[j])
                gr = gn - half * (down[j] - up[j])
                row[j] += sy2 * (gn * gn + gr * gr)


@numba.njit(cache=True, nogil=True)
def finish_tile(diff, score, var, flags, bad_bits, to_sci, diff_out, scorr_out,
                err_out):  # pragma: no cover (compiled)
    """A tile's interior into the outputs: D, S_corr = S / sqrt(V(S)) and the flux error
    sqrt(V(S)) * to_sci, NaN in all three where ``flags & bad_bits`` (0: nowhere)."""
    h, w = score.shape
    nan = np.float32(np.nan)
    std = np.empty(w, np.float32)
    # Exact (IEEE) square roots and quotients, a row of roots first and branch-free selects
    # after: both loops vectorise, twice as fast as one loop with the mask in a branch.
    for i in range(h):
        d, s, v, f = diff[i], score[i], var[i], flags[i]
        do, c, e = diff_out[i], scorr_out[i], err_out[i]
        for j in range(w):
            std[j] = np.sqrt(v[j])
        for j in range(w):
            bad = (f[j] & bad_bits) != 0
            do[j] = nan if bad else d[j]
            c[j] = nan if bad else s[j] / std[j]
            e[j] = nan if bad else std[j] * to_sci


@numba.njit(cache=True, nogil=True)
def bad_pixel_scan(mask, bits, sci, ref):  # pragma: no cover (compiled)
    """(whether any pixel is flagged with ``bits`` or not finite in ``sci`` or ``ref``,
    whether any non-finite pixel is not flagged)."""
    h, w = mask.shape
    bad, unflagged = False, False
    for i in range(h):
        m, s, r = mask[i], sci[i], ref[i]
        row_bad, row_unflagged = False, False
        for j in range(w):  # bitwise, not short-circuit, operators: the loop vectorises
            flagged = (m[j] & bits) != 0
            finite = np.isfinite(s[j]) & np.isfinite(r[j])
            row_bad |= flagged | (not finite)
            row_unflagged |= (not flagged) & (not finite)
        bad |= row_bad
        unflagged |= row_unflagged
    return bad, unflagged


@numba.njit(cache=True, nogil=True)
def flag_non_finite(mask, bits, image, flag):  # pragma: no cover (compiled)
    """Set ``flag`` in ``mask`` where ``image`` is not finite and no ``bits`` are set."""
    h, w = mask.shape
    for i in range(h):
        m, x = mask[i], image[i]
        for j in range(w):
            if (m[j] & bits) == 0 and not np.isfinite(x[j]):
                m[j] |= flag


@numba.njit(cache=True, nogil=True)
def zero_where(bad, a, b, c, d):  # pragma: no cover (compiled)
    """Set four same-shape tiles to 0 where ``bad``, in one pass."""
    h, w = bad.shape
    zero = np.float32(0.0)
    for i in range(h):
        # Selects, not a branch: the loops vectorise.
        m, ra, rb, rc, rd = bad[i], a[i], b[i], c[i], d[i]
        for j in range(w):
            ra[j] = zero if m[j] else ra[j]
        for j in range(w):
            rb[j] = zero if m[j] else rb[j]
        for j in range(w):
            rc[j] = zero if m[j] else rc[j]
        for j in range(w):
            rd[j] = zero if m[j] else rd[j]


@numba.njit(cache=True, nogil=True)
def pair_flags(sci_mask, sci, saturation, ref, inside, bits, out):  # pragma: no cover (compiled)
    """The input flags of a pair on the science grid. ``bits`` = (science bad, reference bad,
    no overlap, saturated): science bad, or saturated (at or above ``saturation``, NaN for
    none: saturated, not merely bad); reference NaN inside its frame (``inside``), or no
    overlap outside it."""
    sci_bad, ref_bad, no_overlap, saturated = bits[0], bits[1], bits[2], bits[3]
    zero = np.uint8(0)
    h, w = out.shape
    check_saturation = saturation == saturation
    for i in range(h):
        m, d, r, f, o = sci_mask[i], sci[i], ref[i], inside[i], out[i]
        for j in range(w):
            flags = sci_bad if m[j] else zero
            if check_saturation and d[j] >= saturation:
                flags = saturated
            if not f[j]:
                flags |= no_overlap
            elif not np.isfinite(r[j]):
                flags |= ref_bad
            o[j] = flags
