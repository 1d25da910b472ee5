"""The ZOGY core on synthetic arrays with known PSFs, noise and sources (no sep, no alignment)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import fftconvolve

from astrid.diff.quality import robust_std
from astrid.diff.zogy_core import (
    MASK_EDGE,
    MASK_SCI_BAD,
    embed_centered,
    stamp_rfft2,
    zogy_images,
    zogy_kernels,
    zogy_tile,
)

SIZE = 384


def gaussian_psf(fwhm_px: float, size: int = 31, dx: float = 0.0, dy: float = 0.0) -> np.ndarray:
    sigma = fwhm_px / 2.3548
    y, x = np.mgrid[:size, :size] - size // 2
    p = np.exp(-((x - dx) ** 2 + (y - dy) ** 2) / (2 * sigma ** 2))
    return (p / p.sum()).astype(np.float32)


def point_sources(shape, xy, flux, psf) -> np.ndarray:
    """Integer-pixel point sources convolved with ``psf``."""
    img = np.zeros(shape)
    np.add.at(img, (xy[:, 1], xy[:, 0]), flux)
    return fftconvolve(img, psf, mode="same")


def make_pair(seed, *, flux_ratio, sigma_ref=5.0, sigma_sci=11.0, fwhm_ref=2.4, fwhm_sci=3.6,
              n_stars=40, gain=None, size=SIZE):
    """Reference and science with the same stars; returns arrays, PSFs, star positions."""
    rng = np.random.default_rng(seed)
    psf_r, psf_n = gaussian_psf(fwhm_ref), gaussian_psf(fwhm_sci)
    xy = rng.integers(24, size - 24, (n_stars, 2))
    flux = 10 ** rng.uniform(2.5, 4.5, n_stars)
    ref_true = point_sources((size, size), xy, flux, psf_r)
    sci_true = point_sources((size, size), xy, flux * flux_ratio, psf_n)
    if gain is not None:  # source Poisson noise
        ref_true = rng.poisson(np.clip(ref_true, 0, None) * gain) / gain
        sci_true = rng.poisson(np.clip(sci_true, 0, None) * gain) / gain
    ref = (ref_true + rng.normal(0, sigma_ref, ref_true.shape)).astype(np.float32)
    sci = (sci_true + rng.normal(0, sigma_sci, sci_true.shape)).astype(np.float32)
    return ref, sci, psf_r, psf_n, xy


def empty_sky(shape, xy, radius_px=14, border_px=24) -> np.ndarray:
    free = np.ones(shape, bool)
    free[:border_px] = free[-border_px:] = False
    free[:, :border_px] = free[:, -border_px:] = False
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    for x, y in xy:
        free[max(0, y - radius_px):y + radius_px, max(0, x - radius_px):x + radius_px] = False
    del yy, xx
    return free


def run(ref, sci, psf_r, psf_n, *, flux_ratio, sigma_ref=5.0, sigma_sci=11.0, **kw):
    return zogy_images(ref, sci, psf_r, psf_n, sigma_ref=sigma_ref, sigma_sci=sigma_sci,
                       flux_ratio=flux_ratio, **kw)


def test_stamp_rfft2_matches_full_fft():
    psf = gaussian_psf(3.0, dx=0.3, dy=-0.2)
    shape = (130, 96)
    full = np.fft.rfft2(embed_centered(psf, shape))
    assert np.allclose(stamp_rfft2(psf, shape), full, atol=1e-6)


@pytest.mark.parametrize("flux_ratio", [1.0, 6.0, 0.15])
def test_scorr_and_d_are_unit_noise_in_empty_sky(flux_ratio):
    # A flux ratio far from 1 catches F_r / F_n swapped in the kernels.
    ref, sci, psf_r, psf_n, xy = make_pair(1, flux_ratio=flux_ratio)
    out = run(ref, sci, psf_r, psf_n, flux_ratio=flux_ratio)
    free = empty_sky(ref.shape, xy)
    assert robust_std(out.scorr[free]) == pytest.approx(1.0, abs=0.05)
    assert np.std(out.diff[free]) == pytest.approx(1.0, abs=0.05)
    # Static stars subtract: nothing significant anywhere away from the border.
    assert np.nanmax(np.abs(out.scorr[24:-24, 24:-24])) < 5.5


def test_wrong_flux_ratio_leaves_star_residuals():
    # F_n enters D and S: with the inverse ratio the stars no longer subtract.
    ref, sci, psf_r, psf_n, xy = make_pair(2, flux_ratio=6.0)
    wrong = run(ref, sci, psf_r, psf_n, flux_ratio=1 / 6.0)
    stars = np.abs(wrong.scorr[xy[:, 1], xy[:, 0]])
    assert np.median(stars) > 10


def test_point_source_flux_snr_and_sign():
    flux_ratio = 2.5
    ref, sci, psf_r, psf_n, _ = make_pair(3, flux_ratio=flux_ratio, n_stars=0)
    new = np.array([[100, 120]])
    faded = np.array([[250, 260]])
    flux_sci = 3000.0
    sci = sci + point_sources(sci.shape, new, [flux_sci], psf_n).astype(np.float32)
    ref = ref + point_sources(ref.shape, faded, [flux_sci / flux_ratio], psf_r).astype(np.float32)
    out = run(ref, sci, psf_r, psf_n, flux_ratio=flux_ratio)
    y, x = 120, 100
    peak = np.unravel_index(np.nanargmax(out.scorr), out.scorr.shape)
    assert peak == (y, x)
    err = float(out.flux_err[y, x])
    assert float(out.flux[y, x]) == pytest.approx(flux_sci, abs=3 * err)
    # flux_err is the real scatter of the flux map in empty sky.
    free = empty_sky(ref.shape, np.vstack([new, faded]))
    assert np.std(out.flux[free]) == pytest.approx(float(np.median(out.flux_err[free])), rel=0.05)
    assert out.scorr[y, x] == pytest.approx(out.flux[y, x] / err, rel=1e-4)
    low = np.unravel_index(np.nanargmin(out.scorr), out.scorr.shape)
    assert low == (260, 250)
    assert out.scorr[low] < -5
    assert float(out.flux[low]) == pytest.approx(-flux_sci, abs=3 * float(out.flux_err[low]))


def test_source_noise_term_normalises_bright_stars():
    # With Poisson noise from bright stars, S_corr at the stars is unit-variance only when
    # V(S) includes the variance maps.
    gain = 1.0
    flux_ratio = 1.3
    ref, sci, psf_r, psf_n, xy = make_pair(4, flux_ratio=flux_ratio, n_stars=60, gain=gain,
                                           sigma_ref=3.0, sigma_sci=4.0)
    var_ref = 3.0 ** 2 + np.clip(ref, 0, None) / gain
    var_sci = 4.0 ** 2 + np.clip(sci, 0, None) / gain
    with_var = run(ref, sci, psf_r, psf_n, flux_ratio=flux_ratio, sigma_ref=3.0, sigma_sci=4.0,
                   var_ref=var_ref, var_sci=var_sci)
    without = run(ref, sci, psf_r, psf_n, flux_ratio=flux_ratio, sigma_ref=3.0, sigma_sci=4.0)
    near = np.zeros(ref.shape, bool)
    for x, y in xy:
        near[y - 2:y + 3, x - 2:x + 3] = True
    assert np.std(with_var.scorr[near]) == pytest.approx(1.0, abs=0.15)
    assert np.std(without.scorr[near]) > 1.3


def test_astrometric_term_absorbs_misregistration():
    flux_ratio = 1.0
    rng = np.random.default_rng(5)
    psf_r, psf_n = gaussian_psf(3.0), gaussian_psf(3.0, dx=0.25)  # 0.25 px shift of the stars
    xy = rng.integers(30, SIZE - 30, (30, 2))
    flux = np.full(30, 2e5)
    ref = point_sources((SIZE, SIZE), xy, flux, psf_r) + rng.normal(0, 5, (SIZE, SIZE))
    sci = point_sources((SIZE, SIZE), xy, flux, psf_n) + rng.normal(0, 5, (SIZE, SIZE))
    plain = run(ref.astype(np.float32), sci.astype(np.float32), psf_r, psf_r,
                flux_ratio=flux_ratio, sigma_ref=5.0, sigma_sci=5.0)
    corrected = run(ref.astype(np.float32), sci.astype(np.float32), psf_r, psf_r,
                    flux_ratio=flux_ratio, sigma_ref=5.0, sigma_sci=5.0,
                    sigma_x_px=0.25, sigma_y_px=0.05)
    inner = np.s_[24:-24, 24:-24]
    assert np.nanmax(np.abs(plain.scorr[inner])) > 50  # dipoles without the term
    assert np.nanmax(np.abs(corrected.scorr[inner])) < 5


def test_nan_pixels_are_masked_not_poisoning_tiles():
    flux_ratio = 1.5
    ref, sci, psf_r, psf_n, xy = make_pair(6, flux_ratio=flux_ratio, n_stars=10)
    sci[100:110, 200:205] = np.nan
    ref[300, 50] = np.nan
    out = run(ref, sci, psf_r, psf_n, flux_ratio=flux_ratio, tile_px=128, overlap_px=32)
    assert np.isnan(out.scorr[100:110, 200:205]).all()
    assert out.mask[105, 202] & MASK_SCI_BAD
    assert out.mask[105, 202 + 4] & MASK_SCI_BAD  # dilated by the kernel footprint
    assert out.mask[300, 50] & 2
    finite = np.isfinite(out.scorr)
    assert finite.sum() == out.scorr.size - 50 - 1
    free = empty_sky(ref.shape, xy) & (out.mask == 0)
    assert robust_std(out.scorr[free]) == pytest.approx(1.0, abs=0.05)
    assert (out.mask[0] & MASK_EDGE).all()


def test_tiles_agree_with_one_tile():
    flux_ratio = 0.8
    ref, sci, psf_r, psf_n, _ = make_pair(7, flux_ratio=flux_ratio)
    one = run(ref, sci, psf_r, psf_n, flux_ratio=flux_ratio, tile_px=1024)
    tiled = run(ref, sci, psf_r, psf_n, flux_ratio=flux_ratio, tile_px=128, overlap_px=32)
    inner = np.s_[20:-20, 20:-20]
    assert np.allclose(tiled.scorr[inner], one.scorr[inner], atol=2e-3)
    assert np.allclose(tiled.diff[inner], one.diff[inner], atol=2e-3)


def test_per_tile_psf_is_used():
    # The science PSF broadens to the right; a per-tile PSF function subtracts both halves.
    rng = np.random.default_rng(8)
    psf_r = gaussian_psf(2.5)
    narrow, broad = gaussian_psf(3.0), gaussian_psf(4.2)
    half = SIZE // 2
    xy_l = np.column_stack([rng.integers(30, half - 30, 15), rng.integers(30, SIZE - 30, 15)])
    xy_r = np.column_stack([rng.integers(half + 30, SIZE - 30, 15),
                            rng.integers(30, SIZE - 30, 15)])
    flux = np.full(15, 3e4)
    ref = (point_sources((SIZE, SIZE), np.vstack([xy_l, xy_r]), np.r_[flux, flux], psf_r)
           + rng.normal(0, 5, (SIZE, SIZE))).astype(np.float32)
    sci = (point_sources((SIZE, SIZE), xy_l, flux, narrow)
           + point_sources((SIZE, SIZE), xy_r, flux, broad)
           + rng.normal(0, 5, (SIZE, SIZE))).astype(np.float32)
    per_tile = run(ref, sci, psf_r, lambda x, y: narrow if x < half else broad, flux_ratio=1.0,
                   sigma_ref=5.0, sigma_sci=5.0, tile_px=half, overlap_px=32)
    single = run(ref, sci, psf_r, narrow, flux_ratio=1.0, sigma_ref=5.0, sigma_sci=5.0,
                 tile_px=half, overlap_px=32)
    inner = np.s_[24:-24, 24:-24]
    assert np.nanmax(np.abs(per_tile.scorr[inner])) < 6
    assert np.nanmax(np.abs(single.scorr[inner])) > 20


def test_kernels_and_zero_points():
    psf_r, psf_n = gaussian_psf(2.0), gaussian_psf(3.0)
    k_ref, k_sci, f_d, f_s = zogy_kernels(psf_r, psf_n, 4.0, 6.0, 2.0)
    # F_D = F_r F_n / sqrt(sigma_n^2 F_r^2 + sigma_r^2 F_n^2)
    assert f_d == pytest.approx(2.0 / np.hypot(6.0, 8.0))
    # In empty sky var(S) = sigma_r^2 sum k_r^2 + sigma_n^2 sum k_n^2 = F_S (S is in units
    # where a unit point source scores F_S, and S/F_S has variance 1/F_S).
    var_s = 16 * np.sum(k_ref.astype(float) ** 2) + 36 * np.sum(k_sci.astype(float) ** 2)
    assert var_s == pytest.approx(f_s, rel=1e-3)
    tile = zogy_tile(np.zeros((64, 64), np.float32), np.zeros((64, 64), np.float32), psf_r, psf_n,
                     sigma_ref=4.0, sigma_sci=6.0, flux_ratio=2.0)
    assert tile.flux_zp_score == pytest.approx(f_s)


@pytest.mark.parametrize("radius", [1, 6, 17])
def test_dilate_equals_a_box_maximum_filter_also_in_bands(radius):
    # Frames taller than a band are dilated band by band; the result must not show the seams.
    from scipy import ndimage

    from astrid.diff.zogy_core import _DILATE_BAND_PX, dilate

    rng = np.random.default_rng(radius)
    flags = rng.random((_DILATE_BAND_PX * 2 + 37, 150)) < 0.002
    flags[_DILATE_BAND_PX - 1, 40] = flags[_DILATE_BAND_PX, 90] = True  # at a band seam
    expected = ndimage.maximum_filter(flags, 2 * radius + 1, mode="constant")
    assert np.array_equal(dilate(flags, radius), expected)


def test_compiled_passes_equal_the_numpy_formulas():
    # zogy_fused does in one pass each what these NumPy expressions do (ZOGY.md).
    from astrid.diff.zogy_fused import finish_variance, score_spectra

    rng = np.random.default_rng(7)
    shape = (40, 21)

    def spectrum():
        return (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)

    pr, pn, n_hat, r_hat = spectrum(), spectrum(), spectrum(), spectrum()
    pr[3, 4] = pn[3, 4] = 0  # den = 0: the floor
    s_r, s_n, fn = 2.0, 3.0, 1.7
    den2 = s_n ** 2 * np.abs(pr) ** 2 + s_r ** 2 * fn ** 2 * np.abs(pn) ** 2
    den = np.sqrt(np.maximum(den2, 1e-6 * den2.max()))
    d_sci = pr * n_hat / den
    d = d_sci - fn * pn * r_hat / den
    to_score = fn * np.conj(pr * pn) / den
    got = [a.copy() for a in (pr, pn, n_hat, r_hat)]
    f32 = np.float32
    score_spectra(*got, f32(s_n ** 2), f32(s_r ** 2 * fn ** 2), f32(1.0), f32(fn), f32(1e-6))
    np.testing.assert_allclose(got[3], d, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[0], d * to_score, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[2], d_sci * to_score, rtol=1e-4, atol=1e-5)

    var = rng.random((30, 25)).astype(np.float32)
    var[4, 5] = 0.0
    score, score_sci = rng.normal(size=(2, 30, 25)).astype(np.float32)
    expected = np.maximum(var, 0.01)
    for img in (score_sci, score_sci - score):
        expected[:, 1:-1] += (0.3 * 0.5 * (img[:, 2:] - img[:, :-2])) ** 2
        expected[1:-1, :] += (0.2 * 0.5 * (img[2:, :] - img[:-2, :])) ** 2
    finish_variance(var, score, score_sci, f32(0.01), f32(0.3), f32(0.2))
    np.testing.assert_allclose(var, expected, rtol=1e-5)


def test_dilate_of_bit_flags_dilates_each_bit():
    # The output mask dilates all bad bits at once: a bitwise OR over the box.
    from astrid.diff.zogy_core import dilate

    rng = np.random.default_rng(3)
    flags = (rng.random((300, 200)) < 0.003).astype(np.uint8) * 2
    flags[rng.random(flags.shape) < 0.002] |= 8
    out = dilate(flags, 5)
    assert out.dtype == np.uint8
    for bit in (2, 8):
        assert np.array_equal((out & bit) != 0, dilate((flags & bit) != 0, 5))
    assert not (out & ~np.uint8(2 | 8)).any()


def test_pair_flags():
    from astrid.diff.zogy_core import MASK_NO_OVERLAP, MASK_REF_BAD, MASK_SATURATED
    from astrid.diff.zogy_fused import pair_flags

    sci_bad = np.array([[True, False, False, True]])
    sci = np.array([[1.0, 70_000.0, 5.0, 80_000.0]], np.float32)
    ref = np.array([[2.0, np.nan, np.nan, 3.0]], np.float32)
    inside = np.array([[True, True, False, True]])
    bits = np.array([MASK_SCI_BAD, MASK_REF_BAD, MASK_NO_OVERLAP, MASK_SATURATED], np.uint8)
    out = np.empty((1, 4), np.uint8)
    pair_flags(sci_bad, sci, np.float32(60_000), ref, inside, bits, out)
    assert out.tolist() == [[MASK_SCI_BAD, MASK_SATURATED | MASK_REF_BAD, MASK_NO_OVERLAP,
                             MASK_SATURATED]]
    pair_flags(sci_bad, sci, np.float32(np.nan), ref, inside, bits, out)  # no saturation level
    assert out.tolist() == [[MASK_SCI_BAD, MASK_REF_BAD, MASK_NO_OVERLAP, MASK_SCI_BAD]]
