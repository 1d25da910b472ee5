"""``astrid run --dry-run``: what a run would do, without doing it.

The plan lists the supernovae (archive source), the pairs, how many pairs each stage would
(re)compute given what the state store already verifies, the downloads, and an estimate of
the disk the new outputs need. Nothing is written and nothing is fetched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from astrid.config import Settings
from astrid.pipeline.plan import resolve_chain
from astrid.pipeline.run import ChainTask, first_invalid, stage_hashes
from astrid.pipeline.sources import PAIRS_FILE, scan_local_pairs, sim_items
from astrid.pipeline.state import STATE_FILE, open_state

# Files the diff stage writes per pair, in science-frame float32 images (diff, scorr, sci,
# ref; the mask is one byte, the flux maps stay in memory).
_DIFF_IMAGES = 4.25


@dataclass(frozen=True)
class DryRunPlan:
    """What ``astrid run`` would do. ``None`` where it cannot be known without running."""

    source: str
    stages: tuple[str, ...]
    selected: tuple[str, ...]
    n_sne: int | None
    pairs: tuple[str, ...]
    pending: dict[str, int] = field(default_factory=dict)
    n_downloads: int | None = None
    disk_bytes: int | None = None
    notes: tuple[str, ...] = ()


def dry_run(settings: Settings, run_dir: Path, *, stage_spec: str | None = None,
            force: bool = False, limit: int | None = None) -> DryRunPlan:
    """The plan of a run (see the module docstring)."""
    run_dir = Path(run_dir).resolve()
    chain = resolve_chain(settings.pipeline, stage_spec)
    source = settings.pipeline.source
    notes: list[str] = []
    n_sne = None
    frame_px: dict[str, int] = {}
    if source == "sim":
        items = sim_items(settings, limit)
        frame_px = {item: settings.sim.size_px ** 2 for item in items}
    elif source == "local":
        table = scan_local_pairs(settings.pipeline.local_dir, settings.archive)
        if limit is not None:
            table = table.head(limit)
        items = {row.pop("item"): row for row in table.to_dict("records")}
        frame_px = {item: _npix(Path(d["sci"])) for item, d in items.items() if d["sci"]}
    else:
        from astrid.catalog import read_catalog

        catalog = read_catalog(settings.pipeline.catalog).table
        n_sne = len(catalog) if limit is None else min(limit, len(catalog))
        items = {}
        if (run_dir / PAIRS_FILE).exists():
            table = pd.read_csv(run_dir / PAIRS_FILE, dtype=str, keep_default_na=False)
            items = {row.pop("item"): row for row in table.to_dict("records")}
        else:
            notes.append("the pairs are known once the query and pairs stages have run")

    pending = {name: 0 for name in chain.per_pair}
    hashes = stage_hashes(settings, chain)
    state = open_state(run_dir, create=False) if (run_dir / STATE_FILE).exists() else None
    disk = 0
    try:
        for item, data in items.items():
            recorded = {}
            if state is not None:
                recorded = {n: r for n in chain.per_pair if (r := state.get(n, item))}
            task = ChainTask(str(run_dir), settings, item, data, chain.per_pair, chain.selected,
                             hashes, recorded, _upstream(state, chain), force)
            first, _ = first_invalid(task, run_dir)
            todo = [n for n in chain.per_pair[first:] if n in chain.selected]
            for name in todo:
                pending[name] += 1
            npix = frame_px.get(item)
            if npix:
                disk += int(npix * 4 * (2 * ("simulate" in todo) + _DIFF_IMAGES * ("diff" in todo)))
    finally:
        if state is not None:
            state.close()
    n_downloads = pending.get("download") if source == "archive" else None
    if source == "archive" and items:
        notes.append("disk estimate excludes downloads (sizes known only to the archive)")
    return DryRunPlan(source, chain.stages, tuple(n for n in chain.stages if n in chain.selected),
                      n_sne, tuple(items), pending, n_downloads,
                      disk if (frame_px or not items) else None, tuple(notes))


def _upstream(state, chain) -> dict[str, dict]:
    from astrid.pipeline.run import GLOBAL_ITEM

    out = {}
    for name in chain.before:
        rec = state.get(name, GLOBAL_ITEM) if state is not None else None
        out[name] = rec.outputs if rec else {}
    return out


def _npix(path: Path) -> int:
    """Pixels of a FITS image from its header (0 when unreadable: the run will say why)."""
    from astrid.fitsio import read_image

    try:
        return int(read_image(path).data.size)
    except Exception:  # noqa: BLE001  (a corrupt input is reported by the run, not the plan)
        return 0
