"""``astrid stamps``, ``astrid dataset info|merge|split`` and ``astrid fakes`` from the command line."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from astropy.wcs import WCS
from typer.testing import CliRunner

from astrid.cli import app
from astrid.fitsio import write_image
from astrid.ml.data import load_dataset

SIZE_PX = 160


def _wcs():
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [150.0, 2.0]
    wcs.wcs.crpix = [SIZE_PX / 2, SIZE_PX / 2]
    wcs.wcs.cdelt = [-1 / 3600, 1 / 3600]
    return wcs


def _diff_dir(root, name, seed):
    """A small diff directory as ``astrid diff`` writes it, plus the survey's truth beside it."""
    rng = np.random.default_rng(seed)
    folder = root / "diffs" / name
    folder.mkdir(parents=True)
    yy, xx = np.mgrid[:SIZE_PX, :SIZE_PX]
    sources = [(40.3, 50.6, 1), (120.0, 30.2, 1), (80.0, 140.0, -1), (100.0, 100.0, 1), (5.0, 80.0, 1)]
    diff = rng.normal(0, 1, (SIZE_PX, SIZE_PX))
    for x0, y0, sign in sources:
        diff += sign * 30 * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / 4.0)
    sci = 100 + rng.normal(0, 3, diff.shape) + np.where(diff > 0, diff, 0)
    ref = 100 + rng.normal(0, 2, diff.shape) - np.where(diff < 0, diff, 0)
    header = {"TELESCOP": "SIM", "FILTER": "r", "MJD-OBS": 60000.25}
    from astropy.io import fits

    for fname, data in (("sci.fits", sci), ("ref.fits", ref), ("diff.fits", diff)):
        write_image(folder / fname, data.astype(np.float32), fits.Header(header), wcs=_wcs())
    cands = pd.DataFrame(sources, columns=["x", "y", "sign"])
    cands["snr"] = [12.0, 8.0, 9.0, 6.0, 7.0]
    cands.to_csv(folder / "candidates.csv", index=False)
    (folder / "quality.json").write_text(json.dumps({"noise_ratio": 1.0}))
    truth_dir = root / "survey" / name
    truth_dir.mkdir(parents=True)
    pd.DataFrame({"kind": ["sn", "variable", "cosmic_ray"], "x": [40.0, 80.5, 119.6],
                  "y": [51.0, 140.2, 30.0], "snr": [12.0, 9.0, np.nan], "mag": [20.1, 19.0, np.nan],
                  "is_real": [True, True, False], "sign": [1, -1, 1]}
                 ).to_csv(truth_dir / "truth.csv", index=False)
    pd.DataFrame({"kind": ["star"], "x": [101.0], "y": [100.5]}).to_csv(truth_dir / "static.csv",
                                                                       index=False)
    return folder


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_stamps_builds_labelled_dataset_with_gallery_and_resumes(tmp_path):
    dirs = [_diff_dir(tmp_path, f"pair{k}", k) for k in range(3)]
    out = tmp_path / "ds"
    png = tmp_path / "gallery.png"
    result = _run("stamps", *dirs, "-o", out, "--truth", tmp_path / "survey", "--gallery", png,
                  "--size", 31, "-q")
    assert result.exit_code == 0, result.output
    stamps, meta = load_dataset(out)
    assert stamps.shape == (15, 3, 31, 31)
    first = meta[meta["pair_id"] == "pair0"].reset_index(drop=True)
    assert list(first["kind"]) == ["sn", "cosmic_ray", "variable", "star_residual", "noise"]
    assert list(first["label"]) == [1, 0, 1, 0, 0]
    assert (first["label_source"] == "truth").all()
    assert list(first["edge"]) == [False, False, False, False, True]
    assert first["truth_mag"].iloc[0] == pytest.approx(20.1)
    assert (meta["mission"] == "SIM").all() and (meta["filter"] == "r").all()
    assert np.isfinite(meta["ra"]).all() and meta["mjd"].iloc[0] == pytest.approx(60000.25)
    # pixels are the diff dir's raw pixels, candidate at the centre
    assert np.nanargmax(stamps[0][2]) == 15 * 31 + 15
    assert png.exists() and png.stat().st_size > 5_000

    again = _run("stamps", *dirs, "-o", out, "--truth", tmp_path / "survey", "--size", 31, "-q")
    assert again.exit_code == 0 and "3 already there" in again.output
    assert len(load_dataset(out)[0]) == 15

    info = _run("dataset", "info", out)
    assert info.exit_code == 0 and "15 triplets of 31x31" in info.output

    split = _run("dataset", "split", out, "--by", "pair_id", "--fractions", "0.34,0.33,0.33",
                 "--seed", 1)
    assert split.exit_code == 0, split.output
    _, meta = load_dataset(out)
    assert (meta.groupby("pair_id")["split"].nunique() == 1).all()
    assert set(meta["split"]) == {"train", "val", "test"}

    other = tmp_path / "ds2"
    assert _run("stamps", _diff_dir(tmp_path, "pair9", 9), "-o", other, "--size", 31, "-q"
                ).exit_code == 0
    _, unlabelled = load_dataset(other)
    assert (unlabelled["label"] == -1).all()  # no truth, no catalogued SN: unlabelled
    merged = _run("dataset", "merge", out, other, "-o", tmp_path / "merged", "-q")
    assert merged.exit_code == 0, merged.output
    assert len(load_dataset(tmp_path / "merged")[0]) == 20


def _one_line_error(result, *fragments):
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output


def test_bad_inputs_give_one_line_errors(tmp_path):
    _one_line_error(_run("stamps", tmp_path / "nowhere", "-o", tmp_path / "ds", "-q"),
                    "nowhere", "no such directory")
    folder = _diff_dir(tmp_path, "p", 0)
    (folder / "candidates.csv").write_text("a,b\n1,2\n")
    _one_line_error(_run("stamps", folder, "-o", tmp_path / "ds", "-q"), "candidates.csv",
                    "missing column")
    folder2 = _diff_dir(tmp_path, "q", 1)
    (folder2 / "diff.fits").write_bytes(b"not fits at all")
    _one_line_error(_run("stamps", folder2, "-o", tmp_path / "ds", "-q"), "diff.fits")
    _one_line_error(_run("stamps", folder2, "-o", tmp_path / "ds", "--size", 30, "-q"), "odd")
    _one_line_error(_run("dataset", "info", tmp_path), "not a triplet dataset")
    _one_line_error(_run("dataset", "split", tmp_path / "none"), "not found")
    good = tmp_path / "good"
    assert _run("stamps", _diff_dir(tmp_path, "r", 2), "-o", good, "--size", 15, "-q").exit_code == 0
    _one_line_error(_run("dataset", "split", good, "--fractions", "0.5,0.5,0.5"), "fractions")
    _one_line_error(_run("dataset", "split", good, "--fractions", "a,b"), "--fractions")
    _one_line_error(_run("dataset", "split", good, "--by", "galaxy"), "galaxy")
    _one_line_error(_run("dataset", "merge", good, good, "-o", tmp_path / "m", "-q"),
                    "already in an earlier input")
    _one_line_error(_run("fakes", tmp_path / "ref.fits", tmp_path / "sci.fits", "-o", tmp_path / "f"),
                    "ref.fits", "file not found")
