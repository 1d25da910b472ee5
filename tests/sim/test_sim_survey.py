"""The survey directory: files, read_image round trip, resume, preview and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from astrid.cli import app
from astrid.config import SimSettings
from astrid.fitsio import read_image
from astrid.sim import simulate_pair, write_survey


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    out = tmp_path_factory.mktemp("survey")
    settings = SimSettings(pairs=2, size_px=192, seed=3, n_stars=4000, n_transients=600)
    return out, settings, write_survey(out, settings)


def test_survey_layout_and_tables(survey):
    out, settings, dirs = survey
    assert [d.name for d in dirs] == ["sim-s3-0000", "sim-s3-0001"]
    for d in dirs:
        for name in ("ref.fits", "sci.fits", "truth.csv", "static.csv", "pair.json"):
            assert (d / name).is_file()
        truth = pd.read_csv(d / "truth.csv")
        assert list(truth.columns) == ["kind", "x", "y", "ra", "dec", "flux", "mag", "snr",
                                       "is_real", "sign"]
        static = pd.read_csv(d / "static.csv")
        assert {"kind", "x", "y", "flux", "mag", "saturated"} <= set(static.columns)
    record = json.loads((out / "survey.json").read_text())
    assert record["pair_ids"] == [d.name for d in dirs]
    assert record["seed"] == 3 and record["settings"]["size_px"] == 192
    assert record["provenance"]["astrid_version"]
    assert set(record["pairs"]["sim-s3-0000"]) >= {"ref_offset_px", "rotation_deg", "flux_ratio"}
    assert not list(out.rglob("*.part"))  # no temporary files left behind


def test_read_image_round_trip(survey):
    out, settings, dirs = survey
    pair = simulate_pair(settings, 0)
    for name, epoch in (("sci", pair.sci), ("ref", pair.ref)):
        image = read_image(dirs[0] / f"{name}.fits", require_wcs=True)
        assert np.array_equal(image.data[~image.mask], epoch.data[~image.mask])
        assert np.array_equal(image.mask, epoch.data >= epoch.saturation_adu)
        meta = image.meta
        assert meta.gain == pytest.approx(epoch.gain, rel=1e-4)
        assert meta.read_noise == pytest.approx(epoch.read_noise_e, rel=1e-3)
        assert meta.saturation == settings.saturation_adu
        assert meta.filter == "r" and meta.telescope == "SIM"
        assert meta.instrument and meta.exptime_s > 0
        assert meta.zero_point == pytest.approx(epoch.zero_point, abs=1e-4)
        assert meta.mjd == pytest.approx(pair.info[name]["mjd"], abs=1e-5)
        # The file's WCS is the header WCS (true + recorded error), to a micro-pixel.
        pix = np.array([[10.0, 20.0], [150.0, 100.0]])
        sky = image.wcs.wcs_pix2world(pix, 0)
        assert np.allclose(epoch.wcs.wcs_world2pix(sky, 0), pix, atol=1e-6)
        assert image.wcs.wcs.ctype[0] == "RA---TAN"
    ref_meta, sci_meta = read_image(dirs[0] / "ref.fits").meta, read_image(dirs[0] / "sci.fits").meta
    assert sci_meta.mjd > ref_meta.mjd
    assert ref_meta.zero_point != sci_meta.zero_point  # the flux ratio is not 1


def test_resume_skips_complete_pairs_and_redoes_incomplete_ones(survey, tmp_path):
    settings = SimSettings(pairs=2, size_px=96, seed=4)
    dirs = write_survey(tmp_path, settings)
    before = {d: (d / "sci.fits").stat().st_mtime_ns for d in dirs}
    (dirs[1] / "pair.json").unlink()  # as if killed before the pair finished
    more = write_survey(tmp_path, settings.model_copy(update={"pairs": 3}))
    assert len(more) == 3
    assert (dirs[0] / "sci.fits").stat().st_mtime_ns == before[dirs[0]]
    assert (dirs[1] / "sci.fits").stat().st_mtime_ns != before[dirs[1]]
    # Other settings make other pairs: nothing is reused.
    write_survey(tmp_path, settings.model_copy(update={"fwhm_range_px": (2.0, 2.5), "pairs": 1}))
    assert (dirs[0] / "sci.fits").stat().st_mtime_ns != before[dirs[0]]


def test_cli_simulate_writes_survey_and_preview(tmp_path):
    result = CliRunner().invoke(app, ["simulate", str(tmp_path / "s"), "--pairs", "1",
                                      "--size", "96", "--seed", "9", "--quiet"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "s" / "sim-s9-0000" / "sci.fits").is_file()
    # The preview (three panels with truth markers) is a real PNG.
    assert (tmp_path / "s" / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(tmp_path / "s") in result.output


@pytest.mark.parametrize("args, flag", [(["--pairs", "0"], "--pairs"), (["--size", "10"], "--size"),
                                        (["--seed", "-1"], "--seed")])
def test_cli_bad_input_is_one_line_and_non_zero(tmp_path, args, flag):
    result = CliRunner().invoke(app, ["simulate", str(tmp_path / "s"), "--no-preview", *args])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {flag}:"), result.output
    assert not (tmp_path / "s").exists()


def test_cli_bad_config_values_are_one_line(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("sim:\n  fwhm_range_px: [3.0, 2.0]\n")
    result = CliRunner().invoke(app, ["simulate", str(tmp_path / "s"), "-c", str(config), "-q"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "error: sim.fwhm_range_px: low end 3.0 is above high end 2.0"]
