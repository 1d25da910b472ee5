"""Reference/science pairs: same mission, instrument and filter, on the right sides of discovery.

The rule, per supernova and per (mission, instrument, filter):

1. An observation is usable if its filter is known after normalisation
   (:func:`astrid.archive.filters.normalise_filter`), it has a science product (when the table
   says which), its ``s_region`` footprint contains the supernova, and it falls in a window:
   reference if it *ends* (``t_max``) at least ``ref_gap_days`` before discovery and starts
   within ``ref_window_days`` of it; science if it starts between discovery and
   ``sci_window_days`` after.
2. References are ranked deepest first (longest ``t_exptime``), ties by most recent; science
   images by closeness of their mid-time to the expected peak (the catalog's ``peak_mjd``, else
   discovery + ``peak_offset_days``), ties by depth.
3. Candidate pairs are tried in rank order (reference rank + science rank, then reference rank);
   the first whose reference covers at least ``min_overlap`` of the science footprint is
   ``paired``. Every other candidate pair, and every unusable observation, is a ``rejected``
   row with its reason.

Without a catalog (a local folder of images, such as the simulated survey) the targets are the
observations' ``target_name`` groups; references are the images marked ``ref`` (file name) or,
failing that, the earliest, and science images the others.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from astrid.archive.filters import MISSIONS, mission_of, normalise_filter, validate_archive_settings
from astrid.archive.footprint import contains, overlap_fraction, parse_s_region
from astrid.catalog import with_mjd
from astrid.config import ArchiveSettings
from astrid.errors import AstridError

PAIR_COLUMNS = ["sn", "mission", "instrument", "filter", "ref_obsid", "sci_obsid", "status",
                "reason", "ref_mjd", "sci_mjd", "ref_exptime_s", "sci_exptime_s", "overlap",
                "ref_url", "sci_url", "ref_filename", "sci_filename", "ref_size", "sci_size",
                "ra_deg", "dec_deg", "disc_mjd"]
# Only observations within this distance of a supernova are tested against its footprint when
# the table does not say which supernova each observation belongs to.
_SEARCH_RADIUS_DEG = 3.0


def make_pairs(obs: pd.DataFrame, catalog: pd.DataFrame | None,
               settings: ArchiveSettings | None = None, *, source: str = "settings") -> pd.DataFrame:
    """Choose the best reference/science pair per supernova, mission, instrument and filter.

    Parameters
    ----------
    obs : observation table with astroquery's column names (``obsid, obs_collection,
        instrument_name, filters, t_min, t_max, t_exptime, s_ra, s_dec, s_region, dataURL``;
        optional ``sn`` naming the supernova each row was queried for, ``product_filename``,
        ``product_reason``, ``product_size``).
    catalog : normalised catalog table (``name, ra_deg, dec_deg``, ``disc_mjd`` or
        ``disc_date``, optional ``peak_mjd``), or None to pair a local folder by
        ``target_name``.
    settings : archive settings (windows, ``min_overlap``, missions, filters).
    source : the config file the settings came from, for error messages.

    Returns
    -------
    DataFrame with :data:`PAIR_COLUMNS`: one ``paired`` row per chosen pair and ``rejected``
    rows for every other candidate pair or unusable observation, each with a reason.

    Raises
    ------
    ConfigError
        Unknown mission or filter in the settings.
    """
    settings = settings or ArchiveSettings()
    missions, filters = validate_archive_settings(settings.missions, settings.filters, source)
    obs = _normalised(obs)
    if catalog is None:
        rows = _pair_targets(obs, settings)
    else:
        rows = []
        for sn in with_mjd(catalog).itertuples(index=False):
            rows.extend(_pair_one(sn, _observations_of(obs, sn), settings, set(missions),
                                  set(filters)))
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


# ----------------------------------------------------------------------------- preparation

def _normalised(obs: pd.DataFrame) -> pd.DataFrame:
    """Add ``mission``, ``instrument``, ``filter`` and parsed footprints to the table."""
    obs = obs.copy().reset_index(drop=True)
    for column, default in (("obsid", ""), ("obs_collection", ""), ("instrument_name", ""),
                            ("filters", ""), ("s_region", ""), ("dataURL", ""), ("sn", ""),
                            ("product_filename", ""), ("product_reason", ""), ("obs_id", ""),
                            ("target_name", "")):
        if column not in obs:
            obs[column] = default
        obs[column] = obs[column].fillna("").astype(str).replace("nan", "")
    for column in ("t_min", "t_max", "t_exptime", "s_ra", "s_dec", "product_size"):
        obs[column] = pd.to_numeric(obs[column], errors="coerce") if column in obs else np.nan
    obs["t_max"] = obs["t_max"].fillna(obs["t_min"])
    obs["mission"] = [mission_of(c) or c.strip().upper() for c in obs["obs_collection"]]
    names = [p or o or u.rsplit("/", 1)[-1] for p, o, u in
             zip(obs["product_filename"], obs["obs_id"], obs["dataURL"], strict=True)]
    obs["filter"] = [normalise_filter(m, f, n) or "" for m, f, n in
                     zip(obs["mission"], obs["filters"], names, strict=True)]
    obs["instrument"] = obs["instrument_name"].str.strip()
    obs["footprint"] = [_parse_or_none(s) for s in obs["s_region"]]
    return obs


def _parse_or_none(text: str):
    try:
        return parse_s_region(text)
    except AstridError:
        return None


def _observations_of(obs: pd.DataFrame, sn) -> pd.DataFrame:
    """Rows queried for this supernova, or (no ``sn`` column values) rows near it."""
    mine = obs[obs["sn"] == str(sn.name)]
    if len(mine) or (obs["sn"] != "").any():
        return mine
    ra, dec = np.radians(sn.ra_deg), np.radians(sn.dec_deg)
    cos_sep = (np.sin(dec) * np.sin(np.radians(obs["s_dec"]))
               + np.cos(dec) * np.cos(np.radians(obs["s_dec"])) * np.cos(np.radians(obs["s_ra"]) - ra))
    return obs[np.degrees(np.arccos(np.clip(cos_sep, -1, 1))) < _SEARCH_RADIUS_DEG]


# ----------------------------------------------------------------------------- pairing

def _pair_one(sn, obs: pd.DataFrame, settings: ArchiveSettings, missions: set[str],
              filters: set[str]) -> list[dict]:
    base = {"sn": sn.name, "ra_deg": sn.ra_deg, "dec_deg": sn.dec_deg,
            "disc_mjd": getattr(sn, "disc_mjd", np.nan)}
    disc = base["disc_mjd"]
    if not np.isfinite(disc):
        return [{**base, "status": "rejected", "reason": "no discovery date"}]
    if obs.empty:
        return [{**base, "status": "rejected", "reason": "no observations"}]
    peak = getattr(sn, "peak_mjd", np.nan)
    peak = peak if np.isfinite(peak) else disc + settings.peak_offset_days
    rows, usable = [], []
    for o in obs.itertuples(index=False):
        role = _role(o, disc, settings)
        reason = _unusable(o, sn, role, missions, filters, disc, settings)
        if reason:
            rows.append(_obs_row(base, o, "sci" if o.t_min >= disc else "ref", reason))
        else:
            usable.append((role, o))
    groups: dict[tuple, dict[str, list]] = {}
    for role, o in usable:
        groups.setdefault((o.mission, o.instrument, o.filter), {"ref": [], "sci": []})[role].append(o)
    for (mission, instrument, band), members in groups.items():
        rows.extend(_choose(base, mission, instrument, band, members["ref"], members["sci"],
                            peak, settings))
    return rows


def _role(o, disc: float, settings: ArchiveSettings) -> str | None:
    if disc - settings.ref_window_days <= o.t_min and o.t_max <= disc - settings.ref_gap_days:
        return "ref"
    if disc <= o.t_min <= disc + settings.sci_window_days:
        return "sci"
    return None


def _unusable(o, sn, role, missions, filters, disc, settings) -> str:
    """Why an observation cannot be used for this supernova ('' if it can)."""
    if o.mission in MISSIONS and o.mission not in missions:
        return f"mission {o.mission} not requested"
    if not o.filter:
        return f"filter not recognised ({o.mission} filters={o.filters!r})"
    if filters and o.filter not in filters:
        return f"filter {o.filter} not requested"
    if o.product_reason:
        return f"no usable product: {o.product_reason}"
    if not np.isfinite(o.t_min):
        return "no observation time"
    if role is None:
        if o.t_min < disc <= o.t_max:
            return "spans the discovery date (a stack or long series holding supernova light)"
        if o.t_min < disc and o.t_max > disc - settings.ref_gap_days:
            return (f"in the gap before discovery (ends {disc - o.t_max:.1f} d before; "
                    f"ref_gap_days={settings.ref_gap_days:g})")
        if o.t_min < disc:
            return f"older than ref_window_days={settings.ref_window_days:g}"
        return f"later than sci_window_days={settings.sci_window_days:g}"
    if o.footprint is None or o.footprint.empty:
        return f"no usable s_region ({o.s_region[:40]!r})"
    if not contains(o.footprint, sn.ra_deg, sn.dec_deg):
        return "supernova outside the footprint"
    return ""


def _choose(base, mission, instrument, band, refs, scis, peak, settings) -> list[dict]:
    group = {**base, "mission": mission, "instrument": instrument, "filter": band}
    if not refs or not scis:
        dated = np.isfinite(base["disc_mjd"])
        missing = (("no reference before discovery" if dated else "no reference image") if not refs
                   else ("no science image after discovery" if dated else "no science image"))
        return [_obs_row(group, o, role, f"{missing} in {mission}/{instrument}/{band}")
                for role, side in (("ref", refs), ("sci", scis)) for o in side]
    refs = sorted(refs, key=lambda o: (-np.nan_to_num(o.t_exptime), -o.t_min))
    scis = sorted(scis, key=lambda o: (abs(0.5 * (o.t_min + o.t_max) - peak),
                                       -np.nan_to_num(o.t_exptime)))
    order = sorted(((i, j) for i in range(len(refs)) for j in range(len(scis))),
                   key=lambda ij: (ij[0] + ij[1], ij[0]))
    rows, chosen = [], None
    for i, j in order:
        ref, sci = refs[i], scis[j]
        row = _pair_row(group, ref, sci)
        if chosen is not None:
            rows.append({**row, "status": "rejected",
                         "reason": f"outranked by ref {chosen[0]} / sci {chosen[1]}"})
            continue
        overlap = overlap_fraction(ref.footprint, sci.footprint, base["ra_deg"], base["dec_deg"])
        row["overlap"] = round(overlap, 3)
        if overlap < settings.min_overlap:
            rows.append({**row, "status": "rejected",
                         "reason": f"overlap {overlap:.2f} < min_overlap {settings.min_overlap:g}"})
            continue
        chosen = (ref.obsid, sci.obsid)
        rows.append({**row, "status": "paired", "reason": _why_chosen(base, ref, sci, peak)})
    return rows


def _why_chosen(base: dict, ref, sci, peak: float) -> str:
    if not np.isfinite(base["disc_mjd"]):
        return f"deepest reference ({_num(ref.t_exptime)} s), latest science image"
    return (f"deepest recent reference ({_num(ref.t_exptime)} s, "
            f"{base['disc_mjd'] - ref.t_max:.0f} d before discovery), science "
            f"{0.5 * (sci.t_min + sci.t_max) - peak:+.1f} d from expected peak")


def _num(value) -> str:
    return f"{value:g}" if np.isfinite(value) else "?"


def _pair_row(group: dict, ref, sci) -> dict:
    row = dict(group)
    for role, o in (("ref", ref), ("sci", sci)):
        row.update({f"{role}_obsid": o.obsid, f"{role}_mjd": o.t_min,
                    f"{role}_exptime_s": o.t_exptime, f"{role}_url": o.dataURL,
                    f"{role}_filename": o.product_filename or o.dataURL.rsplit("/", 1)[-1],
                    f"{role}_size": o.product_size})
    return row


def _obs_row(base: dict, o, role: str, reason: str) -> dict:
    return {**base, "mission": o.mission, "instrument": o.instrument, "filter": o.filter,
            f"{role}_obsid": o.obsid, f"{role}_mjd": o.t_min, f"{role}_exptime_s": o.t_exptime,
            "status": "rejected", "reason": reason}


def _pair_targets(obs: pd.DataFrame, settings: ArchiveSettings) -> list[dict]:
    """Catalog-free pairing of a local folder: per ``target_name``, ref images vs the rest."""
    rows = []
    for target, members in obs.groupby("target_name", sort=True):
        ra, dec = float(members["s_ra"].mean()), float(members["s_dec"].mean())
        base = {"sn": target, "ra_deg": ra, "dec_deg": dec, "disc_mjd": np.nan}
        hinted = members["role_hint"] if "role_hint" in members else pd.Series("", members.index)
        if (hinted == "ref").any():
            is_ref = hinted == "ref"
        else:
            is_ref = members["t_min"] == members["t_min"].min()
        usable = []
        for o, ref in zip(members.itertuples(index=False), is_ref, strict=True):
            role = "ref" if ref else "sci"
            if not o.filter:
                rows.append(_obs_row(base, o, role, f"filter not recognised ({o.filters!r})"))
            else:
                usable.append((role, o))
        groups: dict[tuple, dict[str, list]] = {}
        for role, o in usable:
            groups.setdefault((o.mission, o.instrument, o.filter), {"ref": [], "sci": []})[role].append(o)
        for (mission, instrument, band), m in groups.items():
            peak = max((o.t_min for o in m["sci"]), default=np.nan)
            rows.extend(_choose(base, mission, instrument, band, m["ref"], m["sci"],
                                peak if np.isfinite(peak) else 0.0, settings))
    return rows
