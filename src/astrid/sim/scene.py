"""The static sky (stars and Sérsic galaxies) and how sources are drawn into an image.

Sources are rendered by adding small stamps around each one (``add_stamps``), never by a
full-image operation per source, so the cost scales with the number of sources and their
stamp areas. Galaxies are pixel-integrated Sérsic profiles convolved, stamp by stamp, with the
local PSF.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.signal import fftconvolve
from scipy.special import gammaincinv

from astrid.sim.psf import MoffatPsf, pixel_integrate

_MAX_STAMP_ELEMENTS = 3_000_000  # per rendering batch, bounds the temporary memory (~24 MB)


@dataclass(frozen=True)
class Galaxies:
    """Sérsic galaxies in the science pixel frame.

    ``x, y`` (px, 0-based), ``mag`` (AB), ``r_eff_px`` (circularised half-light radius),
    ``sersic_n``, ``axis_ratio`` (b/a), ``angle_deg`` (major axis from +x towards +y).
    """

    x: np.ndarray
    y: np.ndarray
    mag: np.ndarray
    r_eff_px: np.ndarray
    sersic_n: np.ndarray
    axis_ratio: np.ndarray
    angle_deg: np.ndarray

    def __len__(self) -> int:
        return len(self.x)


def power_law_mags(rng: np.random.Generator, n: int, mag_range: tuple[float, float],
                   slope: float) -> np.ndarray:
    """``n`` magnitudes with counts dN/dm ∝ 10^(slope m) between the limits (inverse CDF)."""
    lo, hi = mag_range
    u = rng.random(n)
    if slope <= 0:
        return lo + (hi - lo) * u
    a, b = 10 ** (slope * lo), 10 ** (slope * hi)
    return np.log10(a + u * (b - a)) / slope


def draw_galaxies(rng: np.random.Generator, n: int, shape: tuple[int, int], margin_px: float,
                  mag_range, slope, reff_range_px, n_range) -> Galaxies:
    """Random galaxies over the image plus a margin: varied size, Sérsic index and shape."""
    ny, nx = shape
    lo, hi = reff_range_px
    return Galaxies(
        x=rng.uniform(-margin_px, nx - 1 + margin_px, n),
        y=rng.uniform(-margin_px, ny - 1 + margin_px, n),
        mag=power_law_mags(rng, n, mag_range, slope),
        r_eff_px=np.exp(rng.uniform(np.log(lo), np.log(hi), n)),
        sersic_n=rng.uniform(*n_range, n),
        axis_ratio=rng.uniform(0.3, 1.0, n),
        angle_deg=rng.uniform(0, 180, n),
    )


def sersic_b(n) -> np.ndarray:
    """b_n such that r_eff encloses half the light: P(2n, b_n) = 1/2."""
    return gammaincinv(2 * np.asarray(n, float), 0.5)


def sersic_truncation_px(r_eff_px, sersic_n) -> np.ndarray:
    """Radius where the rendered profile is cut: wider for cuspy, high-index profiles."""
    return np.clip(np.asarray(r_eff_px) * (3 + np.asarray(sersic_n)), 3.0, 64.0)


def sample_sersic_offsets(rng: np.random.Generator, r_eff_px, sersic_n, axis_ratio,
                          angle_deg) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (dx, dy) px drawn from the light of each galaxy (one per galaxy).

    The enclosed light of a Sérsic profile is the regularised incomplete gamma function
    P(2n, b_n (r / r_e)^(1/n)), so ``b_n (r / r_e)^(1/n)`` is Gamma(2n)-distributed.
    """
    r_eff_px = np.asarray(r_eff_px, float)
    n = np.asarray(sersic_n, float)
    r_max = sersic_truncation_px(r_eff_px, n)
    r = np.full(r_eff_px.shape, np.inf)
    while np.any(bad := r > r_max):  # rejection keeps the offsets inside the rendered light
        g = rng.gamma(2 * n[bad])
        r[bad] = r_eff_px[bad] * (g / sersic_b(n[bad])) ** n[bad]
    phi = rng.uniform(0, 2 * np.pi, r.shape)
    q = np.asarray(axis_ratio, float)
    u = r * np.cos(phi) / np.sqrt(q)
    v = r * np.sin(phi) * np.sqrt(q)
    t = np.deg2rad(angle_deg)
    return u * np.cos(t) - v * np.sin(t), u * np.sin(t) + v * np.cos(t)


def add_stamps(image: np.ndarray, ix: np.ndarray, iy: np.ndarray, stamps: np.ndarray) -> None:
    """Add (N, S, S) stamps centred on pixels ``(iy, ix)`` into ``image`` in place (clipped
    at the edges)."""
    acc = _StampSum(image.shape)
    acc.add(ix, iy, stamps)
    acc.flush_into(image)


class _StampSum:
    """Collects stamps and adds them all with one ``bincount`` (one full-image pass instead of
    one per batch)."""

    def __init__(self, shape: tuple[int, int]):
        self.shape = shape
        self.index: list[np.ndarray] = []
        self.weight: list[np.ndarray] = []

    def add(self, ix, iy, stamps: np.ndarray) -> None:
        n, s, _ = stamps.shape
        if n == 0:
            return
        r = s // 2
        ny, nx = self.shape
        off = np.arange(-r, r + 1)
        yy = np.asarray(iy)[:, None, None] + off[None, :, None]
        xx = np.asarray(ix)[:, None, None] + off[None, None, :]
        inside = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
        self.index.append((yy * nx + xx)[inside])
        self.weight.append(stamps[inside])

    def flush_into(self, image: np.ndarray) -> None:
        if self.index:
            ny, nx = self.shape
            index, weight = np.concatenate(self.index), np.concatenate(self.weight)
            if len(index) < image.size // 16:  # few pixels: skip the full-image pass
                np.add.at(image.reshape(-1), index, weight)
            else:
                image += np.bincount(index, weights=weight, minlength=nx * ny).reshape(ny, nx)
        self.index, self.weight = [], []


def add_point_sources(image: np.ndarray, psf: MoffatPsf, x, y, flux_adu, floor_adu: float) -> None:
    """Add point sources of total flux ``flux_adu`` at ``x, y`` (px) into ``image`` (ADU).

    Each source gets a stamp large enough to lose < 0.5 % of its flux and to reach a surface
    brightness of ``floor_adu`` (a small fraction of the sky noise); sources are grouped by
    stamp size and rendered in vectorised batches.
    """
    x, y, flux = (np.atleast_1d(np.asarray(a, float)) for a in (x, y, flux_adu))
    ny, nx = image.shape
    radius = psf.radius_for(flux, floor_adu)
    near = (x > -radius) & (x < nx - 1 + radius) & (y > -radius) & (y < ny - 1 + radius)
    acc = _StampSum(image.shape)
    for r in np.unique(radius[near]):
        idx = np.flatnonzero(near & (radius == r))
        step = max(1, _MAX_STAMP_ELEMENTS // (2 * r + 1) ** 2)
        for start in range(0, len(idx), step):
            sel = idx[start:start + step]
            stamps, ix, iy = psf.stamps(x[sel], y[sel], int(r))
            acc.add(ix, iy, stamps * flux[sel, None, None])
    acc.flush_into(image)


def add_galaxies(image: np.ndarray, psf: MoffatPsf, gal: Galaxies, x, y, angle_deg,
                 flux_adu) -> None:
    """Add PSF-convolved Sérsic galaxies into ``image`` (ADU).

    ``x, y, angle_deg`` are the galaxies' positions and major-axis angles in this image's
    pixel frame; shapes come from ``gal``. Each profile is integrated over pixels, truncated
    at :func:`sersic_truncation_px`, normalised to ``flux_adu`` and convolved with the PSF at the
    galaxy's position.
    """
    x, y, angle_deg, flux = (np.asarray(a, float) for a in (x, y, angle_deg, flux_adu))
    ny, nx = image.shape
    fwhm_max = psf.fwhm_px * (1 + sum(abs(c) for c in psf.fwhm_coeffs))
    r_trunc = sersic_truncation_px(gal.r_eff_px, gal.sersic_n)
    psf_margin = max(6, int(np.ceil(3 * fwhm_max)))
    # Stamp radii on a coarse ladder so that galaxies batch together.
    radius = (np.ceil((r_trunc + psf_margin) / 8) * 8).astype(int)
    near = (x > -radius) & (x < nx - 1 + radius) & (y > -radius) & (y < ny - 1 + radius)
    acc = _StampSum(image.shape)
    for r in np.unique(radius[near]):
        idx = np.flatnonzero(near & (radius == r))
        step = max(1, _MAX_STAMP_ELEMENTS // (4 * (2 * r + 1) ** 2))
        for start in range(0, len(idx), step):
            sel = idx[start:start + step]
            ix, iy = np.rint(x[sel]).astype(np.int64), np.rint(y[sel]).astype(np.int64)
            profile = _sersic_profile(gal.r_eff_px[sel], gal.sersic_n[sel], gal.axis_ratio[sel],
                                      np.deg2rad(angle_deg[sel]), r_trunc[sel])
            intrinsic = pixel_integrate(profile, x[sel] - ix, y[sel] - iy, int(r))
            intrinsic *= (flux[sel] / intrinsic.sum(axis=(1, 2), dtype=float))[:, None, None].astype(np.float32)
            # PSF at each galaxy's own position, centred (the sub-pixel shift is in the profile).
            kernels, _, _ = psf.stamps(ix.astype(float), iy.astype(float), min(int(r), psf_margin * 2))
            kernels /= kernels.sum(axis=(1, 2), keepdims=True)
            observed = fftconvolve(intrinsic, kernels, mode="same", axes=(1, 2))
            acc.add(ix, iy, np.clip(observed, 0, None))
    acc.flush_into(image)


def _sersic_profile(r_eff, n, q, angle_rad, r_trunc):
    f32 = np.float32
    n = np.asarray(n, float)[:, None, None]
    b = sersic_b(n).astype(f32)
    inv_re = (1 / np.asarray(r_eff, float))[:, None, None].astype(f32)
    inv_n = (1 / n).astype(f32)
    q = np.asarray(q, float)[:, None, None]
    sq, iq = np.sqrt(q).astype(f32), (1 / np.sqrt(q)).astype(f32)
    cos = np.cos(angle_rad)[:, None, None].astype(f32)
    sin = np.sin(angle_rad)[:, None, None].astype(f32)
    r_trunc = np.asarray(r_trunc, float)[:, None, None].astype(f32)

    def f(dx, dy):
        u = (dx * cos + dy * sin) * sq
        v = (dy * cos - dx * sin) * iq
        r = np.sqrt(u * u + v * v)
        # A smooth taper over the last 10 % avoids a sharp edge at the truncation radius.
        taper = np.clip((r_trunc - r) / (0.1 * r_trunc), 0, 1)
        return np.exp(-b * ((r * inv_re) ** inv_n - 1)) * taper

    return f
