"""CLI commands of the real/bogus classifier: train, evaluate, export, score."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from astrid.cli.app import ConfigOption, QuietOption, app, apply_quiet
from astrid.errors import AstridError, InputFileError


@app.command("train")
def train_cmd(
    data: Annotated[Path, typer.Option("--data", "-d", help="Triplet dataset directory.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Model directory to write.")],
    model: Annotated[str | None, typer.Option(help="Architecture: astrid, braai or braai_fast (overrides config).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Most epochs (overrides config).")] = None,
    restart: Annotated[bool, typer.Option(help="Ignore a checkpoint in the output directory.")] = False,
    config: ConfigOption = None,
    quiet: QuietOption = False,
) -> None:
    """Train a real/bogus network; resumes from OUTPUT/checkpoint.pt if a run was interrupted."""
    apply_quiet(quiet)
    from astrid.config import load_settings
    from astrid.ml.train import train

    settings = load_settings(config).train
    updates = {k: v for k, v in (("model", model), ("epochs", epochs)) if v is not None}
    if updates:
        from pydantic import ValidationError

        from astrid.config import describe_validation_error

        try:
            settings = type(settings).model_validate({**settings.model_dump(), **updates})
        except ValidationError as exc:
            raise AstridError(f"invalid option: {describe_validation_error(exc)}") from None
    result = train(data, output, settings, restart=restart)
    best = result.history.loc[result.history["epoch"] == result.best_epoch].iloc[0]
    typer.echo(f"{output}: {settings.model}, best epoch {result.best_epoch}/{len(result.history)}, "
               f"val AUCPR {best['val_aucpr']:.4f}, FNR@1%FPR {best['val_fnr_at_fpr1']:.4f}, "
               f"T={result.temperature:.3f}")


@app.command("evaluate")
def evaluate_cmd(
    model: Annotated[Path, typer.Argument(help="Model directory.")],
    dataset: Annotated[Path, typer.Argument(help="Triplet dataset directory.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for metrics.json, plots, summary.md.")],
    split: Annotated[str, typer.Option(help="Split to evaluate: test, val, train or all.")] = "test",
    quiet: QuietOption = False,
) -> None:
    """Evaluate a model on a dataset split: metrics with bootstrap CIs, plots, summary."""
    apply_quiet(quiet)
    from astrid.ml.evaluate import evaluate

    report = evaluate(model, dataset, output, split=split)
    m = report["overall"]
    typer.echo(f"{output}: n={m['n']} AUCPR {m['aucpr']['value']:.4f} "
               f"FNR@1%FPR {m['fnr_at_fpr1']['value']:.4f} "
               f"[{m['fnr_at_fpr1']['ci95'][0]:.4f}, {m['fnr_at_fpr1']['ci95'][1]:.4f}]"
               if "aucpr" in m else f"{output}: n={m['n']} (one class only)")


@app.command("export")
def export_cmd(model_dir: Annotated[Path, typer.Argument(help="Model directory (model.pt, model.json).")]
               ) -> None:
    """Export MODEL_DIR/model.pt to MODEL_DIR/model.onnx and check it against torch."""
    from astrid.ml.export import export_onnx

    if not (model_dir / "model.pt").exists():
        raise InputFileError(model_dir, "no model.pt to export")
    report = export_onnx(model_dir)
    typer.echo(f"{report.path}: max |onnx - torch| = {report.max_abs_diff:.2e} on {report.n_checked} triplets")


@app.command("score")
def score_cmd(
    inputs: Annotated[list[Path], typer.Argument(help="Dataset dirs, .npz (sci, ref, diff) or alert packets.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="CSV to write.")],
    model: Annotated[Path | None, typer.Option("--model", "-m", help="Model directory, or a packaged model: default (the ensemble chosen on validation) or fast (braai_fast, > 5,000 triplets/s, for alert streams). Default: default.")] = None,
    backend: Annotated[str | None, typer.Option(help="onnx or torch (default from config).")] = None,
    config: ConfigOption = None,
    quiet: QuietOption = False,
) -> None:
    """Score triplets: writes `candid, score` for alert packets, else `index, score`."""
    apply_quiet(quiet)
    from astrid.config import load_settings
    from astrid.ml.score import resolve_model_dir, score_triplets
    from astrid.provenance import provenance, write_json_atomic, write_table_atomic

    settings = load_settings(config).score
    backend = backend or settings.backend
    if backend not in ("onnx", "torch"):
        raise AstridError(f"--backend must be onnx or torch, not {backend!r}")
    model_dir = resolve_model_dir(model)
    stamps, table, problems = load_score_inputs(inputs)
    scores = score_triplets(stamps, model_dir, backend, threads=settings.threads,
                            batch_size=settings.batch_size)
    table["score"] = scores.astype(float)
    write_table_atomic(output, table)
    record = provenance(settings, [str(p) for p in inputs])
    record.update(model=str(model_dir), backend=backend, n=len(table))
    write_json_atomic(output.with_name(output.name + ".provenance.json"), record)
    if problems is not None and len(problems):
        bad = output.with_name(output.stem + ".problems.csv")
        write_table_atomic(bad, problems)
        typer.echo(f"{len(problems)} packets skipped (see {bad})", err=True)
    if not quiet:
        n_real = int((scores >= settings.threshold).sum())
        typer.echo(f"{output}: {len(table)} triplets scored, {n_real} with score >= {settings.threshold}")


def load_score_inputs(inputs: list[Path]):
    """Raw triplets from datasets, .npz files or alert packets.

    Returns
    -------
    stamps : (N, 3, S, S) float32.
    table : DataFrame with ``candid`` (alerts) or ``index`` (others), and ``source`` if several
        inputs of a non-alert kind were given.
    problems : DataFrame of skipped packets (alerts) or None.
    """
    import numpy as np
    import pandas as pd

    from astrid.alerts import is_alert_file, read_alerts

    for p in inputs:
        if not p.exists():
            raise InputFileError(p, "file not found")
    alerts = [p for p in inputs if (p.is_dir() and not (p / "dataset.json").exists()) or
              (p.is_file() and is_alert_file(p))]
    if alerts and len(alerts) != len(inputs):
        raise AstridError("give either alert packets or triplet files (.npz, datasets), not both")
    if alerts:
        batch = read_alerts(alerts)
        if len(batch) == 0:
            reasons = "; ".join(sorted(set(map(str, batch.problems["reason"]))))[:200]
            raise InputFileError(alerts[0], f"no decodable alert packets ({reasons})")
        table = pd.DataFrame({"candid": batch.meta["candid"].to_numpy()})
        return batch.stamps, table, batch.problems
    parts, tables = [], []
    for p in inputs:
        stamps = _read_triplet_file(p)
        parts.append(stamps)
        tables.append(pd.DataFrame({"index": np.arange(len(stamps)), "source": str(p)}))
    sizes = {s.shape[-1] for s in parts}
    if len(sizes) > 1:
        raise AstridError(f"inputs have different stamp sizes {sorted(sizes)}: score them separately")
    table = pd.concat(tables, ignore_index=True)
    if len(inputs) == 1:
        table = table.drop(columns="source")
    return np.concatenate(parts), table, None


def _read_triplet_file(path: Path):
    import numpy as np

    if path.is_dir():
        from astrid.ml.data import load_dataset

        stamps, _ = load_dataset(path)
        return np.asarray(stamps)
    if path.suffix.lower() != ".npz":
        raise InputFileError(path, "expected a triplet dataset directory, an .npz with sci/ref/diff, "
                                   "or alert packets (.avro, .parquet, .json, .tar.gz)")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("sci", "ref", "diff") if k not in z.files]
            if missing:
                raise InputFileError(path, f"npz lacks array(s) {', '.join(missing)} (needs sci, ref, diff)")
            sci, ref, diff = (np.asarray(z[k], dtype=np.float32) for k in ("sci", "ref", "diff"))
    except (OSError, ValueError) as exc:
        raise InputFileError(path, f"not a readable .npz ({type(exc).__name__})") from None
    if sci.ndim == 2:
        sci, ref, diff = sci[None], ref[None], diff[None]
    if not (sci.shape == ref.shape == diff.shape) or sci.ndim != 3 or sci.shape[1] != sci.shape[2]:
        raise InputFileError(path, f"sci/ref/diff must be (N, S, S) arrays of one shape, got "
                                   f"{sci.shape}, {ref.shape}, {diff.shape}")
    return np.stack([sci, ref, diff], axis=1)
