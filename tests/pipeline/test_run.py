"""Whole runs on small simulated surveys: resume, invalidation, executors, the report."""

from __future__ import annotations

import base64
import shutil
from html.parser import HTMLParser

import pandas as pd
from pipeline_testing import (
    CHAIN,
    HAS_MODEL,
    candidate_tables,
    pixel_digests,
    settings_of,
    small_config,
)

from astrid.pipeline import open_state, run_pipeline
from astrid.pipeline.run import verify_outputs
from astrid.pipeline.state import DONE, SKIPPED


def test_a_run_records_every_stage_and_its_outputs(baseline):
    run_dir, summary = baseline
    per_pair = [s for s in CHAIN if s != "report"]
    assert summary.counts["simulate"][DONE] == 3
    assert all(summary.counts[s].get(DONE) == 3 for s in per_pair)
    with open_state(run_dir, create=False) as state:
        records = state.records()
        assert {r.stage for r in records} == set(CHAIN)
        assert all(r.ok and verify_outputs(run_dir, r) for r in records)
        assert len(state.items()) == 3
        run = state.runs()[-1]
        assert run["status"] == "ok" and run["config_hash"] and "numpy" in run["versions_json"]
    assert (run_dir / "report.html").exists() and (run_dir / "candidates.csv").exists()
    assert len(candidate_tables(run_dir)) > 0


def test_a_second_run_does_no_work(baseline, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(baseline[0], run_dir)
    summary = run_pipeline(settings_of(small_config()), run_dir)
    assert summary.done == 0 and summary.failed == 0
    assert all(set(c) == {SKIPPED} for c in summary.counts.values())
    with open_state(run_dir, create=False) as state:
        assert not [r for r in state.records() if r.run_id == summary.run_id]


def test_changing_diff_settings_redoes_diff_and_downstream_only(baseline, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(baseline[0], run_dir)
    summary = run_pipeline(settings_of(small_config(detect={"threshold_sigma": 6.0})), run_dir)
    assert summary.counts["simulate"] == {SKIPPED: 3}
    for stage in CHAIN[1:-1]:
        assert summary.counts[stage] == {DONE: 3}, stage
    assert summary.counts["report"] == {DONE: 1}
    # A stricter threshold can only remove candidates.
    assert len(candidate_tables(run_dir)) < len(candidate_tables(baseline[0]))


def test_a_corrupted_output_is_recomputed_with_what_depends_on_it(baseline, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(baseline[0], run_dir)
    pair = sorted((run_dir / "pairs").iterdir())[1]
    with open(pair / "diff" / "candidates.csv", "a") as fh:
        fh.write("garbage\n")
    summary = run_pipeline(settings_of(small_config()), run_dir)
    assert summary.counts["simulate"] == {SKIPPED: 3}
    assert summary.counts["diff"] == {SKIPPED: 2, DONE: 1}
    pd.testing.assert_frame_equal(candidate_tables(run_dir), candidate_tables(baseline[0]))


def _same_results(run_dir, baseline_dir):
    pd.testing.assert_frame_equal(candidate_tables(run_dir), candidate_tables(baseline_dir))
    assert pixel_digests(run_dir / "pairs") == pixel_digests(baseline_dir / "pairs")


def test_process_pool_gives_identical_results(baseline, tmp_path):
    # No report: the candidate tables and images are what must agree.
    config = small_config(pipeline={"executor": "processes", "workers": 2,
                                    "stages": CHAIN[:-1]})
    summary = run_pipeline(settings_of(config), tmp_path / "run")
    assert summary.failed == 0, summary.failures
    _same_results(tmp_path / "run", baseline[0])


def test_dask_cluster_on_loopback_gives_identical_results(baseline, tmp_path):
    from distributed import LocalCluster

    # A real scheduler and worker processes on 127.0.0.1, reached by its tcp:// address as a
    # remote cluster would be.
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        config = small_config(pipeline={"executor": "dask", "stages": CHAIN[:-1],
                                        "scheduler": cluster.scheduler_address})
        summary = run_pipeline(settings_of(config), tmp_path / "run")
    assert summary.failed == 0, summary.failures
    _same_results(tmp_path / "run", baseline[0])


def test_stage_selection_and_limit(tmp_path):
    run_dir = tmp_path / "run"
    summary = run_pipeline(settings_of(small_config()), run_dir, stage_spec="simulate",
                           limit=2)
    assert summary.counts["simulate"] == {DONE: 2}
    assert summary.counts["diff"] == {"blocked": 2}
    assert not (run_dir / "report.html").exists() or summary.counts["report"]
    assert summary.failed == 0


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.headings, self._in_h2 = [], [], False

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))
        self._in_h2 = tag == "h2"

    def handle_data(self, data):
        if self._in_h2:
            self.headings.append(data.strip())
            self._in_h2 = False


def test_report_is_self_contained_and_embeds_its_figures(baseline):
    run_dir, _ = baseline
    parser = _Images()
    parser.feed((run_dir / "report.html").read_text())
    # completeness (truth is known), scores (when scored), gallery
    assert len(parser.images) >= (3 if HAS_MODEL else 2)
    for img in parser.images:
        assert img["src"].startswith("data:image/png;base64,")
        png = base64.b64decode(img["src"].split(",", 1)[1])
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    assert {"Summary", "Per-pair quality", "Completeness"} <= set(parser.headings)
    assert not any(src.startswith("http") for src in
                   (i.get("src", "") for i in parser.images))


def test_astrid_report_rebuilds_the_report(baseline, tmp_path):
    from typer.testing import CliRunner

    from astrid.cli import app

    run_dir = tmp_path / "run"
    shutil.copytree(baseline[0], run_dir)
    (run_dir / "report.html").unlink()
    result = CliRunner().invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "candidates:" in result.output and (run_dir / "report.html").exists()
    bad = CliRunner().invoke(app, ["report", str(tmp_path / "nothing")])
    assert bad.exit_code == 1 and "not a run directory" in bad.stderr
