"""Fake injection: PSF-shaped point sources, completeness curves and their 50% point."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from scipy import special

from astrid.config import FakeSettings, Settings, SimSettings
from astrid.detect.fakes import fit_completeness, inject_point_sources, run_fakes, write_fakes_dir
from astrid.fitsio import read_image
from astrid.ml.data import load_dataset

HAVE_ENGINE = all(importlib.util.find_spec(m) is not None
                  for m in ("astrid.diff.high_level", "astrid.detect.candidates", "astrid.sim"))
needs_engine = pytest.mark.skipif(not HAVE_ENGINE, reason="differencing engine not available")


def test_injected_source_has_its_flux_and_position():
    y, x = np.mgrid[-7:8, -7:8]
    psf = np.exp(-(x**2 + y**2) / (2 * 1.3**2))
    psf = (psf / psf.sum()).astype(np.float32)
    data = np.zeros((64, 64), np.float32)
    data[0, 0] = np.nan
    out = inject_point_sources(data, psf, [30.3, 10.0], [20.8, 50.0], [1000.0, 250.0])
    assert np.isnan(out[0, 0])  # bad pixels stay bad
    box = np.nan_to_num(out[12:30, 22:39])
    assert box.sum() == pytest.approx(1000.0, rel=1e-3)
    yy, xx = np.mgrid[12:30, 22:39]
    assert (box * xx).sum() / box.sum() == pytest.approx(30.3, abs=0.02)
    assert (box * yy).sum() / box.sum() == pytest.approx(20.8, abs=0.02)
    assert np.nansum(out[42:58, 2:18]) == pytest.approx(250.0, rel=1e-3)
    assert (data[1:] == 0).all()  # the input is not modified


def test_completeness_fit_recovers_a_known_curve():
    rng = np.random.default_rng(0)
    snr = np.repeat(np.geomspace(1.5, 30, 16), 60)
    detected = rng.random(snr.size) < special.ndtr(snr - 5.0)  # threshold 5, unit noise
    fit = fit_completeness(snr, detected, "snr")
    assert abs(fit.x50 - 5.0) < 3 * max(fit.x50_err, 0.05)
    assert abs(fit.x50 - 5.0) < 0.3 and 0.6 < fit.width < 1.5 and fit.plateau > 0.97
    mags = 22.0 - 2.5 * np.log10(snr / 5.0)
    fit_mag = fit_completeness(mags, detected, "mag")
    assert abs(fit_mag.x50 - 22.0) < 0.15
    assert fit_mag.predict(18.0) > 0.95 and fit_mag.predict(24.0) < 0.05


@pytest.fixture(scope="module")
def sim_pair(tmp_path_factory):
    from astrid.sim import simulate_pair, write_pair

    # a galaxy-rich field so that every host type gets fakes
    settings = SimSettings(pairs=1, size_px=512, seed=3, n_galaxies=1000)
    pair = simulate_pair(settings, 0)
    folder = tmp_path_factory.mktemp("sim") / pair.pair_id
    write_pair(folder, pair, settings)
    return read_image(folder / "ref.fits"), read_image(folder / "sci.fits")


@needs_engine
def test_completeness_on_simulated_pair_reaches_threshold(sim_pair, tmp_path):
    reference, science = sim_pair
    settings = Settings(fakes=FakeSettings(snr_min=2.0, snr_max=20.0, n_levels=10, per_level=30,
                                           min_separation_px=10.0, max_rounds=2, seed=1))
    result = run_fakes(reference, science, settings)
    print("\nsimulated 512x512:", result.summary())
    fakes = result.fakes
    assert 0.95 * 300 <= len(fakes) <= 300  # a few may find no room in the rounds allowed
    assert result.quality["n_fakes"] + result.quality["n_not_placed"] == 300
    # blank sky and galaxies both host fakes (how many galaxies there are depends on the field)
    assert "blank" in set(fakes["host"]) and set(fakes["host"]) & {"galaxy", "nuclear"}
    bright = fakes[fakes["snr_expected"] >= 8]
    assert bright["detected"].mean() >= 0.98, result.summary()
    threshold = settings.detect.threshold_sigma
    assert abs(result.fit_snr.x50 - threshold) <= 0.5, result.summary()
    assert result.fit_mag is not None  # the simulation writes MAGZP
    # recovered fakes come back as real triplets cut at their detections
    assert len(result.stamps) == int(fakes["detected"].sum())
    assert (result.meta["label"] == 1).all() and (result.meta["label_source"] == "fake").all()
    centre = settings.stamps.size_px // 2
    stack = np.nanmean(result.stamps[:, 2], axis=0)  # the fakes' mean difference stamp
    assert np.unravel_index(np.argmax(stack), stack.shape) == (centre, centre)

    write_fakes_dir(tmp_path, result, {"astrid_version": "test"})
    summary = json.loads((tmp_path / "completeness.json").read_text())
    assert summary["fit_snr"]["x50"] == pytest.approx(result.fit_snr.x50)
    assert (tmp_path / "completeness.png").stat().st_size > 10_000
    stamps, meta = load_dataset(tmp_path / "triplets")
    assert len(stamps) == len(result.stamps) and set(meta["kind"]) <= {
        "fake_blank", "fake_galaxy", "fake_nuclear"}


@needs_engine
def test_real_decam_pair_gives_a_completeness_curve(shared_data, tmp_path):
    folder = shared_data("diffpairs", "decam", "input_data")
    settings = Settings(fakes=FakeSettings(snr_min=2.0, snr_max=25.0, n_levels=8, per_level=15,
                                           min_separation_px=12.0, max_rounds=4, seed=2))
    result = run_fakes(folder / "DEC-OBS18a.mini.fits", folder / "DEC-OBS04a.mini.fits", settings)
    print("\nDECam a:", result.summary())
    table = result.by_snr[result.by_snr["host"] == "all"]
    assert len(table) == 8 and table["n"].sum() == len(result.fakes) >= 0.9 * 8 * 15
    # the curve rises from the faintest to the brightest level
    assert table["completeness"].iloc[-1] >= 0.8 > table["completeness"].iloc[0]
    assert np.isfinite(result.fit_snr.x50)
