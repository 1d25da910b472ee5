"""The example per-mission configs load, and name only missions and filters AstrID knows."""

from __future__ import annotations

from pathlib import Path

import pytest

from astrid.archive.filters import validate_archive_settings
from astrid.config import load_settings

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "missions").glob("*.yaml"))


def test_there_is_one_config_per_mission():
    assert {p.stem for p in CONFIGS} >= {"swift_uvot", "galex", "ps1", "hst"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_mission_config_is_valid(path):
    archive = load_settings(path).archive
    missions, filters = validate_archive_settings(archive.missions, archive.filters, str(path))
    assert len(missions) == 1 and filters
