"""Helpers of the pipeline tests: a small simulated run (3 pairs of 256², seconds each)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from astrid.config import Settings
from astrid.ml.score import default_model_dir

# The score stage joins the chain as soon as the packaged model exists.
HAS_MODEL = (default_model_dir() / "model.onnx").exists()
CHAIN = ["simulate", "diff", "stamps"] + (["score"] if HAS_MODEL else []) + ["report"]

SMALL = {
    # 256² with fields four times denser than the default, so that every pair has the stars
    # alignment and PSF need and candidates of every kind, in about a second per stage.
    "sim": {"pairs": 3, "size_px": 256, "seed": 11, "n_stars": 6000, "n_galaxies": 1600,
            "n_transients": 1500, "n_cosmic_rays": 1500},
    "pipeline": {"source": "sim", "stages": CHAIN, "executor": "serial", "workers": 2},
}


def small_config(**sections) -> dict:
    """The small run's config with some sections overridden (``pipeline={...}``)."""
    config = copy.deepcopy(SMALL)
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return config


def settings_of(config: dict) -> Settings:
    return Settings.model_validate(config)


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def candidate_tables(run_dir: Path) -> pd.DataFrame:
    """Every pair's final candidate table (scored if scored), concatenated in pair order."""
    name = "scored.csv" if HAS_MODEL else "diff/candidates.csv"
    frames = []
    for pair in sorted((run_dir / "pairs").iterdir()):
        table = pd.read_csv(pair / name)
        table.insert(0, "pair", pair.name)
        frames.append(table)
    return pd.concat(frames, ignore_index=True)


def pixel_digests(run_dir: Path) -> dict[str, str]:
    """A digest of the pixels of every FITS file (headers carry creation times)."""
    import hashlib

    from astropy.io import fits

    out = {}
    for path in sorted(run_dir.rglob("*.fits")):
        with fits.open(path) as hdul:
            digest = hashlib.sha256()
            for hdu in hdul:
                if hdu.data is not None:
                    digest.update(np.ascontiguousarray(hdu.data).tobytes())
        out[str(path.relative_to(run_dir))] = digest.hexdigest()
    return out


def output_files(run_dir: Path) -> set[str]:
    """Every file of a run directory except the state store, its lock and its WAL files."""
    skip = {".lock", "state.sqlite", "state.sqlite-wal", "state.sqlite-shm"}
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*")
            if p.is_file() and p.name not in skip}
