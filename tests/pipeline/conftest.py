"""Fixtures of the pipeline tests; the helpers live in pipeline_testing.py beside this file."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Test modules import the helpers by name (pytest runs with --import-mode=importlib).
sys.path.insert(0, str(Path(__file__).parent))

from pipeline_testing import settings_of, small_config  # noqa: E402


@pytest.fixture(scope="session")
def baseline(tmp_path_factory):
    """An uninterrupted serial run of the small config: (run_dir, summary)."""
    from astrid.pipeline import run_pipeline

    run_dir = tmp_path_factory.mktemp("baseline") / "run"
    summary = run_pipeline(settings_of(small_config()), run_dir)
    assert summary.failed == 0, summary.failures
    return run_dir, summary
