"""``astrid serve`` (the API and review page) and ``astrid retrain`` (learn from the labels)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from astrid.cli.app import ConfigOption, QuietOption, app, apply_quiet


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Interface to listen on [serve.host].")] = None,
    port: Annotated[int | None, typer.Option(help="Port [serve.port]; 0 = any free port.")] = None,
    model: Annotated[Path | None, typer.Option(
        help="Model directory or models root (a promoted model is picked up live) "
             "[serve.model, else the packaged model].")] = None,
    db: Annotated[str | None, typer.Option(
        help="Label store: sqlite:///FILE or postgresql://user@host/db [serve.db_url].")] = None,
    import_paths: Annotated[list[Path] | None, typer.Option(
        "--import", help="Triplet dataset or run directory to add to the review queue "
                         "(repeatable).")] = None,
    config: ConfigOption = None,
) -> None:
    """Serve the scoring API, the label store and the review page (/review, /docs)."""
    import os
    import secrets

    import uvicorn

    from astrid.config import load_settings
    from astrid.serve.app import create_app
    from astrid.serve.queue import import_candidates

    settings = load_settings(config)
    cfg = settings.serve
    for key, value in (("host", host), ("port", port), ("model", model), ("db_url", db)):
        if value is not None:
            setattr(cfg, key, value)
    token = cfg.token or os.environ.get("ASTRID_TOKEN")
    if not token:
        # Like Jupyter: never run with writes open; give the operator a token to use.
        token = secrets.token_urlsafe(18)
        typer.echo(f"no serve.token or ASTRID_TOKEN set; write token for this run: {token}",
                   err=True)
    web = create_app(settings, token=token)
    holder, store = web.state.holder, web.state.store
    if holder.model_dir is None:
        typer.echo(f"warning: no model loaded ({holder.error}); /v1/score answers 503", err=True)
    for path in import_paths or []:
        n = import_candidates(store, path, model=holder.version,
                              score=(lambda s: holder.score(s)[0]) if holder.model_dir else None)
        typer.echo(f"imported {n} candidates from {path}", err=True)
    typer.echo(f"AstrID on http://{cfg.host}:{cfg.port}  (review page /review, API docs /docs, "
               f"store {store.engine}, model {holder.version})", err=True)
    uvicorn.run(web, host=cfg.host, port=cfg.port, log_level="info")


@app.command()
def retrain(
    labels: Annotated[str, typer.Option(help="Label store: a SQLite file or URL, or "
                                             "postgresql://...")],
    base: Annotated[Path, typer.Option(help="Base model directory or models root.")],
    out: Annotated[Path, typer.Option("--output", "-o", help="Directory for the new model.")],
    train_data: Annotated[list[Path] | None, typer.Option(
        "--train-data", help="Original training dataset(s) replayed to avoid forgetting "
                             "(default: the one recorded in the base model, if present).")] = None,
    root: Annotated[Path | None, typer.Option(
        help="Models root to record the version in and promote to (default: the base's "
             "root when --base is one).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Fine-tuning epochs.")] = None,
    holdout: Annotated[float, typer.Option(help="Fraction of labels held out for the "
                                                "old-vs-new comparison.")] = 0.25,
    config: ConfigOption = None,
    quiet: QuietOption = False,
) -> None:
    """Fine-tune a model on reviewers' labels; promote it only if it beats the base."""
    apply_quiet(quiet)
    from astrid.config import load_settings
    from astrid.ml.retrain import retrain as run_retrain

    settings = load_settings(config)
    result = run_retrain(labels, base, out, train_data=train_data or None, root=root,
                         settings=settings.train, epochs=epochs, holdout_fraction=holdout)
    key = result.metric
    typer.echo(f"labels: {result.n_train_labels} train, {result.n_holdout_labels} held out; "
               f"replayed {result.n_replay} original triplets")
    for name, metrics in (("base", result.base_metrics), ("new", result.new_metrics)):
        value, (lo, hi) = metrics[key]["value"], metrics[key]["ci95"]
        typer.echo(f"held-out {key} {name}: {value:.4f} (95% CI {lo:.3f}-{hi:.3f})")
    verdict = f"promoted as {result.version}" if result.promoted else "not promoted"
    typer.echo(f"{verdict}: {result.reason}  (model in {result.new_model_dir})")
