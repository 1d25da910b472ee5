"""``astrid run``, ``astrid demo`` and ``astrid report``: whole runs with resume, and their report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from astrid.cli.app import QuietOption, app, apply_quiet

StageOption = Annotated[str | None, typer.Option(
    "--stage", help="Run only this stage, or a range A:B (earlier stages must be done).")]
ForceOption = Annotated[bool, typer.Option(
    "--force", help="Recompute the selected stages even where their outputs verify.")]
LimitOption = Annotated[int | None, typer.Option(
    "--limit", min=1, help="Only the first N pairs (supernovae for the archive source).")]


@app.command("run")
def run_command(
    config: Annotated[Path, typer.Argument(help="YAML config of the run.", dir_okay=False)],
    stage: StageOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and exit.")] = False,
    force: ForceOption = False,
    limit: LimitOption = None,
    run_dir: Annotated[Path | None, typer.Option(
        "--run-dir", "-o", help="Run directory (default: pipeline.run_dir, else "
                                "runs/<config name>).")] = None,
    quiet: QuietOption = False,
) -> None:
    """Run the chain a config describes; rerun to resume (verified outputs are kept)."""
    from astrid.config import load_settings

    apply_quiet(quiet)
    settings = load_settings(config)
    run_dir = run_dir or settings.pipeline.run_dir or Path("runs") / config.stem
    _execute(settings, run_dir, config, stage, dry_run, force, limit,
             command=f"astrid run {config}")


@app.command("demo")
def demo_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory.")] = Path("demo_out"),
    quiet: QuietOption = False,
) -> None:
    """A simulated survey through the whole chain, ending with DIR/report.html (resumable)."""
    from astrid.pipeline import demo_settings

    apply_quiet(quiet)
    _execute(demo_settings(), out, None, None, False, False, None, command="astrid demo")


@app.command("report")
def report_command(
    run_dir: Annotated[Path, typer.Argument(help="Run directory.", file_okay=False)],
) -> None:
    """Rebuild RUN_DIR/report.html from the run's state and outputs."""
    from astrid.report import gather, headline, write_report

    paths = write_report(run_dir)
    for line in headline(gather(run_dir)).lines():
        typer.echo(line)
    typer.echo(f"report: {paths[-1]}")


def _execute(settings, run_dir: Path, config: Path | None, stage, dry_run: bool, force: bool,
             limit, command: str) -> None:
    from astrid.pipeline import dry_run as plan_run
    from astrid.pipeline import run_pipeline

    if dry_run:
        _print_plan(plan_run(settings, run_dir, stage_spec=stage, force=force, limit=limit),
                    run_dir)
        return
    summary = run_pipeline(settings, run_dir, config_path=config, stage_spec=stage, force=force,
                           limit=limit, command=command)
    _print_summary(summary)
    if summary.failed:
        raise typer.Exit(1)


def _print_plan(plan, run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]plan[/] for {run_dir} (source: {plan.source})")
    console.print(f"stages: {' -> '.join(plan.stages)}; this run: {', '.join(plan.selected)}")
    if plan.n_sne is not None:
        console.print(f"supernovae: {plan.n_sne}")
    console.print(f"pairs: {len(plan.pairs)}")
    if plan.n_downloads is not None:
        console.print(f"downloads: {plan.n_downloads} pairs")
    table = Table("stage", "pairs to compute")
    for name, n in plan.pending.items():
        table.add_row(name, str(n))
    console.print(table)
    if plan.disk_bytes is not None:
        console.print(f"estimated new disk: {plan.disk_bytes / 1e9:.2f} GB")
    for note in plan.notes:
        console.print(f"note: {note}")


def _print_summary(summary) -> None:
    from rich.console import Console
    from rich.table import Table

    from astrid.pipeline.state import BLOCKED, DONE, FAILED, SKIPPED

    console = Console()
    table = Table("stage", "done", "skipped (verified)", "failed", "blocked",
                  title=f"run {summary.run_id} in {summary.run_dir} ({summary.elapsed_s:.1f} s)")
    for stage, counts in summary.counts.items():
        failed = counts.get(FAILED, 0)
        table.add_row(stage, str(counts.get(DONE, 0)), str(counts.get(SKIPPED, 0)),
                      f"[red]{failed}[/]" if failed else "0", str(counts.get(BLOCKED, 0)))
    console.print(table)
    for event in summary.failures:
        console.print(f"[red]failed[/] {event.item} {event.stage}: {event.error}",
                      highlight=False)
    if summary.report is not None:
        from astrid.report import gather, headline

        for line in headline(gather(summary.run_dir)).lines():
            console.print(line, highlight=False)
        console.print(f"report: {summary.report}", highlight=False)
