"""Downloads of real FITS files from a loopback server that misbehaves on purpose."""

from __future__ import annotations

import hashlib
import json

import pandas as pd
import pytest

from astrid.archive.download import download_pairs, pair_paths
from astrid.config import ArchiveSettings

FILES = {  # url name -> file in diffpairs/decam/input_data
    "ref_a.fits": "DEC-OBS18a.mini.fits", "sci_a.fits": "DEC-OBS04a.mini.fits",
    "ref_b.fits": "DEC-OBS18b.mini.fits", "sci_b.fits": "DEC-OBS04b.mini.fits",
    "ref_c.fits": "DEC-OBS18c.mini.fits", "sci_c.fits": "DEC-OBS04c.mini.fits",
    "kernel.fits": "DEC-OBS04d.MatchKernel.fits", "ref_r.fits": "DEC-OBS18e.mini.fits",
}
# The DECam cutouts kept the CHECKSUM/DATASUM cards of their parent CCD frame, which no longer
# match their bytes: card checks are off here and tested on their own below.
SETTINGS = ArchiveSettings(retries=2, backoff_s=0.01, connections=4, timeout_s=10,
                           verify_fits_checksum=False)


@pytest.fixture
def served(file_server, shared_data):
    folder = shared_data("diffpairs", "decam", "input_data")
    for url_name, name in FILES.items():
        file_server.files[f"/files/{url_name}"] = (folder / name).read_bytes()
    return file_server


def _pairs(server, rows):
    out = []
    for sn, status, ref, sci, extra in rows:
        out.append({"sn": sn, "mission": "DECAM", "filter": "i", "status": status,
                    "reason": "", "ref_obsid": f"{sn}-r", "sci_obsid": f"{sn}-s",
                    "ref_url": f"{server.url}/files/{ref}", "sci_url": f"{server.url}/files/{sci}",
                    **extra})
    return pd.DataFrame(out)


def _sha(server, name):
    return "sha256:" + hashlib.sha256(server.files[f"/files/{name}"]).hexdigest()


def test_failures_end_verified_or_reported_and_rerun_fetches_nothing_verified(served, tmp_path):
    s = served
    s.failures["/files/ref_a.fits"] = [503]
    s.failures["/files/sci_a.fits"] = ["truncate"]          # resumed with Range
    s.failures["/files/ref_b.fits"] = ["drop"]
    s.failures["/files/sci_b.fits"] = ["corrupt"]           # caught by the checksum, refetched
    s.failures["/files/ref_c.fits"] = ["truncate"]          # server ignores Range: restart
    s.no_range.add("/files/ref_c.fits")
    s.failures["/files/sci_c.fits"] = ["corrupt"] * 3       # wrong every time: failed
    pairs = _pairs(s, [
        ("sn_a", "paired", "ref_a.fits", "sci_a.fits",
         {"ref_size": len(s.files["/files/ref_a.fits"])}),
        ("sn_b", "paired", "ref_b.fits", "sci_b.fits", {"sci_checksum": _sha(s, "sci_b.fits")}),
        ("sn_c", "paired", "ref_c.fits", "sci_c.fits", {"sci_checksum": _sha(s, "sci_c.fits")}),
        ("sn_d", "paired", "ref_r.fits", "kernel.fits", {}),  # kernel image: no WCS
        ("sn_e", "rejected", "ref_r.fits", "sci_a.fits", {}),
    ])
    root = tmp_path / "root"
    result = download_pairs(pairs, root, SETTINGS)
    status = result.files.set_index(result.files["path"].str.replace(str(root) + "/", ""))["status"]
    assert status["sn_c/DECAM_i/sci/sci_c.fits"] == "failed"
    assert status["sn_d/DECAM_i/sci/kernel.fits"] == "failed"
    assert (status.drop(["sn_c/DECAM_i/sci/sci_c.fits", "sn_d/DECAM_i/sci/kernel.fits"])
            == "verified").all()
    assert len(status) == 8  # the rejected pair is never downloaded
    reasons = result.files.set_index("status")["reason"]
    assert "sha256 checksum mismatch" in result.files.loc[
        result.files["path"].str.endswith("sci_c.fits"), "reason"].iloc[0]
    assert "no celestial WCS" in result.files.loc[
        result.files["path"].str.endswith("kernel.fits"), "reason"].iloc[0]
    assert len(reasons) == 8
    # verified files are byte-identical to the served ones; failed ones are nowhere
    for name in ("ref_a", "sci_a", "ref_b", "sci_b", "ref_c"):
        sn = "sn_" + name[-1]
        path = root / sn / "DECAM_i" / name[:3] / f"{name}.fits"
        assert path.read_bytes() == s.files[f"/files/{name}.fits"]
    assert not (root / "sn_c" / "DECAM_i" / "sci" / "sci_c.fits").exists()
    assert pair_paths(pairs.iloc[0], root) == (root / "sn_a/DECAM_i/ref/ref_a.fits",
                                               root / "sn_a/DECAM_i/sci/sci_a.fits")
    assert not list(root.rglob("*.part"))
    ranges = [r["range"] for r in s.requests if r["path"] == "/files/sci_a.fits"]
    assert ranges[0] is None and ranges[1].startswith("bytes=") and ranges[1] != "bytes=0-"
    # rerun: nothing verified is fetched again; the failed one is tried again
    s.requests.clear()
    again = download_pairs(pairs, root, SETTINGS)
    assert {r["path"] for r in s.requests} <= {"/files/sci_c.fits", "/files/kernel.fits"}
    assert (again.files["status"] == "cached").sum() == 6
    assert again.files.loc[again.files["path"].str.endswith("sci_c.fits"), "status"].iloc[0] == "verified"


def test_manifest_is_merged_not_overwritten(served, tmp_path):
    s = served
    root = tmp_path / "root"
    first = _pairs(s, [("sn_a", "paired", "ref_a.fits", "sci_a.fits", {})])
    second = _pairs(s, [("sn_b", "paired", "ref_b.fits", "sci_b.fits", {})])
    download_pairs(first, root, SETTINGS)
    download_pairs(second, root, SETTINGS)
    manifest = json.loads((root / "manifest.json").read_text())
    names = sorted(p["path"].rsplit("/", 1)[-1] for p in manifest["files"])
    assert names == ["ref_a.fits", "ref_b.fits", "sci_a.fits", "sci_b.fits"]
    assert all(len(p["sha256"]) == 64 for p in manifest["files"])
    assert manifest["provenance"]["astrid_version"]


def test_a_tampered_file_is_fetched_again(served, tmp_path):
    s = served
    root = tmp_path / "root"
    pairs = _pairs(s, [("sn_a", "paired", "ref_a.fits", "sci_a.fits", {})])
    download_pairs(pairs, root, SETTINGS)
    target = root / "sn_a" / "DECAM_i" / "ref" / "ref_a.fits"
    target.write_bytes(target.read_bytes()[:-2880])  # lose the last FITS block
    s.requests.clear()
    result = download_pairs(pairs, root, SETTINGS)
    assert [r["path"] for r in s.requests] == ["/files/ref_a.fits"]
    assert target.read_bytes() == s.files["/files/ref_a.fits"]
    assert sorted(result.files["status"]) == ["cached", "verified"]


def test_cli_download_reports_failures_in_one_line(served, tmp_path):
    from typer.testing import CliRunner

    from astrid.cli import app

    s = served
    pairs = _pairs(s, [("sn_a", "paired", "ref_a.fits", "missing.fits", {})])
    path = tmp_path / "pairs.csv"
    pairs.to_csv(path, index=False)
    config = tmp_path / "cfg.yaml"
    config.write_text("archive:\n  retries: 1\n  backoff_s: 0.01\n  verify_fits_checksum: false\n")
    result = CliRunner().invoke(app, ["download", str(path), "-o", str(tmp_path / "root"),
                                      "--config", str(config), "--quiet"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("error: 1 downloads failed") and "HTTP 404" in lines[-1]
    assert (tmp_path / "root" / "sn_a" / "DECAM_i" / "ref" / "ref_a.fits").exists()


def test_fits_checksum_cards_catch_corruption(served, tmp_path):
    from astropy.io import fits

    s = served
    # real stale cards (cutouts of a larger frame) are reported, not trusted
    pairs = _pairs(s, [("sn_a", "paired", "ref_a.fits", "sci_a.fits", {})])
    strict = SETTINGS.model_copy(update={"verify_fits_checksum": True, "retries": 0})
    result = download_pairs(pairs, tmp_path / "stale", strict)
    assert (result.files["status"] == "failed").all()
    assert result.files["reason"].str.startswith("FITS DATASUM of HDU 0 does not match").all()
    # the same image written with valid cards: corrupted bytes of the same size are caught by
    # DATASUM alone (no archive checksum given) and fetched again
    good = tmp_path / "good.fits"
    with fits.open(shared_path(s, "ref_a.fits")) as hdul:
        hdul.writeto(good, checksum=True)
    s.files["/files/good.fits"] = good.read_bytes()
    s.failures["/files/good.fits"] = ["corrupt"]
    pairs = _pairs(s, [("sn_g", "paired", "good.fits", "sci_b.fits", {})])
    result = download_pairs(pairs, tmp_path / "root", SETTINGS.model_copy(
        update={"verify_fits_checksum": True}))
    row = result.files[result.files["path"].str.endswith("good.fits")].iloc[0]
    assert row["status"] == "verified" and row["attempts"] == 2


def shared_path(server, name):
    """Write a served file to a temporary FITS path for astropy to open."""
    import tempfile

    handle = tempfile.NamedTemporaryFile(suffix=".fits", delete=False)
    handle.write(server.files[f"/files/{name}"])
    handle.close()
    return handle.name
