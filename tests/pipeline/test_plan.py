"""Chains per source, stage selection, and the demo's settings."""

from pathlib import Path

import pytest

from astrid.config import PipelineSettings, load_settings
from astrid.errors import AstridError, ConfigError
from astrid.pipeline import demo_settings
from astrid.pipeline.plan import resolve_chain

ROOT = Path(__file__).resolve().parents[2]


def test_each_source_has_its_own_acquisition():
    sim = resolve_chain(PipelineSettings(source="sim"))
    assert sim.stages == ("simulate", "diff", "stamps", "score", "report")
    local = resolve_chain(PipelineSettings(source="local"))
    assert local.before == ("index",) and local.per_pair == ("diff", "stamps", "score")
    archive = resolve_chain(PipelineSettings(source="archive"))
    assert archive.before == ("catalog", "query", "pairs")
    assert archive.per_pair == ("download", "diff", "stamps", "score")


def test_stage_ranges_select_part_of_the_chain():
    settings = PipelineSettings(source="sim")
    assert resolve_chain(settings, "diff:score").selected == {"diff", "stamps", "score"}
    assert resolve_chain(settings, "stamps").selected == {"stamps"}
    assert resolve_chain(settings, ":diff").selected == {"simulate", "diff"}
    assert resolve_chain(settings, "score:").selected == {"score", "report"}
    with pytest.raises(AstridError, match="runs backwards"):
        resolve_chain(settings, "score:diff")
    with pytest.raises(AstridError, match="'query' is not a stage of this run"):
        resolve_chain(settings, "query")


def test_a_chain_with_a_hole_or_an_unknown_stage_is_refused():
    with pytest.raises(ConfigError, match="'score' needs 'stamps'"):
        resolve_chain(PipelineSettings(source="sim", stages=["simulate", "diff", "score"]))
    with pytest.raises(ConfigError, match="x.yaml: unknown stage 'zogy'"):
        resolve_chain(PipelineSettings(stages=["diff", "zogy"]), config_path=Path("x.yaml"))
    # A chain may stop early, and the report shows whatever exists.
    short = resolve_chain(PipelineSettings(source="sim", stages=["simulate", "diff", "report"]))
    assert short.stages == ("simulate", "diff", "report")


def test_demo_config_file_matches_the_demo_command():
    assert load_settings(ROOT / "configs" / "demo.yaml") == demo_settings()


@pytest.mark.parametrize("name", ["demo", "local_folder", "archive_example"])
def test_example_configs_load_and_resolve(name):
    settings = load_settings(ROOT / "configs" / f"{name}.yaml")
    assert resolve_chain(settings.pipeline).stages[-1] == "report"
