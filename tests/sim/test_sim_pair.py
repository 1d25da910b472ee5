"""The simulated pair: determinism, truth positions and fluxes, noise, geometry, saturation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from astrid.config import SimSettings
from astrid.sim import REAL_KINDS, simulate_pair


def _settings(**kw) -> SimSettings:
    base = dict(size_px=256, seed=11, pairs=1)
    base.update(kw)
    return SimSettings(**base)


# Bright, isolated point transients on an almost empty sky: positions and fluxes are
# measurable to a fraction of a pixel and a few per cent.
_POINTS = dict(size_px=320, n_stars=40, n_galaxies=0, n_transients=1200, n_cosmic_rays=0,
               n_hot_pixels=0, n_bad_columns=0, n_trails=0, snr_range=(25.0, 80.0),
               transient_mix={"sn_hostless": 1.0}, fading_fraction=0.0,
               star_mag_range=(19.0, 23.0))


@pytest.fixture(scope="module")
def point_pair():
    return simulate_pair(_settings(**_POINTS), 0)


def test_same_seed_same_pair_and_different_seed_different_pair():
    a = simulate_pair(_settings(pairs=1), 0)
    # Same seed and index in a survey of another size: each pair has its own seed stream.
    b = simulate_pair(_settings(pairs=500), 0)
    assert np.array_equal(a.sci.data, b.sci.data) and np.array_equal(a.ref.data, b.ref.data)
    assert a.truth.equals(b.truth) and a.static.equals(b.static)
    c = simulate_pair(_settings(seed=12), 0)
    assert not np.array_equal(a.sci.data, c.sci.data)
    d = simulate_pair(_settings(), 1)  # another pair of the same survey
    assert not np.array_equal(a.sci.data, d.sci.data)
    assert a.pair_id != c.pair_id and a.pair_id != d.pair_id


def test_point_transients_land_where_truth_says_with_the_flux_it_says(point_pair):
    pair, sci = point_pair, point_pair.sci
    truth = pair.truth[pair.truth.kind == "sn_hostless"]
    assert len(truth) >= 8
    resid = sci.data.astype(float) - sci.sky
    # Independent of the simulator's PSF code: matched-filter peak with a Gaussian of the FWHM.
    smooth = ndimage.gaussian_filter(resid, sci.fwhm_px / 2.3548)
    ny, nx = resid.shape
    errors, pulls = [], []
    for row in truth.itertuples():
        ix, iy = int(round(row.x)), int(round(row.y))
        if not (13 <= ix < nx - 13 and 13 <= iy < ny - 13):
            continue
        # Skip blends: another transient or star within 3 FWHM.
        others = np.hypot(truth.x - row.x, truth.y - row.y)
        stars = np.hypot(pair.static.x - row.x, pair.static.y - row.y)
        if np.sum(others < 3 * sci.fwhm_px) > 1 or np.any(stars < 4 * sci.fwhm_px):
            continue
        win = smooth[iy - 3:iy + 4, ix - 3:ix + 4]
        py, px = np.unravel_index(np.argmax(win), win.shape)
        py, px = min(max(py, 1), 5), min(max(px, 1), 5)
        # Quadratic interpolation of the peak along each axis.
        dx = 0.5 * (win[py, px - 1] - win[py, px + 1]) / (win[py, px - 1] - 2 * win[py, px] + win[py, px + 1])
        dy = 0.5 * (win[py - 1, px] - win[py + 1, px]) / (win[py - 1, px] - 2 * win[py, px] + win[py + 1, px])
        errors.append(np.hypot(ix - 3 + px + dx - row.x, iy - 3 + py + dy - row.y))
        # Flux: optimal PSF-weighted estimate with the true PSF, and its noise.
        psf = sci.psf.stamp(row.x, row.y, radius_px=12, normalise=False)
        cut = resid[iy - 12:iy + 13, ix - 12:ix + 13]
        var = sci.sky_sigma_adu ** 2 + row.flux * psf / sci.gain
        estimate = np.sum(cut * psf) / np.sum(psf * psf)
        sigma = np.sqrt(np.sum(psf * psf * var)) / np.sum(psf * psf)
        pulls.append((estimate - row.flux) / sigma)
    assert len(errors) >= 8
    assert max(errors) < 0.5, errors
    pulls = np.array(pulls)
    # Fluxes within noise: no pull beyond 4 sigma, and no bias (mean pull ~ 0).
    assert np.max(np.abs(pulls)) < 4.0, pulls
    assert abs(np.mean(pulls)) < 4 / np.sqrt(len(pulls)), pulls


def test_background_noise_matches_the_simulated_noise():
    pair = simulate_pair(_settings(size_px=384, clean=True, n_galaxies=40), 0)
    for epoch in (pair.sci, pair.ref):
        sigma_map = np.sqrt(epoch.sky * epoch.gain + epoch.read_noise_e ** 2) / epoch.gain
        norm = (epoch.data - epoch.sky) / sigma_map
        empty = np.ones(norm.shape, bool)
        yy, xx = np.indices(norm.shape)
        for row in pair.static.itertuples():
            radius = 6 * epoch.fwhm_px + (0 if np.isnan(row.r_eff_px) else 8 * row.r_eff_px)
            radius += 4 * max(0.0, 16 - row.mag)  # bright stars have wide wings
            box = (slice(max(int(row.y - radius), 0), int(row.y + radius) + 1),
                   slice(max(int(row.x - radius), 0), int(row.x + radius) + 1))
            empty[box] &= np.hypot(xx[box] - row.x, yy[box] - row.y) > radius
        values = norm[empty]
        assert values.size > 20000
        robust_std = 1.4826 * np.median(np.abs(values - np.median(values)))
        assert robust_std == pytest.approx(1.0, abs=0.03)
        # The header's SKYSIG is the noise at the mean sky.
        assert epoch.header["SKYSIG"] == pytest.approx(epoch.sky_sigma_adu, rel=1e-3)
    # The reference is deeper: lower noise in science units.
    ratio = pair.info["flux_ratio"]
    assert pair.ref.sky_sigma_adu * ratio < pair.sci.sky_sigma_adu


def test_epochs_are_offset_and_rotated_as_recorded():
    """A star's pixel position differs between the epochs as the true WCSs say."""
    pair = simulate_pair(_settings(size_px=384, n_stars=3500, n_galaxies=0, clean=True,
                                   star_mag_range=(14.0, 17.5), rotation_range_deg=(0.25, 0.3),
                                   offset_range_px=(3.0, 5.0)), 0)
    static = pair.static
    stars = static[(static.kind == "star") & ~static.saturated]
    # Isolated stars only: no other source within 12 px.
    near = [np.sum(np.hypot(static.x - x, static.y - y) < 12) for x, y in zip(stars.x, stars.y, strict=True)]
    stars = stars[np.array(near) == 1]
    sci_xy, ref_xy = [], []
    rx_true, ry_true = pair.ref.true_wcs.wcs_world2pix(stars.ra, stars.dec, 0)
    for x, y, rx, ry in zip(stars.x, stars.y, rx_true, ry_true, strict=True):
        ms = _centroid(pair.sci, x, y)
        mr = _centroid(pair.ref, rx, ry)
        if ms is not None and mr is not None:
            sci_xy.append(ms)
            ref_xy.append(mr)
    sci_xy, ref_xy = np.array(sci_xy), np.array(ref_xy)
    assert len(sci_xy) >= 25, len(sci_xy)
    shift = ref_xy - sci_xy
    assert np.median(np.hypot(*shift.T)) > 1.0  # alignment is really needed
    # Fit ref = A @ sci + t and compare the rotation with the recorded one.
    design = np.column_stack([sci_xy, np.ones(len(sci_xy))])
    coef, *_ = np.linalg.lstsq(design, ref_xy, rcond=None)
    a = coef[:2].T
    angle = np.degrees(np.arctan2(a[1, 0] - a[0, 1], a[0, 0] + a[1, 1]))
    # Pixel axes rotate by -rotation when the sky frame rotates by +rotation (x east-flipped).
    assert abs(abs(angle) - abs(pair.info["rotation_deg"])) < 0.03
    predicted = np.array(pair.ref.true_wcs.wcs_world2pix(
        *pair.sci.true_wcs.wcs_pix2world(sci_xy[:, 0], sci_xy[:, 1], 0), 0)).T
    assert np.median(np.hypot(*(predicted - ref_xy).T)) < 0.1


def _centroid(epoch, x, y, half=7):
    """Iterated Gaussian-windowed centroid (unbiased for a symmetric source), or None when the
    star is near the edge or too faint to measure well."""
    ix, iy = int(round(x)), int(round(y))
    ny, nx = epoch.data.shape
    if not (half <= ix < nx - half and half <= iy < ny - half):
        return None
    cut = epoch.data[iy - half:iy + half + 1, ix - half:ix + half + 1] - epoch.sky[iy, ix]
    if cut.max() < 50 * epoch.sky_sigma_adu:
        return None
    off = np.arange(-half, half + 1)
    cx = cy = 0.0
    sigma = epoch.fwhm_px / 2.3548
    for _ in range(20):
        w = cut * np.exp(-0.5 * (((off[None, :] - cx) ** 2 + (off[:, None] - cy) ** 2) / sigma ** 2))
        cx, cy = np.sum(w * off[None, :]) / w.sum(), np.sum(w * off[:, None]) / w.sum()
    return ix + cx, iy + cy


def test_header_wcs_is_off_by_the_recorded_error(point_pair):
    """Each header WCS is right for its epoch except a small shift that star matching must fix."""
    for epoch in (point_pair.sci, point_pair.ref):
        ra, dec = epoch.true_wcs.wcs_pix2world([[100.0, 80.0]], 0)[0]
        hx, hy = epoch.wcs.wcs_world2pix([[ra, dec]], 0)[0]
        assert 0.1 <= np.hypot(*epoch.wcs_error_px) <= 1.0
        assert hx - 100.0 == pytest.approx(epoch.wcs_error_px[0], abs=1e-6)
        assert hy - 80.0 == pytest.approx(epoch.wcs_error_px[1], abs=1e-6)


def test_truth_table_columns_kinds_and_signs():
    pair = simulate_pair(_settings(size_px=384, seed=5, n_transients=200, n_cosmic_rays=300), 0)
    truth = pair.truth
    assert list(truth.columns) == ["kind", "x", "y", "ra", "dec", "flux", "mag", "snr", "is_real", "sign"]
    assert set(truth["sign"]) <= {-1, 1}
    assert (truth["is_real"] == truth["kind"].isin(REAL_KINDS)).all()
    assert truth["x"].between(-0.5, 383.5).all() and truth["y"].between(-0.5, 383.5).all()
    real = truth[truth.is_real]
    assert len(real) > 0
    # Expected S/N drawn over the configured range (solved exactly for each source).
    lo, hi = SimSettings().snr_range
    assert real["snr"].between(0.999 * lo, 1.001 * hi).all(), real
    # ra/dec are the true sky positions of x, y on the science grid.
    x, y = pair.sci.true_wcs.wcs_world2pix(truth.ra, truth.dec, 0)
    assert np.allclose(x, truth.x, atol=1e-6) and np.allclose(y, truth.y, atol=1e-6)
    assert {"cosmic_ray", "hot_pixel"} & set(truth.kind)
    # Supernovae sit on their hosts: nuclear ones at a galaxy centre, others within its light.
    gal = pair.static[pair.static.kind == "galaxy"]
    for row in truth[truth.kind.isin(["sn", "sn_nuclear"])].itertuples():
        dist = np.hypot(gal.x - row.x, gal.y - row.y)
        reach = 0.5 if row.kind == "sn_nuclear" else (3 + gal.sersic_n) * gal.r_eff_px / np.sqrt(gal.axis_ratio)
        assert np.any(dist <= reach), row
    # Variable stars are stars of the static sky.
    stars = pair.static[pair.static.kind == "star"]
    for row in truth[truth.kind == "variable"].itertuples():
        assert np.min(np.hypot(stars.x - row.x, stars.y - row.y)) < 1e-6


def test_clean_pair_has_nothing_that_changed():
    pair = simulate_pair(_settings(clean=True, n_stars=3000), 0)
    assert pair.truth.empty
    assert not pair.static["saturated"].any()
    assert pair.sci.data.max() < pair.sci.saturation_adu


def test_saturated_stars_are_clipped_and_bleed_along_columns():
    pair = simulate_pair(_settings(n_stars=200, star_mag_range=(9.5, 11.0), n_galaxies=0,
                                   n_transients=0), 0)
    sat = pair.sci.saturation_adu
    assert pair.sci.data.max() == pytest.approx(sat)
    assert pair.static.saturated.any()
    bleed = pair.truth[pair.truth.kind == "bleed"]
    assert len(bleed) > 0
    # Bleeds run along columns: the science bleed rows sit on saturated pixels (except the
    # partly filled pixel at each end of a bleed).
    sci_bleed = bleed[bleed.sign > 0]
    on = pair.sci.data[sci_bleed.y.round().astype(int), sci_bleed.x.round().astype(int)]
    assert np.mean(on >= sat) > 0.7 and np.all(on > 0.2 * sat)
    assert (np.diff(sci_bleed.x.to_numpy()) == 0).mean() > 0.5
