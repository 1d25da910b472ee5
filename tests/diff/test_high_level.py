"""``zogy`` / ``gaussian_baseline`` / ``difference`` end to end on simulated pairs with truth."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
from astropy.io import fits
from scipy.spatial import cKDTree

from astrid.config import DiffSettings, SimSettings
from astrid.diff import (
    DiffResult,
    FilterMismatchWarning,
    difference,
    parse_input_image,
    zogy,
)
from astrid.errors import AstridError, InputFileError
from astrid.fitsio import Image, ImageMeta
from astrid.sim import simulate_pair

SIZE = 768


def as_hdus(pair):
    return (fits.PrimaryHDU(pair.ref.data, pair.ref.header),
            fits.PrimaryHDU(pair.sci.data, pair.sci.header))


@pytest.fixture(scope="module")
def clean_runs():
    """Three clean 768² pairs (different seeds: PSFs, pointings, zero points) differenced.

    768 px is about the smallest field with enough bright isolated stars (clean pairs have no
    saturated ones) for per-image PSFs and a star-based registration.
    """
    runs = []
    for seed in (11, 12, 13):
        pair = simulate_pair(SimSettings(size_px=SIZE, clean=True, seed=seed), 0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result, cands = difference(*as_hdus(pair))
        runs.append((pair, result, cands))
    return runs


def test_clean_pairs_are_pure_noise(clean_runs):
    for pair, result, cands in clean_runs:
        q = result.quality
        assert q["noise_ratio"] == pytest.approx(1.0, abs=0.05), pair.info
        assert q["star_residual_chi2"] < 1.2
        assert q["star_residual_n"] >= 10
        # At most one noise false positive; edge-flagged ones lie in the kernel footprint of
        # the image border, where the convolution lacks data.
        assert (~cands.flag_edge).sum() <= 1, cands
        # PSF-fit fluxes within the stamps: Moffat wings beyond them differ between epochs.
        assert q["flux_ratio"] == pytest.approx(pair.info["flux_ratio"], rel=0.04)
        assert q["fwhm_sci"] == pytest.approx(pair.sci.fwhm_px, rel=0.15)
        assert q["fwhm_ref"] == pytest.approx(pair.ref.fwhm_px, rel=0.15)
        assert q["overlap"] > 0.95
        assert q["alignment_rms_px"] < 0.2


def test_result_fields_follow_the_contract(clean_runs):
    pair, result, _ = clean_runs[0]
    shape = pair.sci.data.shape
    for name in ("diff", "scorr", "flux", "flux_err", "mask", "sci", "ref"):
        arr = getattr(result, name)
        assert arr.shape == shape, name
    assert result.mask.dtype == np.uint8
    assert result.scorr.dtype == np.float32
    assert result.psf_sci.ndim == 2 and result.psf_sci.sum() == pytest.approx(1, abs=1e-3)
    assert result.ref_sources.shape[1] == 2
    assert result.wcs is not None
    # The reference is on the science grid and on the science flux scale: stars line up.
    inner = (pair.static.x > 20) & (pair.static.x < SIZE - 20) & (pair.static.y > 20) \
        & (pair.static.y < SIZE - 20)
    static = pair.static[(pair.static.kind == "star") & inner & (pair.static.x > 40)
                         & (pair.static.x < SIZE - 40) & (pair.static.y > 40)
                         & (pair.static.y < SIZE - 40)]
    bright = static.nsmallest(5, "mag")
    for x, y in bright[["x", "y"]].to_numpy():
        ix, iy = int(round(x)), int(round(y))
        box = np.s_[iy - 12:iy + 13, ix - 12:ix + 13]  # wide enough for both PSFs
        q = result.quality
        noise = 25 * np.hypot(q["sigma_sci_adu"], q["flux_ratio"] * q["sigma_ref_adu"])
        s = np.nansum(result.sci[box])
        assert np.nansum(result.ref[box]) == pytest.approx(s, abs=4 * noise + 0.05 * s)
    for key in ("noise_ratio", "noise_ratio_diff", "star_residual_chi2", "alignment_rms_px",
                "overlap", "fwhm_ref", "fwhm_sci", "flux_ratio", "elapsed_s", "n_candidates",
                "timings_s"):
        assert key in result.quality


def _inject(image: np.ndarray, psf, x, y, flux):
    """Add point sources with the simulation's own PSF (pixel-integrated Moffat)."""
    stamps, ix, iy = psf.stamps(x, y, 12)
    stamps = stamps / stamps.sum(axis=(1, 2), keepdims=True)
    r = 12
    for st, cx, cy, f in zip(stamps, ix, iy, flux, strict=True):
        image[cy - r:cy + r + 1, cx - r:cx + r + 1] += f * st


def test_injected_sources_recovered_and_faded_source_negative():
    pair = simulate_pair(SimSettings(size_px=768, clean=True, seed=21), 0)
    ref_hdu, sci_hdu = as_hdus(pair)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = zogy(ref_hdu, sci_hdu)
    rng = np.random.default_rng(3)
    stars = base.ref_sources
    xy = []
    while len(xy) < 60:  # positions away from stars, edges and each other
        x, y = rng.uniform(30, 738, 2)
        if len(stars) and np.min(np.hypot(*(stars - [x, y]).T)) < 8:
            continue
        if xy and np.min(np.hypot(*(np.array(xy) - [x, y]).T)) < 15:
            continue
        xy.append((x, y))
    xy = np.array(xy)
    snr = rng.uniform(8, 12, len(xy))
    err = base.flux_err[np.rint(xy[:, 1]).astype(int), np.rint(xy[:, 0]).astype(int)]
    sci = pair.sci.data.astype(float).copy()
    _inject(sci, pair.sci.psf, xy[:, 0], xy[:, 1], snr * err)
    # One source faded: present in the reference only (placed on the reference grid).
    fx, fy = 400.3, 380.6
    rx, ry = pair.ref.true_wcs.world_to_pixel(pair.sci.true_wcs.pixel_to_world(fx, fy))
    ref = pair.ref.data.astype(float).copy()
    ref_flux = 15 * base.flux_err[381, 400] / base.quality["flux_ratio"]
    _inject(ref, pair.ref.psf, [float(rx)], [float(ry)], [ref_flux])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result, cands = difference(fits.PrimaryHDU(ref.astype(np.float32), pair.ref.header),
                                   fits.PrimaryHDU(sci.astype(np.float32), pair.sci.header))
    pos = cands[cands.sign > 0]
    dist, _ = cKDTree(pos[["x", "y"]].to_numpy()).query(xy)
    assert np.mean(dist < 1.5) >= 0.98
    d, i = cKDTree(cands[["x", "y"]].to_numpy()).query([fx, fy])
    assert d < 1.5
    faded = cands.iloc[i]
    assert faded.sign == -1
    assert faded.flux == pytest.approx(-ref_flux * result.quality["flux_ratio"],
                                       abs=4 * faded.flux_err)
    # Measured fluxes are unbiased: median of (measured - true) / err near 0.
    _, j = cKDTree(pos[["x", "y"]].to_numpy()).query(xy)
    pull = (pos.flux.to_numpy()[j] - snr * err) / pos.flux_err.to_numpy()[j]
    assert abs(np.median(pull)) < 0.5
    # Nothing else but the odd noise peak just above threshold (off the image border).
    truth = np.vstack([xy, [[fx, fy]]])
    d_truth, _ = cKDTree(truth).query(cands[["x", "y"]].to_numpy())
    others = cands[(d_truth > 1.5) & ~cands.flag_edge.to_numpy()]
    assert len(others) <= 2 and (others.snr < 5.5).all(), others


def test_real_transients_in_a_full_simulation_are_found():
    pair = simulate_pair(SimSettings(size_px=SIZE, seed=5), 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result, cands = difference(*as_hdus(pair))
    real = pair.truth[pair.truth.is_real & (pair.truth.snr >= 8)]
    if len(real) == 0:
        pytest.skip("this simulated pair has no bright real transient")
    dist, idx = cKDTree(cands[["x", "y"]].to_numpy()).query(real[["x", "y"]].to_numpy())
    assert np.all(dist < 1.5)
    assert np.all(cands.sign.to_numpy()[idx] == real.sign.to_numpy())
    assert result.quality["noise_ratio"] == pytest.approx(1.0, abs=0.05)


def test_gaussian_baseline_same_inputs_same_result(clean_runs):
    pair, zres, zcands = clean_runs[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gres, gcands = difference(*as_hdus(pair), diff_settings=DiffSettings(method="gaussian"))
    assert isinstance(gres, DiffResult)
    assert gres.quality["method"] == "gaussian"
    for f in dataclasses.fields(DiffResult):
        a, b = getattr(gres, f.name), getattr(zres, f.name)
        if isinstance(a, np.ndarray) and a.ndim == 2 and a.shape[0] > 100:
            assert a.shape == b.shape, f.name
    assert tuple(gcands.columns) == tuple(zcands.columns)
    # On a pair where nothing changed, the baseline's Gaussian kernel leaves star residuals
    # that pass its per-pixel 5-sigma cut; ZOGY's S_corr does not.
    assert (~gcands.flag_edge).sum() > (~zcands.flag_edge).sum()


def test_parse_input_image_accepts_every_form(tmp_path, clean_runs):
    pair = clean_runs[0][0]
    path = tmp_path / "sci.fits"
    fits.PrimaryHDU(pair.sci.data, pair.sci.header).writeto(path)
    meta = ImageMeta(gain=2.0, filter="r")
    forms = [str(path), path, fits.PrimaryHDU(pair.sci.data, pair.sci.header),
             (pair.sci.data, pair.sci.wcs), (pair.sci.data, pair.sci.wcs, meta)]
    for form in forms:
        img = parse_input_image(form)
        assert isinstance(img, Image)
        assert img.data.shape == pair.sci.data.shape
        assert img.wcs is not None
    assert parse_input_image(forms[-1]).meta.gain == 2.0
    assert parse_input_image(forms[0]).meta.filter == "r"
    with pytest.raises(AstridError, match="expected an Image"):
        parse_input_image([1, 2, 3])


def _noise_image(size, seed=0, value=None):
    data = np.random.default_rng(seed).normal(100, 5, (size, size)).astype(np.float32)
    if value is not None:
        data[:] = value
    return data


def test_bad_inputs_give_one_line_errors(clean_runs):
    pair = clean_runs[0][0]
    ref_hdu, sci_hdu = as_hdus(pair)
    small = (_noise_image(40), None)
    with pytest.raises(InputFileError, match="at least 64 px"):
        zogy(small, sci_hdu)
    all_nan = (np.full((128, 128), np.nan, np.float32), None)
    with pytest.raises(InputFileError, match="no valid pixels"):
        zogy(ref_hdu, all_nan)
    # No stars: a pure-noise science image.
    blank = (_noise_image(256), None, ImageMeta(gain=1.0))
    with pytest.raises(InputFileError, match="science.*no stars|no stars"):
        zogy((_noise_image(256, 1), None), blank)
    # No overlap: move the reference's WCS far away.
    far = ref_hdu.header.copy()
    far["CRVAL1"] = (far["CRVAL1"] + 1.0) % 360
    with pytest.raises(AstridError, match="overlap"):
        zogy(fits.PrimaryHDU(pair.ref.data, far), sci_hdu)
    for exc in (InputFileError, AstridError):
        assert issubclass(exc, AstridError)


def test_filter_mismatch_is_an_error_unless_allowed(clean_runs):
    pair = clean_runs[0][0]
    ref_hdu, sci_hdu = as_hdus(pair)
    hdr = ref_hdu.header.copy()
    hdr["FILTER"] = "g"
    other = fits.PrimaryHDU(pair.ref.data, hdr)
    with pytest.raises(AstridError, match="filter 'r' differs from the reference's 'g'"):
        zogy(other, sci_hdu)
    with pytest.warns(FilterMismatchWarning):
        result = zogy(other, sci_hdu, settings=DiffSettings(allow_filter_mismatch=True))
    assert result.quality["noise_ratio"] == pytest.approx(1.0, abs=0.05)


def test_psf_fallback_warning_names_the_image_it_concerns(clean_runs):
    # The two PSFs are measured side by side in two threads; the warning must still name
    # the reference, not the science image.
    pair = clean_runs[0][0]
    rng = np.random.default_rng(0)
    noisy = pair.ref.data + rng.normal(0, 10 * np.nanstd(pair.ref.data[:50, :50]),
                                       pair.ref.data.shape).astype(np.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result, _ = difference(fits.PrimaryHDU(noisy, pair.ref.header),
                               fits.PrimaryHDU(pair.sci.data, pair.sci.header))
    assert (result.quality["psf_method_ref"], result.quality["psf_method_sci"]) == ("moffat", "empirical")
    psf_warnings = [str(w.message) for w in caught if "PSF stars" in str(w.message)]
    assert len(psf_warnings) == 1 and psf_warnings[0].startswith("reference: only ")


def test_reference_holes_are_bad_reference_pixels_and_beyond_its_frame_no_overlap(clean_runs):
    from astropy.wcs import WCS

    from astrid.diff import MASK_NO_OVERLAP, MASK_REF_BAD

    pair = clean_runs[0][0]
    ref = pair.ref.data.copy()
    ref[300:312, 300:320] = np.nan  # a blob inside the overlap
    ref[:, 500] = np.nan  # a bad column from edge to edge: still the reference's own pixels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result, _ = difference(fits.PrimaryHDU(ref, pair.ref.header),
                               fits.PrimaryHDU(pair.sci.data, pair.sci.header))
    ref_wcs, sci_wcs = WCS(pair.ref.header).celestial, WCS(pair.sci.header).celestial
    x, y = sci_wcs.world_to_pixel_values(*ref_wcs.pixel_to_world_values([310, 500], [306, 400]))
    for xi, yi in zip(np.rint(x).astype(int), np.rint(y).astype(int), strict=True):
        assert result.mask[yi, xi] & MASK_REF_BAD and not result.mask[yi, xi] & MASK_NO_OVERLAP
    # science pixels beyond the reference frame are "no overlap", and only those
    h, w = result.mask.shape
    yy, xx = np.mgrid[0:h:7, 0:w:7]
    rx, ry = ref_wcs.world_to_pixel_values(*sci_wcs.pixel_to_world_values(xx, yy))
    rh, rw = ref.shape
    outside = (rx < -0.5) | (ry < -0.5) | (rx > rw - 0.5) | (ry > rh - 0.5)
    # the output mask grows each flag by the ZOGY kernel's reach (well under 20 px)
    margin = (rx < 20) | (ry < 20) | (rx > rw - 21) | (ry > rh - 21)
    flagged = (result.mask[yy, xx] & MASK_NO_OVERLAP) != 0
    assert outside.any() and (flagged[outside]).all() and not flagged[~outside & ~margin].any()


@pytest.mark.parametrize("side_by_side", [True, False])
def test_both_schedules_give_one_result_and_name_the_image_a_warning_is_about(
        clean_runs, monkeypatch, side_by_side):
    """Small frames prepare both images side by side, large ones one background at a time with
    the science PSF beside the reference's star finding: the same result either way, and a
    warning from either thread names its own image."""
    from astrid.diff import high_level

    pair, expected, _ = clean_runs[0]
    ref_hdu, sci_hdu = as_hdus(pair)
    # A noisy reference keeps too few stars at S/N >= 10 for an empirical PSF.
    noisy = pair.ref.data + np.random.default_rng(0).normal(0, 2 * np.std(pair.ref.data[:50]),
                                                            pair.ref.data.shape)
    if not side_by_side:
        monkeypatch.setattr(high_level, "_LARGE_FRAME_PIXELS", 0)
    result = zogy(ref_hdu, sci_hdu)
    np.testing.assert_array_equal(result.scorr, expected.scorr)
    for name in ("reference", "science"):
        ref_in, sci_in = ref_hdu, sci_hdu
        if name == "reference":
            ref_in = fits.PrimaryHDU(noisy.astype(np.float32), pair.ref.header)
        else:
            sci_in = fits.PrimaryHDU(noisy.astype(np.float32), pair.sci.header)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            zogy(ref_in, sci_in)
        psf_warnings = [str(w.message) for w in caught if "good PSF stars" in str(w.message)]
        assert psf_warnings and all(m.startswith(f"{name}: ") for m in psf_warnings), name


def test_differencing_runs_blas_on_one_thread_and_restores_it(clean_runs, monkeypatch):
    from threadpoolctl import threadpool_info, threadpool_limits

    from astrid.diff import align

    def blas_threads():
        return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}

    seen, warp = [], align._warp

    def spying_warp(*args, **kwargs):
        seen.append(blas_threads())
        return warp(*args, **kwargs)

    monkeypatch.setattr(align, "_warp", spying_warp)
    with threadpool_limits(2, "blas"):
        zogy(*as_hdus(clean_runs[0][0]))
        assert blas_threads() == {2}
    assert seen == [{1}]


def test_images_in_flux_units_difference_as_in_adu_and_unusable_scales_are_named(clean_runs):
    """Flux-calibrated images (noise ~1e-8) give the same result as the ADU originals; noise
    beyond what single precision holds is a one-line error naming the image."""
    pair = clean_runs[0][0]

    def scaled(image, factor):
        header = image.header.copy()
        for key in ("GAIN", "SATURATE"):
            header.remove(key, ignore_missing=True)
        return fits.PrimaryHDU((image.data * factor).astype(np.float32), header)

    adu = zogy(scaled(pair.ref, 1.0), scaled(pair.sci, 1.0)).quality
    flux = zogy(scaled(pair.ref, 1e-9), scaled(pair.sci, 1e-9)).quality
    for key in ("noise_ratio", "star_residual_chi2", "flux_ratio"):
        assert flux[key] == pytest.approx(adu[key], rel=1e-3), key
    assert flux["sigma_sci_adu"] == pytest.approx(1e-9 * adu["sigma_sci_adu"], rel=1e-3)
    with pytest.raises(InputFileError, match="reference: background noise .* rescale"):
        zogy(scaled(pair.ref, 1e-12), scaled(pair.sci, 1.0))
