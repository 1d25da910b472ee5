"""Config-driven runs with resume: stages, state store, executors (serial, processes, Dask).

``run_pipeline(settings, run_dir)`` runs or resumes a run; ``dry_run`` says what it would do.
Command line: ``astrid run CONFIG.yaml``, ``astrid demo``, ``astrid report RUN_DIR``.
"""

from astrid.pipeline.demo import demo_settings
from astrid.pipeline.dryrun import DryRunPlan, dry_run
from astrid.pipeline.run import RunSummary, run_pipeline
from astrid.pipeline.state import StateStore, open_state

__all__ = ["DryRunPlan", "RunSummary", "StateStore", "demo_settings", "dry_run", "open_state",
           "run_pipeline"]
