"""Image differencing: alignment, background, PSF, ZOGY with S_corr, and the Gaussian baseline.

``zogy(reference, science)`` and ``gaussian_baseline(reference, science)`` take the same inputs
(an Image, a FITS path, an HDU or ``(array, WCS[, ImageMeta])``) and return the same
:class:`DiffResult` on the science pixel grid; ``difference`` adds candidate detection.
The array-level pieces (alignment, background, PSF, the ZOGY core) are public too.
"""

from astrid.diff.align import Alignment, align_reference
from astrid.diff.background import Background, estimate_background, variance_map
from astrid.diff.high_level import (
    DiffResult,
    FilterMismatchWarning,
    difference,
    gaussian_baseline,
    parse_input_image,
    prepare_pair,
    zogy,
)
from astrid.diff.io import read_diff_dir, write_diff_dir
from astrid.diff.psf import PSFModel, measure_psf, psf_at
from astrid.diff.stars import FluxRatio, find_stars, fit_flux_ratio, match_positions
from astrid.diff.zogy_core import (
    MASK_BAD_ANY,
    MASK_EDGE,
    MASK_NO_OVERLAP,
    MASK_REF_BAD,
    MASK_SATURATED,
    MASK_SCI_BAD,
    zogy_images,
    zogy_tile,
)

__all__ = [
    "MASK_BAD_ANY", "MASK_EDGE", "MASK_NO_OVERLAP", "MASK_REF_BAD", "MASK_SATURATED",
    "MASK_SCI_BAD", "Alignment", "Background", "DiffResult", "FilterMismatchWarning",
    "FluxRatio", "PSFModel", "align_reference", "difference", "estimate_background",
    "find_stars", "fit_flux_ratio", "gaussian_baseline", "match_positions", "measure_psf",
    "parse_input_image", "prepare_pair", "psf_at", "read_diff_dir", "variance_map",
    "write_diff_dir", "zogy", "zogy_images", "zogy_tile",
]
