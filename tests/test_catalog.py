"""Supernova catalogs: the real sncat dump, Open Supernova Catalog, ZTF BTS, TNS and plain CSVs."""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd
import pytest

from astrid.catalog import filter_catalog, parse_angle, parse_date, read_catalog
from astrid.errors import AstridError, InputFileError


@functools.lru_cache(maxsize=4)
def _read(path, require_date=True):
    """Read each real catalog once per session (they are large); tests do not modify it."""
    return read_catalog(path, require_date=require_date)


@functools.lru_cache(maxsize=1)
def _raw_sncat(path):
    """sn_name -> (ra text, dec text, disc_date text) straight from the pipe-delimited dump."""
    lines = path.read_text().splitlines()
    header = [h.strip() for h in lines[0].split("|")]
    ra_i, dec_i, date_i = header.index("sn_ra"), header.index("sn_dec"), header.index("disc_date")
    out = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.split("|")]
        out[cells[0]] = (cells[ra_i], cells[dec_i], cells[date_i])
    return out


def test_sncat_all_rows_with_blank_after_sign_declinations(shared_data):
    path = shared_data("catalogs", "sncat_compiled.txt")
    raw = _raw_sncat(path)
    cat = _read(path, require_date=False)
    assert len(cat.table) == 6539 and len(raw) == 6539
    assert cat.rejected.empty
    table = cat.table.set_index("name")
    # Hand-computed: 16h29m46.09s = 247.442042 deg, +8d38m30.6s = 8.641833 deg.
    assert table.loc["2014dl", "ra_deg"] == pytest.approx(247.4420417, abs=1e-6)
    assert table.loc["2014dl", "dec_deg"] == pytest.approx(8.6418333, abs=1e-6)
    assert table.loc["2014dm", "dec_deg"] == pytest.approx(-(8 + 49 / 60 + 37.0 / 3600), abs=1e-6)
    # '- 0 04 47.5': the sign belongs to a zero-degree value
    assert table.loc["1946B", "dec_deg"] == pytest.approx(-(4 / 60 + 47.5 / 3600), abs=1e-6)
    # every '± D MM SS' declination (the 37% the old parser lost) is within 10 deg, sign kept
    blank_form = [n for n, (_, dec, _) in raw.items() if dec[:2] in ("+ ", "- ")]
    assert len(blank_form) == 2398
    decs = table.loc[blank_form, "dec_deg"].to_numpy()
    assert np.all(np.abs(decs) < 10)
    signs = np.array([-1 if raw[n][1].startswith("-") else 1 for n in blank_form])
    nonzero = decs != 0
    assert np.all(np.sign(decs[nonzero]) == signs[nonzero])
    assert table["ra_deg"].between(0, 360).all() and table["dec_deg"].between(-90, 90).all()
    assert table.loc["2014dl", "disc_date"] == "2014-09-25"
    assert table.loc["2014dl", "disc_mjd"] == 56925.0  # 2014-09-25 = MJD 56925


def test_sncat_undated_rows_are_rejected_with_reason_by_default(shared_data):
    path = shared_data("catalogs", "sncat_compiled.txt")
    cat = _read(path)
    undated = sum(1 for _, _, d in _raw_sncat(path).values() if not d)
    assert undated == 86
    assert len(cat.table) == 6539 - undated
    assert (cat.rejected["reason"] == "no discovery date").sum() == undated
    assert "1946B" in set(cat.rejected["name"])
    assert "86 rows rejected" in cat.summary()


def test_open_supernova_catalog_loads_and_counts_rejections(shared_data):
    path = shared_data("catalogs", "oac_open_supernova_catalog_2022-07-31.csv.gz")
    cat = read_catalog(path)
    assert cat.format == "oac"
    assert len(cat.table) + len(cat.rejected) == 99546
    reasons = cat.rejected["reason"].value_counts()
    assert reasons["RA is missing"] == 3732
    assert reasons["no discovery date"] > 0
    assert reasons["discovery date has only a year"] > 0
    sn = cat.table.set_index("name").loc["SN2011fe"]
    assert sn["ra_deg"] == pytest.approx(210.774, abs=0.01)
    assert sn["dec_deg"] == pytest.approx(54.274, abs=0.01)
    assert sn["disc_date"] == "2011-08-24"
    assert sn["type"].startswith("Ia")
    # rejected rows point at real file lines: line 2 is the first data row
    first = cat.rejected.iloc[0]
    assert first["line"] >= 2


def test_ztf_bts_dates_from_peak_minus_rise(shared_data):
    cat = _read(shared_data("catalogs", "ztf_bts_explorer_2022-09-01.csv"))
    assert cat.format == "bts"
    sn = cat.table.set_index("name").loc["SN2018bfx"]
    assert sn["ra_deg"] == pytest.approx((13 + 18 / 60 + 6.62 / 3600) * 15, abs=1e-6)
    assert sn["dec_deg"] == pytest.approx(27 + 52 / 60 + 24.2 / 3600, abs=1e-6)
    # peakt = JD - 2458000 = 245.71 -> MJD 58245.21; rise 18.904 d
    assert sn["peak_mjd"] == pytest.approx(58245.21, abs=1e-6)
    assert sn["disc_mjd"] == pytest.approx(58245.21 - 18.904, abs=1e-6)
    assert sn["type"] == "Ia"
    # objects without an IAU name keep their ZTF id
    assert cat.table["name"].str.startswith("ZTF").any()
    # an object listed twice (BTS types the second 'duplicate') is kept once, the other reported
    assert cat.table["name"].is_unique
    dup = cat.rejected[cat.rejected["name"] == "SN2018euz"]
    assert len(dup) == 1 and dup["reason"].iloc[0].startswith("duplicate of line ")
    assert len(cat.table) + len(cat.rejected) == 5417


TNS_EXPORT = '''"ID","Name","RA","DEC","Obj. Type","Redshift","Host Name","Host Redshift","Discovery Mag/Flux","Discovery Filter","Discovery Date (UT)"
"130761","SN 2023ixf","14:03:38.562","+54:18:41.94","SN II","0.000804","M101","","14.9","Clear-","2023-05-19 17:27:15.000"
"80279","SN 2011fe","14:03:05.733","+54:16:25.18","SN Ia","0.000804","M101","","17.35","g","2011-08-24 03:00:00"
"99999","AT 2099zz","","","","","","","","",""
'''


def test_tns_export(tmp_path):
    path = tmp_path / "tns_search.csv"
    path.write_text(TNS_EXPORT)
    cat = read_catalog(path)
    assert cat.format == "tns"
    assert list(cat.table["name"]) == ["SN 2023ixf", "SN 2011fe"]
    ixf = cat.table.iloc[0]
    assert ixf["ra_deg"] == pytest.approx((14 + 3 / 60 + 38.562 / 3600) * 15, abs=1e-7)
    assert ixf["dec_deg"] == pytest.approx(54 + 18 / 60 + 41.94 / 3600, abs=1e-7)
    # 2023-05-19 = MJD 60083; 17:27:15 = 0.727257 d
    assert ixf["disc_mjd"] == pytest.approx(60083 + (17 * 3600 + 27 * 60 + 15) / 86400, abs=1e-6)
    assert ixf["disc_date"] == "2023-05-19T17:27:15"
    assert ixf["type"] == "II" and ixf["host"] == "M101"
    assert list(cat.rejected["line"]) == [4]
    assert cat.rejected["reason"].iloc[0] == "RA is missing"
    # the normalised table written out reads back as the same table
    out = tmp_path / "normalised.csv"
    cat.table.to_csv(out, index=False)
    again = read_catalog(out).table
    cols = ["name", "ra_deg", "dec_deg", "disc_date", "disc_mjd", "type", "host", "redshift"]
    pd.testing.assert_frame_equal(again[cols], cat.table[cols], check_dtype=False)


def test_plain_csv_aliases_degrees_and_sexagesimal(tmp_path):
    degrees = tmp_path / "mine.csv"
    degrees.write_text("sn,RA,Dec,date,z\n2011fe,210.774208,54.273722,55797,0.0008\n")
    sexa = tmp_path / "mine2.csv"
    sexa.write_text("Name,ra,dec,discovery_date\n2011fe,14 03 05.81,+54 16 25.4,2011-08-24\n")
    a, b = read_catalog(degrees).table.iloc[0], read_catalog(sexa).table.iloc[0]
    assert a["disc_mjd"] == b["disc_mjd"] == 55797.0
    assert a["ra_deg"] == pytest.approx(b["ra_deg"], abs=1e-5)
    assert a["dec_deg"] == pytest.approx(b["dec_deg"], abs=1e-5)
    assert a["redshift"] == pytest.approx(0.0008)


def test_catalog_without_usable_rows_is_a_one_line_error(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("name,ra,dec,date\nx,25:00:00,+91:00:00,2011-02-30\ny,,,\n")
    with pytest.raises(InputFileError) as err:
        read_catalog(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "no usable" in message
    nocols = tmp_path / "nocols.csv"
    nocols.write_text("a,b\n1,2\n")
    with pytest.raises(InputFileError, match="no ra/dec column|no name/ra/dec column"):
        read_catalog(nocols)


@pytest.mark.parametrize("text, hours, expected", [
    ("+ 8 38 30.6", False, 8 + 38 / 60 + 30.6 / 3600),
    ("- 0 04 47.5", False, -(4 / 60 + 47.5 / 3600)),
    ("-00:35:27.4", False, -(35 / 60 + 27.4 / 3600)),
    ("12h30m49.42s", True, (12 + 30 / 60 + 49.42 / 3600) * 15),
    ("16:16:34.06,16:16:34.08", True, (16 + 16 / 60 + 34.06 / 3600) * 15),
    ("-62:35", False, -(62 + 35 / 60)),
    ("187.70593", True, 187.70593),
])
def test_parse_angle(text, hours, expected):
    value, problem = parse_angle(text, hours=hours)
    assert problem == ""
    assert value == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("text, problem", [
    ("24 00 00", "is out of range"), ("+91 00 00", "is out of range"),
    ("12 61 00", "has minutes or seconds >= 60"), ("abc", "is not an angle")])
def test_parse_angle_problems(text, problem):
    assert parse_angle(text, hours=not text.startswith("+"))[1] == problem


def test_parse_date_forms_and_problems():
    assert parse_date("2011/08/24")[0] == 55797.0
    assert parse_date("2455797.5")[0] == 55797.0  # JD
    assert parse_date("2011-08-24.25")[0] == pytest.approx(55797.25)
    assert parse_date("1054/07/04")[1] == "1054-07-04"
    assert parse_date("2011")[2] == "has only a year"
    assert parse_date("2011/08")[2] == "has only a year and month"
    assert parse_date("2011-02-30")[2] == "is not a calendar day"


def test_filters(shared_data):
    cat = _read(shared_data("catalogs", "sncat_compiled.txt"))
    out = filter_catalog(cat, date_min="2010-01-01", date_max=56000, types=["Ia"],
                         dec_min_deg=-10, dec_max_deg=10)
    t = out.table
    assert len(t) > 0
    assert t["disc_mjd"].between(55197, 56000).all()  # 2010-01-01 = MJD 55197
    assert t["type"].str.startswith("Ia").all() and t["dec_deg"].between(-10, 10).all()
    assert len(filter_catalog(cat, limit=5).table) == 5
    with pytest.raises(AstridError):
        filter_catalog(cat, date_min="soon")


def test_cli_catalog_writes_table_and_reports(tmp_path, shared_data):
    from typer.testing import CliRunner

    from astrid.cli import app

    out = tmp_path / "sne.csv"
    source = shared_data("catalogs", "ztf_bts_explorer_2022-09-01.csv")
    result = CliRunner().invoke(app, ["catalog", str(source), "-o", str(out), "--type", "II",
                                      "--limit", "20", "--date-min", "2020-01-01"])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out)
    assert len(table) == 20 and table["type"].str.startswith("II").all()
    assert (table["disc_mjd"] >= 58849).all()  # 2020-01-01 = MJD 58849
    n = len(_read(source).table)
    assert f"{n} supernovae" in result.output and f"selected 20 of {n}" in result.output
    assert len(pd.read_csv(tmp_path / "sne.rejected.csv")) == 5417 - n > 0
    assert (tmp_path / "sne.csv.provenance.json").exists()
    bad = tmp_path / "empty.csv"
    bad.write_text("name,ra,dec,date\n")
    result = CliRunner().invoke(app, ["catalog", str(bad)])
    assert result.exit_code == 1
    assert result.output.strip().count("\n") == 0 and "empty.csv" in result.output
