"""Star detection, matching and the robust flux ratio."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from astrid.diff.background import estimate_background
from astrid.diff.psf import measure_psf, psf_photometry
from astrid.diff.stars import (
    BINNED_DETECTION_MIN_PX,
    _error_map,
    find_stars,
    fit_flux_ratio,
    good_stars,
    match_positions,
    sep_extract,
)
from astrid.errors import AstridError
from astrid.fitsio import read_image

SIGMA_ADU = 10.0


def render(xy, flux, shape=(512, 512), fwhm_px=3.5, beta=2.5, seed=0):
    """Background-subtracted image of point-sampled Moffat stars plus white noise."""
    rng = np.random.default_rng(seed)
    height, width = shape
    alpha = fwhm_px / (2 * np.sqrt(2 ** (1 / beta) - 1))
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.zeros(shape)
    for (x, y), f in zip(xy, flux, strict=True):
        sl = (slice(max(int(y) - 25, 0), max(int(y) + 26, 0)),
              slice(max(int(x) - 25, 0), max(int(x) + 26, 0)))
        r2 = (xx[sl] - x) ** 2 + (yy[sl] - y) ** 2
        image[sl] += f * (beta - 1) / (np.pi * alpha**2) * (1 + r2 / alpha**2) ** (-beta)
    return (image + rng.normal(0, SIGMA_ADU, shape)).astype(np.float32)


def grid_positions(n_side=12, size=512, margin=30, seed=0):
    rng = np.random.default_rng(seed)
    c = np.linspace(margin, size - margin, n_side)
    gx, gy = np.meshgrid(c, c)
    return np.column_stack([gx.ravel(), gy.ravel()]) + rng.uniform(-0.5, 0.5, (n_side**2, 2))


def test_find_stars_positions_fluxes_and_flags():
    xy = grid_positions()
    flux = np.full(len(xy), 5e4)
    flux[0] = 4e6  # one star well above the saturation level given below
    xy[1] = [5.3, 200.2]  # one at the edge
    image = render(xy, flux)
    stars = find_stars(image, SIGMA_ADU, saturation=20_000.0)
    assert {"x", "y", "flux", "flux_err", "fwhm_px", "ellipticity", "peak", "flag_saturated",
            "flag_edge", "isolated"} <= set(stars.columns)
    ia, ib = match_positions(stars[["x", "y"]].to_numpy(), xy, 1.0)
    assert len(ia) == len(xy)
    found = stars.iloc[ia]
    err = found[["x", "y"]].to_numpy() - xy[ib]
    normal = ib >= 2
    # Windowed centroids of S/N ~ 300 stars: a few hundredths of a pixel.
    assert np.sqrt(np.mean(err[normal] ** 2)) < 0.05
    assert found["flag_saturated"].to_numpy()[ib == 0].all()
    assert not found["flag_saturated"].to_numpy()[normal].any()
    assert found["flag_edge"].to_numpy()[ib == 1].all()
    assert not found["flag_edge"].to_numpy()[normal].any()
    assert found["isolated"].to_numpy()[normal].all()
    assert np.median(found["fwhm_px"].to_numpy()[normal]) == pytest.approx(3.5, rel=0.15)
    assert np.median(found["ellipticity"].to_numpy()[normal]) < 0.05  # round stars
    # Aperture fluxes (2 FWHM radius) capture most of a Moffat beta=2.5 profile.
    frac = found["flux"].to_numpy()[normal] / 5e4
    assert 0.85 < np.median(frac) < 1.0
    pulls = (found["flux"].to_numpy()[normal] - np.median(frac) * 5e4) / \
        found["flux_err"].to_numpy()[normal]
    assert np.std(pulls) < 2.0  # errors are background-only; source noise absent in this image
    assert len(good_stars(stars)) == normal.sum()


@pytest.mark.parametrize("size", [512, BINNED_DETECTION_MIN_PX])
def test_the_values_of_masked_pixels_do_not_matter(size):
    # Masked pixels are not copied to zero first: sep must skip them wherever they sit,
    # here across the cores and apertures of several stars.
    xy = grid_positions(size=size)
    image = render(xy, np.full(len(xy), 5e4), shape=(size, size))
    mask = np.zeros(image.shape, bool)
    for x, y in xy[::7]:
        mask[int(y) - 2:int(y) + 3, int(x) - 4:int(x) + 1] = True
    tables = []
    for fill in (0.0, np.nan, 1e6):
        filled = image.copy()
        filled[mask] = fill
        tables.append(find_stars(filled, SIGMA_ADU, mask))
    assert len(tables[0]) >= len(xy) - 2 and tables[0]["flag_masked"].sum() >= len(xy[::7])
    for other in tables[1:]:
        pd.testing.assert_frame_equal(other, tables[0])


def test_large_frames_found_binned_are_measured_at_full_resolution():
    # Frames this large are searched on a 2x2-binned S/N image; sharp stars (FWHM 2 px) must
    # all be found, with full-resolution centroids and sizes.
    size = BINNED_DETECTION_MIN_PX + 76
    xy = grid_positions(n_side=20, size=size, margin=40, seed=3)
    image = render(xy, np.full(len(xy), 2e4), shape=(size, size), fwhm_px=2.0, seed=3)
    stars = find_stars(image, SIGMA_ADU)
    ia, ib = match_positions(stars[["x", "y"]].to_numpy(), xy, 1.0)
    assert len(ia) == len(xy) == len(stars)
    err = stars[["x", "y"]].to_numpy()[ia] - xy[ib]
    assert np.sqrt(np.mean(err ** 2)) < 0.05
    assert np.median(stars["fwhm_px"]) == pytest.approx(2.0, rel=0.2)


def test_sep_extract_grows_its_pixel_stack_for_crowded_frames():
    image = np.zeros((800, 800), np.float32)
    image[100:700, 100:700] = 100.0  # 360,000 pixels above threshold: more than sep's default
    objects = sep_extract(image, 1.0)
    assert len(objects) == 1 and objects["npix"][0] >= 600 * 600


def test_error_map_uses_a_usable_rms_map_as_it_is_and_repairs_others_in_a_copy():
    rms = np.full((64, 64), 3.0, np.float32)
    assert _error_map(rms, rms.shape) is rms
    for bad in (np.nan, 0.0, np.inf):
        broken = rms.copy()
        broken[5, 7] = bad
        err = _error_map(broken, broken.shape)
        assert not np.shares_memory(err, broken) and (broken[5, 7] == bad or np.isnan(bad))
        assert err[5, 7] == np.inf and (np.delete(err.ravel(), 5 * 64 + 7) == 3.0).all()
    assert (_error_map(2.5, (4, 4)) == 2.5).all()


def test_empty_image_gives_empty_table():
    rng = np.random.default_rng(1)
    stars = find_stars(rng.normal(0, SIGMA_ADU, (256, 256)).astype(np.float32), SIGMA_ADU,
                       thresh_sigma=6.0)
    assert len(stars) == 0 and "flux" in stars.columns


def test_match_positions_is_mutual_nearest_within_radius():
    a = np.array([[10.0, 10.0], [20.0, 20.0], [30.0, 30.0], [50.0, 50.0]])
    b = np.array([[10.4, 10.0], [10.9, 10.0], [20.0, 21.5], [30.2, 29.9]])
    ia, ib = match_positions(a, b, radius_px=1.0)
    assert sorted(zip(ia.tolist(), ib.tolist(), strict=True)) == [(0, 0), (2, 3)]
    assert match_positions(a, np.zeros((0, 2)), 1.0)[0].size == 0


def _flux_ratio_sample(seed, ratio=1.37, n=200, outlier_frac=0.1):
    rng = np.random.default_rng(seed)
    true_ref = 10 ** rng.uniform(3.0, 5.0, n)
    err_ref = np.sqrt(true_ref + 30.0**2)
    err_sci = np.sqrt(ratio * true_ref + 45.0**2)
    flux_ref = true_ref + rng.normal(0, err_ref)
    flux_sci = ratio * true_ref + rng.normal(0, err_sci)
    # Variable stars: brightened or faded by up to a factor of two in the science epoch.
    var = rng.random(n) < outlier_frac
    flux_sci[var] *= rng.choice([0.5, 0.7, 1.5, 2.0], var.sum())
    return flux_sci, flux_ref, err_sci, err_ref


def test_flux_ratio_recovers_known_ratio_despite_variables():
    fit_errors, median_errors = [], []
    for seed in range(20):
        fs, fr, es, er = _flux_ratio_sample(seed)
        fit = fit_flux_ratio(fs, fr, es, er)
        assert abs(fit.value - 1.37) < 3.5 * fit.err
        assert fit.err < 0.01
        assert fit.n_stars == 200 and 170 <= fit.n_used <= 190
        assert 0.5 < fit.chi2_red < 1.5
        fit_errors.append(fit.value - 1.37)
        # The ratio of medians, the old approach, is pulled by the variables and the spread.
        median_errors.append(np.median(fs) / np.median(fr) - 1.37)
    assert np.sqrt(np.mean(np.square(fit_errors))) < 0.5 * np.sqrt(np.mean(np.square(median_errors)))


def test_flux_ratio_error_is_honest():
    """Over many samples the pulls (fit - truth) / err have unit scatter."""
    pulls = []
    for seed in range(40):
        fs, fr, es, er = _flux_ratio_sample(100 + seed, outlier_frac=0.0)
        fit = fit_flux_ratio(fs, fr, es, er)
        pulls.append((fit.value - 1.37) / fit.err)
    assert 0.6 < np.std(pulls) < 1.4
    assert abs(np.mean(pulls)) < 0.5


def test_flux_ratio_needs_stars():
    with pytest.raises(AstridError, match="only 2 matched stars"):
        fit_flux_ratio([1.0, 2.0], [1.0, 2.0], [0.1, 0.1], [0.1, 0.1])


def test_flux_ratio_from_psf_photometry_of_images_with_different_psfs():
    """End to end on pixels: science has a broader PSF and 0.8x the flux.

    PSF-fit fluxes are on the scale of the (normalised, finite) stamps, which is the scale ZOGY
    needs; with beta = 4.765 (typical seeing) the wings beyond the stamp are negligible, so the
    ratio is also the true one.
    """
    xy = grid_positions(seed=3)
    rng = np.random.default_rng(4)
    flux = 10 ** rng.uniform(3.7, 5.0, len(xy))
    ref = render(xy, flux, fwhm_px=3.0, beta=4.765, seed=5)
    sci = render(xy, 0.8 * flux, fwhm_px=4.5, beta=4.765, seed=6)
    ratios = []
    for image in (sci, ref):
        stars = find_stars(image, SIGMA_ADU)
        psf = measure_psf(image, SIGMA_ADU, stars=stars)
        ratios.append(psf_photometry(image, SIGMA_ADU, psf, xy[:, 0], xy[:, 1]))
    (fs, es), (fr, er) = ratios
    fit = fit_flux_ratio(fs, fr, es, er)
    assert abs(fit.value - 0.8) < max(3 * fit.err, 0.005)


def test_real_decam_epochs_match_and_give_a_flux_ratio(shared_data):
    folder = shared_data("diffpairs", "decam", "input_data")
    catalogues = []
    for name in ("DEC-OBS04a.mini.fits", "DEC-OBS18a.mini.fits"):
        image = read_image(folder / name)
        bkg = estimate_background(image.data, image.mask)
        data = image.data - bkg.level
        stars = find_stars(data, bkg.rms, image.mask, edge_px=8)
        catalogues.append(good_stars(stars, snr_min=20))
    sci, ref = catalogues
    ia, ib = match_positions(sci[["x", "y"]].to_numpy(), ref[["x", "y"]].to_numpy(), 1.5)
    assert len(ia) >= 5
    fit = fit_flux_ratio(sci["flux"].to_numpy()[ia], ref["flux"].to_numpy()[ib],
                         sci["flux_err"].to_numpy()[ia], ref["flux_err"].to_numpy()[ib],
                         systematic_frac=0.01)
    assert np.isfinite(fit.value) and 0.1 < fit.value < 10 and fit.err < 0.1 * fit.value


@pytest.mark.filterwarnings("ignore:only .* good PSF stars")
@pytest.mark.parametrize("index", [0])
def test_flux_ratio_of_simulated_pairs_matches_their_zero_points(index):
    """The whole measurement chain on a survey-simulator pair (512 px, few stars): background,
    alignment, PSFs, matched PSF photometry and the robust fit."""
    sim = pytest.importorskip("astrid.sim")
    from astrid.config import SimSettings
    from astrid.diff.align import align_reference

    pair = sim.simulate_pair(SimSettings(size_px=512, clean=True), index)
    ref, sci = pair.ref, pair.sci
    al = align_reference(ref.data, ref.wcs, sci.data.shape, sci.wcs, sci_data=sci.data)
    measured = []
    for data, bad in ((sci.data, None), (al.ref_on_sci, ~al.footprint)):
        bkg = estimate_background(data, bad)
        image = data - bkg.level
        stars = find_stars(image, bkg.rms, bad)
        measured.append((image, bkg.rms, bad, stars, measure_psf(image, bkg.rms, bad, stars=stars)))
    (ds, rs, bs, ss, ps), (dr, rr, br, sr, pr) = measured
    gs, gr = good_stars(ss), good_stars(sr)
    ia, ib = match_positions(gs[["x", "y"]].to_numpy(), gr[["x", "y"]].to_numpy(), 1.5)
    fs, es = psf_photometry(ds, rs, ps, gs["x"].to_numpy()[ia], gs["y"].to_numpy()[ia], bs)
    fr, er = psf_photometry(dr, rr, pr, gr["x"].to_numpy()[ib], gr["y"].to_numpy()[ib], br)
    fit = fit_flux_ratio(fs, fr, es, er)
    truth = pair.info["flux_ratio"]
    # A handful of stars: the fit's error, plus ~1% of PSF-model systematics.
    assert abs(fit.value - truth) < 3 * fit.err + 0.015 * truth


@pytest.mark.parametrize("step", [1, 2])
def test_binned_snr_image_is_the_block_sum_of_snr_and_any_bad(step):
    from astrid.diff.stars import _binned_snr

    def bin_sum(image, step):  # the NumPy code it replaced: strided sums in this order
        h, w = (n // step * step for n in image.shape)
        out = np.array(image[0:h:step, 0:w:step], dtype=np.result_type(image.dtype, np.float32))
        for i in range(step):
            for j in range(step):
                if i or j:
                    out += image[i:h:step, j:w:step]
        return out

    rng = np.random.default_rng(step)
    work = rng.normal(0, 3, (101, 64)).astype(np.float32)
    work[7, 9] = np.nan  # a bad pixel, whatever it holds
    err = rng.uniform(2, 4, work.shape).astype(np.float32)
    bad = np.isnan(work) | (rng.random(work.shape) < 0.01)
    snr = np.empty((101 // step, 64 // step), np.float32)
    binned_bad = np.empty(snr.shape, bool)
    _binned_snr(work, err, bad, step, snr, binned_bad)
    expected = bin_sum(work / err, step) / (step if step > 1 else 1)
    np.testing.assert_array_equal(snr, expected.astype(np.float32))
    np.testing.assert_array_equal(binned_bad, bin_sum(bad, step) > 0)
