"""CLI commands for serve (registered on the shared app)."""

from astrid.cli.app import app  # noqa: F401
