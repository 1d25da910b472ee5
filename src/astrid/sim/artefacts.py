"""Bogus signals: cosmic rays, hot pixels, bad columns, satellite trails, saturation and bleeds.

Each function changes one epoch's image in place (in that epoch's detector frame) and returns
where it did so as a table with columns ``kind, x, y, flux, effect``: ``x, y`` in this image's
pixels, ``flux`` in this image's ADU (total for compact artefacts, per pixel of length for
trails, columns and bleeds), ``effect`` +1 where light was added, -1 where it was removed.
Extended artefacts are sampled every ``sample_px`` along their length so that any detection on
them lies near a row.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

COLUMNS = ["kind", "x", "y", "flux", "effect"]


def empty() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object if c == "kind" else float) for c in COLUMNS})


def _rows(kind: str, x, y, flux, effect) -> pd.DataFrame:
    x = np.atleast_1d(np.asarray(x, float))
    return pd.DataFrame({"kind": kind, "x": x, "y": np.broadcast_to(y, x.shape).astype(float),
                         "flux": np.broadcast_to(flux, x.shape).astype(float),
                         "effect": np.broadcast_to(effect, x.shape).astype(float)})


def add_cosmic_rays(image: np.ndarray, rng: np.random.Generator, n: int,
                    gain: float) -> pd.DataFrame:
    """Sharp, unconvolved charge deposits: single pixels, small blobs and short worms.

    Deposits are 300-30000 e- per pixel (log-uniform), so many stand far above the sky noise
    while being far narrower than any PSF.
    """
    ny, nx = image.shape
    rows = []
    for _ in range(n):
        length = int(rng.choice([1, 2, 3, 5, 8, 13, 20], p=[.3, .15, .15, .15, .1, .1, .05]))
        x0, y0 = rng.uniform(2, nx - 3), rng.uniform(2, ny - 3)
        angle = rng.uniform(0, np.pi)
        t = np.arange(length) - (length - 1) / 2
        xs = np.rint(x0 + t * np.cos(angle)).astype(int)
        ys = np.rint(y0 + t * np.sin(angle)).astype(int)
        width = 2 if rng.random() < 0.25 else 1  # some tracks hit two pixels across
        xs = np.concatenate([xs + dx for dx in range(width)])
        ys = np.concatenate([ys] * width)
        keep = (xs >= 0) & (xs < nx) & (ys >= 0) & (ys < ny)
        xs, ys = xs[keep], ys[keep]
        if len(xs) == 0:
            continue
        deposit_adu = np.exp(rng.uniform(np.log(300), np.log(30000), len(xs))) / gain
        np.add.at(image, (ys, xs), deposit_adu)
        total = deposit_adu.sum()
        rows.append(_rows("cosmic_ray", np.sum(xs * deposit_adu) / total,
                          np.sum(ys * deposit_adu) / total, total, 1))
    return pd.concat(rows, ignore_index=True) if rows else empty()


def add_hot_pixels(image: np.ndarray, rng: np.random.Generator, n: int) -> pd.DataFrame:
    """Single pixels with a fixed excess of 100-20000 ADU (log-uniform)."""
    ny, nx = image.shape
    xs, ys = rng.integers(0, nx, n), rng.integers(0, ny, n)
    excess = np.exp(rng.uniform(np.log(100), np.log(20000), n))
    np.add.at(image, (ys, xs), excess)
    return _rows("hot_pixel", xs, ys, excess, 1) if n else empty()


def add_bad_columns(image: np.ndarray, rng: np.random.Generator, n: int, sky_sigma_adu: float,
                    sample_px: float) -> pd.DataFrame:
    """Hot columns (an offset of 5-50 sky sigma) or dead ones (10 % response), whole or partial."""
    ny, nx = image.shape
    rows = []
    for _ in range(n):
        col = int(rng.integers(0, nx))
        y0 = 0 if rng.random() < 0.5 else int(rng.integers(0, ny - 1))  # partial: from a trap up
        hot = rng.random() < 0.6
        if hot:
            level = rng.uniform(5, 50) * sky_sigma_adu
            image[y0:, col] += level
        else:
            level = 0.9 * float(np.median(image[y0:, col]))
            image[y0:, col] *= 0.1
        ys = np.arange(y0, ny, sample_px)
        rows.append(_rows("bad_column", np.full(len(ys), col), ys, level, 1 if hot else -1))
    return pd.concat(rows, ignore_index=True) if rows else empty()


def add_trails(image: np.ndarray, rng: np.random.Generator, n: int, fwhm_px: float,
               sample_px: float) -> pd.DataFrame:
    """Satellite or aircraft trails: straight lines across the image with a Gaussian cross
    profile about as wide as the PSF (or a little wider: out of focus) and 30-3000 ADU per pixel
    of length."""
    ny, nx = image.shape
    rows = []
    yy = np.arange(ny, dtype=np.float32)[:, None]
    xx = np.arange(nx, dtype=np.float32)[None, :]
    for _ in range(n):
        x0, y0 = rng.uniform(0, nx - 1), rng.uniform(0, ny - 1)
        angle = rng.uniform(0, np.pi)
        sigma = fwhm_px / 2.3548 * rng.uniform(1.0, 1.6)
        flux_per_px = np.exp(rng.uniform(np.log(30), np.log(3000)))
        dist = (xx - x0) * np.float32(np.sin(angle)) - (yy - y0) * np.float32(np.cos(angle))
        near = np.abs(dist) < 6 * sigma
        image[near] += flux_per_px / (np.sqrt(2 * np.pi) * sigma) * np.exp(
            -0.5 * (dist[near] / sigma) ** 2)
        t = np.arange(-1.5 * (nx + ny), 1.5 * (nx + ny), sample_px)
        xs, ys = x0 + t * np.cos(angle), y0 + t * np.sin(angle)
        keep = (xs >= -0.5) & (xs < nx - 0.5) & (ys >= -0.5) & (ys < ny - 0.5)
        rows.append(_rows("trail", xs[keep], ys[keep], flux_per_px, 1))
    return pd.concat(rows, ignore_index=True) if rows else empty()


def saturate(image: np.ndarray, saturation_adu: float, sample_px: float) -> pd.DataFrame:
    """Clip at ``saturation_adu`` and bleed each saturated column's excess charge along it.

    The charge above full well in a column spills half up, half down, filling pixels to the
    saturation level, as in a CCD read along columns. Returns ``bleed`` rows every
    ``sample_px`` along each bleed (beyond the saturated core).
    """
    from scipy import ndimage

    sat = image >= saturation_adu
    if not sat.any():
        return empty()
    rows = []
    labels, _ = ndimage.label(sat)
    for region in ndimage.find_objects(labels):
        ys, xs = region
        for col in range(xs.start, xs.stop):
            column = image[:, col]
            in_run = np.flatnonzero(sat[ys, col]) + ys.start
            if len(in_run) == 0:
                continue
            lo, hi = in_run.min(), in_run.max()
            excess = float(np.sum(column[lo:hi + 1] - saturation_adu, where=sat[lo:hi + 1, col]))
            column[lo:hi + 1] = np.where(sat[lo:hi + 1, col], saturation_adu, column[lo:hi + 1])
            new_hi = _spill(column[hi + 1:], excess / 2, saturation_adu)
            new_lo = _spill(column[:lo][::-1], excess / 2, saturation_adu)
            if col == (xs.start + xs.stop - 1) // 2 and (new_hi or new_lo):
                y_samples = np.arange(lo - new_lo, hi + new_hi + 1, sample_px)
                rows.append(_rows("bleed", np.full(len(y_samples), col), y_samples,
                                  saturation_adu, 1))
    np.minimum(image, saturation_adu, out=image)
    return pd.concat(rows, ignore_index=True) if rows else empty()


def _spill(pixels: np.ndarray, charge_adu: float, saturation_adu: float) -> int:
    """Fill ``pixels`` (a view, nearest first) up to saturation with ``charge_adu``; returns how
    many pixels were reached."""
    room = np.clip(saturation_adu - pixels, 0, None)
    filled = np.cumsum(room)
    n_full = int(np.searchsorted(filled, charge_adu))
    pixels[:n_full] = saturation_adu
    if n_full < len(pixels):
        pixels[n_full] += charge_adu - (filled[n_full - 1] if n_full else 0.0)
    return min(n_full + 1, len(pixels))
