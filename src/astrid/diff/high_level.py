"""The differencing entry points: ``zogy`` and ``gaussian_baseline``, same inputs, same result.

Both take the reference and the science image as an :class:`~astrid.fitsio.Image`, a path, an
HDU, or ``(array, WCS)`` / ``(array, WCS, ImageMeta)`` (one :func:`parse_input_image` at the
edge), run the same preparation (background, alignment of the reference onto the science grid,
PSFs, flux ratio) and return a :class:`DiffResult` on the science pixel grid.
:func:`difference` adds candidate detection and times the whole chain.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial, wraps
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from astropy.io import fits
from astropy.wcs import WCS

from astrid.config import DetectSettings, DiffSettings
from astrid.errors import AstridError, InputFileError
from astrid.fitsio import Image, ImageMeta, celestial_wcs, read_image, read_meta

MIN_SIZE_PX = 64


class FilterMismatchWarning(UserWarning):
    """The two images were taken through different filters (differenced anyway on request)."""


@dataclass(frozen=True)
class DiffResult:
    """A difference on the science pixel grid (see docs/interfaces.md, "Differencing").

    diff : (H, W) float32, D: unit-variance white noise in empty sky (NaN at bad pixels).
    scorr : (H, W) float32, S_corr in sigma.
    flux, flux_err : (H, W) PSF flux of a point source centred at each pixel and its 1-sigma
        error, science ADU (float32; ZOGY's ``flux`` is a FluxMap, S_corr x flux_err computed
        where indexed, ``np.asarray`` for the whole map).
    mask : (H, W) uint8, ``MASK_*`` bit flags.
    sci : (H, W) float32, background-subtracted science image, ADU.
    ref : (H, W) float32, background-subtracted reference on the science grid, scaled to the
        science flux (science ADU).
    psf_sci, psf_ref : (S, S) float32, central PSF stamps (sum 1) on the science grid.
    wcs : science WCS (None when the science image has none).
    ref_sources : (N, 2) float, x, y of reference stars on the science grid (0-based px).
    quality : dict of figures (noise_ratio, star_residual_chi2, ..., elapsed_s, timings_s).
    """

    diff: np.ndarray
    scorr: np.ndarray
    flux: object
    flux_err: np.ndarray
    mask: np.ndarray
    sci: np.ndarray
    ref: np.ndarray
    psf_sci: np.ndarray
    psf_ref: np.ndarray
    wcs: WCS | None
    ref_sources: np.ndarray
    quality: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Inputs


def parse_input_image(obj, *, name: str = "image") -> Image:
    """Turn any accepted input into an :class:`~astrid.fitsio.Image`.

    Parameters
    ----------
    obj : Image, str or path (FITS file), astropy HDU, ``(array, WCS)`` or
        ``(array, WCS, ImageMeta)`` (the WCS may be None).
    name : what to call the image in error messages when it has no path.

    Raises
    ------
    InputFileError
        Unreadable file, not a 2-D image, smaller than 64 px on a side, or no finite pixel.
    """
    if isinstance(obj, Image):
        image = obj
    elif isinstance(obj, str | os.PathLike):
        image = read_image(Path(obj))
    elif isinstance(obj, fits.PrimaryHDU | fits.ImageHDU | fits.CompImageHDU):
        image = _from_array(obj.data, celestial_wcs(obj.header), read_meta(obj.header), name,
                            header=obj.header)
    elif isinstance(obj, tuple) and len(obj) in (2, 3):
        meta = obj[2] if len(obj) == 3 else ImageMeta()
        if not isinstance(meta, ImageMeta):
            raise AstridError(f"{name}: third tuple item must be an ImageMeta, got "
                              f"{type(meta).__name__}")
        if obj[1] is not None and not isinstance(obj[1], WCS):
            raise AstridError(f"{name}: second tuple item must be an astropy WCS or None, got "
                              f"{type(obj[1]).__name__}")
        image = _from_array(obj[0], obj[1], meta, name)
    else:
        raise AstridError(f"{name}: expected an Image, a FITS path, an HDU or (array, WCS[, meta]), "
                          f"got {type(obj).__name__}")
    label = image.path or name
    if image.data.ndim != 2:
        raise InputFileError(label, f"expected a 2-D image, got shape {image.data.shape}")
    h, w = image.data.shape
    if min(h, w) < MIN_SIZE_PX:
        raise InputFileError(label, f"image is {w}x{h} px; differencing needs at least "
                                    f"{MIN_SIZE_PX} px on each side")
    if not np.any(np.isfinite(image.data) & ~image.mask):
        raise InputFileError(label, "no valid pixels (all NaN or masked)")
    return _with_inferred_saturation(image)


_SATURATED_MIN_PIXELS = 5  # pixels sharing the maximum value that reveal a clipped image


def _with_inferred_saturation(image: Image) -> Image:
    """Set the saturation level from the data when the header does not give it.

    An image clipped by its ADC (or by a pipeline) has many pixels sharing exactly the
    maximum value; those are saturated, and stars there cannot subtract. Without this, a
    header lacking SATURATE turns every saturated star into a bright false candidate.
    """
    if image.meta.saturation is not None:
        return image
    good = image.data[~image.mask]
    good = good[np.isfinite(good)]
    if good.size == 0:
        return image
    top = float(good.max())
    if np.count_nonzero(good == top) < _SATURATED_MIN_PIXELS or top <= float(np.median(good)):
        return image
    mask = image.mask | (np.nan_to_num(image.data, nan=-np.inf) >= top)
    return replace(image, mask=mask, meta=replace(image.meta, saturation=top))


def _from_array(data, wcs, meta, name, header=None) -> Image:
    data = np.array(np.squeeze(np.asarray(data)), dtype=np.float32)
    if data.ndim != 2:
        raise InputFileError(name, f"expected a 2-D image, got shape {data.shape}")
    mask = ~np.isfinite(data)
    if meta.saturation is not None:
        with np.errstate(invalid="ignore"):
            mask |= data >= meta.saturation
    data[~np.isfinite(data)] = np.nan
    return Image(data=data, mask=mask, header=header if header is not None else fits.Header(),
                 wcs=wcs, meta=meta, path=None)


def _label(image: Image, name: str) -> str:
    return image.path or name


def check_filters(ref: Image, sci: Image, allow_mismatch: bool) -> None:
    """Raise (or warn, when allowed) if both images state different filters."""
    fr, fs = ref.meta.filter, sci.meta.filter
    if not fr or not fs or _norm_filter(fr) == _norm_filter(fs):
        return
    message = (f"{_label(sci, 'science')}: filter {fs!r} differs from the reference's {fr!r} "
               f"({_label(ref, 'reference')})")
    if not allow_mismatch:
        raise AstridError(message + "; pass --allow-filter-mismatch to difference anyway")
    warnings.warn(message, FilterMismatchWarning, stacklevel=3)


def _norm_filter(name: str) -> str:
    # First word only ('i DECam SDSS c0003 ...' is 'i'); case matters (Johnson R is not r).
    return name.strip().split()[0]


# ---------------------------------------------------------------------------------------------
# Preparation shared by both methods


@dataclass(frozen=True)
class PreparedPair:
    """Both images ready for differencing, on the science grid.

    sci, ref : background-subtracted science and reference (reference ADU, not flux-scaled),
        NaN at bad pixels and (ref) outside the overlap.
    mask : uint8 ``MASK_*`` input bits.
    sigma_sci, sigma_ref : background noise per pixel, each in its own ADU.
    var_sci, var_ref : per-pixel variance (background + source Poisson), 0 where masked;
        :class:`~astrid.diff.background.LazyVariance`, computed where indexed (per tile).
    psf_sci, psf_ref : PSFModel of each image on the science grid.
    flux_ratio : FluxRatio (science / reference).
    flux_ratio_median : median ratio of matched stars' fluxes (the Gaussian baseline's scale).
    alignment : Alignment of the reference onto the science grid (figures only: its
        ``ref_on_sci`` is ``ref`` and its footprint is in ``mask``).
    ref_xy, sci_xy : (N, 2) star positions on the science grid.
    wcs : the science WCS (None without one).
    timings_s : seconds per stage.
    started_s : ``time.perf_counter()`` when both images were in memory (read and checked):
        where the differencing clock (``elapsed_s``) starts.
    """

    sci: np.ndarray
    ref: np.ndarray
    mask: np.ndarray
    sigma_sci: float
    sigma_ref: float
    var_sci: object
    var_ref: object
    psf_sci: object
    psf_ref: object
    flux_ratio: object
    flux_ratio_median: float
    alignment: object
    ref_xy: np.ndarray
    sci_xy: np.ndarray
    wcs: WCS | None
    timings_s: dict
    started_s: float


class _Timer:
    def __init__(self):
        self.timings: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = self.timings.get(stage, 0.0) + (now - self._t)
        self._t = now


# Frames larger than this are prepared with memory first: one background at a time, on all
# cores (both images' temporaries at once would lift the peak over 1 GB at 4096^2), and freed
# memory handed back to the OS between the stages. Smaller frames keep it for the next stage:
# faulting it in again cost a 2048^2 pair 0.08 s of system time (20,000 page faults).
_LARGE_FRAME_PIXELS = 3072 ** 2


# Background noise (data units) that differencing handles: ZOGY fails from about 3e-11 and
# 3e10, where the fourth power of the noise leaves single precision.
_NOISE_RANGE = (1e-9, 1e8)


def prepare_pair(reference, science, settings: DiffSettings | None = None) -> PreparedPair:
    """Background, alignment, PSFs, flux ratio and variance maps of a reference/science pair."""
    from astrid.diff.align import align_reference
    from astrid.diff.background import LazyVariance
    from astrid.diff.psf import psf_photometry
    from astrid.diff.stars import find_stars, fit_flux_ratio, good_stars, match_positions
    from astrid.diff.zogy_core import (
        MASK_BAD_ANY,
        MASK_NO_OVERLAP,
        MASK_REF_BAD,
        MASK_SATURATED,
        MASK_SCI_BAD,
    )
    from astrid.diff.zogy_fused import pair_flags

    settings = settings or DiffSettings()
    ref_img = parse_input_image(reference, name="reference")
    sci_img = parse_input_image(science, name="science")
    large = max(sci_img.data.size, ref_img.data.size) > _LARGE_FRAME_PIXELS
    if large:
        release_freed_memory()  # what an earlier pair left in the heap
    check_filters(ref_img, sci_img, settings.allow_filter_mismatch)
    ref_name, sci_name = _label(ref_img, "reference"), _label(sci_img, "science")
    started_s = time.perf_counter()  # images in memory: the differencing clock starts here
    timer = _Timer()

    edge_px = settings.psf_size_px // 2 + 1

    side_by_side = not large

    def background(img: Image, name: str):
        with _blame(name):
            return _subtract_background(img, parallel=not side_by_side)

    def stars_of(img: Image, name: str, subtracted):
        with _blame(name):
            return find_stars(subtracted.data, subtracted.rms, img.mask,
                              saturation=subtracted.saturation, edge_px=edge_px)

    def background_and_stars(img: Image, name: str):
        subtracted = background(img, name)
        return subtracted, stars_of(img, name, subtracted)

    def science_psf(subtracted, stars):
        if len(stars) == 0:
            raise InputFileError(sci_name, "no stars detected (need stars for the PSF and the "
                                           "flux ratio)")
        return _measured_psf(sci_name, subtracted.data, subtracted.rms, sci_img.mask, settings,
                             stars, subtracted.saturation)

    # The science PSF needs only the science image and its stars, so it is measured while the
    # reference's stars are still being found: the PSF stacks and fits hold the GIL much of the
    # time, star finding hardly at all (sep runs without it, see sep_nogil).
    with _warnings_by_image(sci_name, ref_name):
        if side_by_side:
            # The two images side by side: the backgrounds run without the GIL, so they overlap
            # fully, and so does the star finding.
            def science_job():
                subtracted, stars = background_and_stars(sci_img, sci_name)
                return subtracted, stars, science_psf(subtracted, stars)

            (sci_bkg, sci_stars, psf_sci), (ref_bkg, ref_stars_native) = _side_by_side(
                science_job, partial(background_and_stars, ref_img, ref_name))
        else:
            # One background at a time, on all cores (numba's threads, launched from one Python
            # thread at a time); the science image's star finding overlaps the reference's
            # background, its PSF the reference's star finding.
            sci_bkg = background(sci_img, sci_name)
            sci_stars, ref_bkg = _side_by_side(partial(stars_of, sci_img, sci_name, sci_bkg),
                                               partial(background, ref_img, ref_name))
            psf_sci, ref_stars_native = _side_by_side(
                partial(science_psf, sci_bkg, sci_stars),
                partial(stars_of, ref_img, ref_name, ref_bkg))
    # The reference's RMS map is not kept (64 MB at 4096^2, where the alignment is the peak
    # of the preparation's memory): its stars are found and it is aligned by them.
    sci, rms_sci, sigma_sci, sci_mesh = sci_bkg.data, sci_bkg.rms, sci_bkg.sigma, sci_bkg.mesh
    ref_native, sigma_ref = ref_bkg.data, ref_bkg.sigma
    del sci_bkg, ref_bkg
    for name, sigma in ((sci_name, sigma_sci), (ref_name, sigma_ref)):
        if not _NOISE_RANGE[0] <= sigma <= _NOISE_RANGE[1]:
            # ZOGY's spectra hold the fourth power of the noise in single precision.
            raise InputFileError(name, f"background noise {sigma:.3g} (data units) is outside "
                                       f"{_NOISE_RANGE[0]:g} to {_NOISE_RANGE[1]:g}, where "
                                       "single-precision differencing is reliable; rescale "
                                       "the image")
    timer.lap("background+stars+psf_sci")
    with _blame(ref_name):
        alignment = align_reference(
            ref_native, ref_img.wcs, sci.shape, sci_img.wcs, ref_mask=ref_img.mask,
            sci_data=sci, sci_mask=sci_img.mask, sci_rms=rms_sci,
            min_overlap=settings.min_overlap, sci_stars=sci_stars, ref_stars=ref_stars_native)
    if alignment.overlap < settings.min_overlap:
        raise InputFileError(ref_name, f"overlaps only {alignment.overlap:.0%} of the science "
                                       f"image {sci_name} (need {settings.min_overlap:.0%})")
    ref = np.asarray(alignment.ref_on_sci, np.float32)
    del ref_native  # bounded memory: only the science-grid reference is kept
    timer.lap("align")

    # The flags of both images on the science grid, in one compiled pass: science bad or
    # saturated (saturated, not merely bad), reference NaN inside its frame (bad) or no
    # overlap outside it.
    mask = np.empty(sci.shape, np.uint8)
    sci_saturation = sci_img.meta.saturation
    pair_flags(np.asarray(sci_img.mask), sci_img.data,
               np.float32(np.nan if sci_saturation is None else sci_saturation), ref,
               np.asarray(alignment.footprint, bool),
               np.array([MASK_SCI_BAD, MASK_REF_BAD, MASK_NO_OVERLAP, MASK_SATURATED], np.uint8),
               mask)
    if ref_img.meta.saturation is not None:
        # Saturated reference pixels arrive as NaN holes; mark them saturated, not just bad.
        with np.errstate(invalid="ignore"):
            # flatnonzero: np.nonzero of a 2-D map is 10x slower (55 ms at 4096^2).
            sy, sx = np.divmod(np.flatnonzero(ref_img.data >= ref_img.meta.saturation),
                               ref_img.data.shape[1])
        if sy.size:
            px, py = _ref_to_sci_xy(sx.astype(float), sy.astype(float), alignment, ref_img.wcs,
                                    sci_img.wcs)
            ix, iy = np.rint(px).astype(int), np.rint(py).astype(int)
            ok = (ix >= 0) & (iy >= 0) & (ix < sci.shape[1]) & (iy < sci.shape[0])
            mask[iy[ok], ix[ok]] |= MASK_SATURATED

    # The reference stars, detected once on the native grid, carried onto the science grid.
    ref_stars = _stars_on_science_grid(ref_stars_native, alignment, ref_img.wcs, sci_img.wcs,
                                       sci.shape, edge_px=edge_px)
    if len(ref_stars) == 0:
        raise InputFileError(ref_name, "no stars detected in the overlap with the science image")
    timer.lap("stars")

    with _warnings_by_image(ref_name, ref_name):
        psf_ref = _measured_psf(ref_name, ref, sigma_ref, None, settings, ref_stars)
    timer.lap("psf_ref")

    good_sci, good_ref = good_stars(sci_stars), good_stars(ref_stars)
    match_px = max(2.0, 3.0 * float(getattr(alignment, "rms_px", 0.0) or 0.0))
    ia, ib = match_positions(good_sci[["x", "y"]].to_numpy(), good_ref[["x", "y"]].to_numpy(),
                             match_px)
    if len(ia) < 3:
        # Faint fields: fall back on every matched detection.
        good_sci, good_ref = sci_stars, ref_stars
        ia, ib = match_positions(good_sci[["x", "y"]].to_numpy(),
                                 good_ref[["x", "y"]].to_numpy(), match_px)
    xs, ys = good_sci["x"].to_numpy()[ia], good_sci["y"].to_numpy()[ia]
    xr, yr = good_ref["x"].to_numpy()[ib], good_ref["y"].to_numpy()[ib]
    (f_sci, e_sci), (f_ref, e_ref) = _side_by_side(
        partial(psf_photometry, sci, rms_sci, psf_sci, xs, ys, mask=sci_img.mask),
        partial(psf_photometry, ref, sigma_ref, psf_ref, xr, yr))
    with _blame(f"{sci_name} vs {ref_name}"):
        ratio = fit_flux_ratio(f_sci, f_ref, e_sci, e_ref)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = f_sci / f_ref
    median_ratio = float(np.nanmedian(r[np.isfinite(r) & (f_ref > 0)]))
    timer.lap("flux_ratio")

    # The science variance takes its RMS from the background mesh where it is needed (per
    # tile): ZOGY keeps no full-size RMS or variance map.
    var_sci = LazyVariance(sci, sci_mesh, sci_img.meta.gain, mask, MASK_BAD_ANY)
    del rms_sci
    var_ref = LazyVariance(ref, sigma_ref, ref_img.meta.gain, mask, MASK_BAD_ANY)

    if large:
        release_freed_memory()
    return PreparedPair(
        sci=sci.astype(np.float32, copy=False), ref=ref, mask=mask,
        sigma_sci=sigma_sci, sigma_ref=sigma_ref, var_sci=var_sci, var_ref=var_ref,
        psf_sci=psf_sci, psf_ref=psf_ref, flux_ratio=ratio, flux_ratio_median=median_ratio,
        # The footprint is in the mask now; not keeping it saves a full-size map.
        alignment=replace(alignment, ref_on_sci=None, footprint=None),
        ref_xy=ref_stars[["x", "y"]].to_numpy(float),
        sci_xy=sci_stars[["x", "y"]].to_numpy(float), wcs=sci_img.wcs,
        timings_s=timer.timings, started_s=started_s)


def _side_by_side(sci_job, ref_job, parallel: bool = True):
    """``(sci_job(), ref_job())``, the reference's job in a helper thread while this thread
    runs the science's (numpy, scipy's FFTs and sorts release the GIL); one after the other
    when not ``parallel``."""
    if not parallel:
        return sci_job(), ref_job()
    with ThreadPoolExecutor(max_workers=1) as pool:
        ref_future = pool.submit(ref_job)
        return sci_job(), ref_future.result()


@contextlib.contextmanager
def _warnings_by_image(main_name: str, helper_name: str):
    """Warnings issued inside, re-issued after it with the image they concern: ``main_name``
    for those from this thread, ``helper_name`` for those from a helper thread.

    ``catch_warnings`` is process-wide, so it is entered once, here, around both threads' work,
    and each warning is attributed by the thread that issued it.
    """
    caught = []
    main = threading.get_ident()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = lambda message, category, *_: caught.append(
                (threading.get_ident(), message, category))
            yield
    finally:
        for ident, message, category in caught:
            name = main_name if ident == main else helper_name
            # stacklevel: past contextlib and prepare_pair, to prepare_pair's caller
            warnings.warn(f"{name}: {message}", category, stacklevel=4)


def _measured_psf(name: str, data, rms, mask, settings: DiffSettings, stars,
                  saturation: float | None = None):
    """:func:`measure_psf` of one image, its errors naming the image."""
    from astrid.diff.psf import measure_psf

    with _blame(name):
        return measure_psf(data, rms, mask, size_px=settings.psf_size_px,
                           tile_px=settings.tile_px, stars=stars, saturation=saturation)


def release_freed_memory() -> None:
    """Hand memory freed by the preparation back to the OS before ZOGY allocates its maps.

    glibc keeps freed buffers below its (adaptive, up to 32 MB) mmap threshold in the heap,
    which is what the half-resolution background and star-finding maps of a 4k frame are:
    about 80 MB at 4096^2 that ``malloc_trim`` returns in a millisecond. No-op elsewhere.
    """
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _ref_to_sci_xy(rx: np.ndarray, ry: np.ndarray, alignment, ref_wcs,
                   sci_wcs) -> tuple[np.ndarray, np.ndarray]:
    """Reference pixel positions -> science pixel positions, inverting the alignment.

    Reference pixel -> (WCS) corrected science pixel x' -> science pixel x solving
    ``A[:, :2] @ x + A[:, 2] = x'`` (the alignment's affine acts on the science side).
    """
    if ref_wcs is not None and sci_wcs is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            px, py = sci_wcs.world_to_pixel_values(*ref_wcs.pixel_to_world_values(rx, ry))
        px, py = np.asarray(px, float), np.asarray(py, float)
    else:
        px, py = np.asarray(rx, float), np.asarray(ry, float)
    affine = np.asarray(alignment.affine, float)
    xy = np.linalg.inv(affine[:, :2]) @ (np.vstack([px, py]) - affine[:, 2:3])
    return xy[0], xy[1]


def _stars_on_science_grid(stars: pd.DataFrame, alignment, ref_wcs, sci_wcs,
                           shape: tuple[int, int], edge_px: int) -> pd.DataFrame:
    """Reference star catalogue with x, y moved onto the science grid, clipped to the frame."""
    out = stars.copy()
    out["x"], out["y"] = _ref_to_sci_xy(stars["x"].to_numpy(float), stars["y"].to_numpy(float),
                                        alignment, ref_wcs, sci_wcs)
    h, w = shape
    inside = np.isfinite(out["x"]) & np.isfinite(out["y"]) & (out["x"] >= 0) \
        & (out["y"] >= 0) & (out["x"] <= w - 1) & (out["y"] <= h - 1)
    out = out[inside].copy()
    out["flag_edge"] = ((out["x"] < edge_px) | (out["y"] < edge_px)
                        | (out["x"] > w - 1 - edge_px) | (out["y"] > h - 1 - edge_px))
    return out.reset_index(drop=True)


class _Subtracted(NamedTuple):
    """An image with its background subtracted (see :func:`_subtract_background`)."""

    data: np.ndarray  # background-subtracted, NaN at bad pixels
    rms: np.ndarray  # background RMS map
    sigma: float  # global noise per pixel
    saturation: float | None  # saturation level above the background
    mesh: object  # the BackgroundMesh both maps come from


def _subtract_background(img: Image, parallel: bool = False) -> _Subtracted:
    """The image with its background subtracted, the subtraction done as the level is
    evaluated (no full-size level map is ever made); ``parallel`` as for
    ``measure_background``."""
    from astrid.diff.background import measure_background

    mesh = measure_background(img.data, img.mask, parallel=parallel)
    data, rms = mesh.subtract(img.data, img.mask, parallel=parallel)
    saturation = None if img.meta.saturation is None \
        else float(img.meta.saturation - mesh.level_median)
    return _Subtracted(data, rms, float(mesh.sigma_adu), saturation, mesh)


class _blame:
    """Re-raise an AstridError from a library step with the file it concerns."""

    def __init__(self, label: str):
        self.label = label

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is not None and isinstance(exc, AstridError) and not isinstance(exc, InputFileError):
            raise InputFileError(self.label, str(exc)) from None
        return False


# ---------------------------------------------------------------------------------------------
# Entry points


def _one_blas_thread(func):
    """``func`` run with BLAS on one thread (see :func:`astrid.diff.zogy_core.one_blas_thread`)."""
    @wraps(func)
    def wrapper(*args, **kwargs):
        from astrid.diff.zogy_core import one_blas_thread

        with one_blas_thread():
            return func(*args, **kwargs)
    return wrapper


@_one_blas_thread
def zogy(reference, science, *, settings: DiffSettings | None = None) -> DiffResult:
    """ZOGY difference and S_corr of two images, on the science pixel grid.

    Parameters
    ----------
    reference, science : Image, FITS path, HDU, ``(array, WCS)`` or ``(array, WCS, ImageMeta)``.
    settings : DiffSettings (tiles, PSF stamp size, overlap, FFT threads, filter check).

    Returns
    -------
    DiffResult; ``quality`` holds the noise ratios, star residual chi^2, alignment and PSF
    figures and the time per stage (``elapsed_s`` excludes file reading).
    """
    from astrid.diff.psf import psf_at
    from astrid.diff.zogy_core import zogy_images

    settings = settings or DiffSettings()
    pair = prepare_pair(reference, science, settings)
    t0 = time.perf_counter()
    ratio = float(pair.flux_ratio.value)
    images = zogy_images(
        pair.ref, pair.sci, lambda x, y: psf_at(pair.psf_ref, x, y),
        lambda x, y: psf_at(pair.psf_sci, x, y),
        sigma_ref=pair.sigma_ref, sigma_sci=pair.sigma_sci, flux_ratio=ratio,
        var_ref=pair.var_ref, var_sci=pair.var_sci, mask=pair.mask,
        sigma_x_px=float(pair.alignment.sigma_x_px), sigma_y_px=float(pair.alignment.sigma_y_px),
        tile_px=settings.tile_px, overlap_px=settings.tile_overlap_px,
        fft_workers=settings.fft_workers)
    timings = dict(pair.timings_s)
    timings["zogy"] = time.perf_counter() - t0
    return _finish(pair, images.diff, images.scorr, images.flux, images.flux_err, images.mask,
                   ratio, "zogy", timings, pair.started_s, rescale_scorr=settings.rescale_scorr,
                   extra={"flux_zp_score": images.flux_zp_score,
                          "flux_zp_diff": images.flux_zp_diff,
                          "kernel_radius_px": images.kernel_radius_px})


@_one_blas_thread
def gaussian_baseline(reference, science, *, settings: DiffSettings | None = None) -> DiffResult:
    """The old Gaussian-blur difference, with the same inputs and result as :func:`zogy`.

    The sharper image is blurred to the broader FWHM, the reference scaled by the median flux
    ratio of matched stars, and the difference divided by sqrt(rms_r^2 + rms_n^2) as its
    "S_corr". Kept as a baseline for benchmarks; see :mod:`astrid.diff.gaussian`.
    """
    from astrid.diff.gaussian import gaussian_images
    from astrid.diff.zogy_core import MASK_BAD_ANY, footprint_flags

    settings = settings or DiffSettings()
    pair = prepare_pair(reference, science, settings)
    t0 = time.perf_counter()
    ratio = pair.flux_ratio_median
    bad = (pair.mask & MASK_BAD_ANY) != 0
    ref = np.where(bad, np.nan, pair.ref)
    sci = np.where(bad, np.nan, pair.sci)
    images = gaussian_images(ref, sci, fwhm_ref_px=pair.psf_ref.fwhm_px,
                             fwhm_sci_px=pair.psf_sci.fwhm_px, flux_ratio=ratio,
                             sigma_ref=pair.sigma_ref, sigma_sci=pair.sigma_sci)
    mask = footprint_flags(pair.mask, int(np.ceil(2 * max(pair.psf_ref.fwhm_px,
                                                          pair.psf_sci.fwhm_px))))
    timings = dict(pair.timings_s)
    timings["gaussian"] = time.perf_counter() - t0
    return _finish(pair, images.diff, images.scorr, images.flux, images.flux_err, mask, ratio,
                   "gaussian", timings, pair.started_s, extra={})


_MIN_NOISE_PIXELS = 2000  # fewer empty-sky pixels than this: too noisy to rescale S_corr by


def _finish(pair: PreparedPair, diff, scorr, flux, flux_err, mask, ratio, method, timings,
            start, extra, rescale_scorr: bool = False) -> DiffResult:
    from astrid.diff import quality as q

    t0 = time.perf_counter()
    fwhm_sci, fwhm_ref = float(pair.psf_sci.fwhm_px), float(pair.psf_ref.fwhm_px)
    psf_sci, psf_ref = pair.psf_sci.central, pair.psf_ref.central
    def noise():
        free = q.source_free(pair.sci, pair.ref, pair.sigma_sci, pair.sigma_ref)
        return q.noise_ratios(scorr, diff, mask, free)

    def star_chi2():
        if method != "zogy":
            return float("nan"), 0
        return q.star_residual_chi2(
            diff, pair.ref_xy, pair.var_sci, pair.var_ref, psf_ref, psf_sci,
            sigma_ref=pair.sigma_ref, sigma_sci=pair.sigma_sci, flux_ratio=ratio,
            radius_px=max(fwhm_sci, fwhm_ref), mask=mask)

    # The star chi^2 beside the noise ratios: both are mostly FFTs and partitions (no GIL).
    (nr_s, nr_d, n_pix), (chi2, n_chi2) = _side_by_side(noise, star_chi2,
                                                        parallel=method == "zogy")
    rescale = 1.0
    if method == "zogy" and rescale_scorr and np.isfinite(nr_s) and nr_s > 0 \
            and n_pix >= _MIN_NOISE_PIXELS:
        # Correlated input noise (stacks, resampled archive images) makes the white-noise
        # S_corr too wide or too narrow; its empty-sky scatter calibrates it back to sigma.
        rescale = float(nr_s)
        scorr /= np.float32(rescale)
        flux_err *= np.float32(rescale)
    timings["quality"] = time.perf_counter() - t0
    al = pair.alignment
    quality = {
        "method": method,
        "noise_ratio": nr_s,
        "scorr_rescale": rescale,
        "noise_ratio_diff": nr_d,
        "noise_pixels": n_pix,
        "star_residual_chi2": chi2,
        "star_residual_n": n_chi2,
        "alignment_rms_px": float(al.rms_px),
        "alignment_sigma_x_px": float(al.sigma_x_px),
        "alignment_sigma_y_px": float(al.sigma_y_px),
        "alignment_n_matched": int(al.n_matched),
        "overlap": float(al.overlap),
        "fwhm_ref": fwhm_ref,
        "fwhm_sci": fwhm_sci,
        "psf_method_ref": pair.psf_ref.method,
        "psf_method_sci": pair.psf_sci.method,
        "flux_ratio": float(ratio),
        "flux_ratio_err": float(pair.flux_ratio.err),
        "flux_ratio_n_used": int(pair.flux_ratio.n_used),
        "sigma_ref_adu": pair.sigma_ref,
        "sigma_sci_adu": pair.sigma_sci,
        "n_ref_sources": int(len(pair.ref_xy)),
        **extra,
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
        "elapsed_s": time.perf_counter() - start,
    }
    return DiffResult(diff=diff, scorr=scorr, flux=flux, flux_err=flux_err, mask=mask,
                      sci=pair.sci, ref=_scaled_in_place(pair.ref, ratio),
                      psf_sci=psf_sci, psf_ref=psf_ref, wcs=pair.wcs, ref_sources=pair.ref_xy,
                      quality=quality)


def _scaled_in_place(ref: np.ndarray, ratio: float) -> np.ndarray:
    """The reference on the science flux scale; in place, as the unscaled copy is not needed."""
    ref *= np.float32(ratio)
    return ref


@_one_blas_thread
def difference(reference, science, *, diff_settings: DiffSettings | None = None,
               detect_settings: DetectSettings | None = None) -> tuple[DiffResult, pd.DataFrame]:
    """Difference (method from ``diff_settings.method``) plus candidate detection.

    ``quality["elapsed_s"]`` then covers the whole chain from both images in memory to the
    candidate table, and ``quality["n_candidates"]`` is set.
    """
    from astrid.detect.candidates import find_candidates

    diff_settings = diff_settings or DiffSettings()
    run = zogy if diff_settings.method == "zogy" else gaussian_baseline
    result = run(reference, science, settings=diff_settings)
    t0 = time.perf_counter()
    candidates = find_candidates(result, detect_settings)
    detect_s = time.perf_counter() - t0
    quality = dict(result.quality)
    quality["timings_s"] = {**quality["timings_s"], "detect": round(detect_s, 4)}
    quality["elapsed_s"] = float(quality["elapsed_s"] + detect_s)
    quality["n_candidates"] = int(len(candidates))
    return replace(result, quality=quality), candidates
