"""Stamp images for the review page: asinh-stretched PNGs.

Science and reference share one colour range (computed from both), so a source that brightened
looks brighter, as on survey scanning pages; the difference gets its own range, symmetric about
zero, so positive and negative residuals are told apart at a glance (grey = 0).
"""

from __future__ import annotations

import io

import numpy as np
from astropy.visualization import AsinhStretch

CHANNELS = ("sci", "ref", "diff")
_PERCENTILES = (0.5, 99.7)
_STRETCH = AsinhStretch(a=0.1)


def display_range(triplet: np.ndarray, channel: str) -> tuple[float, float]:
    """The (low, high) pixel values mapped to black and white for ``channel``.

    Parameters
    ----------
    triplet : (3, S, S) raw pixels, channels ``sci, ref, diff``; NaN allowed.
    channel : ``"sci"``, ``"ref"`` or ``"diff"``.
    """
    if channel == "diff":
        pix = triplet[2][np.isfinite(triplet[2])]
        half = float(np.percentile(np.abs(pix), _PERCENTILES[1])) if pix.size else 1.0
        half = half if half > 0 else 1.0
        return -half, half
    pix = triplet[:2][np.isfinite(triplet[:2])]
    if not pix.size:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(pix, _PERCENTILES))
    return (low, high) if high > low else (low, low + 1.0)


def stamp_png(triplet: np.ndarray, channel: str) -> bytes:
    """One channel of a triplet as an 8-bit greyscale PNG (NaN pixels shown dark red)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.image import imsave

    index = CHANNELS.index(channel)
    low, high = display_range(triplet, channel)
    img = np.asarray(triplet[index], dtype=np.float64)
    bad = ~np.isfinite(img)
    unit = np.clip((np.nan_to_num(img, nan=low) - low) / (high - low), 0.0, 1.0)
    if channel == "diff":
        # asinh on each side of zero keeps the symmetry: 0 stays mid-grey.
        signed = 2.0 * unit - 1.0
        level = 0.5 + 0.5 * np.sign(signed) * _STRETCH(np.abs(signed))
    else:
        level = _STRETCH(unit)
    rgb = np.repeat(level[..., None], 3, axis=-1)
    rgb[bad] = (0.35, 0.0, 0.0)
    buf = io.BytesIO()
    imsave(buf, rgb, format="png", origin="lower")
    return buf.getvalue()
