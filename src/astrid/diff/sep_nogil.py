"""sep's extraction, windowed centroids and circular apertures with the GIL released.

``sep`` holds the GIL in every call (sep-developers/sep#172): 50-80 ms of extraction per
2048^2 frame, plus its centroid and aperture loops, during which the other image's work, in
a second thread, cannot take a single Python step. sep's C library has been thread-safe since
1.2 (its statics became per-call contexts), so its entry points are called here directly:
``sep_extract`` through ctypes, which releases the GIL for the call, and the per-source
``sep_windowed`` and ``sep_sum_circle`` from a compiled loop that runs without it. The
results are those of ``sep.extract``, ``sep.winpos`` and ``sep.sum_circle``, bit for bit.

The structs mirror ``sep.h`` of sep 1.4. With any other version each function here calls
sep's own (same results, GIL held).
"""

from __future__ import annotations

import ctypes
import functools

import numba
import numpy as np
import sep

_TBYTE, _TFLOAT = 11, 42  # sep.h element type codes
_NOISE_STDDEV = 1
_THRESH_ABS = 1
_FILTER_MATCHED = 1
_MEMORY_ALLOC_ERROR = 1

_P_INT64 = ctypes.POINTER(ctypes.c_int64)
_P_DOUBLE = ctypes.POINTER(ctypes.c_double)
_P_FLOAT = ctypes.POINTER(ctypes.c_float)


class _Image(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("noise", ctypes.c_void_p),
                ("mask", ctypes.c_void_p), ("segmap", ctypes.c_void_p),
                ("dtype", ctypes.c_int), ("ndtype", ctypes.c_int),
                ("mdtype", ctypes.c_int), ("sdtype", ctypes.c_int),
                ("segids", _P_INT64), ("idcounts", _P_INT64), ("numids", ctypes.c_int64),
                ("w", ctypes.c_int64), ("h", ctypes.c_int64),
                ("noiseval", ctypes.c_double), ("noise_type", ctypes.c_short),
                ("gain", ctypes.c_double), ("maskthresh", ctypes.c_double)]


# The catalogue's arrays in sep.h order, with the type of each, as sep.extract returns them.
_CATALOG_ARRAYS = (
    [("thresh", _P_FLOAT, np.float64)]
    + [(name, _P_INT64, np.int64) for name in ("npix", "tnpix", "xmin", "xmax", "ymin", "ymax")]
    + [(name, _P_DOUBLE, np.float64)
       for name in ("x", "y", "x2", "y2", "xy", "errx2", "erry2", "errxy")]
    + [(name, _P_FLOAT, np.float64)
       for name in ("a", "b", "theta", "cxx", "cyy", "cxy", "cflux", "flux", "cpeak", "peak")]
    + [(name, _P_INT64, np.int64) for name in ("xcpeak", "ycpeak", "xpeak", "ypeak")]
    + [("flag", ctypes.POINTER(ctypes.c_short), np.short)]
)


class _Catalog(ctypes.Structure):
    _fields_ = ([("nobj", ctypes.c_int)]
                + [(name, pointer) for name, pointer, _ in _CATALOG_ARRAYS]
                + [("pix", ctypes.POINTER(_P_INT64)), ("objectspix", _P_INT64)])


OBJECT_DTYPE = np.dtype([(name, dtype) for name, _, dtype in _CATALOG_ARRAYS])


# The per-source entry points, as ctypes function types: compiled loops call them through
# these without the GIL (the addresses are arguments, so the loops can be cached on disk).
_WINDOWED = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_void_p, ctypes.c_double, ctypes.c_double, ctypes.c_double,
    ctypes.c_int, ctypes.c_short, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
    ctypes.c_void_p)
_SUM_CIRCLE = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_void_p, ctypes.c_double, ctypes.c_double, ctypes.c_double,
    ctypes.c_int, ctypes.c_int, ctypes.c_short, ctypes.c_void_p, ctypes.c_void_p,
    ctypes.c_void_p, ctypes.c_void_p)


@functools.cache
def _library():
    """sep's C library with typed entry points, or None where the structs above may not match
    (not sep 1.4)."""
    if not sep.__version__.startswith("1.4."):
        return None
    lib = ctypes.CDLL(sep.__file__)  # ctypes.CDLL releases the GIL around every call
    lib.sep_extract.argtypes = [
        ctypes.POINTER(_Image), ctypes.c_float, ctypes.c_int, ctypes.c_int, _P_FLOAT,
        ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_double,
        ctypes.c_int, ctypes.c_double, ctypes.POINTER(ctypes.POINTER(_Catalog))]
    lib.sep_extract.restype = ctypes.c_int
    lib.sep_catalog_free.argtypes = [ctypes.POINTER(_Catalog)]
    lib.sep_catalog_free.restype = None
    lib.sep_get_errmsg.argtypes = [ctypes.c_int, ctypes.c_char_p]
    lib.sep_get_errdetail.argtypes = [ctypes.c_char_p]
    lib.windowed = _WINDOWED(("sep_windowed", lib))
    lib.sum_circle = _SUM_CIRCLE(("sep_sum_circle", lib))
    return lib


def available() -> bool:
    """Whether the GIL-free paths run (sep 1.4, whose C structs this module mirrors)."""
    return _library() is not None


def _image(data: np.ndarray, mask: np.ndarray | None, err: np.ndarray | None = None) -> _Image:
    """sep's image struct over ``data`` (float32), ``mask`` (uint8 or bool) and ``err`` (float32
    standard deviations), each C-contiguous of one 2-D shape; the arrays must outlive it."""
    if data.dtype != np.float32 or data.ndim != 2 or not data.flags.c_contiguous:
        raise ValueError("data must be a C-contiguous 2-D float32 array")
    image = _Image(data=data.ctypes.data, dtype=_TFLOAT, w=data.shape[1], h=data.shape[0])
    if mask is not None:
        if mask.shape != data.shape or mask.dtype not in (np.uint8, np.bool_) \
                or not mask.flags.c_contiguous:
            raise ValueError("mask must be a C-contiguous uint8 or bool array of the data's "
                             "shape")
        image.mask, image.mdtype = mask.ctypes.data, _TBYTE
    if err is not None:
        if err.shape != data.shape or err.dtype != np.float32 or not err.flags.c_contiguous:
            raise ValueError("err must be a C-contiguous float32 array of the data's shape")
        image.noise, image.ndtype, image.noise_type = err.ctypes.data, _TFLOAT, _NOISE_STDDEV
    return image


def extract(data: np.ndarray, thresh: float, *, mask: np.ndarray | None = None,
            minarea: int = 5, filter_kernel: np.ndarray | None = None,
            deblend_nthresh: int = 32, deblend_cont: float = 0.005, clean: bool = True,
            clean_param: float = 1.0) -> np.ndarray:
    """``sep.extract(data, thresh, mask=..., ...)`` without ``err``/``var`` (so ``thresh`` is
    absolute): the same structured array, and errors raised as sep raises them
    (``MemoryError``, or ``Exception`` with sep's message, e.g. "internal pixel buffer full").
    """
    kwargs = dict(mask=mask, minarea=minarea, filter_kernel=filter_kernel,
                  deblend_nthresh=deblend_nthresh, deblend_cont=deblend_cont, clean=clean,
                  clean_param=clean_param)
    lib = _library()
    if lib is None:
        return sep.extract(data, thresh, **kwargs)
    image = _image(data, mask)
    if filter_kernel is None:
        kernel, conv_h, conv_w = None, 0, 0
    else:
        kernel = np.ascontiguousarray(filter_kernel, np.float32)
        conv_h, conv_w = kernel.shape
    catalog = ctypes.POINTER(_Catalog)()
    status = lib.sep_extract(
        ctypes.byref(image), thresh, _THRESH_ABS, minarea,
        None if kernel is None else kernel.ctypes.data_as(_P_FLOAT), conv_w, conv_h,
        _FILTER_MATCHED, deblend_nthresh, deblend_cont, int(clean), clean_param,
        ctypes.byref(catalog))
    _check(lib, status)
    try:
        found = catalog.contents
        objects = np.empty(found.nobj, OBJECT_DTYPE)
        if found.nobj:
            for name, _, _ in _CATALOG_ARRAYS:
                objects[name] = np.ctypeslib.as_array(getattr(found, name), (found.nobj,))
    finally:
        lib.sep_catalog_free(catalog)
    return objects


# sep.winpos's lower bound on the window's sigma: SExtractor's half-light radius of 0.5 px.
_MIN_WINDOW_SIGMA = 2.0 / 2.35 * 0.5


def winpos(data: np.ndarray, x: np.ndarray, y: np.ndarray, sig: np.ndarray, *,
           mask: np.ndarray | None = None, subpix: int = 11):
    """``sep.winpos(data, x, y, sig, mask=mask, subpix=subpix)`` for 1-D ``x, y`` (``sig`` an
    array like them, or one value): windowed centroids ``(x, y, flag)``, the same arrays."""
    lib = _library()
    if lib is None:
        return sep.winpos(data, x, y, sig, mask=mask, subpix=subpix)
    image = _image(data, mask)
    x, y = np.ascontiguousarray(x, np.float64), np.ascontiguousarray(y, np.float64)
    sig = np.broadcast_to(np.maximum(np.asarray(sig, np.float64), _MIN_WINDOW_SIGMA), x.shape)
    x_out, y_out = np.empty(x.shape), np.empty(x.shape)
    flag, status = np.empty(x.shape, np.short), np.empty(x.shape, np.intc)
    _windowed_loop(lib.windowed, ctypes.addressof(image), x, y, sig, subpix, x_out, y_out,
                   flag, status)
    _check(lib, _first_failure(status))
    return x_out, y_out, flag


def sum_circle(data: np.ndarray, x: np.ndarray, y: np.ndarray, r: float, *,
               err: np.ndarray | None = None, mask: np.ndarray | None = None,
               gain: float | None = None, subpix: int = 5):
    """``sep.sum_circle(data, x, y, r, err=err, mask=mask, gain=gain, subpix=subpix)`` for one
    radius: ``(sum, sumerr, flag)``, the same arrays."""
    lib = _library()
    if lib is None:
        return sep.sum_circle(data, x, y, r, err=err, mask=mask, gain=gain, subpix=subpix)
    image = _image(data, mask, err)
    if gain is not None:
        image.gain = gain
    x, y = np.ascontiguousarray(x, np.float64), np.ascontiguousarray(y, np.float64)
    total, total_err = np.empty(x.shape), np.empty(x.shape)
    flag, status = np.empty(x.shape, np.short), np.empty(x.shape, np.intc)
    _sum_circle_loop(lib.sum_circle, ctypes.addressof(image), x, y, float(r), subpix, total,
                     total_err, flag, status)
    _check(lib, _first_failure(status))
    return total, total_err, flag


@numba.njit(cache=True, nogil=True)
def _windowed_loop(windowed, image, x, y, sig, subpix, x_out, y_out, flag,
                   status):  # pragma: no cover (compiled)
    niter = np.zeros(1, np.intc)
    for i in range(x.size):
        status[i] = windowed(image, x[i], y[i], sig[i], subpix, 0,
                             x_out.ctypes.data + i * x_out.itemsize,
                             y_out.ctypes.data + i * y_out.itemsize, niter.ctypes.data,
                             flag.ctypes.data + i * flag.itemsize)


@numba.njit(cache=True, nogil=True)
def _sum_circle_loop(sum_circle, image, x, y, r, subpix, total, total_err, flag,
                     status):  # pragma: no cover (compiled)
    area = np.zeros(1)
    for i in range(x.size):
        status[i] = sum_circle(image, x[i], y[i], r, 0, subpix, 0,
                               total.ctypes.data + i * total.itemsize,
                               total_err.ctypes.data + i * total_err.itemsize,
                               area.ctypes.data, flag.ctypes.data + i * flag.itemsize)


def _first_failure(status: np.ndarray) -> int:
    failed = np.flatnonzero(status)
    return int(status[failed[0]]) if failed.size else 0


def _check(lib, status: int) -> None:
    """Raise what sep raises for a non-zero status."""
    if status == 0:
        return
    if status == _MEMORY_ALLOC_ERROR:
        raise MemoryError
    message, detail = ctypes.create_string_buffer(61), ctypes.create_string_buffer(512)
    lib.sep_get_errmsg(status, message)
    lib.sep_get_errdetail(detail)
    text = message.value.decode()
    if detail.value:
        text += ": " + detail.value.decode()
    raise Exception(text)  # what sep raises, so callers handle both paths alike
