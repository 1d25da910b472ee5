"""Candidate detection and measurement on ZOGY outputs of synthetic arrays."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.wcs import WCS
from scipy.signal import fftconvolve

from astrid.config import DetectSettings
from astrid.detect import CANDIDATE_COLUMNS, find_candidates, find_peaks
from astrid.diff import DiffResult
from astrid.diff.zogy_core import MASK_SATURATED, MASK_SCI_BAD, zogy_images

SIZE = 256
FWHM_PX = 3.0


def psf(fwhm_px=FWHM_PX, size=25):
    s = fwhm_px / 2.3548
    y, x = np.mgrid[:size, :size] - size // 2
    p = np.exp(-(x ** 2 + y ** 2) / (2 * s * s))
    return (p / p.sum()).astype(np.float32)


def result_for(sci_extra=None, ref_extra=None, *, seed=0, mask=None, wcs=None, ref_xy=None):
    """A DiffResult from ZOGY on white noise plus the given sources (same PSF both images)."""
    rng = np.random.default_rng(seed)
    ref = rng.normal(0, 5, (SIZE, SIZE)).astype(np.float32)
    sci = rng.normal(0, 5, (SIZE, SIZE)).astype(np.float32)
    if sci_extra is not None:
        sci += sci_extra.astype(np.float32)
    if ref_extra is not None:
        ref += ref_extra.astype(np.float32)
    p = psf()
    out = zogy_images(ref, sci, p, p, sigma_ref=5.0, sigma_sci=5.0, flux_ratio=1.0, mask=mask)
    return DiffResult(diff=out.diff, scorr=out.scorr, flux=out.flux, flux_err=out.flux_err,
                      mask=out.mask, sci=sci, ref=ref, psf_sci=p, psf_ref=p, wcs=wcs,
                      ref_sources=np.zeros((0, 2)) if ref_xy is None else ref_xy,
                      quality={"fwhm_sci": FWHM_PX, "fwhm_ref": FWHM_PX})


def sources(xy, flux, fwhm_px=FWHM_PX):
    img = np.zeros((SIZE, SIZE))
    for (x, y), f in zip(xy, np.broadcast_to(flux, len(xy)), strict=True):
        img[y, x] += f
    return fftconvolve(img, psf(fwhm_px), mode="same") if fwhm_px else img


def test_columns_and_empty_noise():
    cands = find_candidates(result_for(seed=1))
    assert tuple(cands.columns) == CANDIDATE_COLUMNS
    assert len(cands) <= 1  # pure noise: at most a rare 5-sigma fluctuation


def test_positive_and_negative_with_subpixel_position_and_flux():
    sci = sources([(60, 70)], 4000.0)
    ref = sources([(180, 150)], 4000.0)
    cands = find_candidates(result_for(sci, ref, ref_xy=np.array([[181.0, 150.0]])))
    assert len(cands) == 2
    pos = cands[cands.sign > 0].iloc[0]
    neg = cands[cands.sign < 0].iloc[0]
    assert (pos.x, pos.y) == pytest.approx((60, 70), abs=0.3)
    assert (neg.x, neg.y) == pytest.approx((180, 150), abs=0.3)
    assert pos.flux == pytest.approx(4000, abs=3 * pos.flux_err)
    assert neg.flux == pytest.approx(-4000, abs=3 * neg.flux_err)
    assert pos.snr == pytest.approx(pos.flux / pos.flux_err, rel=0.02)
    assert neg.ref_source_dist_px == pytest.approx(1.0, abs=0.3)
    assert pos.fwhm_px == pytest.approx(FWHM_PX, rel=0.35)
    assert pos.neg_fraction < 0.1
    assert not (pos.flag_edge or pos.flag_masked or pos.flag_saturated)


def test_close_pairs_deblend_by_separation():
    apart = find_candidates(result_for(sources([(100, 100), (108, 100)], 5000.0)))
    assert len(apart) == 2
    close = find_candidates(result_for(sources([(100, 100), (102, 100)], 5000.0)),
                            DetectSettings(deblend_min_sep_px=3.0))
    assert len(close) == 1


def test_ripple_on_a_plateau_does_not_split():
    scorr = np.zeros((64, 64), np.float32)
    y, x = np.mgrid[:64, :64]
    scorr += 40 * np.exp(-((x - 30) ** 2 + (y - 30) ** 2) / (2 * 6.0 ** 2))
    scorr[30, 38] += 0.6  # a small bump on the wing: a local maximum but no saddle
    scorr[30, 39] -= 0.3
    iy, ix = find_peaks(scorr, 5.0, 3.0)
    assert list(zip(iy, ix, strict=True)) == [(30, 30)]
    # Two real peaks with a clear saddle between them stay two.
    two = 20 * np.exp(-((x - 20) ** 2 + (y - 30) ** 2) / 8.0) + \
        15 * np.exp(-((x - 30) ** 2 + (y - 30) ** 2) / 8.0)
    iy, ix = find_peaks(two.astype(np.float32), 5.0, 3.0)
    assert sorted(ix.tolist()) == [20, 30]


def test_cosmic_ray_is_sharp_and_dipole_has_negative_fraction():
    cr = sources([(80, 90)], 3000.0, fwhm_px=0)
    star = sources([(170, 90)], 3000.0)
    cands = find_candidates(result_for(cr + star))
    by_x = {int(round(r.x)): r for r in cands.itertuples()}
    assert by_x[80].fwhm_px < 0.6 * by_x[170].fwhm_px
    assert by_x[80].sharpness > 2 * by_x[170].sharpness
    # A star shifted by one pixel between the epochs is a dipole.
    dip = find_candidates(result_for(sources([(128, 128)], 2e4), sources([(130, 128)], 2e4)))
    assert len(dip) >= 2 and set(dip.sign) == {-1, 1}
    assert dip.neg_fraction.min() > 0.2


def test_flags_edge_masked_saturated():
    sci = sources([(5, 100), (100, 100), (200, 100)], 5000.0)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[98, 96] = MASK_SCI_BAD
    mask[100, 204] = MASK_SATURATED
    cands = find_candidates(result_for(sci, mask=mask), DetectSettings(edge_px=10))
    by_x = {int(round(r.x)): r for r in cands.itertuples()}
    assert by_x[5].flag_edge and not by_x[100].flag_edge
    assert by_x[100].flag_masked and not by_x[100].flag_saturated
    assert by_x[200].flag_saturated and not by_x[5].flag_saturated


def test_sky_coordinates_from_the_wcs():
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [30.0, -10.0]
    wcs.wcs.crpix = [129.0, 129.0]
    wcs.wcs.cdelt = [-1 / 3600, 1 / 3600]
    cands = find_candidates(result_for(sources([(128, 128)], 5000.0), wcs=wcs))
    assert cands.ra.iloc[0] == pytest.approx(30.0, abs=1e-6 + 0.3 / 3600)
    assert cands.dec.iloc[0] == pytest.approx(-10.0, abs=0.3 / 3600)


def test_threshold_controls_detections():
    sci = sources([(60, 60), (160, 160)], [900.0, 4000.0])
    res = result_for(sci)
    snrs = sorted(find_candidates(res, DetectSettings(threshold_sigma=3.0)).snr)[-2:]
    high = find_candidates(res, DetectSettings(threshold_sigma=(snrs[0] + snrs[1]) / 2))
    assert len(high) == 1


def test_threshold_scan_gives_numpys_indices_in_raster_order():
    from astrid.detect.peak_kernels import above_threshold

    rng = np.random.default_rng(9)
    scorr = rng.normal(0, 2, (301, 257)).astype(np.float32)
    scorr[40:60] = 0  # rows with nothing above threshold
    scorr[100, 5] = np.nan
    for threshold in (3.0, 5.0, 50.0):
        np.testing.assert_array_equal(above_threshold(scorr, np.float32(threshold)),
                                      np.flatnonzero(np.abs(scorr) >= threshold))
