"""Filter normalisation, footprints and pairing, including the old bugs as traps.

Observation rows come from real MAST responses recorded by astroquery's test suite
(tests/data/mast/advSearchPos.json: GALEX around M101; caom.json: HST WFPC2) where possible;
Swift and PS1 rows are written out with the column values and file names those archives use.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from astrid.archive import (
    contains,
    make_pairs,
    normalise_filter,
    overlap_fraction,
    parse_s_region,
    science_rank,
    select_products,
)
from astrid.archive.filters import validate_archive_settings
from astrid.config import ArchiveSettings
from astrid.errors import AstridError, ConfigError

MAST_DATA = Path(__file__).resolve().parents[1] / "data" / "mast"
M101_SN = {"name": "SN-M101", "ra_deg": 210.774208, "dec_deg": 54.273722}


def _recorded(name: str) -> pd.DataFrame:
    frame = pd.DataFrame(json.loads((MAST_DATA / name).read_text())["data"])
    frame["obsid"] = frame["obsid"].astype(str)
    return frame


def _catalog(disc_mjd: float, **extra) -> pd.DataFrame:
    return pd.DataFrame([{**M101_SN, "disc_mjd": disc_mjd, "peak_mjd": np.nan, **extra}])


@pytest.mark.parametrize("mission, filters, filename, expected", [
    ("SWIFT", "UVW1", None, "UVW1"), ("SWIFT", "uvw1", None, "UVW1"),
    ("SWIFT", "", "sw00032148001uw1_sk.img.gz", "UVW1"),
    ("SWIFT", None, "sw00032148001um2_sk.img.gz", "UVM2"), ("SWIFT", "uvm2", None, "UVM2"),
    ("SWIFT", None, "sw00032148001uw2_sk.img", "UVW2"), ("SWIFT", "UVW2", None, "UVW2"),
    ("SWIFT", None, "sw00032148001uuu_sk.img.gz", "U"), ("SWIFT", None, "sw00032148001ubb_sk.img.gz", "B"),
    ("SWIFT", None, "sw00032148001uvv_sk.img.gz", "V"),
    ("GALEX", "NUV", None, "NUV"), ("GALEX", "FUV", None, "FUV"),
    ("GALEX", None, "MISDR1_24278_0266-nd-int.fits.gz", "NUV"),
    ("PS1", "", "rings.v3.skycell.1334.061.stk.r.unconv.fits", "r"),
    ("PS1", "g", "rings.v3.skycell.1334.061.stk.i.unconv.fits", "i"),  # the file name decides
    ("PS1", None, "rings.v3.skycell.1334.061.wrp.z.55555_12345.fits", "z"),
    ("PS1", None, "rings.v3.skycell.1334.061.stk.unconv.fits", None),  # 'g' in 'rings' is no band
    ("HST", "F814W", None, "F814W"), ("HST", "F814W;CLEAR2L", None, "F814W"),
    ("HST", "CLEAR1L;F555W", None, "F555W"), ("HST", "DETECTION", None, None),
    ("HST", "F555W;F814W", None, None),
])
def test_normalise_filter(mission, filters, filename, expected):
    assert normalise_filter(mission, filters, filename) == expected


def test_config_with_unknown_mission_or_filter_is_a_one_line_error():
    with pytest.raises(ConfigError, match="unknown mission 'KEPLERR'"):
        validate_archive_settings(["SWIFT", "KEPLERR"], [], "cfg.yaml")
    with pytest.raises(ConfigError, match="unknown filter 'uvw9'") as err:
        validate_archive_settings(["SWIFT"], ["uw1", "uvw9"], "cfg.yaml")
    assert "\n" not in str(err.value) and "cfg.yaml" in str(err.value)
    assert validate_archive_settings(["swift", "GALEX"], ["uw1", "NUV"], "x") == (
        ["SWIFT", "GALEX"], ["UVW1", "NUV"])


def test_footprints_from_recorded_regions():
    galex = _recorded("advSearchPos.json").set_index("obsid")
    circle = parse_s_region(galex.loc["1000004218", "s_region"].iloc[0])
    assert contains(circle, M101_SN["ra_deg"], M101_SN["dec_deg"])
    far = parse_s_region(galex.loc["1000001327", "s_region"].iloc[0])
    assert not contains(far, M101_SN["ra_deg"], M101_SN["dec_deg"])
    # the same circle overlaps itself completely; two circles 0.925 deg apart (r = 0.625 deg)
    # share a lens of ~16% of one's area (analytic: 0.160)
    assert overlap_fraction(circle, circle, 210.8, 54.36) == pytest.approx(1.0)
    other = parse_s_region(galex.loc["1000016660", "s_region"].iloc[0])
    assert overlap_fraction(far, other, 211.08, 54.13) == pytest.approx(0.160, abs=0.02)
    hst = parse_s_region(_recorded("caom.json")["s_region"].iloc[0])  # 'POLYGON GSC1 ...'
    assert len(hst.polygons) == 1 and contains(hst, 23.12, 60.643)
    # a footprint across RA = 0
    wrap = parse_s_region("POLYGON ICRS 359.9 -0.1 0.1 -0.1 0.1 0.1 359.9 0.1")
    assert contains(wrap, 0.0, 0.0) and contains(wrap, 359.95, 0.05)
    assert not contains(wrap, 180.0, 0.0) and not contains(wrap, 0.2, 0.0)
    with pytest.raises(AstridError):
        parse_s_region("BOX ICRS 1 2 3")


def test_product_selection_keeps_the_drizzled_science_image():
    products = pd.DataFrame(json.loads((MAST_DATA / "products.json").read_text())["data"])
    picked = select_products(products, max_file_mb=500)
    assert list(picked["product_filename"]) == ["u9o40504m_drz.fits"]
    assert picked["product_size"].iloc[0] == 27227520
    capped = select_products(products, max_file_mb=10)
    assert capped["product_reason"].iloc[0].startswith("science image larger than")
    for name in ("sw00032148001uw1_ex.img.gz", "MISDR1_24278_0266-nd-rrhr.fits.gz",
                 "rings.v3.skycell.1334.061.stk.g.unconv.mask.fits",
                 "rings.v3.skycell.1334.061.stk.g.unconv.wt.fits", "j8xi01010_drz.jpg",
                 "rings.v3.skycell.1334.061.wrp.g.55555_12345.mask.fits"):
        assert science_rank({"sw": "SWIFT", "MI": "GALEX", "ri": "PS1", "j8": "HST"}[name[:2]],
                            name) is None, name
    assert science_rank("SWIFT", "sw00032148001uw1_sk.img.gz") == 0
    assert science_rank("PS1", "rings.v3.skycell.1334.061.wrp.g.55555_12345.fits") == 1
    assert science_rank("GALEX", "MISDR1_24278_0266-nd-int.fits.gz") == 0
    assert science_rank("HST", "j8xi01010_drc.fits") < science_rank("HST", "j8xi01010_flc.fits")


def test_galex_pairs_with_time_windows_and_footprints():
    """Real GALEX observations around M101 with a discovery date placed at MJD 54530."""
    obs = _recorded("advSearchPos.json").assign(sn="SN-M101")
    pairs = make_pairs(obs, _catalog(54530.0), ArchiveSettings(missions=["GALEX"]))
    paired = pairs[pairs["status"] == "paired"].set_index("filter")
    assert set(paired.index) == {"NUV", "FUV"}
    for band in ("NUV", "FUV"):
        # deepest reference whose footprint holds the SN (1000001327 is deeper but misses it)
        assert paired.loc[band, "ref_obsid"] == "1000001326"
        assert paired.loc[band, "sci_obsid"] == "1000004218"
        assert paired.loc[band, "overlap"] > 0.95
    rejected = pairs[pairs["status"] == "rejected"]
    reasons = dict(zip(rejected["ref_obsid"].fillna("") + rejected["sci_obsid"].fillna(""),
                       rejected["reason"], strict=True))
    assert reasons["1000001327"] == "supernova outside the footprint"
    assert reasons["1000004956"].startswith("later than sci_window_days")
    # the other usable references are kept as rejected candidate pairs with a reason
    outranked = rejected[rejected["reason"].str.startswith("outranked")]
    assert set(outranked["ref_obsid"]) == {"1000016660", "1000016663"}
    # every observation is accounted for: paired, or named in a rejected row
    named = set(pairs["ref_obsid"].dropna()) | set(pairs["sci_obsid"].dropna())
    assert named == set(obs["obsid"])


def test_reference_gap_and_no_science_window():
    obs = _recorded("advSearchPos.json").assign(sn="SN-M101")
    # 1000004218 is a coadd of visits from MJD 54560.3 to 54598.4. Discovery 12 d after it
    # ends: inside the 30-day gap; nothing in the science window
    pairs = make_pairs(obs, _catalog(54610.0), ArchiveSettings(missions=["GALEX"]))
    assert (pairs["status"] == "rejected").all()
    by = pairs.set_index(pairs["ref_obsid"].fillna(pairs["sci_obsid"]))["reason"]
    assert by["1000004218"].iloc[0].startswith("in the gap before discovery (ends 11.6 d before")
    assert pairs["reason"].str.startswith("no science image after discovery").any()
    # discovery during the coadd: it holds supernova light and is no reference
    pairs = make_pairs(obs, _catalog(54570.0), ArchiveSettings(missions=["GALEX"]))
    by = pairs.set_index(pairs["ref_obsid"].fillna(pairs["sci_obsid"]))["reason"]
    assert by["1000004218"].iloc[0].startswith("spans the discovery date")


def test_no_overlap_pair_is_rejected():
    obs = _recorded("advSearchPos.json")
    obs = obs[obs["obsid"].isin(["1000001327", "1000016660"]) & (obs["filters"] == "NUV")]
    sn = pd.DataFrame([{"name": "between", "ra_deg": 211.08, "dec_deg": 54.125,
                        "disc_mjd": 53000.0, "peak_mjd": np.nan}])
    settings = ArchiveSettings(missions=["GALEX"], sci_window_days=200)
    pairs = make_pairs(obs.assign(sn="between"), sn, settings)
    assert len(pairs) == 1 and pairs["status"].iloc[0] == "rejected"
    assert pairs["reason"].iloc[0].startswith("overlap 0.1")
    loose = make_pairs(obs.assign(sn="between"), sn,
                       settings.model_copy(update={"min_overlap": 0.1}))
    assert loose["status"].iloc[0] == "paired"


def _row(obsid, collection, instrument, filters, t_min, exptime, filename, ra=150.0, dec=2.0):
    half = 0.1
    region = (f"POLYGON ICRS {ra - half} {dec - half} {ra + half} {dec - half} "
              f"{ra + half} {dec + half} {ra - half} {dec + half}")
    return {"sn": "SN-X", "obsid": obsid, "obs_collection": collection,
            "instrument_name": instrument, "filters": filters, "t_min": t_min,
            "t_max": t_min + exptime / 86400, "t_exptime": exptime, "s_ra": ra, "s_dec": dec,
            "s_region": region, "dataURL": f"http://archive.invalid/{filename}",
            "product_filename": filename, "product_reason": ""}


SN_X = pd.DataFrame([{"name": "SN-X", "ra_deg": 150.0, "dec_deg": 2.0, "disc_mjd": 58000.0,
                      "peak_mjd": 58020.0}])


def test_swift_uvot_names_pair_and_mixed_missions_do_not():
    obs = pd.DataFrame([
        _row("s1", "SWIFT", "UVOT", "UVW1", 57000.0, 1500, "sw00011111001uw1_sk.img.gz"),
        _row("s2", "SWIFT", "UVOT", "", 58010.0, 800, "sw00011111002uw1_sk.img.gz"),
        _row("s3", "SWIFT", "UVOT", "um2", 57100.0, 900, "sw00011111003um2_sk.img.gz"),
        _row("s4", "SWIFT", "UVOT", "UVM2", 58021.0, 700, "sw00011111004um2_sk.img.gz"),
        _row("s5", "SWIFT", "UVOT", "UVW2", 57200.0, 1000, "sw00011111005uw2_sk.img.gz"),
        _row("g1", "GALEX", "GALEX", "NUV", 58012.0, 1500, "X-nd-int.fits.gz"),
    ])
    pairs = make_pairs(obs, SN_X, ArchiveSettings(missions=["SWIFT", "GALEX"]))
    paired = pairs[pairs["status"] == "paired"].set_index("filter")
    assert paired.loc["UVW1", ["ref_obsid", "sci_obsid"]].tolist() == ["s1", "s2"]
    assert paired.loc["UVM2", ["ref_obsid", "sci_obsid"]].tolist() == ["s3", "s4"]
    assert len(paired) == 2  # UVW2 has no science image, GALEX NUV no reference
    rejected = pairs[pairs["status"] == "rejected"].set_index("filter")
    assert rejected.loc["UVW2", "reason"].startswith("no science image after discovery")
    assert rejected.loc["NUV", "reason"].startswith("no reference before discovery")


def test_ps1_band_from_file_name_never_from_rings():
    obs = pd.DataFrame([
        _row("p1", "PS1", "GPC1", "", 56000.0, 1000, "rings.v3.skycell.1334.061.stk.g.unconv.fits"),
        _row("p2", "PS1", "GPC1", "", 58015.0, 45, "rings.v3.skycell.1334.061.wrp.r.58015_1.fits"),
        _row("p3", "PS1", "GPC1", "", 58016.0, 45, "rings.v3.skycell.1334.061.wrp.g.58016_1.fits"),
    ])
    stack = _row("p4", "PS1", "GPC1", "", 55200.0, 3000, "rings.v3.skycell.1334.061.stk.g.unconv.fits")
    stack["t_max"] = 58600.0  # a stack of all epochs, 2010-2019, holds the supernova
    obs = pd.concat([obs, pd.DataFrame([stack])], ignore_index=True)
    pairs = make_pairs(obs, SN_X, ArchiveSettings(missions=["PS1"]))
    assert pairs.loc[pairs["ref_obsid"] == "p4", "reason"].iloc[0].startswith("spans the discovery")
    paired = pairs[pairs["status"] == "paired"]
    assert paired[["filter", "ref_obsid", "sci_obsid"]].values.tolist() == [["g", "p1", "p3"]]
    assert pairs.loc[pairs["sci_obsid"] == "p2", "reason"].iloc[0].startswith(
        "no reference before discovery in PS1/GPC1/r")


def test_hst_filters_instruments_and_requested_filters():
    obs = pd.DataFrame([
        _row("h1", "HST", "ACS/WFC", "F814W;CLEAR2L", 57500.0, 2000, "j1_drc.fits"),
        _row("h2", "HST", "ACS/WFC", "CLEAR1L;F814W", 58030.0, 1000, "j2_drc.fits"),
        _row("h3", "HST", "WFC3/UVIS", "F814W", 58031.0, 1200, "i3_flc.fits"),
        _row("h4", "HST", "ACS/WFC", "F606W", 57400.0, 900, "j4_drc.fits"),
        _row("h5", "HST", "ACS/WFC", "F606W", 58025.0, 900, "j5_drc.fits"),
        _row("h6", "HLA", "ACS/WFC", "DETECTION", 58025.0, 900, "hst_x_total_drz.fits"),
    ])
    pairs = make_pairs(obs, SN_X, ArchiveSettings(missions=["HST"], filters=["F814W"]))
    paired = pairs[pairs["status"] == "paired"]
    # same instrument only: WFC3/UVIS F814W never pairs with ACS/WFC F814W
    assert paired[["instrument", "ref_obsid", "sci_obsid"]].values.tolist() == [["ACS/WFC", "h1", "h2"]]
    reasons = pairs.set_index(pairs["sci_obsid"].fillna(pairs["ref_obsid"]))["reason"]
    assert reasons["h5"] == "filter F606W not requested"
    assert reasons["h6"].startswith("filter not recognised")
    assert reasons["h3"].startswith("no reference before discovery in HST/WFC3/UVIS/F814W")


def test_rows_without_products_or_outside_footprint_are_rejected_not_paired():
    obs = pd.DataFrame([
        _row("a", "SWIFT", "UVOT", "UVW1", 57000.0, 1500, "sw00011111001uw1_sk.img.gz"),
        _row("b", "SWIFT", "UVOT", "UVW1", 58010.0, 800, "sw00011111002uw1_sk.img.gz"),
        _row("c", "SWIFT", "UVOT", "UVW1", 58011.0, 800, "sw00011111003uw1_sk.img.gz", ra=151.0),
    ])
    obs.loc[1, "product_reason"] = "no science image among 4 products"
    pairs = make_pairs(obs, SN_X, ArchiveSettings(missions=["SWIFT"]))
    assert (pairs["status"] == "rejected").all()
    by = pairs.set_index(pairs["sci_obsid"].fillna(pairs["ref_obsid"]))["reason"]
    assert by["b"].startswith("no usable product")
    assert by["c"] == "supernova outside the footprint"
    # a catalog with the interface's disc_date (ISO) instead of disc_mjd works the same
    iso = SN_X.drop(columns="disc_mjd").assign(disc_date="2017-09-04")  # = MJD 58000
    pd.testing.assert_frame_equal(make_pairs(obs, iso, ArchiveSettings(missions=["SWIFT"])),
                                  pairs)
    nothing = make_pairs(obs.iloc[0:0], SN_X, ArchiveSettings(missions=["SWIFT"]))
    assert nothing["reason"].tolist() == ["no observations"]
