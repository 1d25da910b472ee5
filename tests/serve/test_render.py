"""Stamp PNGs: science and reference share a colour range; the difference keeps its sign."""

from __future__ import annotations

import io

import matplotlib.image as mpimg
import numpy as np

from astrid.serve.render import display_range, stamp_png


def _levels(triplet, channel):
    return mpimg.imread(io.BytesIO(stamp_png(triplet, channel)))[..., 0]


def test_science_and_reference_share_one_range_and_diff_is_signed():
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:63, :63]
    star = 500.0 * np.exp(-((xx - 31) ** 2 + (yy - 31) ** 2) / 8.0)
    sci = (star + rng.normal(0, 5, (63, 63))).astype(np.float32)
    ref = (0.25 * star + rng.normal(0, 5, (63, 63))).astype(np.float32)  # fainter before
    diff = (ref - sci).astype(np.float32)  # a source that faded: negative residual
    diff[0, :5] = np.nan
    triplet = np.stack([sci, ref, diff])
    assert display_range(triplet, "sci") == display_range(triplet, "ref")
    low, high = display_range(triplet, "diff")
    assert low == -high > -np.inf
    s, r, d = (_levels(triplet, c) for c in ("sci", "ref", "diff"))
    assert s[31, 31] > r[31, 31] + 0.1  # same scale: the brightening shows
    assert d[31, 31] < 0.2 and abs(np.median(d) - 0.5) < 0.1  # negative = dark, zero = grey
    # origin="lower": row 0 of the array is the bottom row of the image; NaN shown dark red.
    rgb = mpimg.imread(io.BytesIO(stamp_png(triplet, "diff")))
    assert rgb[-1, 0, 0] > 0.3 and rgb[-1, 0, 1] < 0.05
    assert np.isfinite(s).all() and s.shape == (63, 63)


def test_blank_and_constant_stamps_do_not_break():
    blank = np.full((3, 21, 21), np.nan, np.float32)
    flat = np.ones((3, 21, 21), np.float32)
    for triplet in (blank, flat):
        for channel in ("sci", "ref", "diff"):
            assert stamp_png(triplet, channel).startswith(b"\x89PNG")
