"""The ``astrid`` command line. Each module registers its commands on the shared app."""

from astrid.cli import (  # noqa: F401  (importing registers the commands)
    archive,
    config_cmd,
    diff,
    ml,
    pipeline,
    serve,
    sim,
    stamps,
)
from astrid.cli.app import app, main

__all__ = ["app", "main"]
