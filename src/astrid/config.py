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
    """The simulated survey (``astrid simulate``).

    Counts are per 2048² image and scale with the image area. Ranges are ``(low, high)``;
    each pair draws its own values from them.
    """

    pairs: int = Field(12, ge=1, description="number of reference/science pairs")
    size_px: int = Field(2048, ge=64, le=16384, description="image side in pixels")
    seed: int = Field(42, ge=0, description="master seed; pair i uses child i of it")
    clean: bool = Field(False, description="no transients, no artefacts, no saturated stars "
                        "(only noise, PSF, alignment and zero point change): for false-positive tests")
    mission: str = Field("SIM", description="TELESCOP keyword")
    filter: str = Field("r", description="FILTER keyword")
    pixel_scale_arcsec: float = Field(1.0, gt=0)
    # Geometry between the epochs
    offset_range_px: tuple[float, float] = Field(
        (1.0, 6.0), description="pointing offset of the reference relative to the science (px)")
    rotation_range_deg: tuple[float, float] = Field(
        (0.05, 0.3), description="rotation of the reference relative to the science (deg, either sign)")
    wcs_error_range_px: tuple[float, float] = Field(
        (0.1, 1.0), description="deliberate error of each header WCS (px), recorded in pair.json")
    # PSF (Moffat) per epoch
    fwhm_range_px: tuple[float, float] = (1.5, 4.5)
    beta_range: tuple[float, float] = (2.5, 4.5)
    max_ellipticity: float = Field(0.15, ge=0, lt=0.6, description="1 - b/a")
    psf_variation: float = Field(0.06, ge=0, lt=0.5,
                                 description="largest fractional FWHM change across the field")
    # Photometry and noise
    exptime_s: float = Field(60.0, gt=0, description="science exposure")
    ref_depth: float = Field(4.0, ge=1, description="reference exposure / science exposure")
    zero_point_range: tuple[float, float] = Field(
        (26.6, 27.4), description="science MAGZP (AB mag of 1 ADU); the reference adds 2.5 log10(ref_depth)")
    sky_mag_range: tuple[float, float] = Field((19.8, 21.2), description="sky, mag/arcsec²")
    sky_gradient: float = Field(0.06, ge=0, lt=1,
                                description="largest fractional sky change across the image")
    gain_range: tuple[float, float] = Field((1.0, 4.0), description="e-/ADU")
    read_noise_range_e: tuple[float, float] = (3.0, 10.0)
    saturation_adu: float = Field(50000.0, gt=0)
    mjd_start: float = 58000.0
    baseline_days: tuple[float, float] = Field((20.0, 400.0), description="science MJD - reference MJD")
    # Static scene
    n_stars: int = Field(1500, ge=0, description="stars per 2048² (scaled with area)")
    star_mag_range: tuple[float, float] = (11.0, 23.5)
    star_count_slope: float = Field(0.25, ge=0, description="d log10 N / d mag of the star counts")
    n_galaxies: int = Field(400, ge=0, description="galaxies per 2048² (scaled with area)")
    galaxy_mag_range: tuple[float, float] = (15.5, 22.5)
    galaxy_count_slope: float = Field(0.35, ge=0)
    galaxy_reff_range_px: tuple[float, float] = Field((0.8, 12.0), description="half-light radius, log-uniform")
    sersic_n_range: tuple[float, float] = (0.5, 4.0)
    # What changes
    n_transients: int = Field(30, ge=0, description="real transients per 2048² pair")
    transient_mix: dict[str, float] = Field(
        {"sn": 0.4, "sn_nuclear": 0.1, "sn_hostless": 0.15, "variable": 0.2, "asteroid": 0.15},
        description="relative frequency of each real kind")
    fading_fraction: float = Field(0.15, ge=0, le=1,
                                   description="fraction of supernovae seen only in the reference")
    snr_range: tuple[float, float] = Field((2.0, 100.0), description="expected S/N in the difference, log-uniform")
    n_cosmic_rays: int = Field(60, ge=0, description="cosmic rays per 2048² science image")
    ref_cosmic_ray_fraction: float = Field(0.25, ge=0, description="reference rate / science rate (a stack rejects most)")
    n_hot_pixels: int = Field(20, ge=0, description="hot pixels per 2048² image")
    n_bad_columns: float = Field(1.0, ge=0, description="mean bad columns per 2048² image")
    n_trails: float = Field(0.4, ge=0, description="mean satellite trails per 2048² image")
    trail_sample_px: float = Field(2.0, gt=0, description="spacing of truth rows along trails, bleeds and bad columns")


class DiffSettings(_Section):
    """Alignment, background, PSF and differencing (``astrid diff``)."""

    method: Literal["zogy", "gaussian"] = Field(
        "zogy", description="zogy (ZOGY D and S_corr) or gaussian (the old blur-and-subtract "
                            "baseline, for comparison)")
    tile_px: int = Field(1024, ge=128, description="ZOGY tile side in px (PSF constant per tile)")
    tile_overlap_px: int = Field(32, ge=0, description="margin added on each side of a tile and "
                                 "discarded after the FFT, px (at least the kernel radius)")
    psf_size_px: int = Field(31, ge=7, description="side of the PSF stamp, px (odd)")
    min_overlap: float = Field(0.2, ge=0, le=1, description="smallest usable overlap fraction")
    allow_filter_mismatch: bool = Field(False, description="difference images taken through "
                                        "different filters (warn instead of failing)")
    rescale_scorr: bool = Field(True, description="divide S_corr by its measured robust std in "
                                "empty sky (corrects correlated input noise, e.g. stacks); "
                                "quality.json keeps the measured noise_ratio")
    fft_workers: int = Field(2, ge=1, description="threads for scipy.fft")


class DetectSettings(_Section):
    """Candidate detection on S_corr."""

    threshold_sigma: float = Field(5.0, gt=0, description="threshold on |S_corr|, sigma")
    deblend_min_sep_px: float = Field(3.0, ge=0, description="peaks closer than this keep only "
                                      "the most significant, px")
    edge_px: int = Field(16, ge=0, description="candidates closer than this to the border get "
                         "flag_edge, px")


class StampSettings(_Section):
    """Triplet cutouts and labelling."""

    size_px: int = Field(
        63, ge=5, description="stamp side in px (odd: the candidate sits on the central pixel)")
    normalisation: Literal["l2", "robust", "none"] = Field(
        "l2", description="applied when loading: 'l2' (braai: NaN->0, each channel / its L2 "
        "norm), 'robust' (median/MAD), 'none' (NaN->0); all keep the difference's sign")
    match_radius_px: float = Field(1.5, gt=0, description="candidate-to-truth match radius (px)")
    catalog_match_arcsec: float = Field(
        1.5, gt=0, description="real pairs: candidate-to-catalogued-SN match radius (arcsec)")
    real_pair_others: Literal["bogus", "unlabelled"] = Field(
        "unlabelled", description="real pairs: label of candidates other than the catalogued SN")


class FakeSettings(_Section):
    """Fake point-source injection for completeness (``astrid fakes``)."""

    grid: Literal["snr", "mag"] = Field(
        "snr", description="'snr': levels of expected difference S/N from snr_min to snr_max "
        "(log-spaced; needs no zero point); 'mag': AB magnitudes mag_min..mag_max by mag_step "
        "(needs the science zero point)")
    snr_min: float = Field(1.5, gt=0, description="faintest level, expected S/N in D")
    snr_max: float = Field(40.0, gt=0, description="brightest level, expected S/N in D")
    n_levels: int = Field(16, ge=2, description="number of S/N levels")
    mag_min: float = Field(16.0, description="brightest magnitude of the 'mag' grid (AB)")
    mag_max: float = Field(23.0, description="faintest magnitude of the 'mag' grid (AB)")
    mag_step: float = Field(0.5, gt=0, description="step of the 'mag' grid (mag)")
    per_level: int = Field(40, ge=1, description="fakes per S/N or magnitude level")
    hosts: tuple[float, float, float] = Field(
        (0.5, 0.3, 0.2), description="fractions placed on blank sky, on galaxies (1 FWHM to 2 "
        "sigma-ellipses from the centre), near galaxy nuclei (within half a FWHM)")
    min_separation_px: float = Field(
        15.0, gt=0, description="fakes this far from each other (px); per-round count follows")
    recover_radius_px: float = Field(2.0, gt=0, description="a candidate this close recovers a fake")
    max_rounds: int = Field(
        10, ge=1, description="most injection rounds (each reruns differencing); galaxy-hosted "
        "fakes move to blank sky when galaxies are too few to host them all in time")
    seed: int = 7


class TrainSettings(_Section):
    """Real/bogus training (``astrid train``)."""

    model: Literal["braai", "braai_fast", "astrid"] = Field("astrid", description="network architecture")
    width: int = Field(16, ge=4, description="astrid: channels of the stem (doubled per stage)")
    epochs: int = Field(20, ge=1, description="most epochs to run")
    batch_size: int = Field(256, ge=1)
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay")
    patience: int = Field(5, ge=1, description="epochs without a better validation AUCPR before stopping")
    seed: int = 0
    group_by: Literal["field", "sn", "night", "pair_id"] = Field(
        "pair_id", description="objects that must not cross train/val/test (when the dataset has no split)")
    val_fraction: float = Field(0.15, gt=0, lt=1)
    test_fraction: float = Field(0.15, gt=0, lt=1)
    balance: Literal["weight", "sample"] = Field(
        "sample", description="class imbalance: balanced sampling or class-weighted loss")
    normalisation: Literal["l2", "robust"] = Field("l2", description="stamp normalisation (astrid.ml.data)")
    sky_subtract: bool = Field(True, description="remove the median level of the sci and ref stamps "
                               "before normalising (survey cutouts keep their sky)")
    augment_shift_px: float = Field(0.5, ge=0, description="largest random sub-pixel shift of a training triplet")
    augment_noise: float = Field(0.05, ge=0, description="added Gaussian noise, in units of each channel's std")
    max_train_per_epoch: int | None = Field(
        None, ge=1, description="triplets drawn per epoch (default: the training-set size)")
    threads: int = Field(2, ge=1, description="torch CPU threads")
    device: str = Field("cpu", description="torch device ('cpu', 'cuda')")


class ScoreSettings(_Section):
    """Scoring triplets with a trained model (``astrid score``)."""

    backend: Literal["onnx", "torch"] = "onnx"
    batch_size: int = Field(1024, ge=1, description="triplets per inference call")
    threshold: float = Field(0.5, ge=0, le=1, description="score above which a triplet is called real")
    threads: int = Field(2, ge=1, description="onnxruntime intra-op / torch threads")


class ArchiveSettings(_Section):
    """MAST queries, pairing and downloads (``astrid query``, ``pairs``, ``download``)."""

    missions: list[str] = Field(["SWIFT", "GALEX", "PS1", "HST"],
                                description="MAST obs_collection names (SWIFT, GALEX, PS1, HST, TESS)")
    filters: list[str] = Field([], description="filters to keep (any spelling, e.g. uw1, UVW1, NUV, g, "
                                               "F814W); empty = all")
    calib_level: list[int] = [2, 3]
    radius_arcsec: float = Field(30.0, gt=0, description="cone radius around each supernova")
    ref_gap_days: float = Field(30.0, ge=0, description="reference ends this long before discovery")
    ref_window_days: float = Field(3650.0, gt=0, description="how far back references may go")
    sci_window_days: float = Field(60.0, gt=0, description="science from discovery to this after")
    peak_offset_days: float = Field(15.0, description="expected peak = discovery + this, when the "
                                                      "catalog gives no peak date")
    max_file_mb: float = Field(500.0, gt=0, description="larger products are not downloaded")
    min_overlap: float = Field(0.3, ge=0, le=1, description="smallest fraction of the science "
                                                            "footprint that the reference covers")
    requests_per_s: float = Field(2.0, gt=0, description="MAST request rate limit")
    retries: int = Field(4, ge=0, description="retries after a failed request or download")
    backoff_s: float = Field(2.0, ge=0, description="first retry delay; doubles each retry")
    timeout_s: float = Field(120.0, gt=0, description="per-request network timeout")
    connections: int = Field(4, ge=1, le=4, description="concurrent downloads")
    verify_fits_checksum: bool = Field(True, description="check downloaded files' FITS "
                                       "CHECKSUM/DATASUM cards where present")
    products_batch: int = Field(50, ge=1, description="observations per product-list request")
    mast_url: str = Field("https://mast.stsci.edu", description="MAST server (a mirror or replay)")
    cache_dir: Path | None = Field(None, description="query cache (default ~/.cache/astrid/mast)")


class PipelineSettings(_Section):
    """``astrid run``: where the images come from and how work is executed.

    Relative paths are taken from the current directory, like every path on the command line.
    """

    source: Literal["sim", "archive", "local"] = Field(
        "sim", description="sim: simulated survey; local: a folder of pairs; archive: MAST")
    catalog: Path | None = Field(None, description="supernova catalog (archive source)")
    local_dir: Path | None = Field(
        None, description="folder whose sub-folders hold ref.fits and sci.fits (local source)")
    stages: list[str] = Field(
        ["catalog", "query", "pairs", "download", "diff", "stamps", "score", "report"],
        description="stages switched on; the archive acquisition names stand for 'simulate' "
                    "or 'index' with the sim and local sources")
    run_dir: Path | None = Field(None, description="run directory (default runs/<config name>)")
    executor: Literal["serial", "processes", "dask"] = "serial"
    workers: int = Field(2, ge=1, description="processes, or Dask workers of a LocalCluster")
    scheduler: str | None = Field(
        None, description="Dask scheduler address tcp://host:port (default: a LocalCluster "
                          "on 127.0.0.1)")
    streaming: bool = Field(False, description="archive: take each pair from download to "
                                               "score in one task")
    keep_raw: bool = Field(True, description="streaming: keep the downloaded images of "
                                             "finished pairs")
    model: Path | None = Field(None, description="model directory (default: the packaged one)")


class ServeSettings(_Section):
    """``astrid serve``: the HTTP API and review page."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    db_url: str = Field("sqlite:///astrid_labels.db",
                        description="label store: sqlite:///FILE or postgresql://user@host/db")
    model: Path | None = Field(None, description="model directory or models root "
                               "(default: the packaged model)")
    token: str | None = Field(None, description="write token (ASTRID_TOKEN also sets it)")
    open_reads: bool = Field(True, description="reads need no token")
    max_batch: int = Field(1024, ge=1, description="most triplets per /v1/score request "
                           "(1024 raw 63x63 triplets are about 49 MiB as .npz)")
    max_upload_mb: float = Field(64.0, gt=0, description="largest request body (MiB)")
    lease_s: float = Field(600.0, gt=0, description="how long a review candidate stays reserved")
    high_score_share: float = Field(0.2, ge=0, le=1, description="share of the review queue "
                                    "taken from the highest scores instead of the most uncertain")
    model_check_s: float = Field(1.0, ge=0, description="how often to check the models root's "
                                 "'current' pointer for a promoted model")
    rescore_on_model_change: bool = Field(True, description="rescore unlabelled candidates "
                                          "when the model changes")
    difference_sync_max_px: int = Field(1024 * 1024, ge=0, description="science images with "
                                        "more pixels are differenced as a background job")


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
