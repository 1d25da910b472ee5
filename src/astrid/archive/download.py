"""Resumable, verified downloads of paired images into ``ROOT/<sn>/<mission>_<filter>/{ref,sci}/``.

Each file is fetched into ``<name>.part`` (resumed with an HTTP ``Range`` request after a
dropped connection or a truncated body), then verified: the size the archive announced, the
checksum where one is known (``ref_checksum``/``sci_checksum`` as ``sha256:<hex>`` or
``md5:<hex>``, and the FITS ``CHECKSUM``/``DATASUM`` cards when present), the file opens as a
FITS image (:func:`astrid.fitsio.read_image`) and has a celestial WCS. Only then is it renamed to
its final name, so a file under its final name is always a verified one. Corrupt data is
discarded and fetched again; a file that still fails after ``retries`` is reported ``failed``.

``ROOT/manifest.json`` lists every file with its status, size and SHA-256. It is merged with
what an earlier run wrote (never overwritten), and a rerun skips every file it lists as
verified whose bytes still match. At most ``connections`` (<= 4) downloads run at once.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from astrid.config import ArchiveSettings
from astrid.errors import InputFileError
from astrid.progress import track
from astrid.provenance import file_sha256, provenance, write_json_atomic

MANIFEST_NAME = "manifest.json"
MANIFEST_COLUMNS = ["sn", "mission", "filter", "role", "obsid", "url", "path", "status",
                    "reason", "size", "sha256", "attempts"]
_CHUNK_BYTES = 1 << 16


@dataclass(frozen=True)
class DownloadResult:
    """What happened to each file (``files``) and where the manifest is."""

    files: pd.DataFrame
    manifest_path: Path

    @property
    def n_verified(self) -> int:
        return int(self.files["status"].isin(["verified", "cached"]).sum())

    @property
    def n_failed(self) -> int:
        return int((self.files["status"] == "failed").sum())


@dataclass(frozen=True)
class _Task:
    sn: str
    mission: str
    filter: str
    role: str
    obsid: str
    url: str
    path: Path
    size: int | None
    checksum: str


def download_pairs(pairs: pd.DataFrame, root: str | Path,
                   settings: ArchiveSettings | None = None) -> DownloadResult:
    """Download the reference and science images of every ``paired`` row of ``pairs``.

    Parameters
    ----------
    pairs : the table from :func:`astrid.archive.make_pairs` (``sn, mission, filter,
        ref_obsid, sci_obsid, status, ref_url, sci_url``; optional ``ref_filename``,
        ``ref_size`` in bytes, ``ref_checksum`` and the same for ``sci``). Rejected rows are
        never downloaded.
    root : output folder; files go to ``root/<sn>/<mission>_<filter>/{ref,sci}/<file>``.
    settings : ``connections``, ``retries``, ``backoff_s``, ``timeout_s``.

    Returns
    -------
    DownloadResult; ``files`` has :data:`MANIFEST_COLUMNS`, ``status`` one of ``verified``
    (fetched and verified now), ``cached`` (verified earlier, untouched) or ``failed``.
    """
    settings = settings or ArchiveSettings()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    manifest_path = root / MANIFEST_NAME
    known = _read_manifest(manifest_path)
    tasks = _tasks(pairs, root)
    workers = min(settings.connections, 4, max(len(tasks), 1))
    lock = threading.Lock()
    done: list[dict] = []

    def run(task: _Task) -> dict:
        result = _fetch(task, known.get(str(task.path)), settings)
        with lock:
            done.append(result)
        return result

    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for _ in track(pool.map(run, tasks), "downloading", total=len(tasks)):
                pass
    finally:
        _merge_manifest(manifest_path, done, settings)
    files = pd.DataFrame(done, columns=MANIFEST_COLUMNS)
    return DownloadResult(files=files, manifest_path=manifest_path)


def _merge_manifest(path: Path, rows: list[dict], settings: ArchiveSettings) -> None:
    """Add ``rows`` to the manifest, keeping every row of files not touched now.

    Several processes (pipeline workers) may download into one root: the manifest is re-read
    and rewritten under an exclusive lock so that no process drops another's rows.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: single-process use only
        fcntl = None
    lock_path = path.with_name("." + path.name + ".lock")
    with open(lock_path, "a") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        merged = _read_manifest(path)
        merged.update({row["path"]: row for row in rows})
        write_json_atomic(path, {
            "provenance": provenance(settings, inputs=[]),
            "files": sorted(merged.values(), key=lambda r: r["path"]),
        })


def pair_paths(pair: dict | pd.Series, root: str | Path) -> tuple[Path, Path]:
    """Where :func:`download_pairs` puts (or has put) the reference and science files of a pair.

    ``root/<sn>/<mission>_<filter>/{ref,sci}/<file name>``, the file name being
    ``ref_filename``/``sci_filename`` or the last part of the URL.
    """
    row = dict(pair)
    ref, sci = (_destination(row, Path(root), role) for role in ("ref", "sci"))
    return ref, sci


def _text(value) -> str:
    """A table cell as text, '' for missing (None, NaN) values."""
    return "" if value is None or (isinstance(value, float) and value != value) else str(value)


def _destination(row: dict, root: Path, role: str) -> Path:
    name = _text(row.get(f"{role}_filename")) or _name_from_url(_text(row.get(f"{role}_url")))
    folder = root / _safe(row["sn"]) / f"{_safe(row['mission'])}_{_safe(row['filter'])}" / role
    return folder / _safe(name)


def _read_manifest(path: Path) -> dict[str, dict]:
    import json

    if not path.exists():
        return {}
    try:
        return {row["path"]: row for row in json.loads(path.read_text())["files"]}
    except (ValueError, KeyError, TypeError) as exc:
        raise InputFileError(path, f"not a valid download manifest ({exc})") from None


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", str(text)).strip("._") or "unnamed"


def _tasks(pairs: pd.DataFrame, root: Path) -> list[_Task]:
    tasks, seen = [], set()
    paired = pairs[pairs["status"] == "paired"] if "status" in pairs else pairs.iloc[0:0]
    for row in paired.to_dict("records"):
        for role in ("ref", "sci"):
            url = _text(row.get(f"{role}_url"))
            if not url:
                continue
            path = _destination(row, root, role)
            if str(path) in seen:
                continue
            seen.add(str(path))
            size = pd.to_numeric(row.get(f"{role}_size"), errors="coerce")
            tasks.append(_Task(sn=str(row["sn"]), mission=str(row["mission"]),
                               filter=str(row["filter"]), role=role,
                               obsid=str(row.get(f"{role}_obsid", "")), url=url, path=path,
                               size=int(size) if pd.notna(size) and size > 0 else None,
                               checksum=_text(row.get(f"{role}_checksum"))))
    return tasks


def _name_from_url(url: str) -> str:
    parsed = urllib.parse.urlparse(url)
    uri = urllib.parse.parse_qs(parsed.query).get("uri")
    return (uri[0] if uri else parsed.path).rsplit("/", 1)[-1] or "download.fits"


def _record(task: _Task, status: str, reason: str = "", sha: str = "", size=None,
            attempts: int = 0) -> dict:
    return {"sn": task.sn, "mission": task.mission, "filter": task.filter, "role": task.role,
            "obsid": task.obsid, "url": task.url, "path": str(task.path), "status": status,
            "reason": reason, "size": size, "sha256": sha, "attempts": attempts}


def _fetch(task: _Task, previous: dict | None, settings: ArchiveSettings) -> dict:
    """Download (or reuse) one file; returns its manifest row. Never raises for network trouble."""
    if task.path.exists():
        problem = _verify(task.path, task, previous, settings.verify_fits_checksum)
        if not problem:
            return {**_record(task, "cached", sha=file_sha256(task.path),
                              size=task.path.stat().st_size),
                    "attempts": (previous or {}).get("attempts", 0)}
        task.path.unlink()  # a bad file under the final name must not be trusted again
    local = _local_path(task.url)
    if local is not None:
        return _check_local(task, local)
    part = task.path.with_name(task.path.name + ".part")
    task.path.parent.mkdir(parents=True, exist_ok=True)
    delay_s, reason = settings.backoff_s, ""
    for attempt in range(1, settings.retries + 2):
        try:
            _stream(task.url, part, settings.timeout_s)
        except _Fatal as exc:
            return _record(task, "failed", str(exc), attempts=attempt)
        except Exception as exc:  # noqa: BLE001  connection trouble: keep .part and resume
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        else:
            reason = _verify(part, task, None, settings.verify_fits_checksum)
            if not reason:
                sha = file_sha256(part)
                os.replace(part, task.path)
                return _record(task, "verified", sha=sha, size=task.path.stat().st_size,
                               attempts=attempt)
            part.unlink()  # complete but wrong: the bytes cannot be resumed, start over
        if attempt <= settings.retries:
            time.sleep(delay_s)
            delay_s *= 2
    return _record(task, "failed", reason, attempts=settings.retries + 1)


class _Fatal(Exception):
    """An answer that retrying will not change (HTTP 4xx other than 408/429)."""


def _stream(url: str, part: Path, timeout_s: float) -> None:
    """Append the rest of ``url`` to ``part`` (Range request when part has bytes)."""
    import requests

    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    with requests.get(url, headers=headers, stream=True, timeout=timeout_s) as response:
        if response.status_code == 416:  # nothing left to send: part is complete (or wrong)
            return
        if response.status_code in (408, 429) or response.status_code >= 500:
            raise ConnectionError(f"HTTP {response.status_code}")
        if response.status_code >= 400:
            raise _Fatal(f"HTTP {response.status_code}")
        mode = "ab" if response.status_code == 206 and have else "wb"  # 200: server ignored Range
        with open(part, mode) as fh:
            for chunk in response.iter_content(_CHUNK_BYTES):
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())


def _verify(path: Path, task: _Task, previous: dict | None, check_cards: bool) -> str:
    """'' if the file is good, else the problem."""
    size = path.stat().st_size
    if task.size is not None and size != task.size:
        return f"size {size} bytes, archive says {task.size}"
    if previous is not None and previous.get("sha256") and previous.get("status") in (
            "verified", "cached"):
        if previous.get("size") not in (None, size):
            return "size differs from the manifest"
        if file_sha256(path) != previous["sha256"]:
            return "SHA-256 differs from the manifest"
        return ""  # verified before, same bytes: no need to open it again
    if task.checksum:
        algorithm, _, expected = task.checksum.partition(":")
        if algorithm not in ("sha256", "md5") or not expected:
            return f"unknown checksum {task.checksum!r}"
        digest = hashlib.new(algorithm)
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
        if digest.hexdigest().lower() != expected.lower():
            return f"{algorithm} checksum mismatch"
    return _verify_fits(path, check_cards)


def _verify_fits(path: Path, check_cards: bool) -> str:
    """'' if the file is a FITS image with a celestial WCS (and, with ``check_cards``, its
    CHECKSUM/DATASUM cards, where present, match the bytes)."""
    from astropy.io import fits

    from astrid.fitsio import read_image

    try:
        if check_cards:
            with fits.open(path, memmap=False) as hdul:
                for index, hdu in enumerate(hdul):
                    # 1 = matches, 0 = mismatch, 2 = no card (nothing to check)
                    if "DATASUM" in hdu.header and hdu.verify_datasum() == 0:
                        return (f"FITS DATASUM of HDU {index} does not match the data (corrupt, "
                                "or stale cards: see archive.verify_fits_checksum)")
                    if "CHECKSUM" in hdu.header and hdu.verify_checksum() == 0:
                        return (f"FITS CHECKSUM of HDU {index} does not match (corrupt, or "
                                "stale cards: see archive.verify_fits_checksum)")
        read_image(path, require_wcs=True)
    except InputFileError as exc:
        return exc.problem
    except Exception as exc:  # noqa: BLE001  anything astropy raises on broken files
        return f"not a readable FITS file ({type(exc).__name__})"
    return ""


def _local_path(url: str) -> Path | None:
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        return Path(urllib.parse.unquote(parsed.path))
    if parsed.scheme in ("", ) or (len(parsed.scheme) == 1 and url[1:3] in (":\\", ":/")):
        return Path(url)
    return None


def _check_local(task: _Task, source: Path) -> dict:
    """A local archive's file: verify it and link it into the layout (no copy of the bytes)."""
    if not source.exists():
        return _record(task, "failed", f"{source}: file not found")
    # the user's own files: stale CHECKSUM cards in edited files are common and harmless here
    problem = _verify(source, task, None, check_cards=False)
    if problem:
        return _record(task, "failed", f"{source}: {problem}")
    task.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = task.path.with_name(task.path.name + ".part")
    if tmp.exists() or tmp.is_symlink():
        tmp.unlink()
    try:
        os.link(source, tmp)
    except OSError:  # another file system: a symlink is the next best thing
        tmp.symlink_to(source.resolve())
    os.replace(tmp, task.path)
    return _record(task, "verified", sha=file_sha256(task.path), size=task.path.stat().st_size,
                   attempts=1)
