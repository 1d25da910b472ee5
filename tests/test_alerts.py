"""Every ZTF and Rubin alert file in ../shared/data decodes to the converted triplets there."""

from __future__ import annotations

import gzip
import io

import fastavro
import numpy as np
import pandas as pd
import pytest

from astrid.alerts import read_alerts
from astrid.errors import InputFileError

ZTF_SETS = ["fink-client", "fink-broker", "ampel-ztf", "ztf-avro-alert", "braai"]


def _assert_same_triplets(batch, npz, id_key="candid"):
    ids = npz[id_key]
    index = {c: i for i, c in enumerate(batch.meta["candid"])}
    assert set(ids) == set(index), "decoded candidates differ from the converted set"
    for j, c in enumerate(ids):
        for k, channel in enumerate(("sci", "ref", "diff")):
            np.testing.assert_array_equal(batch.stamps[index[c], k], npz[channel][j])


@pytest.mark.parametrize("name", ZTF_SETS)
def test_ztf_alerts_equal_the_converted_triplets(shared_data, name):
    folder = shared_data("ztf-alerts", name)
    batch = read_alerts(folder / "raw")
    npz = np.load(folder / f"{name}_triplets.npz")
    assert batch.stamps.shape == (len(npz["candid"]), 3, 63, 63)
    assert batch.stamps.dtype == np.float32
    _assert_same_triplets(batch, npz)
    meta = pd.read_csv(folder / f"{name}_meta.csv").set_index("candid")
    mine = batch.meta.set_index("candid").loc[meta.index]
    np.testing.assert_allclose(mine["ra"], meta["ra"])
    np.testing.assert_allclose(mine["magpsf"], meta["magpsf"], rtol=1e-6)
    assert (mine["isdiffpos"] == meta["isdiffpos"]).all()
    assert (mine["sign"] == np.where(meta["isdiffpos"] == "f", -1, 1)).all()
    assert (mine["mission"] == "ZTF").all()
    assert set(mine["filter"]) <= {"g", "r", "i"}
    if "drb" in meta:
        np.testing.assert_allclose(mine["drb"].astype(float), meta["drb"], rtol=1e-6)


def test_ampel_corrupt_and_duplicate_packets_are_reported(shared_data):
    batch = read_alerts(shared_data("ztf-alerts", "ampel-ztf", "raw"))
    reasons = batch.problems["reason"]
    jpeg = batch.problems[reasons.str.contains("JPEG")]
    # the 2018 commissioning tarball: 21 packets whose stamps are JPEG, not FITS
    assert len(jpeg) == 21 and jpeg["path"].str.contains("tar.tst.gz::").all()
    dropped = pd.read_csv(shared_data("ztf-alerts", "ampel-ztf", "ampel-ztf_dropped_no_valid_cutouts.csv"))
    tarred = dropped[dropped["source_file"].str.contains("tar.tst.gz")]
    assert set(jpeg["candid"]) == set(tarred["candid"])
    # schema_3.2.avro and schema_3.3.avro hold the same candidate: read once
    assert reasons.str.contains("duplicate").sum() == 1
    # edge stamps are NaN-padded at the bottom/right
    shapes = batch.meta.set_index("candid")["stamp_shape"]
    assert set(shapes) == {"63x63", "51x63", "63x55"}
    small = batch.meta.index[batch.meta["stamp_shape"] == "51x63"][0]
    assert np.isnan(batch.stamps[small, :, 51:, :]).all()


def test_rubin_alerts_equal_the_converted_triplets(shared_data):
    folder = shared_data("rubin-alerts")
    batch = read_alerts(folder / "raw")
    npz = np.load(folder / "rubin_triplets.npz")
    assert batch.stamps.shape == (32, 3, 30, 30)
    _assert_same_triplets(batch, npz, id_key="diaSourceId")
    meta = pd.read_csv(folder / "rubin_meta.csv").set_index("diaSourceId")
    mine = batch.meta.set_index("candid").loc[meta.index]
    np.testing.assert_allclose(mine["reliability"], meta["reliability"], rtol=1e-6)
    assert (mine["sign"] == np.where(meta["isNegative"], -1, 1)).all()
    assert (mine["mission"] == "Rubin").all() and len(batch.problems) == 0


def test_mixed_missions_share_one_stamp_size(shared_data):
    batch = read_alerts([shared_data("rubin-alerts", "raw", "part-2-918301.avro"),
                         shared_data("ztf-alerts", "braai", "raw")])
    assert batch.stamps.shape == (7 + 2, 3, 63, 63)
    rubin = (batch.meta["mission"] == "Rubin").to_numpy()
    assert np.isnan(batch.stamps[rubin][:, :, 30:, :]).all()
    assert np.isfinite(batch.stamps[rubin][:, :, :30, :30]).any()


def _one_packet(shared_data):
    path = shared_data("ztf-alerts", "ztf-avro-alert", "raw", "472263571115115000.avro")
    with open(path, "rb") as fh:
        reader = fastavro.reader(fh)
        return reader.writer_schema, next(iter(reader))


def test_corrupt_packets_are_reported_and_skipped(shared_data, tmp_path):
    schema, good = _one_packet(shared_data)
    bad_gzip = {**good, "candid": good["candid"] + 1}
    bad_gzip["cutoutDifference"] = {**good["cutoutDifference"],
                                    "stampData": good["cutoutDifference"]["stampData"][:200]}
    truncated_fits = {**good, "candid": good["candid"] + 2}
    fits_bytes = gzip.decompress(good["cutoutScience"]["stampData"])
    truncated_fits["cutoutScience"] = {**good["cutoutScience"],
                                       "stampData": gzip.compress(fits_bytes[:2000])}
    path = tmp_path / "mixed.avro"
    buf = io.BytesIO()
    fastavro.writer(buf, schema, [good, bad_gzip, truncated_fits])
    path.write_bytes(buf.getvalue())
    (tmp_path / "truncated.avro").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 definitely not parquet")
    batch = read_alerts(tmp_path)
    assert batch.meta["candid"].tolist() == [good["candid"]]
    reasons = dict(zip(batch.problems["candid"], batch.problems["reason"], strict=False))
    assert "bad gzip" in reasons[good["candid"] + 1]
    assert "corrupt FITS" in reasons[good["candid"] + 2]
    by_file = batch.problems.set_index(batch.problems["path"].str.rsplit("/", n=1).str[-1])
    assert "Parquet" in by_file.loc["junk.parquet", "reason"]
    assert "truncated.avro" in set(by_file.index)


def test_missing_and_unknown_files_are_user_errors(tmp_path):
    with pytest.raises(InputFileError, match="not found"):
        read_alerts(tmp_path / "nope.avro")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(InputFileError, match="not an alert packet"):
        read_alerts(tmp_path / "notes.txt")
    with pytest.raises(InputFileError, match="no alert packets"):
        read_alerts(tmp_path)
