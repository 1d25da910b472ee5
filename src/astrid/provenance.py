"""Atomic output files and the provenance every output carries.

Every file AstrID writes goes through :func:`atomic_path` (write to a temporary file in the
same directory, fsync, rename), so a run killed at any point never leaves a half-written file
under the final name that a rerun could trust.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from astrid import __version__

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs are ordinary files
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def write_table_atomic(path: str | os.PathLike, table, **kwargs) -> Path:
    """Write a pandas DataFrame as CSV or Parquet (chosen by the suffix), atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix == ".parquet":
            table.to_parquet(tmp, index=False, **kwargs)
        else:
            table.to_csv(tmp, index=False, **kwargs)
    return path


def _json_default(obj):
    import numpy as np

    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def config_hash(settings: Any) -> str:
    """A short stable hash of a settings object (pydantic model, dict or None)."""
    if settings is None:
        payload = {}
    elif hasattr(settings, "model_dump"):
        payload = settings.model_dump(mode="json")
    else:
        payload = settings
    blob = json.dumps(payload, sort_keys=True, default=_json_default).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def versions() -> dict[str, str]:
    """Versions of AstrID and the libraries whose behaviour shapes the results."""
    import importlib.metadata as md

    out = {"astrid": __version__, "python": platform.python_version()}
    for name in ("numpy", "scipy", "astropy", "sep", "torch", "onnxruntime"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def provenance(settings: Any = None, inputs: list | tuple = (), seed: int | None = None) -> dict:
    """The provenance record stored with an output (JSON) or in its FITS header."""
    record = {
        "astrid_version": __version__,
        "config_hash": config_hash(settings),
        "inputs": [str(p) for p in inputs],
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": versions(),
    }
    if seed is not None:
        record["seed"] = seed
    return record
