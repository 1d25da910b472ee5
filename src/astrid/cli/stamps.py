"""``astrid stamps``, ``astrid dataset info|merge|split`` and ``astrid fakes``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from astrid.cli.app import ConfigOption, QuietOption, app, apply_quiet
from astrid.errors import AstridError

dataset_app = typer.Typer(help="Inspect, merge and split triplet datasets.", no_args_is_help=True)
app.add_typer(dataset_app, name="dataset")


@app.command()
def stamps(
    diff_dirs: Annotated[list[Path], typer.Argument(help="Diff directories (astrid diff outputs).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Dataset directory to write (or resume).")],
    truth: Annotated[list[Path] | None, typer.Option(
        "--truth", help="Simulated survey directory with <pair_id>/truth.csv (repeatable).")] = None,
    gallery: Annotated[Path | None, typer.Option(help="Also write a PNG gallery of the triplets.")] = None,
    size: Annotated[int | None, typer.Option(help="Stamp side in px (odd; default from config).")] = None,
    config: ConfigOption = None,
    quiet: QuietOption = False,
) -> None:
    """Cut and label (science, reference, difference) triplets of every candidate into a dataset."""
    from astrid.config import load_settings
    from astrid.ml.data import build_dataset, load_dataset

    apply_quiet(quiet)
    settings = load_settings(config).stamps
    if size is not None:
        settings = settings.model_copy(update={"size_px": size})
    if settings.size_px % 2 == 0:
        raise AstridError(f"stamp size must be odd, got {settings.size_px}")
    for folder in truth or []:
        if not folder.is_dir():
            raise AstridError(f"{folder}: truth directory not found")
    summary = build_dataset(diff_dirs, out, truth, settings)
    typer.echo(f"{summary.path}: {summary.n_triplets} triplets ({summary.n_pairs_added} pairs added, "
               f"{summary.n_pairs_skipped} already there) in {summary.elapsed_s:.1f} s")
    for key, n in summary.counts.items():
        label, kind = key.split(":", 1)
        typer.echo(f"  label {int(label):>2}  {kind or '-':<14} {n}")
    if gallery is not None:
        from astrid.detect.gallery import save_gallery

        data, meta = load_dataset(out)
        save_gallery(data, meta, gallery)
        typer.echo(f"gallery: {gallery}")


@dataset_app.command("info")
def dataset_info_cmd(dataset: Annotated[Path, typer.Argument(help="Dataset directory.")]) -> None:
    """Size, channels, shards, and counts by label, kind and split."""
    from astrid.ml.data import dataset_info, load_dataset

    info = dataset_info(dataset)
    _, meta = load_dataset(dataset)
    prov = info.get("provenance", {})
    typer.echo(f"{dataset}: {info['n']} triplets of {info['size']}x{info['size']} "
               f"{tuple(info['channels'])}, {len(info['shards'])} shards, "
               f"astrid {prov.get('astrid_version', '?')}, config {prov.get('config_hash', '?')}")
    if len(meta):
        typer.echo(f"pairs: {meta['pair_id'].nunique()}  fields: {meta['field'].nunique()}  "
                   f"edge stamps: {int(meta['edge'].sum())}")
        counts = meta.groupby(["label", "kind"]).size()
        for (label, kind), n in counts.items():
            typer.echo(f"  label {int(label):>2}  {kind or '-':<14} {n}")
        splits = meta["split"].replace("", "(none)").value_counts()
        typer.echo("splits: " + ", ".join(f"{k} {v}" for k, v in splits.items()))


@dataset_app.command("merge")
def dataset_merge_cmd(
    datasets: Annotated[list[Path], typer.Argument(help="Datasets to concatenate.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="New dataset directory.")],
    keep_split: Annotated[bool, typer.Option(help="Keep the inputs' splits (default: clear).")] = False,
    quiet: QuietOption = False,
) -> None:
    """Concatenate datasets of the same stamp size into a new one."""
    from astrid.ml.data import dataset_info, merge_datasets

    apply_quiet(quiet)
    merge_datasets(datasets, out, keep_split=keep_split)
    typer.echo(f"{out}: {dataset_info(out)['n']} triplets from {len(datasets)} datasets")


@dataset_app.command("split")
def dataset_split_cmd(
    dataset: Annotated[Path, typer.Argument(help="Dataset directory (split saved into it).")],
    by: Annotated[str | None, typer.Option(help="Group column: no group in two splits "
                                                "(default: train.group_by of the config).")] = None,
    fractions: Annotated[str | None, typer.Option(
        help="train,val,test fractions (default: from train.val_fraction/test_fraction).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed (default: train.seed).")] = None,
    config: ConfigOption = None,
) -> None:
    """Grouped, label-stratified train/val/test split, saved in the dataset's metadata."""
    from astrid.config import load_settings
    from astrid.ml.data import grouped_split, load_dataset, write_split

    train = load_settings(config).train
    by = by or train.group_by
    seed = train.seed if seed is None else seed
    if fractions is None:
        parts = (1 - train.val_fraction - train.test_fraction, train.val_fraction, train.test_fraction)
    else:
        try:
            parts = tuple(float(f) for f in fractions.split(","))
        except ValueError:
            raise AstridError(f"--fractions: expected three numbers like 0.7,0.15,0.15, "
                              f"got {fractions!r}") from None
    _, meta = load_dataset(dataset)
    split = grouped_split(meta, by, parts, seed=seed)
    write_split(dataset, split, how={"group_col": by, "fractions": list(parts), "seed": seed})
    for name in ("train", "val", "test"):
        part = meta[split == name]
        real = (part["label"] == 1).mean() if len(part) else float("nan")
        typer.echo(f"{name:<5} {len(part):>8} triplets  {part[by].nunique():>6} groups  "
                   f"real fraction {real:.3f}")


@app.command()
def fakes(
    ref: Annotated[Path, typer.Argument(help="Reference image (FITS).")],
    sci: Annotated[Path, typer.Argument(help="Science image (FITS).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")],
    config: ConfigOption = None,
    quiet: QuietOption = False,
) -> None:
    """Inject PSF-shaped fakes into SCI, re-run ZOGY and detection, measure completeness."""
    from astrid.config import load_settings
    from astrid.detect.fakes import run_fakes, write_fakes_dir
    from astrid.fitsio import read_image
    from astrid.provenance import provenance

    apply_quiet(quiet)
    settings = load_settings(config)
    reference, science = read_image(ref), read_image(sci)
    result = run_fakes(reference, science, settings)
    write_fakes_dir(out, result, provenance(settings, inputs=[ref, sci], seed=settings.fakes.seed))
    typer.echo(result.summary())
    typer.echo(f"wrote {out}/completeness.png, completeness.csv, fakes.csv, triplets/")
