"""Empirical PSF: FWHM, centring, normalisation, tiles, the Moffat fallback and its errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import optimize

from astrid.diff.background import estimate_background
from astrid.diff.psf import fourier_shift, measure_psf, psf_at, psf_photometry
from astrid.errors import AstridError
from astrid.fitsio import read_image

SIGMA_ADU = 10.0


def render(xy, flux, shape=(512, 512), fwhm_px=3.5, beta=2.5, seed=0):
    """Background-subtracted image of point-sampled Moffat stars plus white noise.

    ``fwhm_px`` may be a function of x for a PSF that varies across the field.
    """
    rng = np.random.default_rng(seed)
    height, width = shape
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.zeros(shape)
    for (x, y), f in zip(xy, flux, strict=True):
        fwhm = fwhm_px(x) if callable(fwhm_px) else fwhm_px
        alpha = fwhm / (2 * np.sqrt(2 ** (1 / beta) - 1))
        sl = (slice(max(int(y) - 25, 0), max(int(y) + 26, 0)),
              slice(max(int(x) - 25, 0), max(int(x) + 26, 0)))
        r2 = (xx[sl] - x) ** 2 + (yy[sl] - y) ** 2
        image[sl] += f * (beta - 1) / (np.pi * alpha**2) * (1 + r2 / alpha**2) ** (-beta)
    return (image + rng.normal(0, SIGMA_ADU, shape)).astype(np.float32)


def random_stars(n, size=512, margin=20, seed=0):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(margin, size - margin, (n, 2))
    return xy, 10 ** rng.uniform(3.7, 5.0, n)


def fit_gaussian_centre_and_fwhm(stamp):
    """Independent check: elliptical-free Gaussian fit to the core (centre and FWHM in px)."""
    half = stamp.shape[0] // 2
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    core = np.hypot(xx, yy) <= 6

    def resid(p):
        amp, x0, y0, sigma = p
        model = amp * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * sigma**2))
        return (model - stamp)[core]

    sol = optimize.least_squares(resid, [stamp.max(), 0.0, 0.0, 1.5])
    return sol.x[1], sol.x[2]


def moffat_fwhm_of_stamp(stamp, beta):
    """FWHM of a Moffat of known beta fitted to the stamp (an independent measurement)."""
    half = stamp.shape[0] // 2
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]

    def resid(p):
        amp, alpha = p
        return (amp * (1 + (xx**2 + yy**2) / alpha**2) ** (-beta) - stamp).ravel()

    amp, alpha = optimize.least_squares(resid, [stamp.max(), 2.0]).x
    return 2 * alpha * np.sqrt(2 ** (1 / beta) - 1)


@pytest.mark.parametrize("fwhm_px", [2.5, 4.0])
def test_fwhm_centre_and_normalisation_of_moffat_stars(fwhm_px):
    xy, flux = random_stars(120, seed=1)
    image = render(xy, flux, fwhm_px=fwhm_px, beta=3.0, seed=2)
    model = measure_psf(image, SIGMA_ADU)
    assert model.method == "empirical" and model.n_stars >= 20
    stamp = psf_at(model, 256, 256)
    assert stamp.shape == (31, 31) and stamp.dtype == np.float32
    assert stamp.sum() == pytest.approx(1.0, abs=1e-5)
    assert model.fwhm_px == pytest.approx(fwhm_px, rel=0.05)
    assert moffat_fwhm_of_stamp(stamp, 3.0) == pytest.approx(fwhm_px, rel=0.05)
    x0, y0 = fit_gaussian_centre_and_fwhm(stamp)
    assert abs(x0) < 0.05 and abs(y0) < 0.05
    # The wings are tapered to zero at the stamp edge.
    assert np.abs(stamp[0]).max() < 1e-4 and np.abs(stamp[:, -1]).max() < 1e-4


def test_psf_varies_across_tiles():
    xy, flux = random_stars(400, seed=3)
    image = render(xy, flux, fwhm_px=lambda x: 3.0 if x < 256 else 4.5, beta=3.0, seed=4)
    model = measure_psf(image, SIGMA_ADU, tile_px=256)
    assert model.stamps.shape == (2, 2, 31, 31)
    np.testing.assert_array_equal(model.tile_edges_x, [0, 256, 512])
    assert model.fwhm_tiles[:, 0] == pytest.approx([3.0, 3.0], rel=0.05)
    assert model.fwhm_tiles[:, 1] == pytest.approx([4.5, 4.5], rel=0.05)
    np.testing.assert_array_equal(psf_at(model, 100, 400), model.stamps[1, 0])
    np.testing.assert_allclose(model.stamps.sum(axis=(2, 3)), 1.0, atol=1e-5)


def test_tile_with_too_few_stars_uses_the_global_psf():
    xy, flux = random_stars(150, seed=5)
    xy = xy[~((xy[:, 0] > 256) & (xy[:, 1] > 256))]  # empty upper-right quadrant
    image = render(xy, flux[:len(xy)], fwhm_px=3.5, seed=6)
    model = measure_psf(image, SIGMA_ADU, tile_px=256)
    assert model.n_stars_tiles[1, 1] == 0
    assert model.fwhm_tiles[1, 1] == pytest.approx(3.5, rel=0.05)


def test_few_stars_fall_back_to_moffat_with_a_warning():
    xy = np.array([[120.3, 140.6], [300.8, 350.2], [400.1, 90.7]])
    image = render(xy, np.full(3, 3e4), fwhm_px=3.5, seed=7)
    with pytest.warns(UserWarning, match="Moffat"):
        model = measure_psf(image, SIGMA_ADU)
    assert model.method == "moffat"
    assert model.fwhm_px == pytest.approx(3.5, rel=0.1)
    assert model.stamps[0, 0].sum() == pytest.approx(1.0, abs=1e-5)


def test_no_stars_is_a_user_error():
    rng = np.random.default_rng(8)
    noise = rng.normal(0, SIGMA_ADU, (256, 256)).astype(np.float32)
    with pytest.raises(AstridError, match="no stars found"):
        measure_psf(noise, SIGMA_ADU)


def test_mask_of_the_wrong_shape_is_a_user_error():
    # The mask is read at the stamps only, so its shape is checked up front.
    xy, flux = random_stars(60, seed=4)
    image = render(xy, flux, seed=5)
    model = measure_psf(image, SIGMA_ADU)
    wrong = np.zeros((100, 100), bool)
    with pytest.raises(AstridError, match=r"mask shape \(100, 100\) differs from image shape"):
        measure_psf(image, SIGMA_ADU, wrong)
    with pytest.raises(AstridError, match="differs from image shape"):
        psf_photometry(image, SIGMA_ADU, model, xy[:, 0], xy[:, 1], mask=wrong)


def test_masked_and_non_finite_pixels_carry_no_weight_in_psf_photometry():
    xy, flux = random_stars(40, seed=6)
    image = render(xy, flux, seed=7)
    model = measure_psf(image, SIGMA_ADU)
    clean, _ = psf_photometry(image, SIGMA_ADU, model, xy[:, 0], xy[:, 1])
    # Spoil the core of star 0 with a huge value under the mask, of star 1 with NaN.
    (x0, y0), (x1, y1) = np.rint(xy[:2]).astype(int)
    spoiled = image.copy()
    spoiled[y0, x0], spoiled[y1, x1] = 1e7, np.nan
    mask = np.zeros(image.shape, np.uint8)
    mask[y0, x0] = 4  # flags, not a bool map
    fitted, _ = psf_photometry(spoiled, SIGMA_ADU, model, xy[:2, 0], xy[:2, 1], mask=mask)
    assert np.allclose(fitted, clean[:2], rtol=0.05)
    unmasked, _ = psf_photometry(spoiled, SIGMA_ADU, model, xy[:1, 0], xy[:1, 1])
    assert unmasked[0] > 10 * clean[0]  # the same pixel unmasked does count


def test_psf_photometry_recovers_fluxes_with_honest_errors():
    xy, flux = random_stars(150, seed=9)
    flux = 10 ** np.random.default_rng(11).uniform(2.8, 5.0, len(xy))
    image = render(xy, flux, fwhm_px=3.5, beta=4.765, seed=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = measure_psf(image, SIGMA_ADU)
    measured, err = psf_photometry(image, SIGMA_ADU, model, xy[:, 0], xy[:, 1])
    # An empirical PSF carries a systematic error of a few 0.1%: bright stars show it.
    bright = flux / err > 200
    assert abs(np.median(measured[bright] / flux[bright] - 1)) < 0.005
    # Where the background noise dominates (S/N < 100), the errors are honest.
    faint = flux / err < 100
    pulls = ((measured - flux) / err)[faint]
    assert faint.sum() >= 30
    assert abs(np.median(pulls)) < 0.5
    assert 0.7 < 1.4826 * np.median(np.abs(pulls - np.median(pulls))) < 1.4
    off, off_err = psf_photometry(image, SIGMA_ADU, model, [-40.0, np.nan], [100.0, 5.0])
    assert np.isnan(off).all() and np.isnan(off_err).all()


def test_fourier_shift_moves_by_subpixel_amounts():
    yy, xx = np.mgrid[-15:16, -15:16]
    gauss = lambda x0, y0: np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / 4.0)  # noqa: E731
    shifted = fourier_shift(gauss(0, 0), 0.3, -0.45)
    np.testing.assert_allclose(shifted, gauss(0.3, -0.45), atol=1e-4)


def test_real_properimage_frames_give_consistent_psfs(shared_data):
    folder = shared_data("diffpairs", "properimage")
    fwhms = []
    for name in ("aligned_eso085-030-004.fit", "aligned_eso085-030-005.fit"):
        image = read_image(folder / name)
        bkg = estimate_background(image.data, image.mask)
        model = measure_psf(image.data - bkg.level, bkg.rms, image.mask)
        assert model.method == "empirical" and model.n_stars >= 10
        stamp = model.stamps[0, 0]
        x0, y0 = fit_gaussian_centre_and_fwhm(stamp)
        assert abs(x0) < 0.1 and abs(y0) < 0.1
        fwhms.append(model.fwhm_px)
    # 74 s apart: the seeing barely changed.
    assert 1.5 < fwhms[0] < 15 and fwhms[1] == pytest.approx(fwhms[0], rel=0.15)


def test_compiled_moffat_fit_finds_scipys_minimum():
    """The stack's Moffat fit (compiled Levenberg-Marquardt) lands where scipy's
    least_squares does, on noisy elliptical Moffats of several widths, and a Gaussian stack
    (beta driven up to its bound) still gets the bounded fit."""
    from astrid.diff.psf import _fit_moffat, _moffat_fwhm

    rng = np.random.default_rng(8)
    half = 15
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1].astype(float)
    for alpha, beta, noise in ((1.5, 2.0, 1e-4), (3.0, 3.5, 1e-3), (5.0, 5.0, 3e-3)):
        x0, y0 = rng.uniform(-0.8, 0.8, 2)
        stamp = (1 + (((xx - x0) * 1.1) ** 2 + (yy - y0) ** 2) / alpha**2) ** (-beta)
        stamp = (stamp / stamp.sum() + rng.normal(0, noise, stamp.shape)).astype(np.float32)
        z = stamp.astype(float)
        sigma = 0.02 * z.max() + 0.05 * np.abs(z)

        def resid(p, z=z, sigma=sigma):
            r2 = (xx - p[1]) ** 2 + (yy - p[2]) ** 2
            return ((p[0] * (1 + r2 / p[3] ** 2) ** (-p[4]) - z) / sigma).ravel()

        expected = optimize.least_squares(resid, [z.max(), 0, 0, 2.0, 2.5], method="lm",
                                          xtol=1e-12, ftol=1e-12).x
        got = _fit_moffat(stamp)
        np.testing.assert_allclose(got[1:3], expected[1:3], atol=1e-4)
        assert _moffat_fwhm(got[3], got[4]) == pytest.approx(
            _moffat_fwhm(expected[3], expected[4]), rel=1e-4)
        assert np.sum(resid(got) ** 2) <= np.sum(resid(expected) ** 2) * (1 + 1e-9)
    gaussian = np.exp(-(xx**2 + yy**2) / (2 * 2.0**2)).astype(np.float32)
    assert _fit_moffat(gaussian)[4] == pytest.approx(20.0)  # beta at its upper bound
