"""The Gaussian-blur baseline on arrays: what it does, and why its noise model is wrong."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import fftconvolve

from astrid.diff.gaussian import gaussian_images
from astrid.diff.quality import robust_std

SIZE = 256


def gaussian_psf(fwhm_px, size=31):
    s = fwhm_px / 2.3548
    y, x = np.mgrid[:size, :size] - size // 2
    p = np.exp(-(x ** 2 + y ** 2) / (2 * s * s))
    return p / p.sum()


def test_matched_gaussians_subtract_and_transient_shows():
    rng = np.random.default_rng(0)
    stars = np.zeros((SIZE, SIZE))
    stars[rng.integers(20, SIZE - 20, 30), rng.integers(20, SIZE - 20, 30)] = 5e3
    ratio = 2.0
    ref = fftconvolve(stars, gaussian_psf(2.0), mode="same") + rng.normal(0, 3, stars.shape)
    sci = ratio * fftconvolve(stars, gaussian_psf(3.5), mode="same") \
        + rng.normal(0, 3, stars.shape)
    new = np.zeros_like(stars)
    new[128, 100] = 3e3
    sci = sci + fftconvolve(new, gaussian_psf(3.5), mode="same")
    out = gaussian_images(ref.astype(np.float32), sci.astype(np.float32), fwhm_ref_px=2.0,
                          fwhm_sci_px=3.5, flux_ratio=ratio, sigma_ref=3.0, sigma_sci=3.0)
    # Gaussian PSFs: the blur matches them exactly, so stars vanish and the transient stays.
    peak = np.unravel_index(np.nanargmax(out.scorr), out.scorr.shape)
    assert np.hypot(peak[0] - 128, peak[1] - 100) <= 1
    assert out.flux[128, 100] == pytest.approx(3e3, rel=0.15)
    assert out.scorr.dtype == np.float32 and out.diff is out.scorr


def test_naive_noise_model_is_not_unit_variance():
    # The blur lowers the noise of the blurred image, which sqrt(rms_r^2 + rms_n^2) ignores:
    # pure noise comes out well below 1 "sigma" (the old pipeline's calibration error).
    rng = np.random.default_rng(1)
    ref = rng.normal(0, 10, (SIZE, SIZE)).astype(np.float32)
    sci = rng.normal(0, 10, (SIZE, SIZE)).astype(np.float32)
    out = gaussian_images(ref, sci, fwhm_ref_px=1.5, fwhm_sci_px=4.5, flux_ratio=1.0,
                          sigma_ref=10.0, sigma_sci=10.0)
    assert robust_std(out.scorr[20:-20, 20:-20]) < 0.8


def test_nan_stays_nan():
    ref = np.ones((SIZE, SIZE), np.float32)
    sci = np.ones((SIZE, SIZE), np.float32)
    sci[50, 60] = np.nan
    out = gaussian_images(ref, sci, fwhm_ref_px=3.0, fwhm_sci_px=2.0, flux_ratio=1.0,
                          sigma_ref=1.0, sigma_sci=1.0)
    assert np.isnan(out.scorr[50, 60]) and np.isnan(out.flux[50, 60])
    assert np.isfinite(out.scorr[150, 150])
