"""``astrid config``: inspect settings."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from astrid.cli.app import app
from astrid.config import load_settings, settings_to_yaml
from astrid.provenance import config_hash

config_app = typer.Typer(help="Inspect settings files.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("show")
def show(file: Annotated[Path | None, typer.Argument(help="YAML config (defaults if omitted).")] = None):
    """Print the resolved settings (file values over defaults) and their hash."""
    settings = load_settings(file)
    typer.echo(f"# config hash: {config_hash(settings)}")
    typer.echo(settings_to_yaml(settings), nl=False)
