"""Archive acquisition: MAST queries, product choice, pairing, downloads, local folders.

The steps a pipeline calls, each a plain function taking a settings object:

- :func:`query_observations` (MAST, per supernova, reference and science windows)
- :func:`make_pairs` (same mission, instrument and filter; best pair by a stated rule)
- :func:`download_pairs` (resumable, verified, manifest merged)
- :func:`index_folder` (a folder of FITS as an observation table)
"""

from astrid.archive.download import DownloadResult, download_pairs, pair_paths
from astrid.archive.filters import MISSIONS, mission_of, normalise_filter
from astrid.archive.footprint import contains, overlap_fraction, parse_s_region
from astrid.archive.local import LocalIndex, index_folder, scan_folder
from astrid.archive.mast import (
                                 ArchiveUnreachable,
                                 QueryResult,
                                 query_observations,
                                 read_observations,
                                 time_windows,
)
from astrid.archive.pairing import PAIR_COLUMNS, make_pairs
from astrid.archive.products import science_rank, select_products

__all__ = [
    "MISSIONS", "PAIR_COLUMNS", "ArchiveUnreachable", "DownloadResult", "LocalIndex", "QueryResult", "contains",
    "download_pairs", "index_folder", "make_pairs", "mission_of", "normalise_filter",
    "overlap_fraction", "pair_paths", "parse_s_region", "query_observations", "read_observations",
    "scan_folder", "science_rank", "select_products", "time_windows",
]
