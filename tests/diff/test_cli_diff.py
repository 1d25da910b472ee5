"""``astrid diff REF SCI -o DIR``: outputs, the diff directory round trip, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from astropy.io import fits
from typer.testing import CliRunner

from astrid.cli import app
from astrid.config import SimSettings
from astrid.diff import read_diff_dir
from astrid.diff.io import DIFF_FILES
from astrid.errors import InputFileError
from astrid.sim import simulate_pair

runner = CliRunner()


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    """A simulated 640² pair (transients, artefacts, saturated stars) written as FITS."""
    folder = tmp_path_factory.mktemp("pair")
    pair = simulate_pair(SimSettings(size_px=640, seed=5), 1)
    fits.PrimaryHDU(pair.ref.data, pair.ref.header).writeto(folder / "ref.fits")
    fits.PrimaryHDU(pair.sci.data, pair.sci.header).writeto(folder / "sci.fits")
    return folder / "ref.fits", folder / "sci.fits", pair


@pytest.fixture(scope="module")
def diff_dir(pair_files, tmp_path_factory):
    ref, sci, _ = pair_files
    out = tmp_path_factory.mktemp("run") / "diff"
    result = runner.invoke(app, ["diff", str(ref), str(sci), "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    return out, result.output


def _error_line(result) -> str:
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_writes_the_diff_directory(diff_dir, pair_files):
    out, stdout = diff_dir
    for name in DIFF_FILES:
        assert (out / name).exists(), name
    assert "candidates" in stdout and "noise ratio" in stdout and "elapsed" in stdout
    quality = json.loads((out / "quality.json").read_text())
    for key in ("noise_ratio", "star_residual_chi2", "alignment_rms_px", "overlap", "fwhm_ref",
                "fwhm_sci", "flux_ratio", "n_candidates", "elapsed_s", "timings_s"):
        assert key in quality
    assert quality["provenance"]["inputs"] == [str(p) for p in pair_files[:2]]
    assert quality["provenance"]["config_hash"]
    with fits.open(out / "scorr.fits") as hdul:
        assert hdul[0].header["ASTRIDV"]
        assert hdul[0].header["CFGHASH"] == quality["provenance"]["config_hash"]
        assert [h.name for h in hdul] == ["PRIMARY", "FLUX", "FLUX_ERR"]
    # Files in the directory are the ones quality.json vouches for.
    from astrid.provenance import file_sha256
    for name, digest in quality["files_sha256"].items():
        assert file_sha256(out / name) == digest


def test_diff_directory_round_trip(diff_dir, pair_files):
    out, _ = diff_dir
    result, cands = read_diff_dir(out)
    pair = pair_files[2]
    assert result.scorr.shape == pair.sci.data.shape
    assert result.mask.dtype == np.uint8
    assert result.wcs is not None
    assert result.psf_sci.shape == result.psf_ref.shape
    assert len(cands) == result.quality["n_candidates"]
    assert {"x", "y", "ra", "dec", "snr", "flux", "flux_err", "sign"} <= set(cands.columns)
    # Candidates sit on S_corr peaks above the threshold: snr is the peak |S_corr| next to
    # the (sub-pixel) position.
    for x, y, snr in cands[["x", "y", "snr"]].to_numpy():
        ix, iy = int(round(x)), int(round(y))
        near = np.abs(result.scorr[max(iy - 1, 0):iy + 2, max(ix - 1, 0):ix + 2])
        assert np.nanmax(near) >= snr - 1e-3 and snr >= 5.0
    # The bright real transients of the simulation are in the table.
    from scipy.spatial import cKDTree
    real = pair.truth[pair.truth.is_real & (pair.truth.snr >= 10)]
    if len(real):
        dist, _ = cKDTree(cands[["x", "y"]].to_numpy()).query(real[["x", "y"]].to_numpy())
        assert (dist < 1.5).all()


def test_incomplete_directory_is_refused(tmp_path):
    (tmp_path / "diff.fits").write_bytes(b"")
    with pytest.raises(InputFileError, match="incomplete"):
        read_diff_dir(tmp_path)


def test_gaussian_method_and_threshold(pair_files, diff_dir, tmp_path):
    ref, sci, _ = pair_files
    out = tmp_path / "g"
    result = runner.invoke(app, ["diff", str(ref), str(sci), "-o", str(out), "--method",
                                 "gaussian", "--threshold", "8", "-q"])
    assert result.exit_code == 0, result.output
    quality = json.loads((out / "quality.json").read_text())
    assert quality["method"] == "gaussian"
    _, cands = read_diff_dir(out)
    assert (cands.snr >= 8).all()
    bad = runner.invoke(app, ["diff", str(ref), str(sci), "-o", str(out), "--method", "hotpants"])
    assert bad.exit_code != 0
    assert "Traceback" not in bad.output


def _write(path, data, header=None):
    fits.PrimaryHDU(np.asarray(data, np.float32), header).writeto(path)
    return path


def test_bad_inputs_each_give_one_line(pair_files, tmp_path):
    ref, sci, pair = pair_files
    out = str(tmp_path / "out")
    cases = []
    cases.append(([str(tmp_path / "missing.fits"), str(sci)], "missing.fits"))
    small = _write(tmp_path / "small.fits", np.ones((40, 40)))
    cases.append(([str(ref), str(small)], "at least 64 px"))
    nan = _write(tmp_path / "nan.fits", np.full((128, 128), np.nan))
    cases.append(([str(nan), str(sci)], "no valid pixels"))
    header = pair.ref.header.copy()
    header["CRVAL1"] = (header["CRVAL1"] + 2.0) % 360
    far = _write(tmp_path / "far.fits", pair.ref.data, header)
    cases.append(([str(far), str(sci)], "overlap"))
    noise = np.random.default_rng(0).normal(500, 10, pair.sci.data.shape)
    blank = _write(tmp_path / "blank.fits", noise, pair.sci.header)
    cases.append(([str(ref), str(blank)], "no stars"))
    header = pair.ref.header.copy()
    header["FILTER"] = "g"
    g_band = _write(tmp_path / "g.fits", pair.ref.data, header)
    cases.append(([str(g_band), str(sci)], "--allow-filter-mismatch"))
    for args, expected in cases:
        result = runner.invoke(app, ["diff", *args, "-o", out, "-q"])
        assert result.exit_code == 1, (args, result.output)
        assert expected in _error_line(result), result.output
    assert not (tmp_path / "out" / "quality.json").exists()

    allowed = runner.invoke(app, ["diff", str(g_band), str(sci), "-o", out, "-q",
                                  "--allow-filter-mismatch"])
    assert allowed.exit_code == 0, allowed.output
    assert "warning:" in allowed.output and "filter" in allowed.output
