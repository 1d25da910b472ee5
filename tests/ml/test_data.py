"""Triplet datasets: round trips, crash safety, bounded memory, grouped splits, normalisation."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pandas as pd
import pytest

from astrid.errors import AstridError, InputFileError
from astrid.ml.data import (
    META_COLUMNS,
    DatasetWriter,
    grouped_split,
    load_dataset,
    merge_datasets,
    normalise,
    write_split,
)


def _shard(rng, n, size, pair):
    stamps = rng.normal(size=(n, 3, size, size)).astype(np.float32)
    stamps[0, 0, 0, :] = np.nan  # NaN outside the image must survive the round trip
    meta = pd.DataFrame({
        "pair_id": pair, "field": f"F{pair}", "mission": "SIM", "filter": "r",
        "mjd": 59000.5 + rng.random(n), "x": rng.uniform(0, 512, n), "y": rng.uniform(0, 512, n),
        "ra": rng.uniform(0, 360, n), "dec": rng.uniform(-90, 90, n), "snr": rng.normal(10, 3, n),
        "sign": rng.choice([-1, 1], n), "label": rng.choice([0, 1], n), "label_source": "truth",
        "kind": rng.choice(["sn", "cosmic_ray", "noise"], n), "edge": rng.random(n) < 0.1,
    })
    return stamps, meta


def test_round_trip_preserves_pixels_and_metadata(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "ds"
    parts = [_shard(rng, n, 7, f"p{k}") for k, n in enumerate((5, 1, 12))]
    with DatasetWriter(path, 7) as writer:
        for stamps, meta in parts:
            writer.append(stamps, meta)
    stamps, meta = load_dataset(path)
    expected = np.concatenate([p[0] for p in parts])
    expected_meta = pd.concat([p[1] for p in parts], ignore_index=True)

    assert stamps.shape == (18, 3, 7, 7) and len(stamps) == 18
    got = np.asarray(stamps)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)  # NaN-aware, bit-exact
    assert list(meta.columns[:len(META_COLUMNS)]) == list(META_COLUMNS)
    for col in expected_meta.columns:
        np.testing.assert_array_equal(meta[col].to_numpy(), expected_meta[col].to_numpy(), col)
    assert meta["triplet_id"].is_unique

    # every kind of index a training loop uses, across shard boundaries
    np.testing.assert_array_equal(stamps[6], expected[6])
    np.testing.assert_array_equal(stamps[-1], expected[-1])
    np.testing.assert_array_equal(stamps[3:9], expected[3:9])
    np.testing.assert_array_equal(stamps[::4], expected[::4])
    np.testing.assert_array_equal(stamps[[17, 0, 5, 5]], expected[[17, 0, 5, 5]])
    mask = meta["label"].to_numpy() == 1
    np.testing.assert_array_equal(stamps[mask], expected[mask])
    np.testing.assert_array_equal(stamps[2:8, 2], expected[2:8, 2])
    with pytest.raises(IndexError):
        stamps[18]
    # pickles by path (DataLoader workers) and reads the same pixels
    clone = pickle.loads(pickle.dumps(stamps))
    np.testing.assert_array_equal(clone[4:6], expected[4:6])

    info = json.loads((path / "dataset.json").read_text())
    assert info["channels"] == ["sci", "ref", "diff"] and info["size"] == 7 and info["n"] == 18
    assert len(info["shards"]) == 3 and info["provenance"]["astrid_version"]


def test_killed_build_keeps_finished_shards_and_append_resumes(tmp_path):
    rng = np.random.default_rng(2)
    path = tmp_path / "ds"
    first = _shard(rng, 4, 5, "a")
    writer = DatasetWriter(path, 5)
    writer.append(*first)
    del writer  # "killed": close() never ran, meta.parquet never written
    assert not (path / "meta.parquet").exists()
    stamps, meta = load_dataset(path)
    np.testing.assert_array_equal(np.asarray(stamps), first[0])
    assert list(meta["pair_id"]) == ["a"] * 4

    with pytest.raises(AstridError, match="already a dataset"):
        DatasetWriter(path, 5)
    with pytest.raises(AstridError, match="size"):
        DatasetWriter(path, 7, append=True)
    second = _shard(rng, 3, 5, "b")
    with DatasetWriter(path, 5, append=True) as writer:
        writer.append(*second)
    stamps, meta = load_dataset(path)
    np.testing.assert_array_equal(np.asarray(stamps), np.concatenate([first[0], second[0]]))
    assert list(meta["pair_id"]) == ["a"] * 4 + ["b"] * 3
    assert not list(path.glob("**/*.part"))


def _rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def test_appending_many_shards_keeps_memory_bounded(tmp_path):
    """200,000 tiny stamps (60 MB) in 20 shards: the writer holds only one shard at a time."""
    path = tmp_path / "big"
    n_shard, n_shards, size = 10_000, 20, 5
    rss = []
    with DatasetWriter(path, size) as writer:
        for k in range(n_shards):
            start = k * n_shard
            stamps = np.broadcast_to(
                np.arange(start, start + n_shard, dtype=np.float32)[:, None, None, None],
                (n_shard, 3, size, size))
            meta = pd.DataFrame({"pair_id": f"p{k % 7}", "x": np.arange(n_shard, dtype=float),
                                 "y": float(k), "triplet_id": np.arange(start, start + n_shard)})
            writer.append(stamps, meta)
            del stamps, meta
            rss.append(_rss_bytes())
    total_bytes = n_shard * n_shards * 3 * size * size * 4
    growth = rss[-1] - rss[1]
    assert growth < 0.4 * total_bytes, f"RSS grew {growth / 1e6:.1f} MB over {total_bytes / 1e6:.0f} MB"
    stamps, meta = load_dataset(path)
    assert len(stamps) == len(meta) == n_shard * n_shards
    probe = np.array([0, 9_999, 10_000, 123_456, 199_999])
    np.testing.assert_array_equal(stamps[probe][:, 1, 2, 2], probe.astype(np.float32))
    assert list(meta["triplet_id"].iloc[probe]) == [str(i) for i in probe]


def test_merge_concatenates_and_refuses_duplicates(tmp_path):
    rng = np.random.default_rng(3)
    a, b = tmp_path / "a", tmp_path / "b"
    sa, sb = _shard(rng, 4, 5, "a"), _shard(rng, 6, 5, "b")
    with DatasetWriter(a, 5) as w:
        w.append(*sa)
    with DatasetWriter(b, 5) as w:
        w.append(*sb)
    out = merge_datasets([a, b], tmp_path / "ab")
    stamps, meta = load_dataset(out)
    np.testing.assert_array_equal(np.asarray(stamps), np.concatenate([sa[0], sb[0]]))
    assert list(meta["pair_id"]) == ["a"] * 4 + ["b"] * 6
    with pytest.raises(AstridError, match="already in an earlier input"):
        merge_datasets([a, a], tmp_path / "aa")
    with DatasetWriter(tmp_path / "c", 7) as w:
        w.append(*_shard(rng, 2, 7, "c"))
    with pytest.raises(AstridError, match="differ"):
        merge_datasets([a, tmp_path / "c"], tmp_path / "ac")


def test_load_dataset_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(InputFileError, match="not found"):
        load_dataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputFileError, match="no dataset.json"):
        load_dataset(tmp_path / "empty")
    rng = np.random.default_rng(4)
    with DatasetWriter(tmp_path / "ds", 5) as w:
        w.append(*_shard(rng, 3, 5, "a"))
    (tmp_path / "ds" / "shards" / "stamps-00000.npy").write_bytes(b"garbage")
    stamps, _ = load_dataset(tmp_path / "ds")
    with pytest.raises(InputFileError, match="stamps-00000.npy"):
        stamps[0]


def _grouped_meta(rng, n_groups=60):
    rows = []
    for g in range(n_groups):
        n = int(rng.integers(5, 60))
        real_fraction = rng.uniform(0.05, 0.6)
        rows.append(pd.DataFrame({"field": f"field{g}",
                                  "label": (rng.random(n) < real_fraction).astype(int)}))
    return pd.concat(rows, ignore_index=True)


def test_grouped_split_shares_no_group_and_is_stratified():
    rng = np.random.default_rng(5)
    meta = _grouped_meta(rng)
    split = grouped_split(meta, "field", fractions=(0.7, 0.15, 0.15), seed=11)
    assert set(split) == {"train", "val", "test"}
    assert (meta.groupby("field").apply(lambda g: split[g.index].nunique(),
                                        include_groups=False) == 1).all()
    overall = meta["label"].mean()
    for name, target in zip(("train", "val", "test"), (0.7, 0.15, 0.15), strict=True):
        part = meta[split == name]
        assert abs(len(part) / len(meta) - target) < 0.05, name
        assert abs(part["label"].mean() - overall) < 0.05, name
    # deterministic for a seed, different for another
    pd.testing.assert_series_equal(split, grouped_split(meta, "field", seed=11))
    assert not split.equals(grouped_split(meta, "field", seed=12))
    with pytest.raises(AstridError, match="fractions"):
        grouped_split(meta, "field", fractions=(0.5, 0.5, 0.5))
    with pytest.raises(AstridError, match="no such"):
        grouped_split(meta, "night")


def test_write_split_saves_membership(tmp_path):
    rng = np.random.default_rng(6)
    with DatasetWriter(tmp_path / "ds", 5) as w:
        for k in range(8):
            w.append(*_shard(rng, 5, 5, f"p{k}"))
    _, meta = load_dataset(tmp_path / "ds")
    split = grouped_split(meta, "pair_id", seed=0)
    write_split(tmp_path / "ds", split, how={"group_col": "pair_id", "seed": 0})
    _, again = load_dataset(tmp_path / "ds")
    assert list(again["split"]) == list(split)
    info = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert sum(info["split"]["counts"].values()) == 40 and info["split"]["group_col"] == "pair_id"


def _triplet_with_signed_residual(sign):
    y, x = np.mgrid[:21, :21]
    blob = np.exp(-((x - 10) ** 2 + (y - 10) ** 2) / 8.0).astype(np.float32)
    rng = np.random.default_rng(7)
    sci = 500 + 40 * blob + rng.normal(0, 1, blob.shape)
    ref = 500 + rng.normal(0, 1, blob.shape)
    diff = sign * 30 * blob + rng.normal(0, 1, blob.shape)
    stamp = np.stack([sci, ref, diff]).astype(np.float32)
    stamp[:, 0, :3] = np.nan
    return stamp


@pytest.mark.parametrize("method", ["l2", "robust", "none"])
@pytest.mark.parametrize("sign", [1, -1])
def test_normalise_keeps_difference_sign(method, sign):
    stamp = _triplet_with_signed_residual(sign)
    out = normalise(stamp[None], method)[0]
    assert out.dtype == np.float32 and np.isfinite(out).all()
    assert np.sign(out[2, 10, 10]) == sign  # the residual keeps its sign
    assert np.sign(out[2, 10, 10]) == np.sign(stamp[2, 10, 10])
    if method == "l2":
        np.testing.assert_allclose(np.linalg.norm(out.reshape(3, -1), axis=1), 1, rtol=1e-5)
    if method == "robust":
        # the science/reference background sits at zero, noise at about unit scale
        assert abs(np.median(out[1])) < 0.2 and 0.5 < np.std(out[1]) < 2
        assert out[0, 10, 10] > 20  # the source stands out of the science channel
    with pytest.raises(ValueError):
        normalise(stamp, "minmax")
