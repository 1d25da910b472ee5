"""The ``astrid`` command line. Each module registers its commands on the shared app; the
import order below is the order ``astrid --help`` lists them: the pipeline's order."""

# isort: off
from astrid.cli import sim, diff, stamps, ml, archive, pipeline, serve, config_cmd  # noqa: F401
# isort: on
from astrid.cli.app import app, main

__all__ = ["app", "main"]
