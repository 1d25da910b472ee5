"""The building blocks: Moffat PSF, Sérsic sampling, expected S/N in the difference."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.convolution import discretize_model
from astropy.modeling.models import Moffat2D
from scipy.special import gammainc

from astrid.sim.psf import MoffatPsf, moffat_alpha, noise_equivalent_area
from astrid.sim.scene import (
    add_point_sources,
    sample_sersic_offsets,
    sersic_b,
    sersic_truncation_px,
)
from astrid.sim.transients import EpochNoise, difference_snr, flux_for_snr


@pytest.mark.parametrize("fwhm_px, beta", [(1.5, 2.5), (3.0, 3.5), (4.5, 4.5)])
def test_moffat_stamp_is_the_pixel_integrated_profile(fwhm_px, beta):
    """Compare with astropy's Moffat2D integrated over pixels by 20x oversampling."""
    psf = MoffatPsf(fwhm_px=fwhm_px, beta=beta, ellipticity=0.0, pa_deg=0.0, shape=(101, 101))
    x, y = 50.3, 49.8
    ours = psf.stamp(x, y, radius_px=12, normalise=False)
    alpha = float(moffat_alpha(fwhm_px, beta))
    model = Moffat2D(amplitude=(beta - 1) / (np.pi * alpha ** 2), x_0=12 + x - 50, y_0=12 + y - 50,
                     gamma=alpha, alpha=beta)
    reference = discretize_model(model, (0, 25), (0, 25), mode="oversample", factor=20)
    assert np.max(np.abs(ours - reference)) < 1e-3 * reference.max()
    assert Moffat2D(gamma=alpha, alpha=beta).fwhm == pytest.approx(fwhm_px)


def test_elliptical_psf_keeps_its_flux_and_axis():
    psf = MoffatPsf(fwhm_px=3.0, beta=3.0, ellipticity=0.15, pa_deg=30.0, shape=(200, 200))
    st = psf.stamp(100, 100, radius_px=60, normalise=False)
    assert st.sum() == pytest.approx(1.0, abs=2e-3)
    yy, xx = np.mgrid[-60:61, -60:61]
    w = st * (np.hypot(xx, yy) < 10)
    cxx, cyy, cxy = (w * xx * xx).sum(), (w * yy * yy).sum(), (w * xx * yy).sum()
    angle = 0.5 * np.degrees(np.arctan2(2 * cxy, cxx - cyy))
    assert angle == pytest.approx(30.0, abs=1.0)
    # Mild variation across the field.
    varying = MoffatPsf(3.0, 3.0, 0.05, 0.0, (2048, 2048), fwhm_coeffs=(0.03, -0.02, 0.01))
    fwhm, _, _ = varying.params_at(np.array([0, 1023.5, 2047]), np.array([0, 1023.5, 2047]))
    assert fwhm[1] == pytest.approx(3.0, rel=1e-3) and 0.9 < fwhm[0] / fwhm[2] < 1.1


def test_rendered_point_sources_keep_their_flux():
    psf = MoffatPsf(fwhm_px=2.5, beta=2.5, ellipticity=0.1, pa_deg=10.0, shape=(300, 300))
    image = np.zeros((300, 300))
    flux = np.array([100.0, 1e4, 1e6])
    add_point_sources(image, psf, [60.2, 150.7, 240.4], [150.0, 149.6, 150.3], flux, floor_adu=0.1)
    for x, f in zip((60, 150, 240), flux, strict=True):
        assert image[:, x - 45:x + 46].sum() == pytest.approx(f, rel=6e-3)


@pytest.mark.parametrize("n", [0.7, 1.0, 4.0])
def test_host_offsets_follow_the_host_light(n):
    """Half the light (of the truncated profile) lies within r_eff: so do the offsets."""
    rng = np.random.default_rng(0)
    m = 20000
    r_eff, q, angle = np.full(m, 3.0), np.full(m, 0.5), np.full(m, 30.0)
    dx, dy = sample_sersic_offsets(rng, r_eff, np.full(m, n), q, angle)
    t = np.radians(30.0)
    u = dx * np.cos(t) + dy * np.sin(t)
    v = -dx * np.sin(t) + dy * np.cos(t)
    r = np.sqrt(q * u * u + v * v / q)  # circularised radius
    r_max = sersic_truncation_px(3.0, n)
    b = sersic_b(n)
    expected = 0.5 / gammainc(2 * n, b * (r_max / 3.0) ** (1 / n))
    assert np.mean(r < 3.0) == pytest.approx(expected, abs=0.012)
    assert r.max() <= r_max
    # Elongated along the major axis.
    assert np.std(u) > 1.5 * np.std(v)


def _noise(psf, var, gain=2.0):
    return EpochNoise(psf=psf, background_var_adu2=var, gain=gain)


def test_expected_snr_reduces_to_the_noise_equivalent_area_for_equal_psfs():
    p = MoffatPsf(3.0, 3.0, 0.0, 0.0, (64, 64)).stamp(32, 32, radius_px=20)
    nea = noise_equivalent_area(p)
    snr = difference_snr(500.0, 0.0, 0.0, _noise(p, 100.0), _noise(p, 400.0), flux_ratio=0.5)
    assert snr == pytest.approx(500.0 / np.sqrt(nea * (100.0 + 400.0 * 0.25)), rel=1e-6)
    # A noiseless reference leaves only the science noise (PSF photometry on the science image).
    sharp = MoffatPsf(2.0, 3.0, 0.0, 0.0, (64, 64)).stamp(32, 32, radius_px=20)
    snr = difference_snr(500.0, 0.0, 0.0, _noise(sharp, 100.0), _noise(p, 0.0), flux_ratio=1.0)
    assert snr == pytest.approx(500.0 / np.sqrt(noise_equivalent_area(sharp) * 100.0), rel=1e-6)


def test_expected_snr_is_lower_when_the_psfs_differ_and_with_shot_noise():
    p = MoffatPsf(2.0, 3.0, 0.0, 0.0, (64, 64)).stamp(32, 32, radius_px=20)
    q = MoffatPsf(4.0, 3.0, 0.0, 0.0, (64, 64)).stamp(32, 32, radius_px=20)
    matched = difference_snr(500.0, 0.0, 0.0, _noise(p, 100.0), _noise(p, 100.0), 1.0)
    forced = 500.0 / np.sqrt(noise_equivalent_area(p) * 100 + noise_equivalent_area(q) * 100)
    mismatched = difference_snr(500.0, 0.0, 0.0, _noise(p, 100.0), _noise(q, 100.0), 1.0)
    # Translation-invariant subtraction cannot beat forced photometry on each epoch.
    assert mismatched < forced < matched
    bright = difference_snr(500.0, 5e4, 0.0, _noise(p, 100.0), _noise(p, 100.0), 1.0)
    assert bright < matched


def test_flux_for_snr_inverts_the_snr():
    p = MoffatPsf(2.5, 3.0, 0.0, 0.0, (64, 64)).stamp(32, 32, radius_px=20)
    sci, ref = _noise(p, 150.0), _noise(p, 900.0)
    for target in (2.0, 10.0, 100.0):
        delta = flux_for_snr(target, sci, ref, 0.3, 0.0, 0.0, 1, True)
        assert difference_snr(delta, delta, 0.0, sci, ref, 0.3) == pytest.approx(target, rel=1e-3)


def test_trailed_source_matches_the_point_filter_only_in_part():
    psf = MoffatPsf(1.8, 3.0, 0.0, 0.0, (64, 64))
    p = psf.stamp(32, 32, radius_px=15)
    assert np.allclose(psf.trailed_stamp(32, 32, 0.0, 0.0, radius_px=15), p, atol=1e-7)
    trail = psf.trailed_stamp(32, 32, 4.0, 30.0, radius_px=15)
    assert trail.sum() == pytest.approx(1.0) and trail.max() < p.max()
    sci, ref = _noise(p, 100.0), _noise(p, 100.0)
    point = difference_snr(300.0, 0.0, 0.0, sci, ref, 1.0)
    trailed = difference_snr(300.0, 0.0, 0.0, EpochNoise(p, 100.0, 2.0, source=trail), ref, 1.0)
    assert 0.6 * point < trailed < 0.98 * point
    # In the reference instead (an asteroid seen only there): same loss by symmetry.
    in_ref = difference_snr(300.0, 0.0, 0.0, sci, EpochNoise(p, 100.0, 2.0, source=trail), 1.0,
                            in_science=False)
    assert in_ref == pytest.approx(trailed, rel=1e-6)
