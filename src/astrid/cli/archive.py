"""Archive commands: ``astrid catalog``, ``query``, ``pairs``, ``download``, ``index``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from astrid.cli.app import ConfigOption, QuietOption, app, apply_quiet

OutOption = Annotated[Path, typer.Option("--output", "-o", help="Output file.")]


def _provenance_sidecar(out: Path, settings, inputs: list) -> None:
    """CSV outputs carry their provenance in ``<out>.provenance.json`` beside them."""
    from astrid.provenance import provenance, write_json_atomic

    write_json_atomic(out.with_name(out.name + ".provenance.json"),
                      provenance(settings, inputs=[str(p) for p in inputs]))


def _beside(out: Path, tag: str) -> Path:
    """``pairs.csv`` -> ``pairs.<tag>.csv``."""
    return out.with_name(f"{out.stem}.{tag}{out.suffix or '.csv'}")


@app.command("catalog")
def catalog_cmd(
    path: Annotated[Path, typer.Argument(help="Catalog: sncat dump, OSC csv(.gz), ZTF BTS, TNS or plain CSV.")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the normalised table here (CSV).")] = None,
    date_min: Annotated[str | None, typer.Option(help="Earliest discovery date (ISO or MJD).")] = None,
    date_max: Annotated[str | None, typer.Option(help="Latest discovery date (ISO or MJD).")] = None,
    types: Annotated[list[str] | None, typer.Option("--type", help="Type prefix (repeatable): Ia, II, Ib...")] = None,
    dec_min: Annotated[float | None, typer.Option(help="Smallest declination, degrees.")] = None,
    dec_max: Annotated[float | None, typer.Option(help="Largest declination, degrees.")] = None,
    limit: Annotated[int | None, typer.Option(help="Keep at most this many supernovae.")] = None,
    allow_undated: Annotated[bool, typer.Option(help="Keep rows without a discovery date.")] = False,
    quiet: QuietOption = False,
) -> None:
    """Read a supernova catalog, print a summary and write the normalised table."""
    from astrid.catalog import filter_catalog, read_catalog
    from astrid.provenance import write_table_atomic

    apply_quiet(quiet)
    cat = read_catalog(path, require_date=not allow_undated)
    chosen = filter_catalog(cat, date_min=_date_arg(date_min), date_max=_date_arg(date_max),
                            types=types, dec_min_deg=dec_min, dec_max_deg=dec_max, limit=limit)
    typer.echo(cat.summary())
    if len(chosen.table) != len(cat.table):
        typer.echo(f"  selected {len(chosen.table)} of {len(cat.table)} by the filters")
    if output is not None:
        write_table_atomic(output, chosen.table)
        write_table_atomic(_beside(output, "rejected"), chosen.rejected)
        _provenance_sidecar(output, None, [path])
        typer.echo(f"wrote {output} ({len(chosen.table)} rows) and {_beside(output, 'rejected')}")


def _date_arg(value: str | None) -> str | float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return value


@app.command("query")
def query_cmd(
    catalog: Annotated[Path, typer.Option("--catalog", help="Supernova catalog (any supported format).")],
    output: OutOption,
    config: ConfigOption = None,
    cache: Annotated[Path | None, typer.Option(help="Query cache folder (default from config or ~/.cache/astrid/mast).")] = None,
    limit: Annotated[int | None, typer.Option(help="Query only the first N supernovae.")] = None,
    quiet: QuietOption = False,
) -> None:
    """Query MAST for reference and science images of each supernova (observation table)."""
    from astrid.archive.mast import ArchiveUnreachable, query_observations
    from astrid.catalog import filter_catalog, read_catalog
    from astrid.config import load_settings
    from astrid.errors import AstridError
    from astrid.provenance import write_table_atomic

    apply_quiet(quiet)
    settings = load_settings(config)
    cat = filter_catalog(read_catalog(catalog), limit=limit)
    errors_path = _beside(output, "errors")
    try:
        result = query_observations(cat.table, settings.archive, cache,
                                    source=str(config or "default settings"))
    except ArchiveUnreachable as exc:
        partial = exc.partial
        write_table_atomic(output, partial.observations)
        write_table_atomic(errors_path, partial.errors)
        raise AstridError(f"{exc}; partial results kept in {output} and {errors_path}") from None
    write_table_atomic(output, result.observations)
    write_table_atomic(errors_path, result.errors)
    _provenance_sidecar(output, settings.archive, [catalog])
    n_sn = result.observations["sn"].nunique() if len(result.observations) else 0
    typer.echo(f"{len(result.observations)} observations of {n_sn} of {len(cat.table)} supernovae "
               f"-> {output}; {len(result.errors)} failed requests -> {errors_path}")


@app.command("pairs")
def pairs_cmd(
    observations: Annotated[Path, typer.Argument(help="Observation table (CSV/ECSV/Parquet) from `astrid query` or `astrid index`.")],
    output: OutOption,
    catalog: Annotated[Path | None, typer.Option("--catalog", help="Supernova catalog; without it, a local folder's targets are paired.")] = None,
    config: ConfigOption = None,
    quiet: QuietOption = False,
) -> None:
    """Choose reference/science pairs (same mission, instrument, filter); write pairs.csv."""
    from astrid.archive.mast import read_observations
    from astrid.archive.pairing import make_pairs
    from astrid.catalog import read_catalog
    from astrid.config import load_settings
    from astrid.provenance import write_table_atomic

    apply_quiet(quiet)
    settings = load_settings(config)
    obs = read_observations(observations)
    table = read_catalog(catalog).table if catalog is not None else None
    pairs = make_pairs(obs, table, settings.archive, source=str(config or "default settings"))
    write_table_atomic(output, pairs)
    _provenance_sidecar(output, settings.archive, [observations] + ([catalog] if catalog else []))
    paired = pairs[pairs["status"] == "paired"]
    typer.echo(f"{len(paired)} pairs for {paired['sn'].nunique()} supernovae, "
               f"{len(pairs) - len(paired)} rejected candidates -> {output}")
    reasons = pairs.loc[pairs["status"] == "rejected", "reason"].str.replace(r"\d[\d.]*", "N", regex=True)
    for reason, count in reasons.value_counts().head(8).items():
        typer.echo(f"  rejected {count:6d}: {reason}")


@app.command("download")
def download_cmd(
    pairs: Annotated[Path, typer.Argument(help="pairs.csv from `astrid pairs`.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Root folder for the images.")],
    config: ConfigOption = None,
    quiet: QuietOption = False,
) -> None:
    """Download (resumably) and verify the images of every paired row."""
    import pandas as pd

    from astrid.archive.download import download_pairs
    from astrid.config import load_settings
    from astrid.errors import AstridError, InputFileError

    apply_quiet(quiet)
    settings = load_settings(config)
    if not pairs.exists():
        raise InputFileError(pairs, "file not found")
    try:
        table = pd.read_csv(pairs, dtype={"ref_obsid": str, "sci_obsid": str, "sn": str})
    except Exception as exc:  # noqa: BLE001
        raise InputFileError(pairs, f"not a readable pairs table ({type(exc).__name__})") from None
    missing = [c for c in ("sn", "mission", "filter", "status", "ref_url", "sci_url") if c not in table]
    if missing:
        raise InputFileError(pairs, f"not a pairs table: no {', '.join(missing)} column")
    result = download_pairs(table, output, settings.archive)
    typer.echo(f"{result.n_verified} files verified ({(result.files['status'] == 'cached').sum()} "
               f"already there), {result.n_failed} failed; manifest {result.manifest_path}")
    if result.n_failed:
        first = result.files[result.files["status"] == "failed"].iloc[0]
        raise AstridError(f"{result.n_failed} downloads failed (first: {first['url']}: "
                          f"{first['reason']}); verified files kept, see {result.manifest_path}")


@app.command("index")
def index_cmd(
    folder: Annotated[Path, typer.Argument(help="Folder of FITS images (searched recursively).")],
    output: OutOption,
    quiet: QuietOption = False,
) -> None:
    """Index a folder of FITS images into an observation table (a local archive)."""
    from astrid.archive.local import scan_folder
    from astrid.provenance import write_table_atomic

    apply_quiet(quiet)
    index = scan_folder(folder)
    write_table_atomic(output, index.observations)
    write_table_atomic(_beside(output, "problems"), index.problems)
    _provenance_sidecar(output, None, [folder])
    typer.echo(f"{len(index.observations)} images indexed -> {output}; "
               f"{len(index.problems)} files unusable -> {_beside(output, 'problems')}")
