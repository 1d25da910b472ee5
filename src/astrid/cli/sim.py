"""``astrid simulate``: write a simulated survey with known truth."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from astrid.cli.app import ConfigOption, QuietOption, app, apply_quiet


@app.command("simulate")
def simulate(
    out: Annotated[Path, typer.Argument(help="Output directory (created; complete pairs are kept).")],
    pairs: Annotated[int | None, typer.Option("--pairs", "-n", help="Number of pairs [sim.pairs].")] = None,
    size: Annotated[int | None, typer.Option("--size", help="Image side in pixels [sim.size_px].")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Master seed [sim.seed].")] = None,
    clean: Annotated[bool | None, typer.Option("--clean/--no-clean",
                                               help="No transients or artefacts [sim.clean].")] = None,
    preview: Annotated[bool, typer.Option("--preview/--no-preview",
                                          help="Save OUT/preview.png of the first pair.")] = True,
    config: ConfigOption = None,
    quiet: QuietOption = False,
) -> None:
    """Simulate reference/science pairs with transients, artefacts and truth tables."""
    from pydantic import ValidationError

    from astrid.config import SimSettings, describe_validation_error, load_settings
    from astrid.errors import AstridError
    from astrid.sim import write_survey

    apply_quiet(quiet)
    base = load_settings(config).sim
    options = {"pairs": ("--pairs", pairs), "size_px": ("--size", size), "seed": ("--seed", seed),
               "clean": ("--clean", clean)}
    overrides = {key: value for key, (_, value) in options.items() if value is not None}
    try:
        settings = SimSettings.model_validate({**base.model_dump(), **overrides})
    except ValidationError as exc:
        key = str(exc.errors()[0]["loc"][0])
        flag = options[key][0] if key in options else f"sim.{key}"
        problem = describe_validation_error(exc).split(": ", 1)[-1]
        raise AstridError(f"{flag}: {problem}") from None
    dirs = write_survey(out, settings)
    typer.echo(f"wrote {len(dirs)} pairs ({settings.size_px}x{settings.size_px} px) to {out}/"
               f" (survey.json lists them)")
    if preview and dirs:
        from astrid.sim.preview import save_preview

        png = save_preview(dirs[0], out / "preview.png")
        typer.echo(f"preview of {dirs[0].name}: {png}")
