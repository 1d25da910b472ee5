"""Shared fixtures: the real data in ../shared/data and small simulated images."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ASTRID_SHARED_DATA", ROOT.parent / "shared" / "data"))


def shared_data_path(*parts: str) -> Path:
    """Path inside ../shared/data; skip (or fail under CI) when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        reason = f"real data not available: {path} (see ../shared/data/README.md)"
        if os.environ.get("ASTRID_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


@pytest.fixture
def shared_data():
    """Callable fixture: ``shared_data("diffpairs", "decam")`` -> Path, skipping if absent."""
    return shared_data_path
