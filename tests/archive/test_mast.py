"""MAST queries through astroquery against real recorded MAST responses on a loopback server."""

from __future__ import annotations

import socket

import pandas as pd
import pytest

from astrid.archive.mast import (
    ArchiveUnreachable,
    query_observations,
    read_observations,
    time_windows,
)
from astrid.config import ArchiveSettings
from astrid.errors import ConfigError

SN_2011FE = {"name": "2011fe", "ra_deg": 210.774208, "dec_deg": 54.273722}


def _settings(url: str, **extra) -> ArchiveSettings:
    return ArchiveSettings(missions=["GALEX"], mast_url=url, requests_per_s=200, backoff_s=0.01,
                           **extra)


def _catalog(disc_mjd: float) -> pd.DataFrame:
    return pd.DataFrame([{**SN_2011FE, "disc_mjd": disc_mjd}])


def test_windows_are_sent_in_the_query_and_rows_come_back(mast_server, tmp_path):
    settings = _settings(mast_server.url)
    result = query_observations(_catalog(54530.0), settings, tmp_path / "cache")
    searches = [r for r in mast_server.requests if r["service"] == "Mast.Caom.Filtered.Position"]
    assert len(searches) == 2
    windows = time_windows(54530.0, settings)
    sent = [{f["paramName"]: f["values"] for f in r["params"]["filters"]} for r in searches]
    assert [s["t_min"][0] for s in sent] == [
        {"min": windows["ref"][0], "max": windows["ref"][1]},
        {"min": windows["sci"][0], "max": windows["sci"][1]}]
    # a reference must also end before the gap; a science image may end any time
    assert sent[0]["t_max"][0] == {"min": windows["ref"][0], "max": windows["ref"][1]}
    assert "t_max" not in sent[1]
    for s in sent:
        assert s["dataproduct_type"] == ["image"] and s["obs_collection"] == ["GALEX"]
        assert s["calib_level"] == ["2", "3"]
    ra, dec, radius_deg = (float(v) for v in searches[0]["params"]["position"].split(","))
    assert (ra, dec) == (SN_2011FE["ra_deg"], SN_2011FE["dec_deg"])
    assert radius_deg == pytest.approx(30 / 3600)
    obs = result.observations
    # of the 12 recorded rows 8 start before 54500, 2 in the science window (54560.3); the
    # 2 at 54953.9 are past it
    assert (obs["window"] == "ref").sum() == 8 and (obs["window"] == "sci").sum() == 2
    assert set(obs.loc[obs["window"] == "sci", "obsid"]) == {"1000004218"}
    assert result.errors.empty
    # the product list for these obsids holds no GALEX file: said so, not invented
    assert (obs["product_reason"] == "no products listed").all()
    # cached: a second run asks MAST nothing
    before = len(mast_server.requests)
    again = query_observations(_catalog(54530.0), settings, tmp_path / "cache")
    assert len(mast_server.requests) == before
    pd.testing.assert_frame_equal(again.observations, obs)


def test_transient_errors_are_retried(mast_server, tmp_path):
    mast_server.failures = [503, "drop"]
    result = query_observations(_catalog(54530.0), _settings(mast_server.url), tmp_path,
                                products=False)
    assert result.errors.empty
    assert len(result.observations) == 10


def test_archive_error_is_an_error_row_never_data(mast_server, tmp_path):
    # more 503s than retries for the reference query; the science query then succeeds
    settings = _settings(mast_server.url, retries=1)
    mast_server.failures = [503, 503]
    result = query_observations(_catalog(54530.0), settings, tmp_path, products=False)
    assert result.errors[["sn", "window"]].values.tolist() == [["2011fe", "ref"]]
    assert "503" in result.errors["error"].iloc[0]
    assert set(result.observations["window"]) == {"sci"}
    # MAST's own error answer (HTTP 200, status ERROR) is an error row too
    mast_server.invoke_failures = [True]
    other = query_observations(_catalog(54530.0), settings, tmp_path / "other", products=False)
    assert other.errors["error"].tolist() == [
        "RemoteServiceError: Request timed out on the server"]
    assert set(other.observations["window"]) == {"sci"}
    # the failure was not cached: a rerun asks again and gets the data
    rerun = query_observations(_catalog(54530.0), settings, tmp_path, products=False)
    assert rerun.errors.empty and (rerun.observations["window"] == "ref").sum() == 8


def test_unreachable_archive_stops_with_partial_results(tmp_path):
    with socket.socket() as sock:  # a port with nothing listening
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    catalog = pd.DataFrame([{**SN_2011FE, "name": f"sn{i}", "disc_mjd": 54530.0} for i in range(5)])
    with pytest.raises(ArchiveUnreachable) as err:
        query_observations(catalog, _settings(url, retries=0), tmp_path)
    assert "unreachable" in str(err.value) and "\n" not in str(err.value)
    assert list(err.value.partial.errors["sn"].unique()) == ["sn0", "sn1", "sn2"]
    assert err.value.partial.observations.empty


def test_undated_supernova_and_unknown_mission(mast_server, tmp_path):
    catalog = pd.DataFrame([{**SN_2011FE, "disc_mjd": float("nan")}])
    result = query_observations(catalog, _settings(mast_server.url), tmp_path)
    assert result.errors["error"].tolist() == ["no discovery date"]
    assert mast_server.requests == []
    with pytest.raises(ConfigError, match="unknown mission 'GALAXY'"):
        query_observations(catalog, _settings(mast_server.url).model_copy(
            update={"missions": ["GALAXY"]}), tmp_path)


def test_cli_query_then_pairs(mast_server, tmp_path):
    from typer.testing import CliRunner

    from astrid.cli import app

    catalog = tmp_path / "sne.csv"
    catalog.write_text("name,ra,dec,disc_date\n2011fe,14:03:05.81,+54:16:25.4,2008-02-29\n")
    config = tmp_path / "cfg.yaml"
    config.write_text(f"archive:\n  missions: [GALEX]\n  mast_url: {mast_server.url}\n"
                      f"  requests_per_s: 200\n  cache_dir: {tmp_path / 'cache'}\n")
    obs_path = tmp_path / "obs.csv"
    result = CliRunner().invoke(app, ["query", "--catalog", str(catalog), "--config", str(config),
                                      "-o", str(obs_path)])
    assert result.exit_code == 0, result.output
    obs = read_observations(obs_path)
    assert obs["obsid"].map(type).eq(str).all() and len(obs) == 10
    pairs_path = tmp_path / "pairs.csv"
    result = CliRunner().invoke(app, ["pairs", str(obs_path), "--catalog", str(catalog),
                                      "--config", str(config), "-o", str(pairs_path)])
    assert result.exit_code == 0, result.output
    pairs = pd.read_csv(pairs_path)
    assert {"sn", "mission", "filter", "ref_obsid", "sci_obsid", "status", "reason"} <= set(pairs)
    # no GALEX product was listed, so nothing may be paired for download
    assert (pairs["status"] == "rejected").all()
    assert pairs["reason"].str.contains("no usable product").all()
    bad = tmp_path / "bad.yaml"
    bad.write_text("archive:\n  missions: [GALEX]\n  filters: [uw1]\n")
    result = CliRunner().invoke(app, ["query", "--catalog", str(catalog), "--config", str(bad),
                                      "-o", str(obs_path)])
    assert result.exit_code == 1
    assert "unknown filter 'uw1'" in result.output and result.output.strip().count("\n") == 0


def test_filters_from_the_config_go_into_the_query(mast_server, tmp_path):
    settings = _settings(mast_server.url, filters=["nuv"])  # any spelling; sent as MAST's
    result = query_observations(_catalog(54530.0), settings, tmp_path, products=False)
    sent = {f["paramName"]: f["values"] for f in mast_server.requests[0]["params"]["filters"]}
    assert "NUV" in sent["filters"] and "FUV" not in sent["filters"]
    assert set(result.observations["filters"]) == {"NUV"} and len(result.observations) == 5
