"""The ``astrid`` Typer application, its shared options and its error handling.

Command modules (``astrid/cli/*.py``) register commands on :data:`app`. They keep heavy imports
(torch, dask, fastapi) inside the command functions so that ``astrid --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import click
import typer
from typer.core import TyperGroup

from astrid import __version__
from astrid.errors import AstridError
from astrid.progress import set_quiet


class _AstridGroup(TyperGroup):
    """Turn user errors into one line on stderr and exit code 1, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except AstridError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(1)
        except FileNotFoundError as exc:
            click.echo(f"error: {exc.filename}: file not found", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


app = typer.Typer(
    name="astrid",
    cls=_AstridGroup,
    help="AstrID: find supernovae by image differencing (ZOGY) and a real/bogus CNN.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

# Options shared by commands; use them as parameter annotations.
ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML settings file (see `astrid config show`).",
                 exists=False, dir_okay=False),
]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"astrid {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    quiet: QuietOption = False,
) -> None:
    """AstrID: find supernovae by image differencing (ZOGY) and a real/bogus CNN."""
    set_quiet(quiet)


def apply_quiet(quiet: bool) -> None:
    """Per-command ``--quiet`` (the root ``astrid --quiet`` works too)."""
    if quiet:
        set_quiet(True)


def main(argv: list[str] | None = None) -> None:
    app(args=argv, prog_name="astrid")
