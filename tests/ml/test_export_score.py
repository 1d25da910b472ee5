"""ONNX export agrees with torch; score_triplets and `astrid score` on npz, datasets and alerts."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from astrid.cli import app
from astrid.errors import AstridError, InputFileError
from astrid.ml.export import write_model_dir
from astrid.ml.models import architecture_record, build_model
from astrid.ml.score import adapt_stamp_size, score_triplets


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # the test machine's cores are shared: OpenMP threads spinning against each other are slow
    torch.set_num_threads(1)



SMALL_KWARGS = {"astrid": {"widths": [8, 16, 32]}, "braai": {}, "braai_fast": {},
                "ensemble": {"members": [{"name": "astrid", "kwargs": {"widths": [8, 16, 32]}},
                                         {"name": "braai", "kwargs": {}}]}}


def make_model_dir(path, name="astrid", size=31, temperature=1.7, seed=0):
    """An untrained (random) model directory: enough to test export and scoring plumbing."""
    torch.manual_seed(seed)
    kwargs = SMALL_KWARGS[name]
    net = build_model(name, size, **kwargs).eval()
    for bn in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        # trained-looking statistics, so that exporting batch norm is really tested
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    report = write_model_dir(path, net, architecture_record(name, size, **kwargs),
                             stamp_size=size, temperature=temperature)
    return path, report


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path, _ = make_model_dir(tmp_path_factory.mktemp("m") / "astrid31")
    return path


def _ztf(shared_data):
    z = np.load(shared_data("ztf-alerts", "fink-client", "fink-client_triplets.npz"))
    return np.stack([z["sci"], z["ref"], z["diff"]], axis=1), z


@pytest.mark.parametrize("name", ["braai", "braai_fast", "astrid", "ensemble"])
def test_onnx_matches_torch_within_1e5(tmp_path, shared_data, name):
    path, report = make_model_dir(tmp_path / name, name=name, size=63)
    assert report.max_abs_diff <= 1e-5
    stamps, _ = _ztf(shared_data)  # real ZTF triplets with NaN-padded edge stamps
    onnx = score_triplets(stamps, path, "onnx", threads=1)
    torch_scores = score_triplets(stamps, path, "torch", threads=1)
    assert onnx.shape == (len(stamps),) and np.all((onnx >= 0) & (onnx <= 1))
    np.testing.assert_allclose(onnx, torch_scores, atol=1e-5, rtol=0)
    # a batch split differently gives the same scores (no state leaks between batches)
    again = score_triplets(stamps, path, "onnx", threads=1, batch_size=7)
    np.testing.assert_allclose(again, onnx, atol=1e-6)


def test_ensemble_exports_at_an_odd_small_size_and_scores_its_members_mean(tmp_path):
    from astrid.ml.data import normalise
    from astrid.ml.models import load_weights

    size = 25
    path, report = make_model_dir(tmp_path / "ens", name="ensemble", size=size, temperature=1.0)
    assert report.max_abs_diff <= 1e-5
    x = np.random.default_rng(2).normal(0, 1, (5, 3, size, size)).astype(np.float32)
    prob = score_triplets(x, path, "onnx", threads=1)
    net, _ = load_weights(path / "model.pt")
    xt = torch.from_numpy(normalise(x, "l2"))
    with torch.no_grad():
        mean_logit = torch.stack([m(xt) for m in net.members]).mean(dim=0).numpy()
    np.testing.assert_allclose(prob, 1 / (1 + np.exp(-mean_logit)), atol=1e-5)


def test_temperature_is_applied_in_the_graph(tmp_path):
    x = np.random.default_rng(0).normal(100, 5, (6, 3, 31, 31)).astype(np.float32)
    hot, _ = make_model_dir(tmp_path / "t1", temperature=1.0, seed=4)
    cool, _ = make_model_dir(tmp_path / "t3", temperature=3.0, seed=4)
    p1, p3 = score_triplets(x, hot), score_triplets(x, cool)
    logit1 = np.log(p1 / (1 - p1))
    np.testing.assert_allclose(np.log(p3 / (1 - p3)), logit1 / 3.0, atol=1e-4)


def test_sky_subtraction_removes_each_stamps_nan_median_and_leaves_the_input_alone():
    import warnings

    from astrid.ml.score import preprocess, subtract_sky

    rng = np.random.default_rng(5)
    stamps = rng.normal(150.0, 10.0, (6, 3, 21, 21)).astype(np.float32)
    stamps[1, 0][rng.random((21, 21)) < 0.4] = np.nan  # NaN-padded survey cutouts
    stamps[2, 1] = np.nan  # a stamp with no data at all keeps its NaN, no level
    stamps[3, 0, ::3, ::3][0, :5] = np.nan
    level = stamps[:, :2, ::3, ::3].reshape(6, 2, -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        sky = np.nan_to_num(np.nanmedian(level, axis=2))  # (6, 2): sci and ref only
    expected = stamps.copy()
    expected[:, :2] -= sky[:, :, None, None]
    before = stamps.copy()
    out = preprocess(stamps, {"stamp_size": 21, "normalisation": "none", "sky_subtract": True})
    np.testing.assert_array_equal(stamps, before)  # the caller's stamps are untouched
    np.testing.assert_array_equal(out, np.nan_to_num(expected))
    np.testing.assert_array_equal(subtract_sky(stamps.copy()), expected)


def test_stamp_size_adaptation_centres_the_source():
    rubin = np.zeros((1, 3, 30, 30), np.float32)
    rubin[0, :, 15, 15] = 1.0  # Rubin cutouts put the source at pixel S // 2
    out = adapt_stamp_size(rubin, 63)
    assert out.shape == (1, 3, 63, 63)
    assert out[0, 0, 31, 31] == 1.0 and np.isnan(out[0, 0, 0, 0])
    big = np.zeros((1, 3, 63, 63), np.float32)
    big[0, :, 31, 31] = 2.0
    assert adapt_stamp_size(big, 31)[0, 0, 15, 15] == 2.0


def test_score_rejects_bad_shapes_and_missing_models(model_dir, tmp_path):
    with pytest.raises(AstridError):
        score_triplets(np.zeros((2, 2, 31, 31), np.float32), model_dir)
    with pytest.raises(InputFileError):
        score_triplets(np.zeros((2, 3, 31, 31), np.float32), tmp_path / "nowhere")


runner = CliRunner()


def test_cli_score_npz_writes_index_and_score(model_dir, tmp_path, shared_data):
    src = shared_data("ztf-alerts", "braai", "braai_triplets.npz")
    out = tmp_path / "scores.csv"
    res = runner.invoke(app, ["score", str(src), "-o", str(out), "--model", str(model_dir), "-q"])
    assert res.exit_code == 0, res.output
    table = pd.read_csv(out)
    assert list(table.columns) == ["index", "score"] and len(table) == 2
    z = np.load(src)
    expected = score_triplets(np.stack([z["sci"], z["ref"], z["diff"]], 1), model_dir)
    np.testing.assert_allclose(table["score"], expected, atol=1e-6)
    assert json.loads((tmp_path / "scores.csv.provenance.json").read_text())["n"] == 2


def test_cli_score_dataset_dir(model_dir, tmp_path):
    from astrid.ml.data import DatasetWriter

    stamps = np.random.default_rng(1).normal(0, 1, (5, 3, 31, 31)).astype(np.float32)
    with DatasetWriter(tmp_path / "ds", 31) as writer:
        writer.append(stamps, pd.DataFrame({"pair_id": ["a"] * 5, "x": np.arange(5.0), "y": 0.0}))
    out = tmp_path / "ds.csv"
    res = runner.invoke(app, ["score", str(tmp_path / "ds"), "-o", str(out), "--model", str(model_dir), "-q"])
    assert res.exit_code == 0, res.output
    table = pd.read_csv(out)
    assert list(table.columns) == ["index", "score"] and table["index"].tolist() == list(range(5))
    np.testing.assert_allclose(table["score"], score_triplets(stamps, model_dir), atol=1e-6)


def test_cli_score_alert_packets_writes_candid_and_score(model_dir, tmp_path, shared_data):
    raw = shared_data("ztf-alerts", "ampel-ztf", "raw")
    out = tmp_path / "alerts.csv"
    res = runner.invoke(app, ["score", str(raw / "tar.tst.gz"), str(raw / "516171791415015025.avro"),
                              "-o", str(out), "--model", str(model_dir), "--backend", "torch", "-q"])
    assert res.exit_code == 0, res.output
    table = pd.read_csv(out)
    assert list(table.columns) == ["candid", "score"]
    assert table["candid"].tolist() == [516171791415015025]
    # the 21 JPEG-stamp packets of the tar are reported, not fatal
    problems = pd.read_csv(tmp_path / "alerts.problems.csv")
    assert len(problems) == 21 and problems["reason"].str.contains("JPEG").all()


def test_cli_score_rubin_packets(model_dir, tmp_path, shared_data):
    raw = shared_data("rubin-alerts", "raw")
    out = tmp_path / "rubin.csv"
    res = runner.invoke(app, ["score", str(raw), "-o", str(out), "--model", str(model_dir), "-q"])
    assert res.exit_code == 0, res.output
    table = pd.read_csv(out)
    assert len(table) == 32 and table["score"].between(0, 1).all()


@pytest.mark.parametrize("make,problem", [
    (lambda p: p / "missing.npz", "not found"),
    (lambda p: (p / "x.txt").write_text("hello") and p / "x.txt", "expected a triplet"),
    (lambda p: np.savez(p / "bad.npz", sci=np.zeros((2, 5, 5))) or p / "bad.npz", "lacks"),
    (lambda p: (p / "junk.npz").write_bytes(b"not a zip") and p / "junk.npz", "readable"),
])
def test_cli_score_bad_inputs_give_one_line_errors(model_dir, tmp_path, make, problem):
    path = make(tmp_path)
    res = runner.invoke(app, ["score", str(path), "-o", str(tmp_path / "s.csv"), "--model", str(model_dir)])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and problem in lines[0]
    assert not (tmp_path / "s.csv").exists()


def test_cli_score_bad_model_dir(tmp_path, shared_data):
    src = shared_data("ztf-alerts", "braai", "braai_triplets.npz")
    res = runner.invoke(app, ["score", str(src), "-o", str(tmp_path / "s.csv"), "--model", str(tmp_path)])
    assert res.exit_code == 1 and "not a model directory" in res.output


def test_cli_export_rewrites_onnx(model_dir):
    res = runner.invoke(app, ["export", str(model_dir)])
    assert res.exit_code == 0, res.output
    assert "max |onnx - torch|" in res.output


def test_packaged_default_model_is_complete_and_scores_alerts(tmp_path, shared_data):
    from astrid.ml.score import default_model_dir

    pkg = default_model_dir()
    info = json.loads((pkg / "model.json").read_text())
    assert info["architecture"] in ("astrid", "ensemble") and info["stamp_size"] == 63
    assert 0 < info["threshold"] < 1 and info["temperature"] > 0
    metrics = json.loads((pkg / "metrics.json").read_text())
    assert {"astrid", "braai", info["architecture"]} <= set(metrics["test_simulated"])
    assert metrics.get("default", "astrid") == info["architecture"]
    # shipped by the recipe's rule: the lowest FNR on the holdout survey's validation pairs
    selection = metrics["holdout"]["selection"]
    val_fnr = {c: r["val"]["fnr_at_fpr1"]["value"] for c, r in selection["candidates"].items()}
    assert val_fnr[selection["chosen"]] == min(val_fnr.values())
    members = [m["name"] for m in info["architecture_kwargs"].get("members", [])] or [info["architecture"]]
    assert "+".join(members) == selection["chosen"]
    # three networks (weights twice: model.pt for torch, model.onnx) and the evaluation plots
    assert sum(f.stat().st_size for f in pkg.iterdir()) < 6 * 2**20
    # the shipped ONNX graph and weights agree on real ZTF triplets
    stamps, _ = _ztf(shared_data)
    np.testing.assert_allclose(score_triplets(stamps, pkg, "onnx"), score_triplets(stamps, pkg, "torch"),
                               atol=1e-5, rtol=0)
    # `astrid score` without --model uses it
    raw = shared_data("ztf-alerts", "braai", "raw")
    out = tmp_path / "s.csv"
    res = runner.invoke(app, ["score", str(raw), "-o", str(out), "-q"])
    assert res.exit_code == 0, res.output
    table = pd.read_csv(out)
    assert table["candid"].tolist() == sorted(table["candid"].tolist()) and len(table) == 2


def test_packaged_fast_model_is_braai_size_and_scores_by_name(tmp_path, shared_data, monkeypatch):
    from astrid.ml.score import default_model_dir

    pkg = default_model_dir("fast")
    info = json.loads((pkg / "model.json").read_text())
    assert info["architecture"] == "braai_fast" and info["stamp_size"] == 63
    metrics = json.loads((pkg / "metrics.json").read_text())
    assert metrics["default"] == "braai_fast" and "braai" in metrics["test_simulated"]
    assert metrics["test_simulated"]["braai_fast"]["aucpr"]["value"] > 0.99
    assert sum(f.stat().st_size for f in pkg.iterdir()) < 5 * 2**20
    stamps, _ = _ztf(shared_data)
    np.testing.assert_allclose(score_triplets(stamps, pkg, "onnx"), score_triplets(stamps, pkg, "torch"),
                               atol=1e-5, rtol=0)
    # `--model fast` names the packaged model, unless a directory of that name exists here
    monkeypatch.chdir(tmp_path)
    src = shared_data("ztf-alerts", "braai", "braai_triplets.npz")
    res = runner.invoke(app, ["score", str(src), "-o", "fast.csv", "--model", "fast", "-q"])
    assert res.exit_code == 0, res.output
    z = np.load(src)
    expected = score_triplets(np.stack([z["sci"], z["ref"], z["diff"]], 1), pkg)
    np.testing.assert_allclose(pd.read_csv("fast.csv")["score"], expected, atol=1e-6)
    (tmp_path / "fast").mkdir()
    res = runner.invoke(app, ["score", str(src), "-o", "x.csv", "--model", "fast", "-q"])
    assert res.exit_code == 1 and "not a model directory" in res.output
