import pytest
from typer.testing import CliRunner

from astrid.cli import app
from astrid.config import Settings, load_settings
from astrid.errors import ConfigError
from astrid.provenance import config_hash


def test_defaults_without_file():
    settings = load_settings(None)
    assert settings.detect.threshold_sigma == 5.0
    assert settings.stamps.size_px == 63


def test_partial_file_overrides_only_what_it_names(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("diff:\n  tile_px: 512\n")
    settings = load_settings(path)
    assert settings.diff.tile_px == 512
    assert settings.diff.method == Settings().diff.method
    assert config_hash(settings) != config_hash(Settings())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("diff:\n  tile_pz: 512\n", "unknown key 'diff.tile_pz'"),
        ("difff:\n  tile_px: 512\n", "unknown key 'difff'"),
        ("diff:\n  tile_px: big\n", "invalid value for 'diff.tile_px'"),
        ("detect:\n  threshold_sigma: -1\n", "invalid value for 'detect.threshold_sigma'"),
        ("diff: [1, 2\n", "not valid YAML"),
        ("- a\n- b\n", "expected a mapping"),
    ],
)
def test_bad_config_names_file_and_problem(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert message.startswith(str(path))
    assert expected in message
    assert "\n" not in message


def test_config_show_cli_one_line_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("sim:\n  pairz: 3\n")
    result = CliRunner().invoke(app, ["config", "show", str(path)])
    assert result.exit_code == 1
    assert result.output.strip() == f"error: {path}: unknown key 'sim.pairz'"


def test_config_show_prints_resolved_settings(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sim:\n  pairs: 3\n")
    result = CliRunner().invoke(app, ["config", "show", str(path)])
    assert result.exit_code == 0
    assert "pairs: 3" in result.output
    assert "config hash" in result.output


def test_example_configs_are_valid():
    from pathlib import Path

    configs = sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml"))
    for path in configs:
        if path.name == "model_default.yaml":
            continue  # training recipe, checked by the ML tests
        load_settings(path)
