"""Every AstrID setting, with its default, as pydantic models loaded from YAML.

This module is the one source of defaults. Each section belongs to one part of the pipeline;
unknown keys are errors (a misspelt key must never be silently ignored).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from astrid.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SimSettings(_Section):
    """The simulated survey (``astrid simulate``)."""

    pairs: int = Field(12, ge=1, description="number of reference/science pairs")
    size_px: int = Field(2048, ge=64, description="image side in pixels")
    seed: int = 42
    pixel_scale_arcsec: float = Field(1.0, gt=0)
    fwhm_range_px: tuple[float, float] = (1.5, 4.5)
    n_stars: int = Field(1500, ge=0, description="stars per 2048² (scaled with area)")
    n_galaxies: int = Field(400, ge=0, description="galaxies per 2048² (scaled with area)")
    n_transients: int = Field(30, ge=0, description="real transients per 2048² pair")
    n_cosmic_rays: int = Field(60, ge=0, description="cosmic rays per 2048² science image")
    snr_range: tuple[float, float] = (2.0, 100.0)
    mission: str = "SIM"
    filter: str = "r"


class DiffSettings(_Section):
    """Alignment, background, PSF and differencing (``astrid diff``)."""

    method: Literal["zogy", "gaussian"] = "zogy"
    tile_px: int = Field(1024, ge=128, description="ZOGY tile side (PSF constant per tile)")
    tile_overlap_px: int = Field(64, ge=0)
    psf_size_px: int = Field(31, ge=7, description="side of the PSF stamp (odd)")
    min_overlap: float = Field(0.2, ge=0, le=1, description="smallest usable overlap fraction")
    allow_filter_mismatch: bool = False
    fft_workers: int = Field(2, ge=1)


class DetectSettings(_Section):
    """Candidate detection on S_corr."""

    threshold_sigma: float = Field(5.0, gt=0)
    deblend_min_sep_px: float = Field(3.0, ge=0)
    edge_px: int = Field(16, ge=0)


class StampSettings(_Section):
    """Triplet cutouts and labelling."""

    size_px: int = Field(63, ge=5, description="stamp side (odd)")
    normalisation: Literal["l2", "robust", "none"] = "l2"
    match_radius_px: float = Field(1.5, gt=0, description="candidate-to-truth match radius")
    real_pair_others: Literal["bogus", "unlabelled"] = "unlabelled"


class FakeSettings(_Section):
    """Fake point-source injection for completeness (``astrid fakes``)."""

    mag_min: float = 16.0
    mag_max: float = 23.0
    mag_step: float = 0.5
    per_mag: int = Field(40, ge=1)
    seed: int = 7


class TrainSettings(_Section):
    """Real/bogus training (``astrid train``)."""

    model: Literal["braai", "astrid"] = "astrid"
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(256, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    patience: int = Field(5, ge=1)
    seed: int = 0
    group_by: Literal["field", "sn", "night", "pair_id"] = "pair_id"
    val_fraction: float = Field(0.15, gt=0, lt=1)
    test_fraction: float = Field(0.15, gt=0, lt=1)
    balance: Literal["weight", "sample"] = "sample"
    threads: int = Field(2, ge=1)


class ScoreSettings(_Section):
    """Scoring triplets with a trained model (``astrid score``)."""

    backend: Literal["onnx", "torch"] = "onnx"
    batch_size: int = Field(1024, ge=1)
    threshold: float = Field(0.5, ge=0, le=1)


class ArchiveSettings(_Section):
    """MAST queries, pairing and downloads."""

    missions: list[str] = ["SWIFT", "GALEX", "PS1", "HST"]
    filters: list[str] = []
    calib_level: list[int] = [2, 3]
    radius_arcsec: float = Field(30.0, gt=0)
    ref_gap_days: float = Field(30.0, ge=0, description="reference ends this long before discovery")
    ref_window_days: float = Field(3650.0, gt=0, description="how far back references may go")
    sci_window_days: float = Field(60.0, gt=0, description="science from discovery to this after")
    max_file_mb: float = Field(500.0, gt=0)
    min_overlap: float = Field(0.3, ge=0, le=1)
    requests_per_s: float = Field(2.0, gt=0)
    retries: int = Field(4, ge=0)
    connections: int = Field(4, ge=1, le=4)


class PipelineSettings(_Section):
    """``astrid run``: where the images come from and how work is executed."""

    source: Literal["sim", "archive", "local"] = "sim"
    catalog: Path | None = None
    local_dir: Path | None = None
    stages: list[str] = ["catalog", "query", "pairs", "download", "diff", "stamps", "score", "report"]
    executor: Literal["serial", "processes", "dask"] = "serial"
    workers: int = Field(2, ge=1)
    scheduler: str | None = None
    streaming: bool = False
    keep_raw: bool = True
    model: Path | None = None


class ServeSettings(_Section):
    """``astrid serve``: the HTTP API and review page."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    db_url: str = "sqlite:///astrid_labels.db"
    token: str | None = None
    open_reads: bool = True
    max_batch: int = Field(4096, ge=1)
    max_upload_mb: float = Field(64.0, gt=0)


class Settings(_Section):
    """All settings. A YAML config file holds any subset of these sections."""

    sim: SimSettings = SimSettings()
    diff: DiffSettings = DiffSettings()
    detect: DetectSettings = DetectSettings()
    stamps: StampSettings = StampSettings()
    fakes: FakeSettings = FakeSettings()
    train: TrainSettings = TrainSettings()
    score: ScoreSettings = ScoreSettings()
    archive: ArchiveSettings = ArchiveSettings()
    pipeline: PipelineSettings = PipelineSettings()
    serve: ServeSettings = ServeSettings()


def load_settings(path: str | Path | None = None) -> Settings:
    """Load settings from a YAML file (defaults for everything it leaves out).

    Raises
    ------
    ConfigError
        One line naming the file and the first problem: unreadable file, bad YAML,
        unknown key or a value of the wrong type.
    """
    if path is None:
        return Settings()
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {describe_validation_error(exc)}") from None


def describe_validation_error(exc: ValidationError) -> str:
    """The first pydantic error as one line: ``unknown key 'diff.tile_pz'`` or similar."""
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"unknown key '{key}'"
    more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
    return f"invalid value for '{key}': {err['msg']}{more}"


def settings_to_yaml(settings: Settings) -> str:
    return yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False)
