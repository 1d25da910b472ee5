"""Alignment: WCS mapping on a coarse grid, star-based affine refinement, cubic resampling."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.wcs import WCS

from astrid.diff.align import align_reference, resample_cubic
from astrid.diff.background import estimate_background
from astrid.diff.stars import find_stars, match_positions
from astrid.errors import AstridError
from astrid.fitsio import read_image

SIZE = 512
SIGMA_ADU = 10.0


def tan_wcs(crpix, rot_deg=0.0, scale_arcsec=0.27, crval=(150.0, 2.0)):
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = crval
    wcs.wcs.crpix = crpix
    c, s = np.cos(np.radians(rot_deg)), np.sin(np.radians(rot_deg))
    scale = scale_arcsec / 3600
    wcs.wcs.cd = np.array([[-scale * c, scale * s], [scale * s, scale * c]])
    return wcs


def render(xy, flux, shape=(SIZE, SIZE), fwhm_px=3.5, beta=3.0, sky=100.0, seed=0):
    """Moffat stars (point-sampled) on a flat sky with white Gaussian noise."""
    rng = np.random.default_rng(seed)
    height, width = shape
    alpha = fwhm_px / (2 * np.sqrt(2 ** (1 / beta) - 1))
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.full(shape, sky)
    for (x, y), f in zip(xy, flux, strict=True):
        if not (-25 < x < width + 25 and -25 < y < height + 25):
            continue
        sl = (slice(max(int(y) - 25, 0), max(int(y) + 26, 0)),
              slice(max(int(x) - 25, 0), max(int(x) + 26, 0)))
        r2 = (xx[sl] - x) ** 2 + (yy[sl] - y) ** 2
        image[sl] += f * (beta - 1) / (np.pi * alpha**2) * (1 + r2 / alpha**2) ** (-beta)
    return (image + rng.normal(0, SIGMA_ADU, shape)).astype(np.float32)


def sky_pair(true_sci_wcs, n_stars=250, jitter_px=0.0, seed=0, sci_fwhm_px=4.2):
    """Reference and science images of one star field; science rendered with ``true_sci_wcs``."""
    rng = np.random.default_rng(seed)
    ref_wcs = tan_wcs([SIZE / 2 + 0.5, SIZE / 2 + 0.5])
    px, py = rng.uniform(-30, SIZE + 30, (2, n_stars))
    ra, dec = ref_wcs.pixel_to_world_values(px, py)
    flux = 10 ** rng.uniform(3.5, 5.0, n_stars)
    ref = render(np.column_stack([px, py]), flux, fwhm_px=3.0, seed=seed + 1)
    sx, sy = true_sci_wcs.world_to_pixel_values(ra, dec)
    sci_xy = np.column_stack([sx, sy]) + rng.normal(0, jitter_px, (n_stars, 2))
    sci = render(sci_xy, 1.3 * flux, fwhm_px=sci_fwhm_px, seed=seed + 2)
    return ref, ref_wcs, sci


def true_mapping_error(alignment, ref_wcs, true_sci_wcs):
    """RMS and max (px) of the fitted science->reference mapping against the truth, on nodes."""
    gx, gy = np.meshgrid(alignment.grid_x, alignment.grid_y)
    tx, ty = ref_wcs.world_to_pixel_values(*true_sci_wcs.pixel_to_world_values(gx, gy))
    err = np.hypot(tx - alignment.map_x, ty - alignment.map_y)
    return float(np.sqrt(np.mean(err**2))), float(err.max())


@pytest.mark.parametrize("wcs_error_px", [(-0.37, 0.31), (11.6, -7.2)])
def test_recovers_subpixel_shift_and_rotation_that_the_wcs_misses(wcs_error_px):
    true_sci = tan_wcs([SIZE / 2 + 3.37, SIZE / 2 - 1.81], rot_deg=0.3)
    # The header WCS is off by a shift (sub-pixel, or larger than the star spacing) and 0.3 deg.
    given_sci = tan_wcs([SIZE / 2 + 3.37 + wcs_error_px[0], SIZE / 2 - 1.81 + wcs_error_px[1]])
    ref, ref_wcs, sci = sky_pair(true_sci)
    before, _ = true_mapping_error(
        align_reference(ref, ref_wcs, sci.shape, given_sci, refine=False), ref_wcs, true_sci)
    assert before > 0.5
    al = align_reference(ref, ref_wcs, sci.shape, given_sci, sci_data=sci)
    rms, worst = true_mapping_error(al, ref_wcs, true_sci)
    assert rms < 0.05 and worst < 0.1
    assert al.n_matched >= 30
    assert al.ref_on_sci.shape == sci.shape and al.ref_on_sci.dtype == np.float32
    assert al.overlap > 0.97
    np.testing.assert_array_equal(al.footprint, np.isfinite(al.ref_on_sci))
    # The stars of the resampled reference now sit on the science stars.
    bkg = estimate_background(np.where(al.footprint, al.ref_on_sci, np.nan))
    on_sci = find_stars(al.ref_on_sci - bkg.level, bkg.rms, ~al.footprint)
    sci_bkg = estimate_background(sci)
    sci_stars = find_stars(sci - sci_bkg.level, sci_bkg.rms)
    bright_a = on_sci[on_sci["snr"] > 50]
    bright_b = sci_stars[sci_stars["snr"] > 50]
    ia, ib = match_positions(bright_a[["x", "y"]].to_numpy(), bright_b[["x", "y"]].to_numpy(), 1.0)
    offset = bright_a[["x", "y"]].to_numpy()[ia] - bright_b[["x", "y"]].to_numpy()[ib]
    assert len(ia) > 20
    assert np.all(np.abs(np.median(offset, axis=0)) < 0.05)


def test_reported_residual_rms_is_the_astrometric_scatter():
    """Stars moved at random by 0.2 px per axis: the reported scatter must say so."""
    true_sci = tan_wcs([SIZE / 2 + 0.7, SIZE / 2 + 0.2])
    ref, ref_wcs, sci = sky_pair(true_sci, n_stars=300, jitter_px=0.2, seed=4)
    al = align_reference(ref, ref_wcs, sci.shape, tan_wcs([SIZE / 2, SIZE / 2]), sci_data=sci)
    # Expected per axis: the injected 0.2 px plus centroid noise of a few hundredths.
    assert al.sigma_x_px == pytest.approx(0.2, rel=0.2)
    assert al.sigma_y_px == pytest.approx(0.2, rel=0.2)
    assert al.rms_px == pytest.approx(np.hypot(al.sigma_x_px, al.sigma_y_px))
    rms, _ = true_mapping_error(al, ref_wcs, true_sci)
    assert rms < 0.1


def test_half_overlap_fraction_and_nan_outside():
    ref_wcs = tan_wcs([SIZE / 2 + 0.5, SIZE / 2 + 0.5])
    sci_wcs = tan_wcs([SIZE / 2 + 0.5 - SIZE / 2, SIZE / 2 + 0.5])  # shifted by half a frame
    ref = render(np.zeros((0, 2)), [], seed=1)
    al = align_reference(ref, ref_wcs, (SIZE, SIZE), sci_wcs)
    assert al.overlap == pytest.approx(0.5, abs=0.01)
    assert al.footprint[:, :250].all() and not al.footprint[:, 260:].any()
    assert np.isnan(al.ref_on_sci[:, 260:]).all()


def test_no_overlap_is_a_user_error():
    ref = render(np.zeros((0, 2)), [], seed=1)
    far = tan_wcs([SIZE / 2, SIZE / 2], crval=(151.0, 2.0))
    with pytest.raises(AstridError, match="overlap by only 0.0%"):
        align_reference(ref, tan_wcs([SIZE / 2, SIZE / 2]), (SIZE, SIZE), far)


def test_one_missing_wcs_is_a_user_error():
    ref = render(np.zeros((0, 2)), [], seed=1)
    with pytest.raises(AstridError, match="no celestial WCS"):
        align_reference(ref, None, (SIZE, SIZE), tan_wcs([SIZE / 2, SIZE / 2]))


def test_too_few_stars_keeps_the_wcs_mapping_with_a_warning():
    wcs = tan_wcs([SIZE / 2, SIZE / 2])
    ref = render(np.array([[100.0, 100.0], [300.0, 200.0]]), [1e4, 1e4], seed=1)
    sci = render(np.array([[100.0, 100.0], [300.0, 200.0]]), [1e4, 1e4], seed=2)
    with pytest.warns(UserWarning, match="too few stars"):
        al = align_reference(ref, wcs, sci.shape, wcs, sci_data=sci)
    assert al.n_matched == 0 and np.isnan(al.rms_px)
    np.testing.assert_array_equal(al.affine, [[1, 0, 0], [0, 1, 0]])
    # Same WCS, no refinement: the resampled reference is the reference itself.
    np.testing.assert_allclose(al.ref_on_sci, ref, atol=2e-3 * SIGMA_ADU)


def test_masked_reference_pixels_poison_their_kernel_footprint():
    image = np.random.default_rng(0).normal(0, 1, (64, 64)).astype(np.float32)
    image[30, 40] = np.nan
    yy, xx = np.mgrid[0:64, 0:64].astype(np.float32)
    out = resample_cubic(image, xx + 0.3, yy - 0.4)
    # Output (y, x) samples rows floor(y-0.4)-1 .. +2 and columns floor(x+0.3)-1 .. +2.
    bad = np.argwhere(np.isnan(out))
    assert sorted(set(bad[:, 0])) == [29, 30, 31, 32]
    assert sorted(set(bad[:, 1])) == [38, 39, 40, 41]
    assert len(bad) == 16


def test_cubic_resampling_of_a_smooth_image_is_accurate():
    yy, xx = np.mgrid[0:128, 0:128].astype(np.float64)
    smooth = lambda x, y: np.sin(x / 7.0) * np.cos(y / 9.0)  # noqa: E731
    x_new = xx + 0.37 + 0.01 * (yy - 64)
    y_new = yy - 0.21 - 0.01 * (xx - 64)
    out = resample_cubic(smooth(xx, yy).astype(np.float32), x_new, y_new)
    inner = (slice(4, -4), slice(4, -4))
    np.testing.assert_allclose(out[inner], smooth(x_new, y_new)[inner], atol=2e-3)
    # Integer positions reproduce the input exactly.
    same = resample_cubic(smooth(xx, yy).astype(np.float32), xx, yy)
    np.testing.assert_array_equal(same, smooth(xx, yy).astype(np.float32))


def test_real_properimage_pair_without_wcs_refines_on_stars(shared_data):
    folder = shared_data("diffpairs", "properimage")
    ref = read_image(folder / "aligned_eso085-030-004.fit")
    sci = read_image(folder / "aligned_eso085-030-005.fit")
    al = align_reference(ref.data, None, sci.data.shape, None, ref_mask=ref.mask,
                         sci_data=sci.data, sci_mask=sci.mask)
    assert al.overlap == 1.0
    assert al.n_matched >= 10
    # Frames taken 74 s apart on one grid: the correction is small and the residuals too.
    assert np.abs(al.affine[:, 2]).max() < 2.0
    assert al.rms_px < 0.3


def test_real_decam_pair_on_one_grid(shared_data):
    folder = shared_data("diffpairs", "decam", "input_data")
    ref = read_image(folder / "DEC-OBS18a.mini.fits")
    sci = read_image(folder / "DEC-OBS04a.mini.fits")
    assert ref.wcs is not None and sci.wcs is not None
    al = align_reference(ref.data, ref.wcs, sci.data.shape, sci.wcs, ref_mask=ref.mask,
                         sci_data=sci.data, sci_mask=sci.mask)
    assert al.overlap > 0.99
    # A 256^2 cutout holds a handful of stars: enough for a translation. The epochs share a
    # grid, but their stars agree only to about half a pixel, which the correction takes up.
    assert al.n_matched >= 4
    assert al.rms_px < 0.3
    assert 0.2 < np.hypot(*al.affine[:, 2]) < 1.0
    np.testing.assert_array_equal(al.affine[:, :2], np.eye(2))


def test_compiled_and_numpy_warps_agree(monkeypatch):
    pytest.importorskip("numba")
    from astrid.diff import align as align_module

    true_sci = tan_wcs([SIZE / 2 + 2.3, SIZE / 2 - 40.6], rot_deg=0.4)
    ref = render(np.zeros((0, 2)), [], seed=3)
    ref[200:203, 100] = np.nan
    ref_wcs = tan_wcs([SIZE / 2 + 0.5, SIZE / 2 + 0.5])
    compiled = align_reference(ref, ref_wcs, ref.shape, true_sci)
    monkeypatch.setattr(align_module, "_NUMBA_KERNEL", False)
    plain = align_reference(ref, ref_wcs, ref.shape, true_sci)
    np.testing.assert_array_equal(compiled.footprint, plain.footprint)
    np.testing.assert_allclose(compiled.ref_on_sci[compiled.footprint],
                               plain.ref_on_sci[plain.footprint], atol=1e-3 * SIGMA_ADU)
    assert compiled.overlap == pytest.approx(plain.overlap, abs=1e-4)
    assert 0.85 < compiled.overlap < 0.95


@pytest.mark.parametrize("index", [3])
def test_simulated_pairs_align_to_the_true_wcs(index):
    """Survey simulator pairs: header WCSs off by up to 1 px, rotation up to 0.3 deg."""
    sim = pytest.importorskip("astrid.sim")
    from astrid.config import SimSettings

    pair = sim.simulate_pair(SimSettings(size_px=SIZE, clean=True), index)
    ref, sci = pair.ref, pair.sci
    al = align_reference(ref.data, ref.wcs, sci.data.shape, sci.wcs, sci_data=sci.data)
    gx, gy = np.meshgrid(al.grid_x[1:-1], al.grid_y[1:-1])
    tx, ty = ref.true_wcs.world_to_pixel_values(*sci.true_wcs.pixel_to_world_values(gx, gy))
    hx, hy = ref.wcs.world_to_pixel_values(*sci.wcs.pixel_to_world_values(gx, gy))
    before = np.sqrt(np.mean((tx - hx) ** 2 + (ty - hy) ** 2))
    after = np.sqrt(np.mean((tx - al.map_x[1:-1, 1:-1]) ** 2 + (ty - al.map_y[1:-1, 1:-1]) ** 2))
    assert al.n_matched >= 3
    assert after < 0.05 < before
    assert al.overlap > 0.95
