"""Which archive product of an observation is the science image to difference.

MAST lists many files per observation: raw frames, weights, masks, exposure maps, previews,
catalogs. Per mission we accept only the calibrated sky image and rank the acceptable ones:

=======  ==============================================  ==================================
SWIFT    UVOT sky image ``sw<obsid>u<filt>_sk.img[.gz]``  not ``_ex`` exposure, ``_rw`` raw
GALEX    intensity map ``-nd-int.fits`` / ``-fd-int``     not ``-rrhr``, ``-skybg``, ``-cnt``
PS1      stack ``.stk.<b>.unconv.fits`` or warp ``.wrp``  not ``.mask``, ``.wt``, ``.num``,
                                                          ``.exp``
HST      drizzled ``_drc``/``_drz`` before ``_flc``        not ``_flt`` raw-CTE, ``_wht``,
                                                          previews, auxiliary files
TESS     calibrated full-frame ``-ffic.fits``
=======  ==============================================  ==================================
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

# (pattern, rank): lower rank is preferred.
_SCIENCE = {
    "SWIFT": [(r"^sw\d{11}u[a-z0-9]{2}_sk\.img(\.gz)?$", 0)],
    "GALEX": [(r"-(nd|fd)-int\.fits(\.gz)?$", 0)],
    "PS1": [(r"\.stk\.[grizyw]\.unconv\.fits(\.fz|\.gz)?$", 0),
            (r"\.wrp\.[grizyw]\.[\w.]*?fits(\.fz|\.gz)?$", 1)],
    "HST": [(r"_drc\.fits(\.gz)?$", 0), (r"_drz\.fits(\.gz)?$", 1), (r"_flc\.fits(\.gz)?$", 2)],
    "TESS": [(r"-ffic\.fits(\.gz)?$", 0)],
}
_ANY_FITS = [(r"\.(fits|fit|fts)(\.gz|\.fz)?$", 0)]
# Tokens that mark a non-science companion in any mission's file names.
_NOT_SCIENCE = re.compile(
    r"(\.|_|-)(mask|msk|wt|weight|wht|num|exp|expwt|ex|rrhr|skybg|flags|cnt|cat|mcat|bp|rw|"
    r"raw|ctx|preview|thumb)(\.|_|-|$)|\.(jpe?g|png|gif|txt|xml|cat|csv)$",
    re.IGNORECASE,
)


def science_rank(mission: str, filename: str) -> int | None:
    """Preference rank of a product file name (0 = best), or None if it is not a science image."""
    name = str(filename).rsplit("/", 1)[-1]
    low = name.lower()
    rules = _SCIENCE.get(mission, _ANY_FITS)
    if _NOT_SCIENCE.search(low):
        return None
    for pattern, rank in rules:
        if re.search(pattern, low):
            return rank
    return None


def select_products(products: pd.DataFrame, max_file_mb: float) -> pd.DataFrame:
    """The science image per observation and band, or the reason there is none.

    One MAST observation (``obsID``) can hold several bands (a GALEX visit has the NUV and FUV
    intensity maps), so the choice is made per band named in the file name; a product whose
    name carries no band (HST) is the observation's image for whatever its ``filters`` say.

    Parameters
    ----------
    products : astroquery product list (``obsID``, ``obs_collection``, ``productFilename``,
        ``dataURI``, ``size`` in bytes, ...).
    max_file_mb : products larger than this (MB, 1e6 bytes) are refused.

    Returns
    -------
    DataFrame ``obsid, product_filter, product_filename, product_uri, product_size`` (bytes),
    ``product_reason`` ('' when a product was chosen; then ``product_filter`` is the band from
    the file name or '').
    """
    from astrid.archive.filters import mission_of, normalise_filter

    rows = []
    for obsid, group in products.groupby(products["obsID"].astype(str), sort=False):
        mission = mission_of(group["obs_collection"].iloc[0]) or str(group["obs_collection"].iloc[0])
        ranks = np.array([_rank_or_nan(mission, f) for f in group["productFilename"]])
        science = group[np.isfinite(ranks)].assign(_rank=ranks[np.isfinite(ranks)])
        if science.empty:
            rows.append({"obsid": obsid, "product_filter": "",
                         "product_reason": f"no science image among {len(group)} products"})
            continue
        band = [normalise_filter(mission, None, f) if mission != "HST" else None
                for f in science["productFilename"]]
        science = science.assign(_band=[b or "" for b in band])
        for band_name, candidates in science.groupby("_band", sort=False):
            size = pd.to_numeric(candidates["size"], errors="coerce") if "size" in candidates \
                else pd.Series(np.nan, index=candidates.index)
            small = candidates[~(size > max_file_mb * 1e6)]
            if small.empty:
                rows.append({"obsid": obsid, "product_filter": band_name,
                             "product_reason": f"science image larger than max_file_mb={max_file_mb:g}"})
                continue
            best = small.sort_values(["_rank", "productFilename"]).iloc[0]
            rows.append({"obsid": obsid, "product_filter": band_name,
                         "product_filename": best["productFilename"],
                         "product_uri": best.get("dataURI", ""),
                         "product_size": float(best["size"]) if "size" in best else np.nan,
                         "product_reason": ""})
    return pd.DataFrame(rows, columns=["obsid", "product_filter", "product_filename",
                                       "product_uri", "product_size", "product_reason"])


def _rank_or_nan(mission: str, filename) -> float:
    rank = science_rank(mission, filename)
    return np.nan if rank is None else float(rank)
