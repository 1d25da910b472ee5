"""MAST queries with astroquery: per supernova, reference and science windows, in the query.

For each supernova two ``Observations.query_criteria`` calls are made, a cone of
``radius_arcsec`` with ``dataproduct_type="image"``, the configured ``calib_level``,
``obs_collection`` (missions) and ``filters``, and time ranges:

- reference: ``t_min`` and ``t_max`` in ``disc - ref_window_days`` .. ``disc - ref_gap_days``
  (an exposure, or a stack, that ends after that could hold supernova light)
- science:   ``t_min`` in ``disc`` .. ``disc + sci_window_days``

so MAST returns only observations that can be used. Requests are rate-limited
(``requests_per_s``; MAST asks clients to be gentle), retried with exponential backoff
(``retries``, ``backoff_s``) on connection errors, timeouts and HTTP 5xx/429, and cached on disk
by their criteria so that a rerun or a resumed run asks nothing twice. A request that still
fails becomes a row of the ``errors`` table for that supernova, never an observation.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from astrid.archive.filters import mast_filter_names, normalise_filter, validate_archive_settings
from astrid.archive.products import select_products
from astrid.catalog import with_mjd
from astrid.config import ArchiveSettings
from astrid.errors import AstridError
from astrid.progress import track
from astrid.provenance import write_json_atomic

# Columns every observation table carries (astroquery's names plus ours).
OBS_COLUMNS = ["sn", "window", "obsid", "obs_id", "obs_collection", "instrument_name", "filters",
               "t_min", "t_max", "t_exptime", "s_ra", "s_dec", "s_region", "calib_level",
               "dataURL", "product_filename", "product_uri", "product_size", "product_reason"]
ERROR_COLUMNS = ["sn", "window", "error"]
# After this many supernovae in a row fail with a connection problem the archive is taken to be
# unreachable and the query stops (partial results are kept).
_MAX_CONSECUTIVE_UNREACHABLE = 3


@dataclass(frozen=True)
class QueryResult:
    """Observations found, and the requests that failed (``sn, window, error``)."""

    observations: pd.DataFrame
    errors: pd.DataFrame


class ArchiveUnreachable(AstridError):
    """MAST could not be reached after all retries; ``partial`` is the QueryResult so far."""

    def __init__(self, message: str, partial: QueryResult):
        super().__init__(message)
        self.partial = partial


def time_windows(disc_mjd: float, settings: ArchiveSettings) -> dict[str, tuple[float, float]]:
    """MJD ranges of ``t_min`` for the reference and science observations of one supernova."""
    return {
        "ref": (disc_mjd - settings.ref_window_days, disc_mjd - settings.ref_gap_days),
        "sci": (disc_mjd, disc_mjd + settings.sci_window_days),
    }


class RateLimiter:
    """At most ``per_s`` calls per second across threads (calls wait, they are not dropped)."""

    def __init__(self, per_s: float):
        self.interval_s = 1.0 / per_s
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        with self._lock:
            now = time.monotonic()
            delay = self._next - now
            self._next = max(now, self._next) + self.interval_s
        if delay > 0:
            time.sleep(delay)


def with_retries(call, settings: ArchiveSettings, limiter: RateLimiter | None = None,
                 what: str = "request"):
    """Run ``call()`` with rate limiting and exponential backoff on transient failures.

    Transient: connection errors, timeouts, HTTP 429 and 5xx, MAST's own "try again" errors.
    Other HTTP errors (4xx) are raised at once. Raises the last exception when retries run out.
    """
    import requests

    delay_s = settings.backoff_s
    for attempt in range(settings.retries + 1):
        if limiter is not None:
            limiter.wait()
        try:
            return call()
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            if status != 429 and status < 500:
                raise
            last = exc
        except (requests.ConnectionError, requests.Timeout, TimeoutError, OSError) as exc:
            last = exc
        if attempt < settings.retries:
            time.sleep(delay_s)
            delay_s *= 2
    raise last


def mast_client(settings: ArchiveSettings):
    """An astroquery ``ObservationsClass`` talking to ``settings.mast_url``.

    The URL is configurable so that a mirror, or a local replay of recorded MAST responses in
    the tests, can stand in for https://mast.stsci.edu.
    """
    from astroquery.mast import ObservationsClass

    client = ObservationsClass()
    base = settings.mast_url.rstrip("/")
    portal = client._portal_api_connection
    portal.MAST_REQUEST_URL = f"{base}/api/v0/invoke"
    portal.COLUMNS_CONFIG_URL = f"{base}/portal/Mashup/Mashup.asmx/columnsconfig"
    portal.MAST_DOWNLOAD_URL = f"{base}/api/v0.1/Download/file"
    portal.TIMEOUT = settings.timeout_s
    # the column configs are cached on the class, shared between servers; keep ours apart
    portal._column_configs = {}
    return client


def download_url(data_uri: str, settings: ArchiveSettings) -> str:
    """The HTTP URL of a ``mast:`` data URI (other URLs are returned unchanged)."""
    if not data_uri or not str(data_uri).startswith("mast:"):
        return str(data_uri or "")
    return f"{settings.mast_url.rstrip('/')}/api/v0.1/Download/file?uri={data_uri}"


def query_observations(catalog: pd.DataFrame, settings: ArchiveSettings,
                       cache_dir: str | Path | None = None, *, products: bool = True,
                       source: str = "config") -> QueryResult:
    """Query MAST for reference and science images of every supernova in ``catalog``.

    Parameters
    ----------
    catalog : the normalised catalog table (``name, ra_deg, dec_deg``, ``disc_mjd`` or
        ``disc_date``), e.g. ``read_catalog(path).table``. Undated rows get an error row.
    settings : archive settings (missions, filters, windows, rate, retries, ``mast_url``).
    cache_dir : where query results are cached (default ``settings.cache_dir`` or
        ``~/.cache/astrid/mast``).
    products : also fetch each observation's product list and choose its science image
        (columns ``product_*``, ``dataURL`` set to the product's download URL).
    source : name of the config, for error messages.

    Returns
    -------
    QueryResult
        ``observations`` with :data:`OBS_COLUMNS` (one row per observation and supernova;
        ``window`` is ``ref`` or ``sci``) and ``errors`` (``sn, window, error``).

    Raises
    ------
    ConfigError
        Unknown mission or filter in the settings.
    ArchiveUnreachable
        MAST failed for several supernovae in a row; ``exc.partial`` holds the QueryResult so far.
    """
    missions, filters = validate_archive_settings(settings.missions, settings.filters, source)
    cache = Path(cache_dir or settings.cache_dir or Path.home() / ".cache" / "astrid" / "mast")
    client = mast_client(settings)
    limiter = RateLimiter(settings.requests_per_s)
    # each configured filter in the spellings MAST uses for the missions that have it
    mast_filters = sorted({name for m in missions for f in filters
                           if normalise_filter(m, f) == f for name in mast_filter_names(m, f)})
    frames, errors = [], []
    unreachable_run = 0
    for row in track(with_mjd(catalog).itertuples(index=False), "querying MAST", total=len(catalog)):
        if not np.isfinite(getattr(row, "disc_mjd", np.nan)):
            errors.append({"sn": row.name, "window": "", "error": "no discovery date"})
            continue
        failed_unreachable = False
        for window, (t_lo, t_hi) in time_windows(row.disc_mjd, settings).items():
            criteria = {
                "ra_deg": float(row.ra_deg), "dec_deg": float(row.dec_deg),
                "radius_arcsec": settings.radius_arcsec, "dataproduct_type": "image",
                "calib_level": list(settings.calib_level), "obs_collection": missions,
                "filters": mast_filters, "t_min": [round(t_lo, 6), round(t_hi, 6)],
            }
            if window == "ref":
                criteria["t_max"] = criteria["t_min"]
            try:
                table = _cached(cache, "obs", criteria, settings,
                                lambda c=criteria: _query(client, c, settings, limiter))
            except Exception as exc:  # noqa: BLE001  every failure becomes an error row
                errors.append({"sn": row.name, "window": window, "error": _describe(exc)})
                # astroquery keeps whatever column config it got, even an error answer
                client._portal_api_connection._column_configs = {}
                failed_unreachable |= _is_connection_problem(exc)
                continue
            if len(table):
                frames.append(table.assign(sn=row.name, window=window))
        unreachable_run = unreachable_run + 1 if failed_unreachable else 0
        if unreachable_run >= _MAX_CONSECUTIVE_UNREACHABLE:
            raise ArchiveUnreachable(f"{settings.mast_url}: MAST unreachable for {unreachable_run} "
                                     f"supernovae in a row ({errors[-1]['error']})",
                                     _result(frames, errors))
    result = _result(frames, errors)
    if products and len(result.observations):
        result = _attach_products(result, client, settings, limiter, cache)
    return result


def _query(client, criteria: dict, settings: ArchiveSettings, limiter: RateLimiter) -> pd.DataFrame:
    import astropy.units as u
    from astropy.coordinates import SkyCoord

    kwargs = {
        "coordinates": SkyCoord(criteria["ra_deg"], criteria["dec_deg"], unit="deg"),
        "radius": criteria["radius_arcsec"] * u.arcsec,
        "dataproduct_type": criteria["dataproduct_type"],
        "calib_level": criteria["calib_level"],
        "obs_collection": criteria["obs_collection"],
        "t_min": criteria["t_min"],
    }
    if "t_max" in criteria:
        kwargs["t_max"] = criteria["t_max"]
    if criteria["filters"]:
        kwargs["filters"] = criteria["filters"]

    def call():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # NoResultsWarning: an empty window is an answer
            return client.query_criteria(**kwargs)

    table = with_retries(call, settings, limiter, "MAST query")
    return _to_frame(table)


def _to_frame(table) -> pd.DataFrame:
    frame = table.to_pandas() if len(table) else pd.DataFrame(columns=table.colnames)
    if "obsid" in frame:
        frame["obsid"] = frame["obsid"].astype(str)
    return frame


def _cached(cache: Path, kind: str, key: dict, settings: ArchiveSettings, fetch) -> pd.DataFrame:
    """Return the cached result for ``key`` or fetch, store (atomically) and return it."""
    blob = json.dumps({"kind": kind, "server": settings.mast_url, **key}, sort_keys=True)
    path = cache / f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:24]}.json"
    if path.exists():
        stored = json.loads(path.read_text())
        return pd.DataFrame(stored["rows"], columns=stored["columns"])
    frame = fetch()
    records = json.loads(frame.to_json(orient="split", index=False, date_format="iso"))
    write_json_atomic(path, {"key": json.loads(blob), "columns": records["columns"],
                             "rows": records["data"]})
    # what a rerun will read back, so that fresh and cached results are identical
    return pd.DataFrame(records["data"], columns=records["columns"])


def _attach_products(result: QueryResult, client, settings: ArchiveSettings,
                     limiter: RateLimiter, cache: Path) -> QueryResult:
    """Choose each observation's science image; a failed product request is an error row."""
    obs = result.observations
    obsids = list(dict.fromkeys(obs["obsid"].astype(str)))
    chosen, errors = [], list(result.errors.to_dict("records"))
    for start in range(0, len(obsids), settings.products_batch):
        batch = obsids[start:start + settings.products_batch]

        def fetch(batch=batch):
            def call():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    return client.get_product_list(batch)
            return _to_frame(with_retries(call, settings, limiter, "MAST product list"))

        try:
            products = _cached(cache, "products", {"obsids": batch}, settings, fetch)
        except Exception as exc:  # noqa: BLE001
            for sn in obs.loc[obs["obsid"].isin(batch), "sn"].unique():
                errors.append({"sn": sn, "window": "products", "error": _describe(exc)})
            chosen.append(pd.DataFrame({"obsid": batch, "product_filter": "",
                                        "product_reason": "product list request failed"}))
            continue
        products["obsID"] = products["obsID"].astype(str)
        picked = select_products(products, settings.max_file_mb)
        chosen.append(picked)
    picks = pd.concat(chosen, ignore_index=True)
    obs = _join_products(obs, picks)
    has_uri = obs["product_uri"].fillna("").astype(str) != ""
    obs.loc[has_uri, "dataURL"] = [download_url(u, settings) for u in obs.loc[has_uri, "product_uri"]]
    return QueryResult(_ordered(obs), pd.DataFrame(errors, columns=ERROR_COLUMNS))


def _join_products(obs: pd.DataFrame, picks: pd.DataFrame) -> pd.DataFrame:
    """Give each observation row the product of its own band (or its obsid's band-less one)."""
    from astrid.archive.filters import mission_of, normalise_filter

    picks = picks.fillna({"product_filter": ""})
    by_key = {(str(r["obsid"]), r["product_filter"]): r for r in picks.to_dict("records")}
    columns = ["product_filename", "product_uri", "product_size", "product_reason"]
    values = []
    for row in obs.itertuples(index=False):
        mission = mission_of(row.obs_collection) or row.obs_collection
        band = normalise_filter(mission, row.filters) or ""
        pick = by_key.get((str(row.obsid), band)) or by_key.get((str(row.obsid), ""))
        if pick is None:
            any_pick = [r for (o, _), r in by_key.items() if o == str(row.obsid)]
            reason = (f"no science image in band {band}" if any_pick else "no products listed")
            pick = {"product_reason": reason}
        values.append([pick.get(c, np.nan if c == "product_size" else "") for c in columns])
    obs = obs.drop(columns=[c for c in columns if c in obs.columns])
    return pd.concat([obs.reset_index(drop=True), pd.DataFrame(values, columns=columns)], axis=1)


def _result(frames: list[pd.DataFrame], errors: list[dict]) -> QueryResult:
    obs = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=OBS_COLUMNS)
    return QueryResult(_ordered(obs), pd.DataFrame(errors, columns=ERROR_COLUMNS))


_NUMERIC = ("t_min", "t_max", "t_exptime", "s_ra", "s_dec", "product_size")


def _ordered(obs: pd.DataFrame) -> pd.DataFrame:
    """Our column order and types, identical whether rows came from MAST or from the cache."""
    for column in OBS_COLUMNS:
        if column not in obs:
            obs[column] = np.nan if column in _NUMERIC else ""
        if column in _NUMERIC:
            obs[column] = pd.to_numeric(obs[column], errors="coerce").astype(float)
        elif column != "calib_level":
            obs[column] = obs[column].astype(object).where(obs[column].notna(), "").astype(str)
    rest = [c for c in obs.columns if c not in OBS_COLUMNS]
    return obs[OBS_COLUMNS + rest].reset_index(drop=True)


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:300]


def _is_connection_problem(exc: BaseException) -> bool:
    import requests

    if isinstance(exc, requests.HTTPError):
        return exc.response is not None and exc.response.status_code >= 500
    return isinstance(exc, requests.ConnectionError | requests.Timeout | TimeoutError | OSError)


def read_observations(path: str | Path) -> pd.DataFrame:
    """An observation table saved as CSV, ECSV or Parquet (astroquery's column names).

    Raises
    ------
    InputFileError
        Missing or unreadable file, or no ``obsid``/``obs_collection``/``t_min`` columns.
    """
    from astrid.errors import InputFileError

    path = Path(path)
    if not path.exists():
        raise InputFileError(path, "file not found")
    text_columns = {c: str for c in ("sn", "window", "obsid", "obs_id", "obs_collection",
                                     "instrument_name", "filters", "s_region", "dataURL",
                                     "product_filename", "product_uri", "product_reason",
                                     "target_name", "role_hint")}
    try:
        if path.suffix == ".parquet":
            obs = pd.read_parquet(path)
        elif path.suffix == ".ecsv":
            from astropy.table import Table

            obs = Table.read(path, format="ascii.ecsv").to_pandas()
        else:
            obs = pd.read_csv(path, dtype=text_columns, keep_default_na=False,
                              na_values={c: [""] for c in ("t_min", "t_max", "t_exptime", "s_ra",
                                                           "s_dec", "product_size")})
    except Exception as exc:  # noqa: BLE001  pandas/astropy raise many kinds
        raise InputFileError(path, f"not a readable observation table ({type(exc).__name__})") from None
    missing = [c for c in ("obsid", "obs_collection", "t_min") if c not in obs.columns]
    if missing:
        raise InputFileError(path, f"not an observation table: no {', '.join(missing)} column")
    obs["obsid"] = obs["obsid"].astype(str)
    return obs
