"""ZTF and Rubin alert packets -> (science, reference, difference) triplets with their metadata.

Formats read
------------
* ZTF Avro packets (one or many alerts per file, schema 3.x), as IPAC distributes them;
* Parquet as the Fink broker stores them (one alert per row, same nested layout);
* the MongoDB JSON export used by braai's sample alerts (stamps as ``{"$binary": base64}``);
* tar archives (``.tar``, ``.tar.gz``, ``.tgz``, any gzipped tar) of Avro packets;
* Rubin (LSST) packets in Avro or Parquet (``diaSource`` record, uncompressed FITS cutouts).

Stamps
------
ZTF cutouts are gzipped FITS, 63×63 except at chip edges. Rubin cutouts are plain FITS, 30×30.
Every stamp is placed in a ``size``×``size`` float32 array, NaN-padded at the bottom/right when
smaller (the convention of the converted triplets in ``../shared/data``), so the pixel at
index (0, 0) is always the cutout's own (0, 0). ``size`` defaults to the largest nominal cutout
size among the packets read (63 for ZTF, 30 for Rubin). The original shape is kept in the
``stamp_shape`` column. How a model trained on 63×63 scores a 30×30 Rubin stamp is decided
at scoring time (:func:`astrid.ml.score.adapt_stamp_size`), not here.

A packet that cannot be decoded (bad gzip, JPEG stamps from the 2018 commissioning alerts,
truncated FITS, missing cutout) is skipped and reported in :attr:`AlertBatch.problems`; it is
never fatal. A candidate seen twice (the same ``candid`` in two files) is kept once.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import tarfile
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from astrid.errors import InputFileError

#: Channel order of the triplets, as everywhere in AstrID.
CHANNELS = ("sci", "ref", "diff")
#: Packet field of each channel's cutout (ZTF and Rubin use the same names).
CUTOUT_FIELDS = {"sci": "cutoutScience", "ref": "cutoutTemplate", "diff": "cutoutDifference"}
#: Nominal cutout side in pixels of each mission.
NOMINAL_SIZE_PX = {"ZTF": 63, "Rubin": 30}
#: ZTF filter id -> filter name.
ZTF_FILTERS = {1: "g", 2: "r", 3: "i"}

ALERT_SUFFIXES = (".avro", ".parquet", ".json", ".tar", ".tar.gz", ".tgz")
_JD_MJD_OFFSET = 2400000.5
# packet fields that are neither metadata scalars nor broker extras
_HISTORY_FIELDS = ("prv_candidates", "prvDiaSources", "prvDiaForcedSources", "lc_features_g",
                   "lc_features_r")


@dataclass(frozen=True)
class AlertBatch:
    """Triplets decoded from alert packets.

    Attributes
    ----------
    stamps : ndarray, shape (N, 3, size, size), float32
        Raw cutout pixels, channels ``("sci", "ref", "diff")``, NaN where the cutout had no
        data (padding of edge stamps, masked pixels).
    meta : DataFrame
        Row i describes stamp i: ``candid, objectId, mission, filter, ra, dec, mjd, sign,
        source_file, stamp_shape`` plus every scalar field of the candidate record (ZTF:
        ``magpsf, isdiffpos, rb, drb, fid, jd, ...``; Rubin: ``psfFlux, reliability, band, ...``)
        and the broker's top-level scalar fields prefixed ``x_`` (Fink's ``x_tns`` ...).
    problems : DataFrame
        ``path, candid, reason``: packets skipped and why.
    """

    stamps: np.ndarray
    meta: pd.DataFrame
    problems: pd.DataFrame

    def __len__(self) -> int:
        return len(self.stamps)


class _PacketError(Exception):
    """A packet that cannot be turned into a triplet (reported, not raised to the user)."""


def read_alerts(paths, size: int | None = None) -> AlertBatch:
    """Read ZTF/Rubin alert packets from files or directories.

    Parameters
    ----------
    paths : path or sequence of paths
        Avro, Parquet, JSON or tar(.gz) files; a directory is searched recursively for them.
    size : int, optional
        Side of the output stamps in pixels; default: the largest nominal cutout size of the
        missions read (63 for ZTF, 30 for Rubin). Larger cutouts are reported and skipped.

    Returns
    -------
    AlertBatch

    Raises
    ------
    InputFileError
        A path does not exist, or a file given explicitly is not an alert format.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files = _expand(paths)
    rows: list[dict] = []
    cutouts: list[dict[str, np.ndarray]] = []
    problems: list[dict] = []
    seen: dict[int, str] = {}
    for source, packet in _iter_packets(files, problems):
        candid = _candid(packet)
        try:
            row, channels = _decode(packet)
        except _PacketError as exc:
            problems.append({"path": source, "candid": candid, "reason": str(exc)})
            continue
        if row["candid"] in seen:
            problems.append({"path": source, "candid": candid,
                             "reason": f"duplicate candid (kept the copy in {seen[row['candid']]})"})
            continue
        seen[row["candid"]] = source
        row["source_file"] = source
        rows.append(row)
        cutouts.append(channels)

    if size is None:
        size = max((NOMINAL_SIZE_PX[r["mission"]] for r in rows), default=63)
    stamps = np.full((len(rows), 3, size, size), np.nan, dtype=np.float32)
    keep = []
    for i, (row, channels) in enumerate(zip(rows, cutouts, strict=True)):
        shapes = {c.shape for c in channels.values()}
        if any(s[0] > size or s[1] > size for s in shapes):
            problems.append({"path": row["source_file"], "candid": row["candid"],
                             "reason": f"cutout {row['stamp_shape']} larger than {size}x{size}"})
            continue
        for k, name in enumerate(CHANNELS):
            img = channels[name]
            stamps[i, k, : img.shape[0], : img.shape[1]] = img
        keep.append(i)
    stamps = stamps[keep]
    meta = pd.DataFrame([rows[i] for i in keep])
    if meta.empty:
        meta = pd.DataFrame(columns=["candid", "objectId", "mission", "filter", "ra", "dec",
                                     "mjd", "sign", "source_file", "stamp_shape"])
    lead = ["candid", "objectId", "mission", "filter", "ra", "dec", "mjd", "sign",
            "source_file", "stamp_shape"]
    meta = meta[lead + [c for c in meta.columns if c not in lead]].reset_index(drop=True)
    problems_df = pd.DataFrame(problems, columns=["path", "candid", "reason"], dtype=object)
    # nullable integers: file-level problems have no candid, and float would round 18-digit ids
    problems_df["candid"] = pd.array(list(problems_df["candid"]), dtype="Int64")
    return AlertBatch(stamps=stamps, meta=meta, problems=problems_df)


def is_alert_file(path: str | Path) -> bool:
    """True for a file whose name marks it as an alert container AstrID can read."""
    name = Path(path).name.lower()
    return name.endswith(ALERT_SUFFIXES) or (name.endswith(".gz") and "tar" in name)


# --- files and containers ------------------------------------------------------------------

def _expand(paths) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise InputFileError(p, "file not found")
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and is_alert_file(f))
            if not found:
                raise InputFileError(p, "no alert packets (.avro, .parquet, .json, .tar.gz) in this directory")
            files.extend(found)
        elif is_alert_file(p) or tarfile.is_tarfile(p):
            files.append(p)
        else:
            raise InputFileError(p, "not an alert packet file (expected .avro, .parquet, .json or a tar of Avro)")
    return files


def _iter_packets(files: list[Path], problems: list[dict]) -> Iterator[tuple[str, dict]]:
    """Yield (source name, packet dict) for every packet; unreadable containers go to problems."""
    for path in files:
        name = path.name.lower()
        try:
            if name.endswith(".parquet"):
                yield from ((str(path), pkt) for pkt in _parquet_packets(path))
            elif name.endswith(".json"):
                yield from ((str(path), pkt) for pkt in _json_packets(path))
            elif name.endswith(".avro"):
                with open(path, "rb") as fh:
                    yield from ((str(path), pkt) for pkt in _avro_packets(fh))
            else:
                yield from _tar_packets(path, problems)
        except _PacketError as exc:
            problems.append({"path": str(path), "candid": None, "reason": str(exc)})


def _avro_packets(fh) -> Iterator[dict]:
    import fastavro

    try:
        reader = fastavro.reader(fh)
        yield from reader
    except (ValueError, EOFError, OSError, StopIteration, TypeError, KeyError) as exc:
        raise _PacketError(f"unreadable Avro ({type(exc).__name__}: {exc})") from None


def _tar_packets(path: Path, problems: list[dict]) -> Iterator[tuple[str, dict]]:
    try:
        archive = tarfile.open(path)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise _PacketError(f"unreadable tar archive ({exc})") from None
    with archive:
        try:
            members = [m for m in archive.getmembers() if m.isfile()]
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise _PacketError(f"unreadable tar archive ({exc})") from None
        for member in members:
            source = f"{path}::{member.name}"
            if not member.name.lower().endswith(".avro"):
                continue
            try:
                data = archive.extractfile(member).read()
                yield from ((source, pkt) for pkt in _avro_packets(io.BytesIO(data)))
            except _PacketError as exc:
                problems.append({"path": source, "candid": None, "reason": str(exc)})
            except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
                problems.append({"path": source, "candid": None,
                                 "reason": f"unreadable tar member ({exc})"})


def _parquet_packets(path: Path) -> Iterator[dict]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises many types for a corrupt file
        raise _PacketError(f"unreadable Parquet ({type(exc).__name__}: {exc})") from None
    # history arrays are large and unused here: drop them before converting rows to Python
    heavy = [c for c in _HISTORY_FIELDS if c in table.column_names]
    table = table.drop_columns(heavy)
    for batch in table.to_batches(max_chunksize=256):
        yield from batch.to_pylist()


def _json_packets(path: Path) -> Iterator[dict]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _PacketError(f"unreadable JSON ({exc})") from None
    yield from (doc if isinstance(doc, list) else [doc])


# --- one packet ------------------------------------------------------------------------------

def _candid(packet: dict):
    for key in ("candid", "diaSourceId"):
        if packet.get(key) is not None:
            return int(packet[key])
    return None


def _decode(packet: dict) -> tuple[dict, dict[str, np.ndarray]]:
    if isinstance(packet.get("candidate"), dict):
        row = _ztf_row(packet)
    elif isinstance(packet.get("diaSource"), dict):
        row = _rubin_row(packet)
    else:
        raise _PacketError("neither a ZTF (candidate) nor a Rubin (diaSource) packet")
    errors = []
    channels = {}
    for name in CHANNELS:
        try:
            channels[name] = _decode_cutout(packet.get(CUTOUT_FIELDS[name]))
        except _PacketError as exc:
            errors.append(f"{CUTOUT_FIELDS[name]}: {exc}")
    if errors:
        raise _PacketError("; ".join(errors))
    shapes = {c.shape for c in channels.values()}
    row["stamp_shape"] = "/".join(f"{s[0]}x{s[1]}" for s in sorted(shapes))
    return row, channels


def _scalars(record: dict, prefix: str = "") -> dict:
    return {prefix + k: v for k, v in record.items()
            if v is None or isinstance(v, (bool, int, float, str))}


def _broker_extras(packet: dict, own: set[str]) -> dict:
    """Top-level scalar fields a broker added (Fink's tns, cdsxmatch, ...), prefixed ``x_``."""
    return _scalars({k: v for k, v in packet.items() if k not in own and k not in _HISTORY_FIELDS},
                    prefix="x_")


def _ztf_row(packet: dict) -> dict:
    cand = packet["candidate"]
    row = _scalars(cand)
    row.update(_broker_extras(packet, {"candid", "objectId", "candidate", *CUTOUT_FIELDS.values()}))
    row["candid"] = int(packet.get("candid") or cand["candid"])
    row["objectId"] = packet.get("objectId")
    row["mission"] = "ZTF"
    row["filter"] = ZTF_FILTERS.get(cand.get("fid"), str(cand.get("fid")))
    row["mjd"] = cand["jd"] - _JD_MJD_OFFSET if cand.get("jd") is not None else np.nan
    # isdiffpos: 't'/'1' = positive residual in the difference, 'f'/'0' = negative
    row["sign"] = -1 if str(cand.get("isdiffpos", "t")).lower() in ("f", "0") else 1
    return row


def _rubin_row(packet: dict) -> dict:
    src = packet["diaSource"]
    row = _scalars(src)
    row.update(_broker_extras(packet, {"diaSourceId", "diaSource", "diaObject", "ssSource",
                                       "mpc_orbits", *CUTOUT_FIELDS.values()}))
    row["candid"] = int(packet.get("diaSourceId") or src["diaSourceId"])
    obj = src.get("diaObjectId")
    row["objectId"] = None if obj is None else str(int(obj))
    row["mission"] = "Rubin"
    row["filter"] = src.get("band")
    row["mjd"] = src.get("midpointMjdTai", np.nan)
    row["sign"] = -1 if src.get("isNegative") else 1
    return row


def _stamp_bytes(cutout) -> bytes:
    """The raw bytes of a cutout in any of the packet layouts."""
    if cutout is None:
        raise _PacketError("missing cutout")
    if isinstance(cutout, dict):  # ZTF: {"fileName", "stampData"}
        cutout = cutout.get("stampData")
    if isinstance(cutout, dict):  # MongoDB JSON: {"$binary": b64} or {"$binary": {"base64": b64}}
        b64 = cutout.get("$binary")
        if isinstance(b64, dict):
            b64 = b64.get("base64")
        if not isinstance(b64, str):
            raise _PacketError("unknown JSON stamp encoding")
        cutout = base64.b64decode(b64)
    if not isinstance(cutout, (bytes, bytearray)) or len(cutout) == 0:
        raise _PacketError("empty cutout")
    return bytes(cutout)


def _decode_cutout(cutout) -> np.ndarray:
    """Gzipped or plain FITS bytes -> 2-D float32 image (NaN kept)."""
    from astropy.io import fits
    from astropy.io.fits.verify import VerifyWarning

    raw = _stamp_bytes(cutout)
    if raw[:3] == b"\xff\xd8\xff":
        raise _PacketError("JPEG stamp, not FITS")
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise _PacketError(f"bad gzip ({exc})") from None
        if raw[:3] == b"\xff\xd8\xff":
            raise _PacketError("JPEG stamp, not FITS")
    if not raw.startswith(b"SIMPLE"):
        raise _PacketError("not a FITS stamp")
    try:
        # many alert cutouts carry a SIMPLE card astropy finds non-standard; the data are fine
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", VerifyWarning)
            with fits.open(io.BytesIO(raw), memmap=False) as hdul:
                for hdu in hdul:
                    if hdu.data is not None and np.ndim(hdu.data) == 2:
                        data = np.asarray(hdu.data, dtype=np.float32)
                        break
                else:
                    raise _PacketError("FITS stamp without a 2-D image")
    except _PacketError:
        raise
    except Exception as exc:  # astropy raises OSError, ValueError, TypeError on truncated files
        raise _PacketError(f"corrupt FITS ({type(exc).__name__})") from None
    if data.size == 0:
        raise _PacketError("empty FITS stamp")
    return data
