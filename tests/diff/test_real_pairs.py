"""ZOGY on real image pairs from ../shared/data/diffpairs (skipped when the data are absent)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from astrid.diff import difference
from astrid.diff.quality import robust_std, source_free
from astrid.fitsio import read_image


def _run(ref_path, sci_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return difference(read_image(ref_path), read_image(sci_path))


def test_properimage_pair_is_noise_and_cosmic_rays(shared_data):
    # Two 60 s frames 74 s apart: nothing astrophysical changed.
    folder = shared_data("diffpairs", "properimage")
    result, cands = _run(folder / "aligned_eso085-030-004.fit",
                         folder / "aligned_eso085-030-005.fit")
    q = result.quality
    assert q["noise_ratio"] == pytest.approx(1.0, abs=0.10)
    assert q["flux_ratio"] == pytest.approx(1.0, abs=0.05)
    # The header has no SATURATE: the clipped level (65535) is found from the data, and the
    # saturated stars are flagged, not reported as clean candidates.
    assert (result.mask & 8).any()
    clean = cands[~(cands.flag_edge | cands.flag_saturated | cands.flag_masked)]
    assert len(clean) < 20
    # Every remaining candidate is a cosmic ray or hot pixel: sharper than the PSF.
    psf_fwhm = min(q["fwhm_sci"], q["fwhm_ref"])
    assert (clean.fwhm_px < 0.8 * psf_fwhm).all(), clean


def test_decam_epochs_difference_cleanly(shared_data):
    folder = shared_data("diffpairs", "decam", "input_data")
    for epoch in "ac":
        result, cands = _run(folder / f"DEC-OBS18{epoch}.mini.fits",
                             folder / f"DEC-OBS04{epoch}.mini.fits")
        q = result.quality
        assert q["noise_ratio"] == pytest.approx(1.0, abs=0.15), epoch
        assert q["flux_ratio"] == pytest.approx(1.05, abs=0.1)
        assert q["overlap"] > 0.95  # same pixel grid, up to the sub-pixel registration
        assert np.isfinite(result.scorr[result.mask == 0]).all()


def test_decam_stacks_compare_with_the_reference_difference(shared_data):
    """Our D against the other tool's decorrelated difference of the same median stacks.

    Both are normalised by their own robust noise in empty sky; at the reference stars our
    residuals must be about as small (median chi^2 per pixel in 9x9 boxes). The benchmark
    saves the side-by-side picture (benchmarks/results/decam_comparison.png).
    """
    folder = shared_data("diffpairs", "decam", "4check")
    result, _ = _run(folder / "Stack-DEC-OBS18.fits", folder / "Stack-DEC-OBS04.fits")
    theirs = read_image(folder / "FinalDifference.DeCorr.fits").data
    q = result.quality
    free = source_free(result.sci, result.ref, q["sigma_sci_adu"], q["sigma_ref_adu"])
    free = np.repeat(np.repeat(free, 4, axis=0), 4, axis=1)
    h, w = free.shape
    empty = free & (result.mask[:h, :w] == 0)

    def star_chi2(diff):
        d = diff[:h, :w] / robust_std(diff[:h, :w][empty])
        vals = []
        for x, y in np.rint(result.ref_sources).astype(int):
            box = np.s_[y - 4:y + 5, x - 4:x + 5]
            if 8 < x < w - 8 and 8 < y < h - 8 and (result.mask[box] == 0).all():
                vals.append(np.mean(d[box] ** 2))
        return float(np.median(vals)), len(vals)

    ours, n = star_chi2(result.diff)
    other, _ = star_chi2(theirs)
    assert n >= 10
    assert ours <= 1.1 * other
