"""Uploaded triplets -> raw stamps: ``.npz``, FITS stamps and alert packets.

Every problem with an upload is an :class:`~astrid.errors.AstridError` naming the file and what
is wrong, which the API answers with a 4xx.
"""

from __future__ import annotations

import io
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from astrid.errors import AstridError

CHANNELS = ("sci", "ref", "diff")
ALERT_SUFFIXES = (".avro", ".parquet", ".json", ".tar", ".tar.gz", ".tgz")
FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz")
_MIN_SIDE_PX = 5


class PayloadTooLarge(AstridError):
    """More triplets or bytes than the service accepts in one request (HTTP 413)."""


@dataclass(frozen=True)
class Triplets:
    """Raw triplets from one upload: ``stamps`` (N, 3, S, S) float32, ``ids`` (N,), and the
    packets that could not be decoded (alerts only)."""

    stamps: np.ndarray
    ids: list
    problems: pd.DataFrame


def read_upload(filename: str, data: bytes, *, max_batch: int) -> Triplets:
    """Decode an upload by its file name's suffix.

    Parameters
    ----------
    filename : the client's name for the file (``x.npz``, ``x.fits``, ``x.avro``, ...).
    data : the bytes.
    max_batch : most triplets accepted; more raises :class:`PayloadTooLarge`.
    """
    name = (filename or "").lower()
    if not data:
        raise AstridError(f"{filename}: empty upload")
    if name.endswith(".npz"):
        out = _read_npz(filename, data)
    elif name.endswith(FITS_SUFFIXES):
        out = _read_fits(filename, data)
    elif name.endswith(ALERT_SUFFIXES):
        out = _read_alerts(filename, data)
    else:
        raise AstridError(f"{filename}: unknown format; send .npz (sci, ref, diff), FITS stamps "
                          "(.fits) or alert packets (.avro, .parquet, .json, .tar.gz)")
    n = len(out.stamps)
    if n > max_batch:
        raise PayloadTooLarge(f"{filename}: {n} triplets, more than the {max_batch} accepted "
                              "per request; split the batch")
    if n == 0:
        raise AstridError(f"{filename}: no triplets found")
    side = out.stamps.shape[-1]
    if side < _MIN_SIDE_PX or out.stamps.shape[-2] != side:
        raise AstridError(f"{filename}: stamps must be square and at least {_MIN_SIDE_PX} px, "
                          f"got {out.stamps.shape[-2]}x{side}")
    return out


def _stack(filename: str, parts: dict[str, np.ndarray]) -> np.ndarray:
    shapes = {k: v.shape for k, v in parts.items()}
    arrays = [np.asarray(parts[c], dtype=np.float32) for c in CHANNELS]
    arrays = [a[None] if a.ndim == 2 else a for a in arrays]
    if any(a.ndim != 3 for a in arrays) or len({a.shape for a in arrays}) != 1:
        raise AstridError(f"{filename}: sci, ref and diff must be (N, S, S) arrays of one shape, "
                          f"got {shapes}")
    return np.stack(arrays, axis=1)


def _read_npz(filename: str, data: bytes) -> Triplets:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise AstridError(f"{filename}: not a readable .npz file ({exc})") from None
    if "triplets" in arrays:
        stamps = np.asarray(arrays["triplets"], dtype=np.float32)
        if stamps.ndim != 4 or stamps.shape[1] != 3:
            raise AstridError(f"{filename}: 'triplets' must be (N, 3, S, S), got {stamps.shape}")
    else:
        missing = [c for c in CHANNELS if c not in arrays]
        if missing:
            raise AstridError(f"{filename}: missing array(s) {', '.join(missing)}; expected sci, "
                              f"ref, diff (found {', '.join(sorted(arrays)) or 'none'})")
        try:
            stamps = _stack(filename, {c: arrays[c] for c in CHANNELS})
        except (TypeError, ValueError) as exc:
            raise AstridError(f"{filename}: sci, ref, diff are not numeric arrays ({exc})") from None
    ids = arrays.get("candid")
    ids = [int(i) if np.issubdtype(np.asarray(ids).dtype, np.integer) else str(i) for i in ids] \
        if ids is not None and len(ids) == len(stamps) else list(range(len(stamps)))
    return Triplets(stamps, ids, _no_problems())


def _read_fits(filename: str, data: bytes) -> Triplets:
    """A cube HDU (N, 3, S, S) or (3, S, S), or image HDUs named SCI, REF, DIFF."""
    from astropy.io import fits

    try:
        with fits.open(io.BytesIO(data), memmap=False) as hdul:
            hdul.verify("silentfix")
            named = {(h.name or "").lower(): h.data for h in hdul
                     if getattr(h, "data", None) is not None and h.is_image}
            cubes = [h.data for h in hdul if getattr(h, "data", None) is not None and h.is_image]
    except Exception as exc:  # astropy raises many types for corrupt files
        raise AstridError(f"{filename}: not a readable FITS file ({type(exc).__name__}: {exc})") from None
    if all(c in named for c in CHANNELS):
        stamps = _stack(filename, {c: named[c] for c in CHANNELS})
    elif cubes and cubes[0].ndim in (3, 4) and cubes[0].shape[-3] == 3:
        stamps = np.asarray(cubes[0], dtype=np.float32)
        stamps = stamps[None] if stamps.ndim == 3 else stamps
    else:
        raise AstridError(f"{filename}: expected image HDUs named SCI, REF, DIFF or one "
                          "(N, 3, S, S) cube")
    return Triplets(stamps, list(range(len(stamps))), _no_problems())


def _read_alerts(filename: str, data: bytes) -> Triplets:
    from astrid.alerts import read_alerts

    suffix = next(s for s in sorted(ALERT_SUFFIXES, key=len, reverse=True)
                  if filename.lower().endswith(s))
    with tempfile.TemporaryDirectory(prefix="astrid-upload-") as tmp:
        path = Path(tmp) / f"upload{suffix}"
        path.write_bytes(data)
        try:
            batch = read_alerts([path])
        except AstridError as exc:
            raise AstridError(f"{filename}: {getattr(exc, 'problem', exc)}") from None
    problems = batch.problems.assign(path=filename) if len(batch.problems) else _no_problems()
    if len(batch.stamps) == 0:
        reasons = "; ".join(sorted(set(map(str, problems["reason"]))))[:300] if len(problems) else ""
        raise AstridError(f"{filename}: no decodable alert packets"
                          + (f" ({reasons})" if reasons else ""))
    ids = [int(c) if str(c).lstrip("-").isdigit() else str(c) for c in batch.meta["candid"]]
    return Triplets(np.asarray(batch.stamps, dtype=np.float32), ids, problems)


def _no_problems() -> pd.DataFrame:
    return pd.DataFrame(columns=["path", "candid", "reason"])
