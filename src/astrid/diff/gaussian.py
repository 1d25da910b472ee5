"""The Gaussian-blur baseline: the simple method AstrID replaces, kept to measure the gain.

Blur the sharper image with a Gaussian to the broader FWHM, scale the reference by the median
flux ratio of matched stars, subtract, and divide by sqrt(rms_r^2 + rms_n^2) of the unblurred
images. That noise model ignores both the smoothing (which lowers the noise of the blurred
image) and the pixel-to-pixel correlation, and a per-pixel threshold on it is not a matched
filter: the noise ratio it reports is not 1 and its false positives are many. It is a baseline,
not an alternative.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

_FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


@dataclass(frozen=True)
class GaussianImages:
    """Baseline outputs on the science grid (float32).

    diff : difference divided by the naive noise sqrt(rms_r^2 + rms_n^2) (same as ``scorr``).
    scorr : the naive per-pixel significance, in its own "sigma".
    flux, flux_err : Gaussian-PSF flux of a point source at each pixel, science ADU.
    """

    diff: np.ndarray
    scorr: np.ndarray
    flux: np.ndarray
    flux_err: np.ndarray


def gaussian_images(ref: np.ndarray, sci: np.ndarray, *, fwhm_ref_px: float, fwhm_sci_px: float,
                    flux_ratio: float, sigma_ref: float, sigma_sci: float) -> GaussianImages:
    """Gaussian-matched difference of two background-subtracted images on one grid.

    Parameters
    ----------
    ref, sci : (H, W) float, reference (reference ADU, on the science grid) and science;
        NaN where masked (NaN spreads through the blur, as it did in the old pipeline).
    fwhm_ref_px, fwhm_sci_px : PSF FWHM of each image, px.
    flux_ratio : science / reference flux scale (the old method used the median star ratio).
    sigma_ref, sigma_sci : background rms of each image in its own ADU.
    """
    sigma_kernel = np.sqrt(abs(fwhm_ref_px ** 2 - fwhm_sci_px ** 2)) / _FWHM_PER_SIGMA
    ref_scaled = np.asarray(ref, np.float32) * np.float32(flux_ratio)
    sci = np.asarray(sci, np.float32)
    if fwhm_ref_px < fwhm_sci_px:
        ref_scaled = ndimage.gaussian_filter(ref_scaled, sigma_kernel, mode="nearest")
    elif fwhm_sci_px < fwhm_ref_px:
        sci = ndimage.gaussian_filter(sci, sigma_kernel, mode="nearest")
    raw = sci - ref_scaled
    noise = float(np.hypot(flux_ratio * sigma_ref, sigma_sci))
    scorr = (raw / np.float32(noise)).astype(np.float32)
    # PSF flux with a Gaussian of the broader FWHM: flux = (d (x) G) / sum G^2, sum G^2 = 1/(4 pi s^2)
    sigma_psf = max(fwhm_ref_px, fwhm_sci_px) / _FWHM_PER_SIGMA
    norm = np.float32(4.0 * np.pi * sigma_psf ** 2)
    flux = ndimage.gaussian_filter(np.nan_to_num(raw), sigma_psf, mode="constant") * norm
    flux[~np.isfinite(raw)] = np.nan
    flux_err = np.full(raw.shape, noise * np.sqrt(norm), np.float32)
    flux_err[~np.isfinite(raw)] = np.nan
    return GaussianImages(diff=scorr, scorr=scorr, flux=flux.astype(np.float32), flux_err=flux_err)
