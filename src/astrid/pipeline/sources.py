"""Where a run's pairs come from: the simulated survey, a local folder of FITS, or the archive.

Whole-run acquisition stages (``catalog``, ``query``, ``pairs`` for the archive; ``index`` for a
local folder) run in the orchestrating process, under the same resume rules as the per-pair
stages, and leave ``RUN/pairs.csv``: one row per pair with the item id and its description.
The simulated survey needs no whole-run stage: its pairs are known from the settings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from astrid.config import ArchiveSettings, Settings
from astrid.errors import AstridError, InputFileError
from astrid.pipeline.plan import Chain
from astrid.pipeline.state import Event, StateStore
from astrid.provenance import file_sha256, write_table_atomic

PAIRS_FILE = "pairs.csv"
_FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz", ".fits.fz", ".fz")


@dataclass(frozen=True)
class SourceStage:
    name: str
    settings_keys: tuple[str, ...]


SOURCE_STAGES = {
    "index": SourceStage("index", ("pipeline.local_dir", "archive")),
    "catalog": SourceStage("catalog", ("pipeline.catalog",)),
    "query": SourceStage("query", ("archive",)),
    "pairs": SourceStage("pairs", ("archive",)),
}


# --------------------------------------------------------------------------------------------
# Simulated survey
# --------------------------------------------------------------------------------------------

def sim_items(settings: Settings, limit: int | None) -> dict[str, dict]:
    """The simulated pairs (the simulator's own pair ids, unique across seeds)."""
    from astrid.sim import pair_id_for

    n = settings.sim.pairs if limit is None else min(limit, settings.sim.pairs)
    return {pair_id_for(settings.sim, i): {"index": i} for i in range(n)}


# --------------------------------------------------------------------------------------------
# A local folder of FITS
# --------------------------------------------------------------------------------------------

def _is_fits(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(_FITS_SUFFIXES)


def _find(folder: Path, stem: str) -> Path | None:
    hits = sorted(p for p in folder.iterdir() if _is_fits(p) and p.name.lower().split(".")[0] == stem)
    return hits[0] if hits else None


def scan_local_pairs(local_dir: Path, archive: ArchiveSettings | None = None) -> pd.DataFrame:
    """The pairs of a local folder, one row per pair (``item, ref, sci, truth, ...``).

    Sub-folders holding ``ref.fits`` and ``sci.fits`` (``.fits``, ``.fits.gz`` or ``.fz``)
    are pairs as they are: the layout ``astrid simulate OUT`` writes, and the easiest one for a
    user's own images; a ``truth.csv`` beside them is used when present. Any other folder of
    FITS is indexed into an observation table (:func:`astrid.archive.index_folder`) and paired
    like archive observations, by target, mission and filter
    (:func:`astrid.archive.make_pairs`). The checksums of the inputs make a replaced file
    recompute its pair; files that cannot be indexed are listed in ``problem``.

    Raises
    ------
    InputFileError
        The folder does not exist, or holds no pair.
    """
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise InputFileError(local_dir, "input folder not found (pipeline.local_dir)")
    rows = []
    for folder in sorted(p for p in local_dir.iterdir() if p.is_dir()):
        ref, sci = _find(folder, "ref"), _find(folder, "sci")
        if ref is None or sci is None:
            continue
        truth = folder / "truth.csv"
        rows.append({"item": folder.name, "ref": str(ref), "sci": str(sci),
                     "truth": str(truth) if truth.exists() else ""})
    table = pd.DataFrame(rows) if rows else _pair_indexed_folder(local_dir, archive)
    if table.empty:
        raise InputFileError(local_dir, "no pairs found (sub-folders holding ref.fits and "
                                        "sci.fits, or images of one target in one filter at "
                                        "two epochs)")
    for role in ("ref", "sci"):
        table[f"{role}_sha256"] = [file_sha256(p) if p else "" for p in table[role]]
    return table


def _pair_indexed_folder(local_dir: Path, archive: ArchiveSettings | None) -> pd.DataFrame:
    from astrid.archive import index_folder, make_pairs

    index = index_folder(local_dir)
    pairs = make_pairs(index.observations, None, archive or ArchiveSettings())
    paired = pairs[pairs["status"] == "paired"]
    rows = [{"item": _archive_item(r), "ref": r.ref_url, "sci": r.sci_url, "truth": "",
             "sn": r.sn, "mission": r.mission, "filter": r.filter}
            for r in paired.itertuples()]
    # Files that could not be indexed are kept as rows without a pair, to be reported.
    rows += [{"item": Path(p).name, "ref": "", "sci": "", "truth": "", "problem": reason}
             for p, reason in zip(index.problems["path"], index.problems["reason"], strict=True)]
    return pd.DataFrame(rows)


def _index(run_dir: Path, settings: Settings, limit: int | None) -> list[Path]:
    table = scan_local_pairs(Path(settings.pipeline.local_dir), settings.archive)
    if limit is not None:
        table = table.head(limit)
    return [write_table_atomic(run_dir / PAIRS_FILE, table)]


def _folder_signature(folder: Path | None) -> dict:
    """Names, sizes and times of a folder's files: a changed folder re-runs ``index``."""
    if folder is None or not Path(folder).is_dir():
        return {"missing": str(folder)}
    return {str(p.relative_to(folder)): [p.stat().st_size, p.stat().st_mtime_ns]
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------
# The archive
# --------------------------------------------------------------------------------------------

def _catalog(run_dir: Path, settings: Settings, limit: int | None) -> list[Path]:
    from astrid.catalog import read_catalog

    if settings.pipeline.catalog is None:
        raise AstridError("pipeline.catalog: the archive source needs a supernova catalog file")
    table = read_catalog(settings.pipeline.catalog).table
    if limit is not None:
        table = table.head(limit)
    return [write_table_atomic(run_dir / "catalog.csv", table)]


def _query(run_dir: Path, settings: Settings, limit: int | None) -> list[Path]:
    from astrid.archive import ArchiveUnreachable, query_observations

    catalog = pd.read_csv(run_dir / "catalog.csv")
    try:
        result = query_observations(catalog, settings.archive, run_dir / "mast_cache")
    except ArchiveUnreachable as exc:
        # Keep what was fetched (and cached) before MAST went away, then stop the run.
        write_table_atomic(run_dir / "observations.partial.csv", exc.partial.observations)
        write_table_atomic(run_dir / "query_errors.csv", exc.partial.errors)
        raise
    # Archive errors stay errors (per SN, with the reason), never rows of observations.
    return [write_table_atomic(run_dir / "observations.csv", result.observations),
            write_table_atomic(run_dir / "query_errors.csv", result.errors)]


def _pairs(run_dir: Path, settings: Settings, limit: int | None) -> list[Path]:
    from astrid.archive import make_pairs, read_observations

    observations = read_observations(run_dir / "observations.csv")  # keeps obsid as text
    catalog = pd.read_csv(run_dir / "catalog.csv")
    pairs = make_pairs(observations, catalog, settings.archive)
    write_table_atomic(run_dir / "pairs_all.csv", pairs)
    paired = pairs[pairs["status"] == "paired"].reset_index(drop=True)
    paired.insert(0, "item", [_archive_item(r) for r in paired.itertuples()])
    return [run_dir / "pairs_all.csv", write_table_atomic(run_dir / PAIRS_FILE, paired)]


def _archive_item(row) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in str(row.sn))
    return f"{safe}_{row.mission}_{row.filter}".replace(" ", "")


_SOURCE_FUNCTIONS = {"index": _index, "catalog": _catalog, "query": _query, "pairs": _pairs}


# --------------------------------------------------------------------------------------------
# Running the whole-run acquisition stages and listing the pairs
# --------------------------------------------------------------------------------------------

def run_source_stages(state: StateStore, run_id: int, run_dir: Path, settings: Settings,
                      chain: Chain, hashes: dict, force: bool, limit: int | None
                      ) -> tuple[list[Event], dict[str, dict]]:
    """Run (or verify) the whole-run stages before the pairs; return their events and outputs.

    Raises
    ------
    AstridError
        A user error in these stages (missing folder, unreadable catalog): without them there
        is no list of pairs, so the run cannot go on.
    """
    from astrid.pipeline.run import GLOBAL_ITEM, ChainTask, run_chain

    if not chain.before:
        return [], {}
    data = {"limit": limit}
    if "index" in chain.before:
        data["folder"] = _folder_signature(settings.pipeline.local_dir)
    if "catalog" in chain.before and settings.pipeline.catalog is not None:
        path = Path(settings.pipeline.catalog)
        data["catalog_sha256"] = file_sha256(path) if path.is_file() else "missing"
    functions = {name: _bind(_SOURCE_FUNCTIONS[name], run_dir, settings, limit)
                 for name in chain.before}
    recorded = {name: rec for name in chain.before if (rec := state.get(name, GLOBAL_ITEM))}
    task = ChainTask(str(run_dir), settings, GLOBAL_ITEM, data, chain.before, chain.selected,
                     hashes, recorded, {}, force)
    result = run_chain(task, functions)
    state.save(result.records, result.events, run_id)
    for rec in result.records:
        if not rec.ok:
            # Without the pair list nothing else can run: this is the run's one-line error.
            raise AstridError(rec.error or f"stage {rec.stage} failed")
    outputs = {name: (state.get(name, GLOBAL_ITEM).outputs if state.get(name, GLOBAL_ITEM)
                      else {}) for name in chain.before}
    return list(result.events), outputs


def _bind(fn, run_dir: Path, settings: Settings, limit: int | None):
    def stage(ctx) -> list[Path]:
        return fn(run_dir, settings, limit)
    return stage


def discover_items(run_dir: Path, settings: Settings, chain: Chain,
                   limit: int | None) -> dict[str, dict]:
    """The run's pairs as ``{item: description}``, in a stable order."""
    if settings.pipeline.source == "sim":
        return sim_items(settings, limit)
    path = run_dir / PAIRS_FILE
    if not path.exists():
        return {}
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    if limit is not None and settings.pipeline.source == "local":
        # (the archive's limit counts supernovae, applied to the catalog)
        table = table.head(limit)
    items = {}
    for row in table.to_dict("records"):
        item = row.pop("item")
        if settings.pipeline.source == "archive":
            row = {"pair_row": row, "sn": row.get("sn", ""), "mission": row.get("mission", ""),
                   "filter": row.get("filter", ""), "sn_ra_deg": row.get("ra_deg", ""),
                   "sn_dec_deg": row.get("dec_deg", "")}
        items[item] = json.loads(json.dumps(row))
    return items
