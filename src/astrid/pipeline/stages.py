"""The stages of a run: what each one computes, from which settings, into which files.

A stage is a plain function ``run(ctx) -> list[Path]`` that reads its inputs from the run
directory (or the user's files), calls the library (``astrid.sim``, ``astrid.diff``,
``astrid.detect``, ``astrid.ml``, ``astrid.archive``) and writes its outputs atomically. The
orchestration in :mod:`astrid.pipeline.run` decides whether it needs to run; the stage itself
knows nothing about resume. Library imports stay inside the functions so that a worker process
imports only what its stages use.

Per-pair stages write under ``RUN/pairs/<item>/``::

    raw/{ref.fits, sci.fits, truth.csv, static.csv}    simulate or download
    diff/{diff.fits, scorr.fits, mask.fits, sci.fits, ref.fits, candidates.csv, quality.json}
    triplets/                                          a triplet dataset (astrid.ml.data)
    scored.csv                                         candidates + label, kind, score
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from astrid.config import Settings
from astrid.errors import AstridError, InputFileError
from astrid.provenance import provenance, write_table_atomic


@dataclass(frozen=True)
class StageContext:
    """What a stage function gets: where the run lives, the settings, and which item.

    ``data`` describes the item (for a simulated pair its ``index``; for a local or archive
    pair the ``ref`` and ``sci`` paths, ``sn``, ``mission``, ``filter``...).
    """

    run_dir: Path
    settings: Settings
    item: str
    data: dict = field(default_factory=dict)

    @property
    def pair_dir(self) -> Path:
        return self.run_dir / "pairs" / self.item

    def inputs(self) -> tuple[Path, Path]:
        """The reference and science FITS files of this pair."""
        if self.data.get("problem"):
            raise InputFileError(self.item, self.data["problem"])
        if "ref" in self.data and "sci" in self.data:
            return Path(self.data["ref"]), Path(self.data["sci"])
        if "pair_row" in self.data:  # archive: download_pairs' layout <sn>/<mission>_<filter>/
            from astrid.archive import pair_paths

            paths = pair_paths(self.data["pair_row"], self.pair_dir / "download")
            for role, path in zip(("ref", "sci"), paths, strict=True):
                if not path.exists():
                    raise AstridError(f"{path}: no downloaded {role} image")
            return paths
        raw = self.pair_dir / "raw"
        return raw / "ref.fits", raw / "sci.fits"

    def truth_path(self) -> Path | None:
        """The truth table of a simulated pair, or None for real data."""
        candidates = [Path(self.data["truth"])] if self.data.get("truth") else []
        candidates.append(self.pair_dir / "raw" / "truth.csv")
        return next((p for p in candidates if p.exists()), None)


@dataclass(frozen=True)
class Stage:
    """One step of the chain.

    Parameters
    ----------
    name : the name used in configs and ``--stage``.
    per_pair : True if it runs once per pair (in a worker), False if once per run.
    settings_keys : dotted settings paths its results depend on; changing any of them
        invalidates this stage and everything downstream.
    run : the stage function (per-pair stages: top level, so workers can unpickle it).
    """

    name: str
    per_pair: bool
    settings_keys: tuple[str, ...]
    run: Callable[[StageContext], list[Path]]
    help: str = ""


# --------------------------------------------------------------------------------------------
# Per-pair stages
# --------------------------------------------------------------------------------------------

def simulate(ctx: StageContext) -> list[Path]:
    """Render one simulated pair (reference, science, truth) into ``raw/``."""
    from astrid.sim import simulate_pair, write_pair

    pair = simulate_pair(ctx.settings.sim, int(ctx.data["index"]))
    return write_pair(ctx.pair_dir / "raw", pair, ctx.settings.sim)


def download(ctx: StageContext) -> list[Path]:
    """Fetch (or verify in the cache) the two archive images of one pair into ``download/``."""
    import pandas as pd

    from astrid.archive import download_pairs

    row = pd.DataFrame([ctx.data["pair_row"]])
    # One download root per pair: pairs run in parallel, and each root has its own manifest.
    result = download_pairs(row, ctx.pair_dir / "download", settings=ctx.settings.archive)
    files = result.files
    failed = files[files["status"] == "failed"]
    if len(failed):
        first = failed.iloc[0]
        raise AstridError(f"{first['url']}: download failed ({first['reason']})")
    return [Path(p) for p in files["path"]]


def diff(ctx: StageContext) -> list[Path]:
    """Align, difference (ZOGY or the Gaussian baseline) and detect candidates into ``diff/``."""
    from astrid.diff import difference, write_diff_dir
    from astrid.diff.io import DIFF_FILES

    ref, sci = ctx.inputs()
    result, candidates = difference(ref, sci, diff_settings=ctx.settings.diff,
                                    detect_settings=ctx.settings.detect)
    record = provenance({"diff": ctx.settings.diff.model_dump(mode="json"),
                         "detect": ctx.settings.detect.model_dump(mode="json")},
                        inputs=[ref, sci])
    out = write_diff_dir(ctx.pair_dir / "diff", result, candidates, record)
    return [out / name for name in DIFF_FILES]


def stamps(ctx: StageContext) -> list[Path]:
    """Cut the 63×63 triplets of every candidate, labelled against the truth when known."""
    from astrid.detect.stamps import cut_triplets
    from astrid.diff import read_diff_dir
    from astrid.ml.data import DatasetWriter

    result, candidates = read_diff_dir(ctx.pair_dir / "diff")
    size = ctx.settings.stamps.size_px
    cube, edge = cut_triplets(result.sci, result.ref, result.diff,
                              candidates["x"].to_numpy(), candidates["y"].to_numpy(), size=size)
    meta = candidates.copy()
    meta["pair_id"] = ctx.item
    for key in ("sn", "mission", "filter"):
        meta[key] = ctx.data.get(key, "")
    meta["field"] = ctx.data.get("field", ctx.item)
    meta["edge"] = edge
    meta = meta.join(_labels(ctx, candidates, result.wcs))
    out = ctx.pair_dir / "triplets"
    record = provenance({"stamps": ctx.settings.stamps.model_dump(mode="json")},
                        inputs=[ctx.pair_dir / "diff"])
    # A dataset is several files: build it beside the final name and rename the directory,
    # so a killed stage never leaves a dataset that looks complete.
    tmp = Path(tempfile.mkdtemp(prefix=".triplets.", suffix=".part", dir=ctx.pair_dir))
    try:
        with DatasetWriter(tmp / "ds", size, provenance_record=record) as writer:
            writer.append(cube, meta)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp / "ds", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sorted(p for p in out.rglob("*") if p.is_file())


def _labels(ctx: StageContext, candidates, wcs):
    """Labels from the truth of a simulated pair, the catalogued SN of a real one, or none."""
    import pandas as pd

    from astrid.detect.labels import label_from_truth, label_real_pair, unlabelled

    truth_path = ctx.truth_path()
    if truth_path is not None:
        static_path = truth_path.with_name("static.csv")
        static = pd.read_csv(static_path) if static_path.exists() else None
        return label_from_truth(candidates, pd.read_csv(truth_path), static,
                                match_radius_px=ctx.settings.stamps.match_radius_px)
    ra, dec = ctx.data.get("sn_ra_deg"), ctx.data.get("sn_dec_deg")
    if ra not in (None, "") and dec not in (None, "") and wcs is not None:
        sn_x, sn_y = wcs.world_to_pixel_values(float(ra), float(dec))
        return label_real_pair(candidates, float(sn_x), float(sn_y),
                               radius_px=ctx.settings.stamps.match_radius_px,
                               others=ctx.settings.stamps.real_pair_others)
    return unlabelled(candidates)


def score(ctx: StageContext) -> list[Path]:
    """Score every triplet of the pair with the real/bogus model into ``scored.csv``."""
    import numpy as np

    from astrid.ml.data import load_dataset
    from astrid.ml.score import score_triplets

    cube, meta = load_dataset(ctx.pair_dir / "triplets")
    model_dir = ctx.settings.pipeline.model
    if len(meta):
        meta["score"] = score_triplets(np.asarray(cube), model_dir=model_dir,
                                       backend=ctx.settings.score.backend)
    else:
        meta["score"] = np.array([], dtype=np.float64)
    return [write_table_atomic(ctx.pair_dir / "scored.csv", meta)]


# --------------------------------------------------------------------------------------------
# Whole-run stages (run in the orchestrating process; they return the pair items they make)
# --------------------------------------------------------------------------------------------

def report(ctx: StageContext) -> list[Path]:
    """Merge the scored candidates of every pair and write ``report.html``."""
    from astrid.report import write_report

    return write_report(ctx.run_dir)


# The registry, in chain order. The archive source uses catalog, query, pairs and download;
# the simulated survey replaces them by ``simulate``; a local folder by ``index``.
PAIR_STAGES: dict[str, Stage] = {
    "simulate": Stage("simulate", True, ("sim",), simulate, "simulated reference/science pair"),
    "download": Stage("download", True, ("archive",), download, "archive images of one pair"),
    "diff": Stage("diff", True, ("diff", "detect"), diff, "ZOGY difference + candidates"),
    "stamps": Stage("stamps", True, ("stamps",), stamps, "63×63 triplets with labels"),
    "score": Stage("score", True, ("score", "pipeline.model"), score, "real/bogus scores"),
}
GLOBAL_STAGES = ("catalog", "query", "pairs", "index", "report")
ALL_STAGES = ("catalog", "query", "pairs", "download", "simulate", "index", "diff", "stamps",
              "score", "report")
REPORT = Stage("report", False, ("score.threshold",), report,
               "HTML report")
