"""CLI commands for stamps (registered on the shared app)."""

from astrid.cli.app import app  # noqa: F401
