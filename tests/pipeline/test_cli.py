"""`astrid run` on bad input (one-line errors) and on a local folder with one corrupt file."""

from __future__ import annotations

import shutil
import socket

import pytest
from pipeline_testing import CHAIN, small_config, write_config
from typer.testing import CliRunner

from astrid.cli import app
from astrid.pipeline import open_state

runner = CliRunner()


def _error_line(result) -> str:
    """The run failed with exactly one line on stderr, which is returned."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_unknown_stage_is_a_one_line_error(tmp_path):
    config = write_config(tmp_path / "bad.yaml",
                          small_config(pipeline={"stages": ["simulate", "difff", "report"]}))
    line = _error_line(runner.invoke(app, ["run", str(config), "-o", str(tmp_path / "r")]))
    assert "bad.yaml" in line and "unknown stage 'difff'" in line


def test_unknown_stage_on_the_command_line_is_a_one_line_error(tmp_path):
    config = write_config(tmp_path / "ok.yaml", small_config())
    line = _error_line(runner.invoke(app, ["run", str(config), "--stage", "bogus", "-o",
                                           str(tmp_path / "r")]))
    assert "'bogus' is not a stage of this run" in line


def test_missing_input_folder_is_a_one_line_error(tmp_path):
    config = write_config(tmp_path / "local.yaml", {"pipeline": {
        "source": "local", "local_dir": str(tmp_path / "nowhere"),
        "stages": ["index", "diff", "report"]}})
    line = _error_line(runner.invoke(app, ["run", str(config), "-o", str(tmp_path / "r")]))
    assert "nowhere" in line and "input folder not found" in line


def test_unreachable_scheduler_is_a_one_line_error(tmp_path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = write_config(tmp_path / "dask.yaml", small_config(pipeline={
        "executor": "dask", "scheduler": f"tcp://127.0.0.1:{port}"}))
    line = _error_line(runner.invoke(app, ["run", str(config), "-o", str(tmp_path / "r")]))
    assert f"cannot reach the Dask scheduler at tcp://127.0.0.1:{port}" in line


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    config = write_config(tmp_path / "plan.yaml", small_config())
    result = runner.invoke(app, ["run", str(config), "--dry-run", "-o", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "pairs: 3" in result.output and "estimated new disk" in result.output
    assert not (tmp_path / "r").exists()


@pytest.fixture
def local_folder(baseline, tmp_path):
    """The baseline's simulated pairs as a user's folder, one science image truncated."""
    folder = tmp_path / "images"
    for pair in sorted((baseline[0] / "pairs").iterdir()):
        shutil.copytree(pair / "raw", folder / pair.name)
    victim = sorted(folder.iterdir())[1] / "sci.fits"
    victim.write_bytes(victim.read_bytes()[:20000])
    return folder, victim


def test_one_corrupt_input_is_reported_and_the_rest_complete(local_folder, tmp_path):
    folder, victim = local_folder
    stages = ["index"] + CHAIN[1:]
    config = write_config(tmp_path / "local.yaml", {"pipeline": {
        "source": "local", "local_dir": str(folder), "stages": stages}})
    run_dir = tmp_path / "run"
    result = runner.invoke(app, ["run", str(config), "-o", str(run_dir), "-q"])
    assert result.exit_code == 1
    assert "failed" in result.output and "sci.fits" in result.output
    with open_state(run_dir, create=False) as state:
        failed = [r for r in state.records() if not r.ok]
        assert [(r.stage, r.item) for r in failed] == [("diff", victim.parent.name)]
        assert "sci.fits" in failed[0].error and "\n" not in failed[0].error
        last = stages[-2]
        done = {r.item for r in state.records(last) if r.ok}
        assert done == {p.name for p in folder.iterdir()} - {victim.parent.name}
    assert "sci.fits" in (run_dir / "report.html").read_text()
