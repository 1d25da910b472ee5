"""Training: loss falls, splits are grouped, kill/resume gives the same model, bad input errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from astrid.config import TrainSettings
from astrid.errors import AstridError
from astrid.ml.data import DatasetWriter, load_dataset
from astrid.ml.evaluate import cross_evaluate, evaluate
from astrid.ml.train import split_rows, train

SIZE = 21

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # the test machine's cores are shared: OpenMP threads spinning against each other are slow
    torch.set_num_threads(1)



def _psf(size, x0, y0, fwhm):
    yy, xx = np.mgrid[:size, :size]
    sigma = fwhm / 2.355
    return np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * sigma ** 2))


def make_dataset(path, n=240, n_pairs=12, seed=0, size=SIZE):
    """Toy triplets: reals are PSF-shaped sources in sci and diff, boguses single-pixel spikes
    or PSF dipoles, on a noisy sky; consecutive blocks of n / n_pairs triplets share a pair_id."""
    rng = np.random.default_rng(seed)
    stamps = rng.normal(0, 1, (n, 3, size, size)).astype(np.float32)
    stamps[:, :2] += 100.0  # sky in sci and ref
    label = (np.arange(n) % 3 == 0).astype(int)  # a third are real: imbalanced
    c = size // 2
    for i in range(n):
        amp = rng.uniform(8, 30)
        dx, dy = rng.uniform(-1, 1, 2)
        if label[i]:
            src = amp * _psf(size, c + dx, c + dy, rng.uniform(2, 3.5))
            stamps[i, 0] += src
            stamps[i, 2] += src
        elif i % 2:
            stamps[i, 2, c, c] += 3 * amp  # hot pixel / cosmic ray: sharper than the PSF
            stamps[i, 0, c, c] += 3 * amp
        else:
            dip = amp * (_psf(size, c + 1, c, 2.5) - _psf(size, c - 1, c, 2.5))
            stamps[i, 2] += dip  # misalignment dipole
    meta = pd.DataFrame({"pair_id": [f"p{i * n_pairs // n:02d}" for i in range(n)],
                         "x": np.arange(n, dtype=float), "y": 0.0, "label": label,
                         "kind": np.where(label == 1, "sn", "cosmic_ray"), "snr": 10.0,
                         "mission": "SIM", "filter": "r"})
    with DatasetWriter(path, size) as writer:
        writer.append(stamps[: n // 2], meta.iloc[: n // 2])
        writer.append(stamps[n // 2:], meta.iloc[n // 2:])
    return path


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("ds") / "triplets")


def _fast(**kw):
    base = dict(model="astrid", width=8, epochs=4, batch_size=32, lr=3e-3, patience=10,
                seed=3, threads=1, augment_noise=0.02)
    base.update(kw)
    return TrainSettings(**base)


def test_splits_are_grouped_and_leaks_are_refused(tiny_dataset):
    _, meta = load_dataset(tiny_dataset)
    rows = split_rows(meta, _fast())
    owners = {}
    for name, idx in rows.items():
        for pair in meta["pair_id"].iloc[idx].unique():
            assert owners.setdefault(pair, name) == name, f"{pair} in {owners[pair]} and {name}"
    assert all(len(v) for v in rows.values())
    # a saved split that puts one pair in two splits is refused
    bad = pd.Series(np.where(np.arange(len(meta)) % 2, "train", "val"))
    bad[meta["pair_id"] == "p00"] = ["train", "test"] * int((meta["pair_id"] == "p00").sum() // 2)
    with pytest.raises(AstridError, match="leak"):
        split_rows(meta, _fast(), split=bad)


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "model"
    return train(tiny_dataset, out, _fast(epochs=5))


def test_loss_falls_and_model_dir_is_complete(trained):
    h = trained.history
    assert h["train_loss"].iloc[-1] < 0.6 * h["train_loss"].iloc[0]
    assert h["val_aucpr"].max() > 0.9
    out = trained.model_dir
    for name in ("model.pt", "model.json", "model.onnx", "history.json", "history.csv", "checkpoint.pt"):
        assert (out / name).exists(), name
    info = json.loads((out / "model.json").read_text())
    assert info["architecture"] == "astrid" and info["stamp_size"] == SIZE
    assert 0.05 < info["temperature"] < 20 and 0 <= info["threshold"] <= 1
    assert info["provenance"]["config_hash"] and info["training"]["split_counts"]["train"] > 0
    assert len(json.loads((out / "history.json").read_text())) == len(h)


def test_killed_training_resumes_to_the_same_model(tiny_dataset, tmp_path):
    settings = _fast(model="braai", epochs=3, balance="weight")
    full = train(tiny_dataset, tmp_path / "full", settings)
    part = train(tiny_dataset, tmp_path / "resumed", settings, stop_after_epoch=1)
    assert not part.finished and len(part.history) == 1
    assert not (tmp_path / "resumed" / "model.pt").exists()
    resumed = train(tiny_dataset, tmp_path / "resumed", settings)
    assert resumed.finished and len(resumed.history) == 3
    pd.testing.assert_frame_equal(full.history.drop(columns="elapsed_s"),
                                  resumed.history.drop(columns="elapsed_s"))
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "resumed" / "model.pt", weights_only=True)["state_dict"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    # a checkpoint is not resumed with other settings
    with pytest.raises(AstridError, match="checkpoint"):
        train(tiny_dataset, tmp_path / "resumed", _fast(model="braai", epochs=3, lr=1e-2))


def test_unlabelled_dataset_is_refused(tmp_path):
    path = tmp_path / "ds"
    with DatasetWriter(path, SIZE) as writer:
        writer.append(np.zeros((4, 3, SIZE, SIZE), np.float32),
                      pd.DataFrame({"pair_id": list("abcd"), "label": -1}))
    with pytest.raises(AstridError, match="no labelled"):
        train(path, tmp_path / "m", _fast())


def test_evaluate_writes_metrics_plots_and_summary(trained, tiny_dataset, tmp_path):
    report = evaluate(trained.model_dir, tiny_dataset, tmp_path / "eval", "test", n_boot=50)
    out = tmp_path / "eval"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["overall"]["n"] == report["overall"]["n"] > 0
    assert saved["overall"]["aucpr"]["value"] > 0.8
    assert set(saved["by_kind"]) == {"sn", "cosmic_ray"}
    for name in ("pr.png", "roc.png", "reliability.png", "scores.png", "summary.md",
                 "worst_misses.png", "worst_false_positives.png"):
        assert (out / name).stat().st_size > 0, name
    assert "FNR at FPR = 1%" in (out / "summary.md").read_text()
    with pytest.raises(AstridError, match="unknown split"):
        evaluate(trained.model_dir, tiny_dataset, tmp_path / "e2", "holdout")


def test_cross_evaluate_keeps_regimes_apart(tiny_dataset, tmp_path):
    _, meta = load_dataset(tiny_dataset)
    regime = np.where(meta["pair_id"] < "p08", "early", "late")
    report = cross_evaluate(tiny_dataset, tmp_path / "cross", pd.Series(regime), ["early"], ["late"],
                            _fast(model="braai", epochs=1), n_boot=20)
    assert report["cross"]["test_on"] == ["late"]
    scored = pd.read_csv(tmp_path / "cross" / "eval" / "scores.csv")
    assert set(scored["pair_id"]) == {f"p{i:02d}" for i in range(8, 12)}
    info = json.loads((tmp_path / "cross" / "model" / "model.json").read_text())
    # the other regime is held out whole: never in train or val
    assert info["training"]["split_counts"]["test"] == int((regime == "late").sum())


def test_cli_train_and_evaluate(tiny_dataset, trained, tmp_path):
    from typer.testing import CliRunner

    from astrid.cli import app

    runner = CliRunner()
    cfg = tmp_path / "train.yaml"
    cfg.write_text("train:\n  width: 8\n  batch_size: 32\n  threads: 1\n  seed: 1\n")
    res = runner.invoke(app, ["train", "--data", str(tiny_dataset), "-o", str(tmp_path / "m"),
                              "--model", "braai", "--epochs", "1", "-c", str(cfg), "-q"])
    assert res.exit_code == 0, res.output
    assert "best epoch 1/1" in res.output and (tmp_path / "m" / "model.onnx").exists()
    res = runner.invoke(app, ["evaluate", str(trained.model_dir), str(tiny_dataset), "-o", str(tmp_path / "ev"), "-q"])
    assert res.exit_code == 0, res.output
    assert "AUCPR" in res.output and (tmp_path / "ev" / "metrics.json").exists()
    # user errors: one line, exit 1
    res = runner.invoke(app, ["train", "--data", str(tmp_path / "nowhere"), "-o", str(tmp_path / "x")])
    assert res.exit_code == 1 and res.output.strip().startswith("error:") and "not found" in res.output
    res = runner.invoke(app, ["train", "--data", str(tiny_dataset), "-o", str(tmp_path / "x"), "--model", "resnet"])
    assert res.exit_code == 1 and "invalid option" in res.output
