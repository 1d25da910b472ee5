"""A folder of FITS images as an archive: the same observation table a MAST query gives.

Each image becomes one row with astroquery's column names, read from its header:
``obs_collection`` from TELESCOP (mission names normalised, e.g. ``Swift`` -> ``SWIFT``;
``LOCAL`` when there is none),
``instrument_name`` from INSTRUME, ``filters`` from the filter keywords, ``t_min`` from the
observation MJD and ``t_max`` = ``t_min`` + exposure, ``s_ra``/``s_dec``/``s_region`` from the
WCS, ``dataURL`` = the local path. ``target_name`` is the image's folder relative to the root
(``<pair_id>`` in the simulated survey ``OUT/<pair_id>/{ref,sci}.fits``) and ``role_hint`` is
``ref``/``sci`` when the file name says so. Files that cannot be used are listed in
``problems`` with the reason, never skipped silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from astrid.archive.filters import mission_of
from astrid.archive.footprint import footprint_from_wcs
from astrid.archive.mast import OBS_COLUMNS
from astrid.errors import InputFileError
from astrid.progress import track

_FITS_NAME = re.compile(r"\.(fits|fit|fts|img)(\.gz|\.fz)?$|\.fz$", re.IGNORECASE)


@dataclass(frozen=True)
class LocalIndex:
    """The observation table of a folder and the files that could not be indexed."""

    observations: pd.DataFrame
    problems: pd.DataFrame  # path, reason


def index_folder(folder: str | Path) -> pd.DataFrame:
    """The observation table of every usable FITS image under ``folder`` (recursively).

    Files that cannot be used are in ``table.attrs["problems"]`` (``path, reason``); use
    :func:`scan_folder` to get them as a separate table.
    """
    index = scan_folder(folder)
    table = index.observations
    table.attrs["problems"] = index.problems
    return table


def scan_folder(folder: str | Path) -> LocalIndex:
    """Index every FITS image under ``folder`` (recursively): observations and problems.

    Raises
    ------
    InputFileError
        The folder does not exist, or holds no FITS file at all.
    """
    from astrid.fitsio import read_image

    folder = Path(folder)
    if not folder.is_dir():
        raise InputFileError(folder, "not a folder")
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and _FITS_NAME.search(p.name)
                   and not p.name.endswith(".part"))
    if not paths:
        raise InputFileError(folder, "no FITS files (*.fits, *.fit, *.fts, *.img, .gz/.fz) found")
    rows, problems = [], []
    for path in track(paths, "indexing FITS files"):
        try:
            image = read_image(path, require_wcs=True)
        except InputFileError as exc:
            problems.append({"path": str(path), "reason": exc.problem})
            continue
        meta = image.meta
        if meta.mjd is None:
            problems.append({"path": str(path), "reason": "no observation date (MJD-OBS/DATE-OBS)"})
            continue
        ny, nx = image.data.shape
        centre = image.wcs.pixel_to_world_values((nx - 1) / 2, (ny - 1) / 2)
        relative = path.relative_to(folder)
        telescope = meta.telescope or ""
        exptime_s = meta.exptime_s if meta.exptime_s is not None else np.nan
        stem = path.name.split(".")[0].lower()
        rows.append({
            "sn": "",
            "window": "",
            "obsid": str(relative),
            "obs_id": path.name,
            # images without TELESCOP still pair among themselves, as mission LOCAL
            "obs_collection": mission_of(telescope) or telescope.upper() or "LOCAL",
            "instrument_name": meta.instrument or "",
            "filters": meta.filter or "",
            "t_min": meta.mjd,
            "t_max": meta.mjd + (exptime_s / 86400 if np.isfinite(exptime_s) else 0.0),
            "t_exptime": exptime_s,
            "s_ra": float(centre[0]) % 360.0,
            "s_dec": float(centre[1]),
            "s_region": footprint_from_wcs(image.wcs, (ny, nx)),
            "calib_level": 2,
            "dataURL": str(path.absolute()),
            "product_filename": path.name,
            "product_uri": "",
            "product_size": float(path.stat().st_size),
            "product_reason": "",
            "target_name": str(relative.parent) if str(relative.parent) != "." else stem,
            "role_hint": stem if stem in ("ref", "sci") else "",
            "hdu": image.hdu_index,
        })
    columns = OBS_COLUMNS + ["target_name", "role_hint", "hdu"]
    return LocalIndex(observations=pd.DataFrame(rows, columns=columns),
                      problems=pd.DataFrame(problems, columns=["path", "reason"]))
