"""Catalogs of known supernovae -> one normalised table.

Reads the sncat-style pipe-delimited table dump (Asiago columns), the Open Supernova Catalog
CSV export (plain or ``.gz``), the ZTF Bright Transient Survey explorer CSV, TNS CSV exports and
plain CSV files whose columns go by common aliases (``name``/``ra``/``dec``/``disc_date``,
``date``, ``discovery_date``, ``RA``/``DEC`` in sexagesimal or degrees, ...).

Every input row ends up either in the normalised table or in the ``rejected`` table with the
reason (no coordinates, coordinates out of range, no or partial discovery date, duplicate
name); nothing is dropped silently. The normalised columns are

=========  =====================================================================
name       the supernova name (IAU name where the catalog has one)
ra_deg     ICRS right ascension, degrees [0, 360)
dec_deg    ICRS declination, degrees [-90, 90]
disc_date  discovery date, ISO 8601 (``YYYY-MM-DD`` or ``YYYY-MM-DDTHH:MM:SS``)
disc_mjd   discovery date, MJD (UTC days)
peak_mjd   date of maximum light, MJD, where the catalog gives it (else NaN)
type       classification as written by the catalog, without a leading ``SN``
host       host galaxy name
redshift   redshift (NaN where unknown)
=========  =====================================================================

The ZTF BTS table has no discovery date; we estimate it as the peak time minus the rise time
(both from the BTS light-curve fit) and say so in ``date_note``.
"""

from __future__ import annotations

import csv
import gzip
import io
import re
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from astrid.errors import AstridError, InputFileError

COLUMNS = ["name", "ra_deg", "dec_deg", "disc_date", "disc_mjd", "peak_mjd", "type", "host",
           "redshift", "date_note"]

# date(1858, 11, 17), the MJD epoch, as a proleptic Gregorian ordinal.
_MJD_EPOCH_ORDINAL = 678576
# BTS 'peakt' is JD - 2458000; MJD = JD - 2400000.5.
_BTS_PEAKT_TO_MJD = 2458000.0 - 2400000.5

# Column aliases, compared after lower-casing and dropping everything but letters and digits.
# Order matters: the first alias present with a value wins (per row, so ZTF objects without an
# IAU name fall back to their ZTF id).
_ALIASES = {
    "name": ["name", "snname", "sn", "iauid", "iauname", "objname", "object", "objectname",
             "ztfid", "id"],
    "ra": ["radeg", "ra", "snra", "raj2000", "radecimal", "rahms", "alpha"],
    "dec": ["decdeg", "dec", "sndec", "dej2000", "decj2000", "decdecimal", "decdms", "delta"],
    "date": ["discdate", "discoverydate", "discoverdate", "discoverydateut", "date", "discmjd",
             "discoverymjd", "mjd", "discjd", "jd"],
    "peak": ["peakmjd", "maxdate", "peakdate", "maxmjd"],
    "type": ["type", "sntype", "claimedtype", "objtype", "class", "classification"],
    "host": ["host", "hostname", "galname", "galaxy", "hostgalaxy"],
    "redshift": ["redshift", "z", "snredshift"],
}


@dataclass(frozen=True)
class CatalogTable:
    """A normalised supernova catalog.

    Attributes
    ----------
    table : DataFrame with the columns in :data:`COLUMNS`, one row per usable supernova.
    rejected : DataFrame ``line, name, reason``: every input row that is not in ``table``,
        with its 1-based line number in the file (header = line 1) and why.
    path : the file it came from.
    format : ``sncat``, ``oac``, ``bts``, ``tns`` or ``csv``.
    """

    table: pd.DataFrame
    rejected: pd.DataFrame
    path: str = ""
    format: str = "csv"

    def summary(self) -> str:
        """A few lines for the terminal: counts, date range, rejection reasons."""
        n = len(self.table)
        lines = [f"{self.path}: {self.format} catalog, {n} supernovae, "
                 f"{len(self.rejected)} rows rejected"]
        if n:
            mjd = self.table["disc_mjd"].dropna()
            if len(mjd):
                lo, hi = (_iso_from_mjd(v) for v in (mjd.min(), mjd.max()))
                lines.append(f"  discovered {lo} .. {hi}; {mjd.size} dated, {n - mjd.size} undated")
        for reason, count in self.rejected["reason"].value_counts().items():
            lines.append(f"  rejected {count:6d}: {reason}")
        return "\n".join(lines)


def read_catalog(path: str | Path, *, require_date: bool = True) -> CatalogTable:
    """Read a supernova catalog of any supported format into the normalised table.

    Parameters
    ----------
    path : the catalog file (``.txt`` pipe-delimited dump, ``.csv`` or ``.csv.gz``).
    require_date : reject rows without a usable discovery date (they cannot be given archive
        time windows). With False such rows are kept with NaN ``disc_mjd``.

    Raises
    ------
    InputFileError
        Missing or unreadable file, no recognisable name/coordinate columns, or no usable rows.
    """
    path = Path(path)
    if not path.exists():
        raise InputFileError(path, "file not found")
    text = _read_text(path)
    raw, first_line, fmt = _parse_rows(text, path)
    table, rejected = normalise(raw, first_line=first_line, fmt=fmt, require_date=require_date,
                                path=path)
    if table.empty:
        reasons = rejected["reason"].value_counts()
        why = f"; most common problem: {reasons.index[0]} ({reasons.iloc[0]} rows)" if len(reasons) else ""
        raise InputFileError(path, f"no usable supernova rows ({len(rejected)} rejected{why})")
    return CatalogTable(table=table, rejected=rejected, path=str(path), format=fmt)


def filter_catalog(catalog: CatalogTable, *, date_min: str | float | None = None,
                   date_max: str | float | None = None, types: list[str] | None = None,
                   dec_min_deg: float | None = None, dec_max_deg: float | None = None,
                   limit: int | None = None) -> CatalogTable:
    """Select supernovae by discovery date, type and declination, then keep the first ``limit``.

    Dates are ISO strings or MJD floats (inclusive bounds). ``types`` are prefixes of the
    classification: ``"II"`` selects II, IIP, IIn, IIb...; ``"Ia"`` selects Ia, Ia-91T, IaPec.
    Rows filtered out are a choice, not a problem, so they are not added to ``rejected``.
    """
    table = catalog.table
    keep = np.ones(len(table), bool)
    if date_min is not None:
        keep &= table["disc_mjd"].to_numpy() >= _mjd_bound(date_min)
    if date_max is not None:
        keep &= table["disc_mjd"].to_numpy() <= _mjd_bound(date_max)
    if dec_min_deg is not None:
        keep &= table["dec_deg"].to_numpy() >= dec_min_deg
    if dec_max_deg is not None:
        keep &= table["dec_deg"].to_numpy() <= dec_max_deg
    if types:
        kinds = table["type"].fillna("").astype(str)
        keep &= kinds.apply(lambda t: any(t.startswith(p) for p in types)).to_numpy()
    out = table[keep]
    if limit is not None:
        out = out.head(limit)
    return CatalogTable(table=out.reset_index(drop=True), rejected=catalog.rejected,
                        path=catalog.path, format=catalog.format)


def with_mjd(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with a ``disc_mjd`` column, computed from ``disc_date`` when it lacks one.

    Lets the archive functions take any table with the interface's columns (``name, ra_deg,
    dec_deg, disc_date``), not only :func:`read_catalog` output.
    """
    if "disc_mjd" in table.columns or "disc_date" not in table.columns:
        return table
    mjd, _, _ = parse_dates(table["disc_date"].fillna("").astype(str))
    return table.assign(disc_mjd=mjd)


def _mjd_bound(value: str | float) -> float:
    if isinstance(value, int | float):
        return float(value)
    mjd, _, problem = parse_date(str(value))
    if problem:
        raise AstridError(f"date filter {value!r}: {problem}")
    return mjd


# ----------------------------------------------------------------------------- reading

def _read_text(path: Path) -> str:
    try:
        blob = path.read_bytes()
        if blob[:2] == b"\x1f\x8b":
            blob = gzip.decompress(blob)
        return blob.decode("utf-8-sig", errors="replace")
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise InputFileError(path, f"cannot read ({exc})") from None


def _parse_rows(text: str, path: Path) -> tuple[pd.DataFrame, int, str]:
    """All rows as strings, the file line number of the first data row, and the format name."""
    lines = text.splitlines()
    skip = 0
    while skip < len(lines) and (not lines[skip].strip() or lines[skip].lstrip().startswith("#")):
        skip += 1
    if skip == len(lines):
        raise InputFileError(path, "empty catalog (no header line)")
    header = lines[skip]
    if "|" in header:
        return _parse_pipe_dump(lines, skip, path)
    # read only the columns we use: wide exports (OSC has 20 columns, 100k rows) parse faster
    header_cells = next(csv.reader([header]))
    wanted = {a for aliases in _ALIASES.values() for a in aliases} | {"peakt", "rise"}
    usecols = [c for c in header_cells if _key(c.strip()) in wanted] or None
    try:
        raw = pd.read_csv(io.StringIO(text), skiprows=skip, dtype=str, keep_default_na=False,
                          skipinitialspace=True, on_bad_lines="error", usecols=usecols)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise InputFileError(path, f"not a readable CSV table ({str(exc).splitlines()[0]})") from None
    keys = {_key(c) for c in raw.columns}
    if {"claimedtype", "discoverdate"} <= keys:
        fmt = "oac"
    elif {"ztfid", "peakt"} <= keys:
        fmt = "bts"
    elif "discoverydateut" in keys:
        fmt = "tns"
    else:
        fmt = "csv"
    # CSV header on line skip+1 (1-based), data from the next line. Quoted values with
    # newlines would shift this; the catalogs we know do not have them.
    return raw, skip + 2, fmt


def _parse_pipe_dump(lines: list[str], skip: int, path: Path) -> tuple[pd.DataFrame, int, str]:
    """The sncat/psql-style dump: header, a ``----+----`` rule, then ``a | b | c`` rows."""
    header = [h.strip() for h in lines[skip].split("|")]
    start = skip + 1
    if start < len(lines) and set(lines[start].strip()) <= set("-+"):
        start += 1
    rows, numbers = [], []
    for number, line in enumerate(lines[start:], start=start + 1):
        if not line.strip() or re.fullmatch(r"\(\d+ rows?\)", line.strip()):
            continue
        cells = [c.strip() for c in line.split("|")]
        if len(cells) != len(header):
            # keep it so it is reported, not lost
            cells = (cells + [""] * len(header))[: len(header)]
            cells[0] = cells[0] or f"<line {number}: {len(line.split('|'))} fields>"
        rows.append(cells)
        numbers.append(number)
    raw = pd.DataFrame(rows, columns=header, dtype=str)
    raw.attrs["line_numbers"] = numbers
    fmt = "sncat" if "sn_name" in header else "csv"
    if not rows:
        raise InputFileError(path, "no data rows in the table dump")
    return raw, start + 1, fmt


def _key(column: str) -> str:
    return re.sub(r"[^a-z0-9]", "", column.lower())


def _pick(raw: pd.DataFrame, field: str) -> pd.Series | None:
    """The first non-empty value per row among the columns aliased to ``field``."""
    by_key = {}
    for column in raw.columns:
        by_key.setdefault(_key(column), column)
    found = [by_key[a] for a in _ALIASES[field] if a in by_key]
    if not found:
        return None
    values = raw[found[0]].astype(str).str.strip()
    for column in found[1:]:
        empty = values.isin(["", "-", "nan", "NaN", "None", "null"])
        values = values.where(~empty, raw[column].astype(str).str.strip())
    return values


# ----------------------------------------------------------------------------- normalising

def normalise(raw: pd.DataFrame, *, first_line: int = 2, fmt: str = "csv",
              require_date: bool = True, path: str | Path = "<table>") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Turn a table of strings (any supported column names) into the normalised table.

    Returns ``(table, rejected)``; see :class:`CatalogTable`.
    """
    n = len(raw)
    lines = np.asarray(raw.attrs.get("line_numbers", np.arange(first_line, first_line + n)))
    names, ra_text, dec_text = _pick(raw, "name"), _pick(raw, "ra"), _pick(raw, "dec")
    if names is None or ra_text is None or dec_text is None:
        missing = [f for f, s in (("name", names), ("ra", ra_text), ("dec", dec_text)) if s is None]
        raise InputFileError(path, f"no {'/'.join(missing)} column (columns: {', '.join(map(str, raw.columns[:12]))})")
    reasons = np.full(n, "", dtype=object)

    def reject(mask, reason):
        """Record the first problem of each row; ``reason`` may be one string or per-row."""
        mask = np.asarray(mask, bool) & (reasons == "")
        reasons[mask] = reason[mask] if isinstance(reason, np.ndarray) else reason

    names = names.to_numpy(dtype=object)
    reject(np.isin(names, ["", "-", "nan"]), "no name")
    ra_deg, ra_problem = parse_angles(ra_text, hours=True)
    dec_deg, dec_problem = parse_angles(dec_text, hours=False)
    reject(ra_problem != "", "RA " + ra_problem)
    reject(dec_problem != "", "Dec " + dec_problem)

    date_note = np.full(n, "", dtype=object)
    if fmt == "bts":
        disc_mjd, iso, date_problem, date_note = _bts_dates(raw)
    else:
        date_text = _pick(raw, "date")
        if date_text is None:
            date_text = pd.Series([""] * n)
        disc_mjd, iso, date_problem = parse_dates(date_text)
    undated = date_problem == "no discovery date"
    bad_date = (date_problem != "") & ~undated
    reject(bad_date, "discovery date " + date_problem)
    if require_date:
        reject(undated, "no discovery date")

    peak_mjd = np.full(n, np.nan)
    if fmt != "bts":
        peak_text = _pick(raw, "peak")
        if peak_text is not None:
            peak_mjd, _, _ = parse_dates(peak_text)  # a bad peak date only loses the peak
    else:
        peak_mjd = _to_float(raw["peakt"]) + _BTS_PEAKT_TO_MJD

    # the same object twice (BTS lists some under two ZTF ids, typed 'duplicate'): keep the first
    good = reasons == ""
    repeated = pd.Series(names).where(good).duplicated(keep="first").to_numpy() & good
    if repeated.any():
        first_line: dict[str, int] = {}
        for name, line in zip(names[good], lines[good], strict=True):
            first_line.setdefault(name, line)
        reject(repeated, np.array([f"duplicate of line {first_line.get(n)}" for n in names],
                                  dtype=object))

    kinds = _pick(raw, "type")
    kinds = (kinds.str.replace(r"^SN\s*", "", regex=True).replace({"-": ""})
             if kinds is not None else pd.Series([""] * n))
    host = _pick(raw, "host")
    host = _first_value(host).str.strip() if host is not None else pd.Series([""] * n)
    redshift_text = _pick(raw, "redshift")
    redshift = (_to_float(_first_value(redshift_text)) if redshift_text is not None
                else np.full(n, np.nan))

    table = pd.DataFrame({
        "name": names, "ra_deg": ra_deg, "dec_deg": dec_deg, "disc_date": iso,
        "disc_mjd": disc_mjd, "peak_mjd": peak_mjd, "type": kinds.to_numpy(dtype=object),
        "host": host.to_numpy(dtype=object), "redshift": redshift, "date_note": date_note,
    })
    ok = reasons == ""
    rejected = pd.DataFrame({"line": lines[~ok], "name": names[~ok], "reason": reasons[~ok]})
    return table[ok].reset_index(drop=True), rejected.reset_index(drop=True)


def _first_value(values: pd.Series) -> pd.Series:
    """The first of comma-separated values (OSC lists every source's value)."""
    return values.str.replace(r",.*$", "", regex=True)


def _to_float(values: pd.Series) -> np.ndarray:
    return pd.to_numeric(values.astype(str).str.strip().str.lstrip("><"), errors="coerce").to_numpy(float)


def _bts_dates(raw: pd.DataFrame):
    """BTS: discovery ~ peak - rise (the rise time is a lower limit when written '>x')."""
    peak = _to_float(raw["peakt"]) + _BTS_PEAKT_TO_MJD
    rise = _to_float(raw["rise"]) if "rise" in raw.columns else np.full(len(raw), np.nan)
    mjd = peak - rise
    problem = np.where(np.isfinite(peak), "", "no discovery date").astype(object)
    problem[np.isfinite(peak) & ~np.isfinite(rise)] = "unknown (no rise time to go back from the peak)"
    note = np.where(np.isfinite(mjd), "BTS: peak - rise time", "").astype(object)
    iso = np.array([_iso_from_mjd(v) if np.isfinite(v) else "" for v in mjd], dtype=object)
    return mjd, iso, problem, note


# ----------------------------------------------------------------------------- angles and dates

# Sexagesimal with blanks, colons or h/m/s, d/m/s separators; the sign may be separated from the
# degrees by blanks ('+ 8 38 30.6', the sncat style that the old code lost) and applies to -0.
_SEXAGESIMAL = re.compile(
    r"^(?P<sign>[+-])?\s*(?P<a>\d{1,3})(?:\s*[:hd°\s]\s*(?P<b>\d{1,2}(?:\.\d*)?)"
    r"(?:\s*[:m'\s]\s*(?P<c>\d{1,2}(?:\.\d*)?))?)?\s*[s\"]?$"
)
_DECIMAL = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def parse_angle(text: str, *, hours: bool) -> tuple[float, str]:
    """One RA (``hours=True``) or Dec as degrees, and '' or the problem.

    Accepts decimal degrees or sexagesimal (``HH MM SS.ss``, ``HH:MM:SS``, ``±DD MM SS.s``,
    ``+ 8 38 30.6``, ``12h30m49s``). Of several comma-separated values the first is used.
    """
    text = str(text).strip().split(",")[0].strip()
    if text in ("", "-", "nan", "None"):
        return np.nan, "is missing"
    if _DECIMAL.match(text) and ":" not in text:
        value = float(text)
    else:
        m = _SEXAGESIMAL.match(text)
        if not m or m["b"] is None:
            return np.nan, "is not an angle"
        a, b = float(m["a"]), float(m["b"])
        c = float(m["c"]) if m["c"] else 0.0
        if b >= 60 or c >= 60:
            return np.nan, "has minutes or seconds >= 60"
        value = (a + b / 60 + c / 3600) * (15.0 if hours else 1.0)
        if m["sign"] == "-":
            value = -value
        if hours and (m["sign"] == "-" or a >= 24):
            return np.nan, "is out of range"
    if hours and not 0 <= value < 360:
        return np.nan, "is out of range"
    if not hours and not -90 <= value <= 90:
        return np.nan, "is out of range"
    return value, ""


def parse_angles(values: pd.Series, *, hours: bool) -> tuple[np.ndarray, np.ndarray]:
    """:func:`parse_angle` over a column; returns (degrees, problems) arrays."""
    texts = values.astype(str).str.strip()
    # fast path for plain decimal degrees (100k-row catalogs); the rest one by one
    out = pd.to_numeric(texts, errors="coerce").to_numpy(float, copy=True)
    lo, hi = (0.0, 360.0) if hours else (-90.0, 90.0)
    in_range = (out >= lo) & ((out < hi) if hours else (out <= hi))
    out[~in_range] = np.nan
    problems = np.full(len(texts), "", dtype=object)
    cache: dict[str, tuple[float, str]] = {}
    slow = np.flatnonzero(~in_range)
    for i, text in zip(slow, texts.iloc[slow].tolist(), strict=True):
        if text not in cache:
            cache[text] = parse_angle(text, hours=hours)
        out[i], problems[i] = cache[text]
    return out, problems


_DATE = re.compile(
    r"^(?P<y>\d{3,4})[-/.](?P<m>\d{1,2})(?:[-/.](?P<d>\d{1,2})(?P<frac>\.\d+)?"
    r"(?:[ T](?P<H>\d{1,2}):(?P<M>\d{2})(?::(?P<S>\d{2}(?:\.\d*)?))?)?)?Z?$"
)


def parse_date(text: str) -> tuple[float, str, str]:
    """A date as (MJD, ISO string, problem).

    Accepts ``YYYY-MM-DD``, ``YYYY/MM/DD``, fractional days (``2011-08-24.2``), a time
    (``2011-08-24 03:04:05.6`` or ``T``), MJD (1e4 < x < 1e5) and JD (> 2.4e6). Year-only and
    year/month dates are problems: a month's uncertainty would let a reference window include
    the supernova. Dates are taken as proleptic Gregorian (historical supernovae recorded in
    the Julian calendar are off by days, which no archive query cares about).
    """
    text = str(text).strip().split(",")[0].strip()
    if text in ("", "-", "nan", "None", "NaN"):
        return np.nan, "", "no discovery date"
    if _DECIMAL.match(text):
        value = float(text)
        if 2.4e6 < value < 2.6e6:
            value -= 2400000.5
        if 1e4 < value < 1e5:
            return value, _iso_from_mjd(value), ""
        if re.fullmatch(r"\d{3,4}", text):
            return np.nan, "", "has only a year"
        return np.nan, "", "is not a date or MJD"
    m = _DATE.match(text)
    if not m:
        return np.nan, "", "is not a recognised date"
    if m["d"] is None:
        return np.nan, "", "has only a year and month"
    try:
        day = date(int(m["y"]), int(m["m"]), int(m["d"]))
    except ValueError:
        return np.nan, "", "is not a calendar day"
    mjd = float(day.toordinal() - _MJD_EPOCH_ORDINAL)
    if m["frac"]:
        mjd += float(m["frac"])
        return mjd, _iso_from_mjd(mjd, with_time=True), ""
    if m["H"] is not None:
        seconds = int(m["H"]) * 3600 + int(m["M"]) * 60 + float(m["S"] or 0)
        if seconds >= 86400:
            return np.nan, "", "has a time past 24 h"
        mjd += seconds / 86400
        return mjd, _iso_from_mjd(mjd, with_time=True), ""
    return mjd, day.isoformat(), ""


def parse_dates(values: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`parse_date` over a column: (MJD, ISO, problems) arrays."""
    texts = values.astype(str).str.strip()
    n = len(texts)
    mjd = np.full(n, np.nan)
    iso = np.full(n, "", dtype=object)
    problems = np.full(n, "", dtype=object)
    # fast path for plain YYYY-MM-DD / YYYY/MM/DD (pandas covers 1677-2262; the rest below)
    plain = texts.str.fullmatch(r"\d{4}[-/]\d{2}[-/]\d{2}").fillna(False).to_numpy(bool)
    when = pd.to_datetime(texts[plain].str.replace("/", "-"), format="%Y-%m-%d", errors="coerce")
    good = when.notna().to_numpy()
    fast = np.flatnonzero(plain)[good]
    mjd[fast] = ((when[good] - pd.Timestamp("1858-11-17")) / pd.Timedelta(days=1)).to_numpy(float)
    iso[fast] = when[good].dt.strftime("%Y-%m-%d").to_numpy(dtype=object)
    cache: dict[str, tuple[float, str, str]] = {}
    slow = np.setdiff1d(np.arange(n), fast)
    for i, text in zip(slow, texts.iloc[slow].tolist(), strict=True):
        if text not in cache:
            cache[text] = parse_date(text)
        mjd[i], iso[i], problems[i] = cache[text]
    return mjd, iso, problems


def _iso_from_mjd(mjd: float, with_time: bool = False) -> str:
    day = int(np.floor(mjd))
    d = date.fromordinal(day + _MJD_EPOCH_ORDINAL)
    if not with_time:
        return d.isoformat()
    seconds = round((mjd - day) * 86400)
    seconds = min(seconds, 86399)
    return datetime(d.year, d.month, d.day, seconds // 3600, seconds % 3600 // 60,
                    seconds % 60).isoformat()
