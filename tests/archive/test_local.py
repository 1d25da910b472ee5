"""A folder of FITS images as an archive: index, pair and 'download' (verify and link)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from astrid.archive import contains, download_pairs, index_folder, make_pairs, parse_s_region
from astrid.config import ArchiveSettings
from astrid.errors import InputFileError
from astrid.fitsio import read_image, write_image


@pytest.fixture
def decam(shared_data):
    return shared_data("diffpairs", "decam", "input_data")


def test_simulated_survey_layout_pairs_without_a_catalog(decam, tmp_path):
    # OUT/<pair_id>/{ref,sci}.fits, as astrid.sim writes it (links to real DECam cutouts)
    for pair_id, letter in (("pair000", "a"), ("pair001", "b")):
        (tmp_path / pair_id).mkdir()
        (tmp_path / pair_id / "ref.fits").symlink_to(decam / f"DEC-OBS18{letter}.mini.fits")
        (tmp_path / pair_id / "sci.fits").symlink_to(decam / f"DEC-OBS04{letter}.mini.fits")
    (tmp_path / "pair001" / "kernel.fits").symlink_to(decam / "DEC-OBS04b.MatchKernel.fits")
    obs = index_folder(tmp_path)
    assert len(obs) == 4
    assert obs.attrs["problems"]["reason"].tolist() == ["no celestial WCS in the image header"]
    assert set(obs["target_name"]) == {"pair000", "pair001"}
    assert set(obs["role_hint"]) == {"ref", "sci"}
    assert (obs["filters"] == "i").all()
    image = read_image(decam / "DEC-OBS18a.mini.fits")
    assert obs["t_min"].iloc[0] == pytest.approx(image.meta.mjd)
    # the footprint from the WCS holds the image centre and not a point 1 deg away
    fp = parse_s_region(obs["s_region"].iloc[0])
    assert contains(fp, obs["s_ra"].iloc[0], obs["s_dec"].iloc[0])
    assert not contains(fp, obs["s_ra"].iloc[0], obs["s_dec"].iloc[0] + 1.0)
    pairs = make_pairs(obs, None, ArchiveSettings())
    paired = pairs[pairs["status"] == "paired"]
    assert sorted(paired["sn"]) == ["pair000", "pair001"]
    assert all(u.endswith("ref.fits") for u in paired["ref_url"])
    assert all(u.endswith("sci.fits") for u in paired["sci_url"])
    assert (paired["overlap"] > 0.99).all()
    # 'downloading' a local archive verifies and links into the usual layout
    result = download_pairs(paired, tmp_path / "root", ArchiveSettings())
    assert (result.files["status"] == "verified").all() and len(result.files) == 4
    linked = tmp_path / "root" / "pair000" / "LOCAL_i" / "ref" / "ref.fits"
    assert linked.read_bytes() == (decam / "DEC-OBS18a.mini.fits").read_bytes()


def test_headers_of_a_users_images_pair_with_a_catalog(decam, tmp_path):
    """Swift-like headers (TELESCOP, FILTER spelled two ways) go through the archive pairing."""
    image = read_image(decam / "DEC-OBS18a.mini.fits")
    for name, mjd, band in (("early.fits", 57000.0, "uvw1"), ("late.fits", 58010.0, "UVW1")):
        header = image.header.copy()
        header.update({"TELESCOP": "SWIFT", "INSTRUME": "UVOT", "FILTER": band, "MJD-OBS": mjd,
                       "EXPTIME": 800.0})
        write_image(tmp_path / "mine" / name, image.data, header=header)
    obs = index_folder(tmp_path / "mine")
    assert set(obs["obs_collection"]) == {"SWIFT"}
    ny, nx = image.data.shape
    ra, dec = image.wcs.pixel_to_world_values(nx / 3, ny / 3)
    catalog = pd.DataFrame([{"name": "SN-here", "ra_deg": float(ra), "dec_deg": float(dec),
                             "disc_mjd": 58000.0, "peak_mjd": np.nan},
                            {"name": "SN-elsewhere", "ra_deg": float(ra) + 2, "dec_deg": float(dec),
                             "disc_mjd": 58000.0, "peak_mjd": np.nan}])
    pairs = make_pairs(obs, catalog, ArchiveSettings(missions=["SWIFT"]))
    paired = pairs[pairs["status"] == "paired"]
    assert paired[["sn", "filter"]].values.tolist() == [["SN-here", "UVW1"]]
    assert paired["ref_url"].iloc[0].endswith("early.fits")
    # 0.8 deg away (at Dec -66): near enough to be tested, outside both footprints
    assert pairs.loc[pairs["sn"] == "SN-elsewhere", "reason"].tolist() == [
        "supernova outside the footprint"] * 2


def test_index_errors(tmp_path):
    with pytest.raises(InputFileError, match="not a folder"):
        index_folder(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(InputFileError, match="no FITS files"):
        index_folder(tmp_path)


def test_cli_index_and_pairs(decam, tmp_path):
    from typer.testing import CliRunner

    from astrid.cli import app

    (tmp_path / "pair000").mkdir()
    (tmp_path / "pair000" / "ref.fits").symlink_to(decam / "DEC-OBS18c.mini.fits")
    (tmp_path / "pair000" / "sci.fits").symlink_to(decam / "DEC-OBS04c.mini.fits")
    obs_path = tmp_path / "obs.csv"
    result = CliRunner().invoke(app, ["index", str(tmp_path), "-o", str(obs_path)])
    assert result.exit_code == 0, result.output
    pairs_path = tmp_path / "pairs.csv"
    result = CliRunner().invoke(app, ["pairs", str(obs_path), "-o", str(pairs_path)])
    assert result.exit_code == 0, result.output
    pairs = pd.read_csv(pairs_path)
    assert pairs["status"].tolist() == ["paired"] and pairs["sn"].tolist() == ["pair000"]
