"""The diff directory: write a DiffResult and its candidates, and read them back.

Layout (docs/interfaces.md): ``diff.fits`` (D), ``scorr.fits`` (S_corr, with ``FLUX`` and
``FLUX_ERR`` image extensions), ``mask.fits`` (uint8 ``MASK_*`` bits, described in the header),
``sci.fits`` (background-subtracted science, with the ``PSF`` stamp), ``ref.fits`` (reference on
the science grid scaled to the science flux, with its ``PSF`` and a ``SOURCES`` table),
``candidates.csv`` and ``quality.json``. Every file is written atomically and carries the
provenance; ``quality.json`` is written last, with the SHA-256 of the other files, so a
directory without it (a killed run) is never taken as complete.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from astropy.io import fits
from astropy.io.fits.verify import VerifyWarning
from astropy.wcs import WCS

from astrid.diff.high_level import DiffResult
from astrid.diff.zogy_core import (
    MASK_EDGE,
    MASK_NO_OVERLAP,
    MASK_REF_BAD,
    MASK_SATURATED,
    MASK_SCI_BAD,
)
from astrid.errors import InputFileError
from astrid.fitsio import celestial_wcs, provenance_cards
from astrid.provenance import atomic_path, file_sha256, write_json_atomic, write_table_atomic

DIFF_FILES = ("diff.fits", "scorr.fits", "mask.fits", "sci.fits", "ref.fits", "candidates.csv",
              "quality.json")
_MASK_BITS = {MASK_SCI_BAD: "science bad (+kernel footprint)",
              MASK_REF_BAD: "reference bad (+kernel footprint)",
              MASK_NO_OVERLAP: "not covered by the reference",
              MASK_SATURATED: "saturated (+kernel footprint)",
              MASK_EDGE: "kernel footprint of the image edge"}


def _write_fits(path: Path, primary: np.ndarray, wcs: WCS | None, provenance: dict,
                cards: list[tuple[str, object, str]] = (), extensions=()) -> None:
    header = fits.Header()
    if wcs is not None:
        header.update(wcs.to_header(relax=True))
    for key, value, comment in [*cards, *provenance_cards(provenance or {})]:
        header[key] = (value, comment)
    hdul = fits.HDUList([fits.PrimaryHDU(primary, header=header), *extensions])
    with atomic_path(path) as tmp, warnings.catch_warnings():
        # Long WCS comments (e.g. TPV distortion) are truncated: harmless.
        warnings.filterwarnings("ignore", message="Card is too long", category=VerifyWarning)
        hdul.writeto(tmp, overwrite=True)


def write_diff_dir(out_dir, result: DiffResult, candidates: pd.DataFrame,
                   provenance: dict | None = None) -> Path:
    """Write ``result`` and ``candidates`` as a diff directory; returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prov = provenance or {}
    q = result.quality or {}
    summary = [("METHOD", str(q.get("method", "")), "differencing method"),
               ("NOISERAT", _finite(q.get("noise_ratio")), "robust std of S_corr in empty sky")]
    # Remove the completion marker first: until it is rewritten, the directory is incomplete.
    (out / "quality.json").unlink(missing_ok=True)
    _write_fits(out / "diff.fits", result.diff, result.wcs, prov,
                [("BUNIT", "sigma", "ZOGY D, unit-variance noise"), *summary])
    _write_fits(out / "scorr.fits", result.scorr, result.wcs, prov,
                [("BUNIT", "sigma", "S_corr"), *summary],
                [fits.ImageHDU(np.asarray(result.flux, np.float32), name="FLUX"),
                 fits.ImageHDU(result.flux_err, name="FLUX_ERR")])
    bits = [(f"MASKB{bit}", text, "mask bit") for bit, text in _MASK_BITS.items()]
    _write_fits(out / "mask.fits", np.asarray(result.mask, np.uint8), result.wcs, prov, bits)
    _write_fits(out / "sci.fits", result.sci, result.wcs, prov,
                [("BUNIT", "adu", "background-subtracted science")],
                [fits.ImageHDU(result.psf_sci, name="PSF")])
    src = np.asarray(result.ref_sources, float).reshape(-1, 2)
    sources = fits.BinTableHDU.from_columns(
        [fits.Column(name="x", format="D", array=src[:, 0]),
         fits.Column(name="y", format="D", array=src[:, 1])], name="SOURCES")
    _write_fits(out / "ref.fits", result.ref, result.wcs, prov,
                [("BUNIT", "adu", "reference on the science grid, science flux scale")],
                [fits.ImageHDU(result.psf_ref, name="PSF"), sources])
    write_table_atomic(out / "candidates.csv", candidates)
    files = {name: file_sha256(out / name) for name in DIFF_FILES if name != "quality.json"}
    record = _json_safe({**q, "n_candidates": int(len(candidates))})
    write_json_atomic(out / "quality.json", {**record, "provenance": prov,
                                             "files_sha256": files})
    return out


def _json_safe(obj):
    """NaN and inf (e.g. an alignment without star refinement) become null: strict JSON."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return float(obj) if np.isfinite(obj) else None
    return obj


def _finite(value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return 0.0
    return v if np.isfinite(v) else 0.0


def read_diff_dir(path) -> tuple[DiffResult, pd.DataFrame]:
    """Read a diff directory written by :func:`write_diff_dir`.

    Raises
    ------
    InputFileError
        The directory is missing, incomplete (no ``quality.json``: the run did not finish) or
        a file is unreadable.
    """
    d = Path(path)
    if not d.is_dir():
        raise InputFileError(d, "diff directory not found")
    if not (d / "quality.json").exists():
        raise InputFileError(d, "incomplete diff directory (no quality.json; was the run "
                                "interrupted?)")
    missing = [n for n in DIFF_FILES if not (d / n).exists()]
    if missing:
        raise InputFileError(d, f"diff directory lacks {', '.join(missing)}")
    try:
        quality = json.loads((d / "quality.json").read_text())
    except json.JSONDecodeError as exc:
        raise InputFileError(d / "quality.json", f"not valid JSON ({exc.msg})") from None

    def hdus(name):
        try:
            with fits.open(d / name, memmap=False) as hdul:
                return [(h.name, h.header.copy(), None if h.data is None else
                         (np.array(h.data) if not isinstance(h, fits.BinTableHDU)
                          else h.data.copy())) for h in hdul]
        except OSError as exc:
            raise InputFileError(d / name, f"cannot read FITS ({exc})") from None

    diff = hdus("diff.fits")
    scorr = {n: data for n, _, data in hdus("scorr.fits")}
    mask = hdus("mask.fits")[0][2]
    sci = {n: data for n, _, data in hdus("sci.fits")}
    ref = {n: data for n, _, data in hdus("ref.fits")}
    sources = ref.get("SOURCES")
    ref_xy = (np.column_stack([np.asarray(sources["x"], float), np.asarray(sources["y"], float)])
              if sources is not None else np.zeros((0, 2)))
    result = DiffResult(
        diff=diff[0][2].astype(np.float32), scorr=scorr["PRIMARY"].astype(np.float32),
        flux=scorr["FLUX"].astype(np.float32), flux_err=scorr["FLUX_ERR"].astype(np.float32),
        mask=mask.astype(np.uint8), sci=sci["PRIMARY"].astype(np.float32),
        ref=ref["PRIMARY"].astype(np.float32), psf_sci=sci["PSF"].astype(np.float32),
        psf_ref=ref["PSF"].astype(np.float32), wcs=celestial_wcs(diff[0][1]),
        ref_sources=ref_xy, quality=quality)
    candidates = pd.read_csv(d / "candidates.csv")
    return result, candidates
