"""Missions and their filter names, normalised so that images can be paired band by band.

Archives spell the same band several ways: Swift UVOT writes ``uw1`` in file names and
``UVW1`` in headers, PS1 puts the band in a dot-separated file-name token
(``rings.v3.skycell.1334.061.stk.g.unconv.fits``: the band is the token ``g``, never a letter
inside ``rings``), HST ACS records ``F814W;CLEAR2L``. :func:`normalise_filter` maps all of them
onto one canonical name per band and returns None when it cannot tell.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from astrid.errors import ConfigError


@dataclass(frozen=True)
class Mission:
    """What AstrID knows about one archive collection.

    Attributes
    ----------
    name : canonical mission name (MAST ``obs_collection``).
    aliases : other spellings of the collection (``TELESCOP`` values, for instance).
    filters : canonical filter names, each with the spellings found in MAST and file names.
    open_filters : True when any name matching ``filter_pattern`` is a valid filter (HST).
    """

    name: str
    aliases: tuple[str, ...]
    filters: dict[str, tuple[str, ...]]
    open_filters: bool = False


_HST_FILTER = re.compile(r"^F\d{3,4}[A-Z]{1,2}\d?$|^FR\d{3,4}[A-Z]\d?$|^G\d{3}[A-Z]$")

MISSIONS: dict[str, Mission] = {m.name: m for m in (
    Mission("SWIFT", ("SWIFT", "SWIFT/UVOT", "UVOT"), {
        "UVW1": ("uw1", "uvw1", "w1"), "UVM2": ("um2", "uvm2", "m2"),
        "UVW2": ("uw2", "uvw2", "w2"), "U": ("u", "uuu"), "B": ("b", "ubb"),
        "V": ("v", "uvv"), "WHITE": ("white", "uwh", "wh"),
    }),
    Mission("GALEX", ("GALEX",), {"NUV": ("nuv", "nd"), "FUV": ("fuv", "fd")}),
    Mission("PS1", ("PS1", "PANSTARRS", "PAN-STARRS1", "PS1_GPC1", "GPC1"), {
        "g": ("g", "g.00000"), "r": ("r", "r.00000"), "i": ("i", "i.00000"),
        "z": ("z", "z.00000"), "y": ("y", "y.00000"), "w": ("w", "w.00000"),
    }),
    Mission("HST", ("HST", "HLA", "HUBBLE"), {}, open_filters=True),
    Mission("TESS", ("TESS",), {"TESS": ("tess",)}),
    Mission("ZTF", ("ZTF", "P48"), {"g": ("g", "zg", "ztf_g"), "r": ("r", "zr", "ztf_r"),
                                    "i": ("i", "zi", "ztf_i")}),
)}


def mission_of(collection: str | None) -> str | None:
    """Canonical mission name for an ``obs_collection`` or ``TELESCOP`` value, else None."""
    if collection is None:
        return None
    text = str(collection).strip().upper()
    for mission in MISSIONS.values():
        if text == mission.name or text in mission.aliases:
            return mission.name
    return None


def normalise_filter(mission: str, filters: str | None, filename: str | None = None) -> str | None:
    """The canonical filter of an observation, or None when it cannot be determined.

    Parameters
    ----------
    mission : canonical mission name (see :func:`mission_of`); unknown missions pass the
        filter through (trimmed) so that a user's own telescope still pairs by its FILTER.
    filters : the archive's ``filters`` value or the header's FILTER keyword.
    filename : product file name; PS1 and Swift file names carry the band and win over
        ``filters`` when they name one.
    """
    rules = MISSIONS.get(mission)
    if rules is None:
        text = (filters or "").strip()
        return text or None
    if rules.open_filters:
        return _hst_filter(filters)
    if filename:
        from_name = _filter_from_filename(rules, filename)
        if from_name:
            return from_name
    return _lookup(rules, filters)


def _lookup(rules: Mission, value: str | None) -> str | None:
    if value is None:
        return None
    text = str(value).strip().lower()
    for canonical, spellings in rules.filters.items():
        if text == canonical.lower() or text in spellings:
            return canonical
    return None


def _filter_from_filename(rules: Mission, filename: str) -> str | None:
    name = filename.rsplit("/", 1)[-1].lower()
    if rules.name == "PS1":
        # dot-separated tokens: 'rings.v3.skycell.1334.061.stk.g.unconv.fits' -> 'g'
        bands = [t for t in name.split(".") if t in rules.filters]
        return bands[0] if len(set(bands)) == 1 else None
    if rules.name == "SWIFT":
        # sw00032148001uw1_sk.img.gz: three letters after the 11-digit observation id
        m = re.match(r"sw\d{11}(u[a-z0-9]{2})_", name)
        return _lookup(rules, m.group(1)) if m else None
    if rules.name == "GALEX":
        m = re.search(r"-(nd|fd)-", name)
        return _lookup(rules, m.group(1)) if m else None
    return None


def _hst_filter(value: str | None) -> str | None:
    """HST: drop CLEAR/N/A elements of combined names; one real filter remains, or None."""
    if value is None:
        return None
    parts = [p.strip().upper() for p in re.split(r"[;,/+ ]+", str(value)) if p.strip()]
    real = [p for p in parts if not p.startswith("CLEAR") and p not in ("N/A", "NONE", "")]
    if len(real) != 1 or not _HST_FILTER.match(real[0]):
        return None  # 'DETECTION' (HLA white light), crossed filters, unknown names
    return real[0]


def validate_archive_settings(missions: list[str], filters: list[str], source: str = "config"):
    """Canonical mission and filter names from a config, or a one-line :class:`ConfigError`.

    Returns
    -------
    (missions, filters) : canonical names; ``filters`` empty means every filter.
    """
    canonical_missions = []
    for name in missions:
        mission = mission_of(name)
        if mission is None:
            raise ConfigError(f"{source}: unknown mission '{name}' in archive.missions "
                              f"(known: {', '.join(MISSIONS)})")
        canonical_missions.append(mission)
    canonical_filters = []
    for name in filters:
        found = {normalise_filter(m, name) for m in canonical_missions} - {None}
        if not found:
            raise ConfigError(f"{source}: unknown filter '{name}' in archive.filters for "
                              f"missions {', '.join(canonical_missions)}")
        canonical_filters.extend(sorted(found))
    return canonical_missions, canonical_filters


def mast_filter_names(mission: str, canonical: str) -> list[str]:
    """Spellings of a canonical filter to send to MAST's ``filters`` criterion."""
    rules = MISSIONS.get(mission)
    if rules is None or rules.open_filters:
        return [canonical]
    spellings = rules.filters.get(canonical, ())
    # MAST stores the upper-case long names for Swift/GALEX and the bare letters for PS1.
    return sorted({canonical, canonical.upper(), *(s.upper() for s in spellings if len(s) > 1)})
