import subprocess
import sys

from typer.testing import CliRunner

from astrid import __version__
from astrid.cli import app


def test_help_lists_commands_with_one_line_help():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("config", "simulate", "diff"):
        assert command in result.output


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"astrid {__version__}"


def test_console_entry_point_runs_and_reports_user_errors(tmp_path):
    missing = tmp_path / "nope.yaml"
    proc = subprocess.run([sys.executable, "-m", "astrid", "config", "show", str(missing)],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: {missing}: config file not found"
    assert "Traceback" not in proc.stderr
