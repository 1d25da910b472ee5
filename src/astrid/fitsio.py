"""Read any image FITS file into arrays, and write images atomically with provenance.

``read_image`` finds the image HDU (``SCI`` or the first 2-D image with data), reads plain,
gzip- and tile-compressed files and scaled integer data, masks NaN/inf/BLANK/saturated pixels
and collects the metadata that differencing needs from the keywords of the common missions.
"""

from __future__ import annotations

import gzip
import os
import re
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.time import Time
from astropy.wcs import WCS, FITSFixedWarning

from astrid.errors import InputFileError


@dataclass(frozen=True)
class ImageMeta:
    """Observation metadata; ``None`` where the header does not say."""

    gain: float | None = None  # e-/ADU
    read_noise: float | None = None  # e-
    saturation: float | None = None  # ADU
    filter: str | None = None
    mjd: float | None = None
    exptime_s: float | None = None
    telescope: str | None = None
    instrument: str | None = None
    zero_point: float | None = None  # AB mag of 1 ADU (or 1 count/s)


@dataclass(frozen=True)
class Image:
    """An image and what we know about it.

    ``data`` is float32 with NaN at masked pixels; ``mask`` is True where a pixel is bad
    (non-finite, BLANK, saturated, or flagged in a companion mask). ``wcs`` is None when the
    header has no celestial WCS.
    """

    data: np.ndarray
    mask: np.ndarray
    header: fits.Header
    wcs: WCS | None
    meta: ImageMeta = field(default_factory=ImageMeta)
    path: str | None = None
    hdu_index: int = 0


# Keywords tried in order, per metadata field (ZTF, PS1, Swift UVOT, GALEX, HST, DECam, generic).
_GAIN_KEYS = ("GAIN", "EGAIN", "CCDGAIN", "ARAWGAIN", "GAINA", "CELL.GAIN", "HIERARCH CELL.GAIN")
_READ_NOISE_KEYS = ("RDNOISE", "READNOIS", "READNOISE", "RON", "RDNOISEA", "READNSEA",
                    "CELL.READNOISE", "HIERARCH CELL.READNOISE")
_SATURATION_KEYS = ("SATURATE", "SATURATA", "SATLEVEL", "SATURV", "MAXLIN", "CELL.SATURATION")
_FILTER_KEYS = ("FILTER", "FILTNAM1", "FILTER1", "FILTER2", "FPA.FILTER", "HIERARCH FPA.FILTER",
                "FILTERID", "BAND", "FILTID")
_MJD_KEYS = ("MJD-OBS", "MJD_OBS", "OBSMJD", "MJD", "EXPSTART", "MJD-AVG")
_EXPTIME_KEYS = ("EXPTIME", "EXPOSURE", "XPOSURE", "EXP_TIME", "EXPTIME1")
_ZP_KEYS = ("MAGZP", "MAGZERO", "MAGZPT", "ZP", "ZPT", "PHOTZP", "ZEROPT", "FPA.ZP", "HIERARCH FPA.ZP")

_ZTF_FILTER_IDS = {1: "g", 2: "r", 3: "i"}
_GALEX_BANDS = {1: "NUV", 2: "FUV"}


def read_image(path: str | os.PathLike, *, require_wcs: bool = False,
               hdu: int | str | None = None) -> Image:
    """Read the science image of a FITS file.

    Parameters
    ----------
    path : path to ``.fits``, ``.fits.gz``, ``.fz`` or any FITS file astropy opens.
    require_wcs : raise if the image has no celestial WCS.
    hdu : index or EXTNAME to force a particular HDU.

    Raises
    ------
    InputFileError
        The file is missing, not FITS, truncated, has no 2-D image or (with
        ``require_wcs``) no celestial WCS. The message names the file.
    """
    path = Path(path)
    if not path.exists():
        raise InputFileError(path, "file not found")
    if path.is_dir():
        raise InputFileError(path, "is a directory, not a FITS file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            warnings.filterwarnings("error", message=".*truncated.*")
            with fits.open(path, memmap=False, lazy_load_hdus=False) as hdul:
                index = _pick_hdu(hdul, path, hdu)
                chosen = hdul[index]
                raw = chosen.data
                header = chosen.header.copy()
                primary = hdul[0].header.copy() if index != 0 else header
                data, mask = _to_float32(raw, header)
    except InputFileError:
        raise
    except (OSError, EOFError, zlib.error, ValueError, TypeError, Warning) as exc:
        raise InputFileError(path, _describe_read_failure(exc)) from None

    wcs = celestial_wcs(header)
    if require_wcs and wcs is None:
        raise InputFileError(path, "no celestial WCS in the image header")
    meta = read_meta(header, primary)
    if meta.saturation is not None:
        with np.errstate(invalid="ignore"):
            mask |= data >= meta.saturation
    data[mask & ~np.isfinite(data)] = np.nan
    return Image(data=data, mask=mask, header=header, wcs=wcs, meta=meta, path=str(path),
                 hdu_index=index)


def _describe_read_failure(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    lowered = text.lower()
    if "truncated" in lowered or isinstance(exc, EOFError) or "end of file" in lowered:
        return f"truncated FITS file ({text})"
    if "empty or corrupt" in lowered or "no simple card" in lowered or "not a fits" in lowered:
        return "not a FITS file (no valid FITS header)"
    if isinstance(exc, gzip.BadGzipFile | zlib.error) or "gzip" in lowered or "decompress" in lowered:
        return f"corrupt gzip compression ({text})"
    return f"cannot read FITS ({text})"


def _pick_hdu(hdul: fits.HDUList, path: Path, hdu: int | str | None) -> int:
    if hdu is not None:
        try:
            index = hdul.index_of(hdu)
        except (KeyError, IndexError):
            raise InputFileError(path, f"no HDU {hdu!r}") from None
        if not _is_image(hdul[index]):
            raise InputFileError(path, f"HDU {hdu!r} holds no 2-D image")
        return index
    for index, candidate in enumerate(hdul):
        if candidate.name.upper() == "SCI" and _is_image(candidate):
            return index
    for index, candidate in enumerate(hdul):
        if _is_image(candidate):
            return index
    raise InputFileError(path, "no 2-D image HDU with data")


def _is_image(hdu) -> bool:
    if not isinstance(hdu, fits.PrimaryHDU | fits.ImageHDU | fits.CompImageHDU):
        return False
    shape = hdu.shape if hasattr(hdu, "shape") else ()
    squeezed = [n for n in shape if n != 1]
    return len(squeezed) == 2 and hdu.data is not None


def _to_float32(raw: np.ndarray, header: fits.Header) -> tuple[np.ndarray, np.ndarray]:
    """Float32 copy of the data with NaN at bad pixels, and the bad-pixel mask."""
    raw = np.squeeze(raw)
    if np.issubdtype(raw.dtype, np.integer):
        # astropy applies BSCALE/BZERO; an unscaled integer image keeps BLANK as a value.
        blank = header.get("BLANK")
        data = raw.astype(np.float32)
        mask = raw == blank if blank is not None else np.zeros(raw.shape, bool)
    else:
        data = np.array(raw, dtype=np.float32)
        mask = np.zeros(raw.shape, bool)
    mask |= ~np.isfinite(data)
    data[mask] = np.nan
    return data, mask


def celestial_wcs(header: fits.Header) -> WCS | None:
    """The celestial WCS of a header, or None if it has none (or a broken one)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            wcs = WCS(header, naxis=2)
        except Exception:  # astropy raises many kinds for broken WCS keywords
            return None
    if not wcs.has_celestial or wcs.wcs.ctype[0] == "":
        return None
    return wcs.celestial


def read_meta(header: fits.Header, primary: fits.Header | None = None) -> ImageMeta:
    """Metadata from the image header, falling back to the primary header."""
    headers = [header] if primary is None or primary is header else [header, primary]

    def first(keys):
        for hdr in headers:
            for key in keys:
                if key in hdr and hdr[key] not in (None, "", "N/A"):
                    return hdr[key]
        return None

    return ImageMeta(
        gain=_positive_float(first(_GAIN_KEYS)),
        read_noise=_positive_float(first(_READ_NOISE_KEYS)),
        saturation=_positive_float(first(_SATURATION_KEYS)),
        filter=_filter_name(headers),
        mjd=_mjd(headers, first(_MJD_KEYS)),
        exptime_s=_positive_float(first(_EXPTIME_KEYS)),
        telescope=_text(first(("TELESCOP", "MISSION", "OBSERVAT"))),
        instrument=_text(first(("INSTRUME", "DETECTOR"))),
        zero_point=_float(first(_ZP_KEYS)),
    )


def _float(value) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) else None


def _positive_float(value) -> float | None:
    out = _float(value)
    return out if out is not None and out > 0 else None


def _text(value) -> str | None:
    return str(value).strip() or None if value is not None else None


def _filter_name(headers: list[fits.Header]) -> str | None:
    for hdr in headers:
        # HST ACS keeps one real filter among FILTER1/FILTER2; skip CLEAR*.
        for key in ("FILTER", "FILTNAM1", "FILTER1", "FILTER2", "FPA.FILTER", "HIERARCH FPA.FILTER",
                    "FILTID"):
            value = _text(hdr.get(key))
            if value and not value.upper().startswith("CLEAR"):
                return _clean_filter(value)
        if "FILTERID" in hdr and _float(hdr["FILTERID"]) in _ZTF_FILTER_IDS:
            return _ZTF_FILTER_IDS[int(hdr["FILTERID"])]
        if "BAND" in hdr:
            band = hdr["BAND"]
            if _float(band) in _GALEX_BANDS:
                return _GALEX_BANDS[int(band)]
            return _clean_filter(str(band))
    return None


def _clean_filter(value: str) -> str:
    value = value.strip()
    value = re.sub(r"^ZTF_", "", value)  # ZTF writes 'ZTF_r'
    value = re.sub(r"\.0+$", "", value)  # PS1 writes 'r.00000'
    first, _, rest = value.partition(" ")
    if rest and len(first) <= 2:  # DECam writes 'i DECam SDSS c0003 7835.0 1470'
        return first
    return value


def _mjd(headers: list[fits.Header], mjd_value) -> float | None:
    mjd = _float(mjd_value)
    if mjd is not None and 1e4 < mjd < 1e5:
        return mjd
    for hdr in headers:
        date = hdr.get("DATE-OBS")
        if not date:
            continue
        text = str(date).strip()
        if "T" not in text and hdr.get("TIME-OBS"):
            text = f"{text}T{str(hdr['TIME-OBS']).strip()}"
        try:
            return float(Time(text, format="isot" if "T" in text else "iso", scale="utc").mjd)
        except ValueError:
            try:
                return float(Time(text).mjd)
            except ValueError:
                continue
    return None


def provenance_cards(record: dict) -> list[tuple[str, object, str]]:
    """FITS cards for a provenance record from :func:`astrid.provenance.provenance`."""
    cards = [
        ("ASTRIDV", record.get("astrid_version", ""), "AstrID version"),
        ("CFGHASH", record.get("config_hash", ""), "hash of the settings used"),
        ("CREATED", record.get("created_utc", ""), "UTC time this file was written"),
    ]
    if "seed" in record:
        cards.append(("SEED", int(record["seed"]), "random seed"))
    for i, name in enumerate(record.get("inputs", [])[:99], start=1):
        cards.append((f"INPUT{i}", Path(str(name)).name[:68], "input file"))
    return cards


def write_image(path: str | os.PathLike, data: np.ndarray, header: fits.Header | None = None,
                wcs: WCS | None = None, provenance: dict | None = None,
                overwrite: bool = True) -> Path:
    """Write a 2-D image atomically (temp file + rename).

    A ``.fz`` suffix writes a tile-compressed (RICE) image; ``.gz`` gzip-compresses.
    The WCS (if given) and the provenance record are written into the header.
    """
    from astrid.provenance import atomic_path

    path = Path(path)
    if path.exists() and not overwrite:
        raise InputFileError(path, "exists and overwrite is False")
    header = fits.Header() if header is None else header.copy()
    if wcs is not None:
        header.update(wcs.to_header(relax=True))
    for key, value, comment in provenance_cards(provenance or {}):
        header[key] = (value, comment)
    data = np.asarray(data)
    if path.suffix == ".fz":
        hdul = fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data, header=header)])
    else:
        hdul = fits.HDUList([fits.PrimaryHDU(data, header=header)])
    with atomic_path(path) as tmp:
        if path.suffix == ".gz":
            with gzip.open(tmp, "wb") as fh:
                hdul.writeto(fh)
        else:
            hdul.writeto(tmp, overwrite=True)
    return path
