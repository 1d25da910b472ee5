"""`astrid run` killed with SIGKILL at random moments, then rerun, ends exactly like a clean run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
from pipeline_testing import (
    candidate_tables,
    output_files,
    pixel_digests,
    small_config,
    write_config,
)

from astrid.pipeline import open_state
from astrid.pipeline.run import verify_outputs
from astrid.pipeline.state import DONE

ASTRID = [sys.executable, "-m", "astrid"]


def _start(config: Path, run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "ASTRID_QUIET": "1"}
    return subprocess.Popen([*ASTRID, "run", str(config), "-o", str(run_dir), "-q"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _run(config: Path, run_dir: Path, *, kill_after_s: float | None = None) -> int | None:
    """Run ``astrid run`` in a subprocess; SIGKILL it after ``kill_after_s`` if still running."""
    proc = _start(config, run_dir)
    try:
        if kill_after_s is None:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err.decode()[-2000:]
            return proc.returncode
        try:
            proc.wait(timeout=kill_after_s)
            return proc.returncode  # finished before the kill
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _kill_when_workers_run(config: Path, run_dir: Path, extra_s: float) -> list[psutil.Process]:
    """Start a process-pool run, SIGKILL it ``extra_s`` after its workers exist; the workers."""
    proc = _start(config, run_dir)
    try:
        workers: list[psutil.Process] = []
        for _ in range(600):  # the pool starts after imports and planning: poll for it
            workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                       if "spawn_main" in " ".join(p.cmdline())]
            if workers or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert workers, "the run never started its pool workers"
        time.sleep(extra_s)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return workers
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_killed_runs_resume_to_exactly_the_uninterrupted_outputs(baseline, tmp_path):
    clean_dir, _ = baseline
    config = write_config(tmp_path / "small.yaml", small_config())
    pool = write_config(tmp_path / "pool.yaml", small_config(pipeline={"executor": "processes"}))
    run_dir = tmp_path / "run"
    rng = random.Random(20261127)

    # First a process-pool run, killed once its workers are busy: they must die with it, or
    # they would go on writing into the run directory while the rerun starts.
    workers = _kill_when_workers_run(pool, run_dir, extra_s=rng.uniform(0.5, 3.0))
    gone, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, [p.pid for p in alive]

    # Start-up takes 1.5-3 s and the whole small run 10 s or more: each attempt is killed at a
    # random moment (during start-up, a stage, a write or a state commit) and resumes what the
    # previous attempts left.
    kills = 0
    for _ in range(3):
        if _run(config, run_dir, kill_after_s=rng.uniform(1.5, 5.0)) is None:
            kills += 1
    assert kills >= 2
    _run(config, run_dir)

    # Exactly the outputs of the uninterrupted run: same files, same tables, same pixels.
    assert output_files(run_dir) == output_files(clean_dir)
    pd.testing.assert_frame_equal(candidate_tables(run_dir), candidate_tables(clean_dir))
    assert pixel_digests(run_dir) == pixel_digests(clean_dir)
    assert not [p for p in run_dir.rglob("*") if p.name.endswith(".part")]
    with open_state(run_dir, create=False) as state:
        assert all(r.ok and verify_outputs(run_dir, r) for r in state.records())

    # And once more: nothing is redone.
    _run(config, run_dir)
    with open_state(run_dir, create=False) as state:
        last = state.runs()[-1]["run_id"]
        assert [e for e in state.events(last) if e.action == DONE] == []
        assert not [r for r in state.records() if r.run_id == last]
