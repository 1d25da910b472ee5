"""sep's source extraction with the GIL released.

``sep.extract`` holds the GIL for its whole run (sep-developers/sep#172): 50-80 ms per
2048^2 frame during which the other image's background, in a second thread, cannot take a
single Python step. sep's C library has been thread-safe since 1.2 (its statics became
per-call contexts), so its ``sep_extract`` entry point is called here through ctypes, which
releases the GIL for the call; the catalogue is copied into the same structured array
``sep.extract`` returns.

The structs mirror ``sep.h`` of sep 1.4. :func:`available` is False for any other version, and
callers then use ``sep.extract`` itself (same catalogue, GIL held).
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np
import sep

_TBYTE, _TFLOAT = 11, 42  # sep.h element type codes
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


@functools.cache
def _library():
    """sep's C entry points, or None where the structs above may not match (not sep 1.4)."""
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
    return lib


def available() -> bool:
    """Whether :func:`extract` can run (sep 1.4, whose C structs this module mirrors)."""
    return _library() is not None


def extract(data: np.ndarray, thresh: float, *, mask: np.ndarray | None = None,
            minarea: int = 5, filter_kernel: np.ndarray | None = None,
            deblend_nthresh: int = 32, deblend_cont: float = 0.005, clean: bool = True,
            clean_param: float = 1.0) -> np.ndarray:
    """``sep.extract(data, thresh, mask=..., ...)`` without ``err``/``var`` (so ``thresh`` is
    absolute) and with the GIL released; the same structured array.

    ``data`` is float32 and ``mask`` uint8 (or bool), both C-contiguous 2-D arrays of one
    shape. Errors are raised as sep raises them: ``MemoryError``, or ``Exception`` with sep's
    message (e.g. "internal pixel buffer full").
    """
    lib = _library()
    if lib is None:
        raise RuntimeError(f"sep {sep.__version__}: the GIL-free extraction needs sep 1.4")
    data = np.ascontiguousarray(data, np.float32)
    if data.ndim != 2:
        raise ValueError("array must be 2-d")
    image = _Image(data=data.ctypes.data, dtype=_TFLOAT, w=data.shape[1], h=data.shape[0])
    if mask is not None:
        mask = np.ascontiguousarray(mask)
        if mask.shape != data.shape or mask.dtype not in (np.uint8, np.bool_):
            raise ValueError("mask must be a uint8 or bool array of the data's shape")
        image.mask, image.mdtype = mask.ctypes.data, _TBYTE
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
    if status != 0:
        _raise(lib, status)
    try:
        found = catalog.contents
        objects = np.empty(found.nobj, OBJECT_DTYPE)
        if found.nobj:
            for name, _, _ in _CATALOG_ARRAYS:
                objects[name] = np.ctypeslib.as_array(getattr(found, name), (found.nobj,))
    finally:
        lib.sep_catalog_free(catalog)
    return objects


def _raise(lib, status: int):
    if status == _MEMORY_ALLOC_ERROR:
        raise MemoryError
    message, detail = ctypes.create_string_buffer(61), ctypes.create_string_buffer(512)
    lib.sep_get_errmsg(status, message)
    lib.sep_get_errdetail(detail)
    text = message.value.decode()
    if detail.value:
        text += ": " + detail.value.decode()
    raise Exception(text)  # what sep raises, so callers handle both paths alike
