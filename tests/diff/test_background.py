"""Background and noise maps: the RMS matches the injected noise and sources do not bias it."""

from __future__ import annotations

import numpy as np
import pytest
import sep

from astrid.diff.background import estimate_background, measure_background, variance_map
from astrid.errors import AstridError
from astrid.fitsio import read_image

SIGMA_ADU = 12.0
SKY_ADU = 250.0


def star_field(shape=(512, 512), n_stars=300, fwhm_px=3.5, beta=2.5, seed=0):
    """Moffat stars (point-sampled) on a tilted sky with white Gaussian noise."""
    rng = np.random.default_rng(seed)
    height, width = shape
    alpha = fwhm_px / (2 * np.sqrt(2 ** (1 / beta) - 1))
    yy, xx = np.mgrid[0:height, 0:width]
    sky = SKY_ADU + 0.02 * xx - 0.01 * yy
    image = sky.copy()
    for x, y, flux in zip(rng.uniform(0, width, n_stars), rng.uniform(0, height, n_stars),
                          10 ** rng.uniform(3.5, 5.5, n_stars), strict=True):
        sl = (slice(max(int(y) - 25, 0), int(y) + 26), slice(max(int(x) - 25, 0), int(x) + 26))
        r2 = (xx[sl] - x) ** 2 + (yy[sl] - y) ** 2
        image[sl] += flux * (beta - 1) / (np.pi * alpha**2) * (1 + r2 / alpha**2) ** (-beta)
    return (image + rng.normal(0, SIGMA_ADU, shape)).astype(np.float32), sky


@pytest.mark.parametrize("subsample", [1, 2])
def test_rms_matches_injected_noise_and_is_not_biased_by_sources(subsample):
    image, sky = star_field()
    bkg = estimate_background(image, subsample=subsample)
    assert bkg.source_mask.shape == image.shape
    assert bkg.level.shape == image.shape and bkg.level.dtype == np.float32
    assert bkg.rms.dtype == np.float32
    assert abs(bkg.sigma_adu / SIGMA_ADU - 1) < 0.03
    assert abs(np.median(bkg.rms) / SIGMA_ADU - 1) < 0.03
    # The level follows the tilted sky to a fraction of the noise, sources notwithstanding.
    assert np.median(np.abs(bkg.level - sky)) < 0.2 * SIGMA_ADU
    # Without the source mask sep's RMS is pulled up by the stars' wings: ours must do better.
    naive = sep.Background(image, bw=64, bh=64, fw=3, fh=3)
    assert abs(np.median(bkg.rms) - SIGMA_ADU) < abs(np.median(naive.rms()) - SIGMA_ADU)
    assert abs(np.median(bkg.level - sky)) < abs(np.median(naive.back() - sky))


def test_pure_noise_rms_is_unbiased():
    rng = np.random.default_rng(3)
    image = rng.normal(SKY_ADU, SIGMA_ADU, (512, 512)).astype(np.float32)
    bkg = estimate_background(image)
    assert abs(bkg.sigma_adu / SIGMA_ADU - 1) < 0.01
    assert abs(float(np.median(bkg.level)) - SKY_ADU) < 0.1 * SIGMA_ADU


def test_masked_and_nan_pixels_are_ignored():
    image, _ = star_field(seed=1)
    image[100:140, :] = 1e5  # a saturated band the mask hides
    image[300:310, 200:260] = np.nan
    mask = np.zeros(image.shape, bool)
    mask[100:140, :] = True
    bkg = estimate_background(image, mask)
    assert np.all(np.isfinite(bkg.level)) and np.all(np.isfinite(bkg.rms))
    assert abs(bkg.sigma_adu / SIGMA_ADU - 1) < 0.03


def test_all_nan_image_is_a_user_error():
    with pytest.raises(AstridError, match="masked or not finite"):
        estimate_background(np.full((128, 128), np.nan, np.float32))


def test_variance_map_adds_source_poisson_noise_when_gain_known():
    data = np.array([[-5.0, 0.0], [40.0, np.nan]], np.float32)
    rms = np.full(data.shape, 3.0, np.float32)
    np.testing.assert_allclose(variance_map(data, rms)[:, 0], [9.0, 9.0])
    var = variance_map(data, rms, gain=4.0)
    assert var.dtype == np.float32
    np.testing.assert_allclose(var[0], [9.0, 9.0])
    assert var[1, 0] == pytest.approx(9.0 + 40.0 / 4.0)
    assert np.isnan(var[1, 1])


def test_real_properimage_rms_predicts_the_noise_of_the_difference(shared_data):
    """Two frames of an unchanged field: the noise of their difference in empty sky must be
    the quadrature sum of the two background RMS maps."""
    folder = shared_data("diffpairs", "properimage")
    a = read_image(folder / "aligned_eso085-030-004.fit")
    b = read_image(folder / "aligned_eso085-030-005.fit")
    bkg_a = estimate_background(a.data, a.mask)
    bkg_b = estimate_background(b.data, b.mask)
    diff = (a.data - bkg_a.level) - (b.data - bkg_b.level)
    empty = ~(bkg_a.source_mask | bkg_b.source_mask | a.mask | b.mask) & np.isfinite(diff)
    values = diff[empty]
    measured = 1.4826 * np.median(np.abs(values - np.median(values)))
    expected = np.median(np.hypot(bkg_a.rms, bkg_b.rms)[empty])
    assert abs(measured / expected - 1) < 0.05


def test_subsampled_maps_cover_odd_shapes():
    image, sky = star_field(shape=(301, 257), n_stars=40, seed=5)
    bkg = estimate_background(image, subsample=2, box_px=32)
    assert bkg.level.shape == bkg.rms.shape == bkg.source_mask.shape == (301, 257)
    assert np.median(np.abs(bkg.level - sky)) < 0.3 * SIGMA_ADU
    assert abs(np.median(bkg.rms) / SIGMA_ADU - 1) < 0.05


@pytest.mark.parametrize("shape, box", [((700, 900), 64), ((301, 257), 32)])
def test_mesh_estimator_gives_seps_numbers(shape, box):
    """The compiled estimator is sep's: the same maps as ``sep.Background`` (partial cells at
    the far edges, masked and NaN pixels, the median filter and the spline included)."""
    from astrid.diff import background, sky_mesh

    image, _ = star_field(shape, n_stars=400, seed=2)
    mask = np.zeros(shape, bool)
    mask[100:140, 50:200] = True
    image[200:210, 100:160] = np.nan
    bad = mask | ~np.isfinite(image)
    theirs = sep.Background(np.where(bad, 0, image).astype(np.float32),
                            mask=bad.astype(np.uint8), bw=box, bh=box, fw=3, fh=3)
    level, sigma = sky_mesh.mesh_statistics(image, mask, np.zeros((0, 0), bool), 1, box)
    level, sigma = (a.astype(float) for a in sky_mesh.fill_and_filter(level, sigma, 1))
    rows, cols = background._mesh_coordinates(shape, 1, box)
    ours_level = sky_mesh.evaluate(level, sky_mesh.spline_d2(level), rows, cols)
    ours_rms = sky_mesh.evaluate(sigma, sky_mesh.spline_d2(sigma), rows, cols)
    assert np.median(level) == pytest.approx(theirs.globalback, abs=1e-4)
    np.testing.assert_allclose(ours_level, theirs.back(), atol=2e-3)  # ADU; the noise is 12
    np.testing.assert_allclose(ours_rms, theirs.rms(), rtol=2e-4)


def test_parallel_estimate_and_fused_subtraction_match_the_maps():
    image, _ = star_field((600, 520), n_stars=200, seed=4)
    mask = np.zeros(image.shape, bool)
    mask[50:60, :] = True
    image[300, 300] = np.inf
    serial = measure_background(image, mask, subsample=2)
    parallel = measure_background(image, mask, subsample=2, parallel=True)
    np.testing.assert_array_equal(serial.level, parallel.level)
    np.testing.assert_array_equal(serial.sigma, parallel.sigma)
    level, rms = serial.maps(image.shape)
    for par in (False, True):
        data, rms_fused = serial.subtract(image, mask, parallel=par)
        np.testing.assert_array_equal(rms_fused, rms)
        bad = mask | ~np.isfinite(image)
        assert np.isnan(data[bad]).all() and np.isfinite(data[~bad]).all()
        np.testing.assert_allclose(data[~bad], (image - level)[~bad], atol=1e-3)


def test_median_by_binary_search_equals_seps_walk_from_both_ends():
    """sep's backguess finds a histogram's median by walking in from both ends, each step on
    the side with the smaller sum (the high side on ties); ours finds where the walk ends by
    binary search. Ties, empty bins and every sub-range included."""
    from astrid.diff.sky_mesh import _prefix_sums, _walk_median

    def walk(h, lo_cut, hi_cut):
        low_sum = high_sum = 0
        lo, hi = lo_cut, hi_cut
        for _ in range(lo_cut, hi_cut + 1):
            if low_sum < high_sum:
                low_sum += h[lo]
                lo += 1
            else:
                high_sum += h[hi]
                hi -= 1
        if hi < 0:
            return 0.0
        peak = max(h[lo], h[hi])
        return hi + 0.5 + (high_sum - low_sum) / (2.0 * peak) if peak else hi + 0.5

    rng = np.random.default_rng(7)
    for _ in range(3000):
        n = int(rng.integers(1, 40))
        h = np.zeros(n + 1, np.int64)
        h[:n] = rng.integers(0, 4, n) * (rng.random(n) < rng.random())
        counts = _prefix_sums(h, n)[0]
        lo_cut = int(rng.integers(0, n))
        hi_cut = int(rng.integers(lo_cut, n))
        assert _walk_median(h, counts, lo_cut, hi_cut) == walk(h, lo_cut, hi_cut)


@pytest.mark.parametrize("rms, gain", [("map", 2.0), ("map", None), (7.5, 3.0)])
def test_lazy_variance_tile_equals_the_variance_map(rms, gain):
    # Tiles take a compiled pass, star positions the NumPy one: both must give
    # variance_map with 0 at masked and non-finite pixels.
    from astrid.diff.background import LazyVariance

    rng = np.random.default_rng(4)
    data = rng.normal(0, 10, (300, 260)).astype(np.float32)
    data[20:25, 30] = 5e4  # a star's core: the source term
    data[50, 60] = np.nan
    data[51, 61] = np.inf
    rms_map = (rng.random(data.shape) * 3 + 8).astype(np.float16)
    rms_value = rms_map if rms == "map" else rms
    mask = (rng.random(data.shape) < 0.02).astype(np.uint8) * 2
    lazy = LazyVariance(data, rms_value, gain, mask, 2 | 4)
    tile = np.s_[10:200, 25:250]
    expected = variance_map(data[tile], rms_map[tile].astype(np.float32) if rms == "map"
                            else rms, gain)
    expected[(mask[tile] != 0) | ~np.isfinite(expected) | ~np.isfinite(data[tile])] = 0
    got = lazy[tile]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert got[50 - 10, 60 - 25] == 0 and got[51 - 10, 61 - 25] == 0
    iy, ix = np.array([22, 50, 120]), np.array([30, 60, 200])
    np.testing.assert_allclose(lazy[iy, ix], expected[iy - 10, ix - 25], rtol=1e-6)
    stamps = lazy.stamps(iy, ix, 4)
    assert stamps.shape == (3, 9, 9)
    for stamp, y, x in zip(stamps, iy - 10, ix - 25, strict=True):
        np.testing.assert_allclose(stamp, expected[y - 4:y + 5, x - 4:x + 5], rtol=1e-6)


@pytest.mark.parametrize("units", [1e-9, 1.0, 1e6])
def test_lazy_variance_is_exact_at_any_scale(units):
    # Images in physical flux units (1e-9) or in millions of ADU: the variance is computed in
    # single precision from the RMS as given, with nothing rounded to a narrower format.
    from astrid.diff.background import LazyVariance

    rng = np.random.default_rng(5)
    data = (rng.normal(0, 10, (200, 180)) * units).astype(np.float32)
    rms = ((rng.random(data.shape) * 3 + 8) * units).astype(np.float32)
    lazy = LazyVariance(data, rms, 2.0 / units, np.zeros(data.shape, np.uint8), 1)
    np.testing.assert_allclose(lazy[:, :], variance_map(data, rms, 2.0 / units), rtol=1e-6)


def test_lazy_variance_from_the_background_mesh_equals_the_rms_map():
    # ZOGY's science variance evaluates the RMS from the background mesh tile by tile (no
    # full-size map kept): the same numbers as the map the mesh gives, and star stamps take
    # the RMS at their centre (the mesh is flat on a stamp's scale).
    from astrid.diff.background import LazyVariance

    rng = np.random.default_rng(6)
    yy, xx = np.mgrid[0:400, 0:360]
    data = (rng.normal(0, 1, yy.shape) * (8 + 4 * xx / 360 + 2 * yy / 400)).astype(np.float32)
    data[100:104, 200] = 3e4
    mesh = measure_background(data, None)
    _, rms_map = mesh.maps(data.shape)
    mask = (rng.random(data.shape) < 0.01).astype(np.uint8)
    lazy, from_map = (LazyVariance(data, rms, 1.5, mask, 1) for rms in (mesh, rms_map))
    for window in (np.s_[:, :], np.s_[37:301, 5:333]):
        np.testing.assert_array_equal(lazy[window], from_map[window])
    iy, ix = np.array([101, 7, 390]), np.array([200, 300, 11])
    np.testing.assert_allclose(lazy[iy, ix], from_map[iy, ix], rtol=1e-6)
    stamps = lazy.stamps(iy[:2], ix[:2], 5)
    for stamp, y, x in zip(stamps, iy[:2], ix[:2], strict=True):
        window = np.s_[y - 5:y + 6, x - 5:x + 6]
        expected = variance_map(data[window], rms_map[y, x], 1.5)
        expected[mask[window] != 0] = 0
        np.testing.assert_allclose(stamp, expected, rtol=1e-5)


def test_nan_at_bad_copies_only_when_a_flagged_pixel_holds_a_number():
    from astrid.diff.background import nan_at_bad

    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    mask = np.zeros(data.shape, bool)
    assert nan_at_bad(data, mask) is data and nan_at_bad(data, None) is data
    mask[1, 2] = True
    out = nan_at_bad(data, mask)
    assert out is not data and np.isnan(out[1, 2]) and data[1, 2] == 6  # input untouched
    assert np.isnan(out).sum() == 1
    data[1, 2] = np.nan
    assert nan_at_bad(data, mask) is data  # already NaN there: no copy
    data[0, 0] = np.inf
    assert np.isnan(nan_at_bad(data, mask)[0, 0])


@pytest.mark.parametrize("parallel", [False, True])
def test_source_threshold_pass_equals_the_numpy_box_mean(parallel):
    from astrid.diff.sky_mesh import smoothed_above

    rng = np.random.default_rng(5)
    residual = rng.normal(0, 1, (150, 97)).astype(np.float32)
    sigma = rng.uniform(0.2, 0.5, residual.shape).astype(np.float32)
    p = np.pad(residual, 1, mode="edge")
    rows = p[:-2] + p[1:-1] + p[2:]
    box = (rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]) * np.float32(1.0 / 9.0)
    out = np.empty(residual.shape, bool)
    smoothed_above(residual, sigma, np.float32(2.5 / 3.0), out, parallel)
    np.testing.assert_array_equal(out, box > np.float32(2.5 / 3.0) * sigma)
    assert 0 < out.sum() < out.size
