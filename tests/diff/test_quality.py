"""Quality figures: how many pixels and stars they use, and that subsampling keeps them."""

from __future__ import annotations

import numpy as np
import pytest

from astrid.diff import quality as q


def gaussian_psf(fwhm_px: float, size: int = 31) -> np.ndarray:
    yy, xx = np.mgrid[-(size // 2):size // 2 + 1, -(size // 2):size // 2 + 1]
    psf = np.exp(-(xx**2 + yy**2) / (2 * (fwhm_px / 2.355) ** 2))
    return (psf / psf.sum()).astype(np.float32)


def test_noise_ratio_samples_are_capped_and_keep_its_value():
    rng = np.random.default_rng(0)
    scorr = rng.normal(0, 1.0, (2400, 2400)).astype(np.float32)
    diff = 0.9 * scorr
    mask = np.zeros(scorr.shape, np.uint8)
    free = np.ones((600, 600), bool)
    nr_s, nr_d, n = q.noise_ratios(scorr, diff, mask, free)
    every_other = q.noise_ratios(scorr, diff, mask, free, stride_px=2)
    assert n == 600**2 and every_other[2] == 1200**2  # every 4th pixel, not every other
    assert nr_s == pytest.approx(1.0, abs=0.005) and nr_s == pytest.approx(every_other[0], abs=0.005)
    assert nr_d == pytest.approx(0.9 * nr_s, rel=1e-5)
    # A 1024^2 frame keeps every other pixel (262,144), a 2048^2 one every 4th.
    assert q.noise_ratios(scorr[:1024, :1024], diff[:1024, :1024], mask[:1024, :1024],
                          free[:256, :256])[2] == 512**2
    assert q.noise_ratios(scorr[:2048, :2048], diff[:2048, :2048], mask[:2048, :2048],
                          free[:512, :512])[2] == 512**2


def test_star_chi2_from_a_subsample_of_many_stars_matches_all_of_them():
    rng = np.random.default_rng(1)
    psf_ref, psf_sci = gaussian_psf(3.0), gaussian_psf(3.6)
    # D of two unit-noise images: its variance is 1 wherever there are no sources.
    diff = rng.normal(0, 1.0, (1200, 1200)).astype(np.float32)
    ones = np.ones(diff.shape, np.float32)
    xy = rng.uniform(40, 1160, (1500, 2))
    args = dict(sigma_ref=1.0, sigma_sci=1.0, flux_ratio=1.0, radius_px=3.6)
    all_stars = q.star_residual_chi2(diff, xy, ones, ones, psf_ref, psf_sci, max_stars=10_000,
                                     **args)
    subsample = q.star_residual_chi2(diff, xy, ones, ones, psf_ref, psf_sci, max_stars=300,
                                     **args)
    # (a few stars above the bulk are left out as variables)
    assert 1450 <= all_stars[1] <= 1500 and 290 <= subsample[1] <= 300
    assert all_stars[0] == pytest.approx(1.0, abs=0.05)
    assert subsample[0] == pytest.approx(all_stars[0], abs=0.05)
