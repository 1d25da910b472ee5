"""`astrid serve` as a real process, and `astrid retrain`'s user errors."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest
from typer.testing import CliRunner

from astrid.cli import app
from astrid.ml.data import DatasetWriter
from astrid.ml.score import score_triplets


def test_serve_imports_a_dataset_and_prints_a_token(tmp_path, tiny_model, ztf_triplets):
    stamps, candid, meta = ztf_triplets
    dataset = tmp_path / "ztf-set"
    with DatasetWriter(dataset, 63) as writer:
        writer.append(stamps, meta.assign(triplet_id=candid.astype(str), ra=meta["ra"],
                                          dec=meta["dec"]))
    env = {k: v for k, v in os.environ.items() if k != "ASTRID_TOKEN"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "astrid", "serve", "--host", "127.0.0.1", "--port", "0",
         "--model", str(tiny_model), "--db", f"sqlite:///{tmp_path / 'labels.db'}",
         "--import", str(dataset)], stderr=subprocess.PIPE, text=True, env=env)
    try:
        token, lines, url = None, [], None
        deadline = time.monotonic() + 90
        for line in proc.stderr:  # startup messages, then uvicorn's
            lines.append(line)
            if "write token for this run:" in line:
                token = line.rsplit(":", 1)[1].strip()
            if "Uvicorn running on http://" in line:  # port 0: the OS chose a free one
                url = line.split("running on ", 1)[1].split()[0]
                break
            assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
        assert token and any("imported 49 candidates" in line for line in lines), "".join(lines)
        runs = httpx.get(f"{url}/v1/runs").json()["runs"]
        assert runs == [{"run": "ztf-set", "candidates": 49, "labelled": 0}]
        got = httpx.get(f"{url}/v1/candidates", params={"limit": 100}).json()["candidates"]
        by_id = {c["id"]: c["score"] for c in got}
        expect = score_triplets(stamps, tiny_model)
        assert [by_id[f"ztf-set:{c}"] for c in candid] == pytest.approx(expect.tolist(), abs=1e-6)
        cid = got[0]["id"]
        body = {"label": "real", "reviewer": "cli"}
        assert httpx.post(f"{url}/v1/candidates/{cid}/label", json=body).status_code == 401
        ok = httpx.post(f"{url}/v1/candidates/{cid}/label", json=body,
                        headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stderr.close()


def test_retrain_user_errors_are_one_line(tmp_path, tiny_model):
    runner = CliRunner()
    db = tmp_path / "labels.db"
    empty = runner.invoke(app, ["retrain", "--labels", str(db), "--base", str(tiny_model),
                                "-o", str(tmp_path / "new")])
    assert empty.exit_code == 1
    assert empty.output.strip() == "error: the label store holds no labels yet: nothing to " \
                                   "retrain on"
    missing = runner.invoke(app, ["retrain", "--labels", str(db), "--base",
                                  str(tmp_path / "nope"), "-o", str(tmp_path / "new")])
    assert missing.exit_code == 1 and "nope: model not found" in missing.output
    bad_db = runner.invoke(app, ["retrain", "--labels", "mysql://x", "--base", str(tiny_model),
                                 "-o", str(tmp_path / "new")])
    assert bad_db.exit_code == 1 and "sqlite:///FILE or postgresql" in bad_db.output


def test_retrain_command_promotes_into_a_models_root(tmp_path, tiny_model, ztf_triplets):
    """Labels from braai's drb on real ZTF alerts (a proxy, not human vetting): the command
    fine-tunes, compares on the held-out labels and records the version either way."""
    from astrid.ml.retrain import list_versions
    from astrid.serve.store import open_store

    stamps, candid, meta = ztf_triplets
    db = tmp_path / "labels.db"
    with open_store(str(db)) as store:
        ids = store.add_candidates(stamps, meta.assign(triplet_id=candid), "ztf")
        for cid, drb in zip(ids, meta["drb"], strict=True):
            store.label(cid, int(drb >= 0.5), "drb-proxy")
    root = tmp_path / "models"
    out = CliRunner().invoke(app, ["retrain", "--labels", f"sqlite:///{db}", "--base",
                                   str(tiny_model), "-o", str(tmp_path / "new"), "--root",
                                   str(root), "--epochs", "1", "--holdout", "0.4"])
    assert out.exit_code == 0, out.output
    assert "held-out aucpr base:" in out.output and "held-out aucpr new:" in out.output
    versions = list_versions(root)
    assert [v["version"] for v in versions] == ["v0001", "v0002"]
    promoted = versions[1]["promoted"]
    assert ("promoted as v0002" in out.output) == promoted
    assert (root / "current").read_text().strip() == ("v0002" if promoted else "v0001")
    assert (tmp_path / "new" / "model.onnx").is_file()
