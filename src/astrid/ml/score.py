"""Score raw triplets with a trained model: onnxruntime by default, torch on request.

:func:`score_triplets` takes raw pixels (any stamp size, NaN allowed), adapts the stamp size to
the model's, normalises as the model was trained and returns the calibrated probability of
"real". Survey cutouts keep their sky; models trained with ``sky_subtract`` (the default)
have the median level of the science and reference stamps removed first (:func:`subtract_sky`).
The onnxruntime session is created once per model directory and kept (a service or a
pipeline calls this thousands of times); it runs with ``threads`` intra-op threads and a
preallocated batch buffer.

Stamp-size adaptation (:func:`adapt_stamp_size`): stamps larger than the model's are cropped
about their centre; smaller ones are padded with NaN (0 after normalisation, i.e. no data)
so that pixel ``S_in // 2`` lands on the model's centre pixel. Pixels are never resampled:
Rubin's 30×30 cutouts at 0.2″/px hold a PSF about as many pixels wide (FWHM ≈ 3–4 px) as
ZTF's 63×63 cutouts at 1″/px (≈ 2 px), so a network that learnt shapes in pixels sees
familiar shapes, only with less context around them. Rescaling Rubin to ZTF's pixel scale
would shrink the whole cutout to 6×6 pixels.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np

from astrid.errors import AstridError, InputFileError

_MODEL_FILES = ("model.json",)
_cache: dict[tuple, object] = {}
_cache_lock = threading.Lock()


PACKAGED_MODELS = ("default", "fast")  # astrid/models/<name>; "fast" is braai_fast


def default_model_dir(name: str = "default") -> Path:
    """A packaged model: ``default`` (the ensemble chosen on validation) or ``fast`` (braai_fast,
    for alert streams)."""
    return Path(__file__).resolve().parents[1] / "models" / name


def resolve_model_dir(model_dir=None) -> Path:
    """``model_dir``, or a packaged model by name (``default``, ``fast``) where no such
    directory exists, or the packaged default; checked to be a model directory."""
    if model_dir is None or (str(model_dir) in PACKAGED_MODELS and not Path(model_dir).exists()):
        model_dir = default_model_dir(str(model_dir or "default"))
        if not model_dir.exists():
            raise InputFileError(model_dir, "the packaged model is missing (reinstall AstrID "
                                            "or pass --model)")
    path = Path(model_dir)
    if not path.exists():
        raise InputFileError(path, "model directory not found")
    if not (path / "model.json").exists():
        raise InputFileError(path, "not a model directory (no model.json)")
    return path


def read_model_info(model_dir) -> dict:
    """The ``model.json`` of a model directory (architecture, stamp size, normalisation, ...)."""
    path = Path(model_dir) / "model.json"
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputFileError(Path(model_dir), "not a model directory (no model.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputFileError(path, "not valid JSON") from None
    for key in ("stamp_size", "normalisation"):
        if key not in info:
            raise InputFileError(path, f"model.json lacks {key!r}")
    return info


def adapt_stamp_size(stamps: np.ndarray, size: int) -> np.ndarray:
    """Crop or NaN-pad (N, C, S, S) stamps to (N, C, size, size) about pixel ``S // 2``.

    Returns the input unchanged when it already has the right size.
    """
    s = stamps.shape[-1]
    if stamps.shape[-2] != s:
        raise ValueError(f"stamps must be square, got {stamps.shape[-2]}x{s}")
    if s == size:
        return stamps
    c_in, c_out = s // 2, size // 2
    if s > size:
        lo = c_in - c_out
        return stamps[..., lo:lo + size, lo:lo + size]
    out = np.full((*stamps.shape[:-2], size, size), np.nan, np.float32)
    lo = c_out - c_in
    out[..., lo:lo + s, lo:lo + s] = stamps
    return out


def subtract_sky(stamps: np.ndarray, channels: tuple[int, ...] = (0, 1), step: int = 3) -> np.ndarray:
    """Subtract each stamp's median level from the science and reference channels, in place.

    AstrID's own triplets are cut from background-subtracted images; survey alert cutouts
    (ZTF, Rubin) are not: a ZTF science cutout sits on ~150 ADU of sky, which after L2
    normalisation swamps the source. Removing the median makes both look alike to the
    network. The difference channel is left alone (zero-mean by construction, and an offset
    could flip a faint residual's sign). The median is taken on every ``step``-th pixel:
    plenty for a sky level, and ~10x cheaper.

    Parameters
    ----------
    stamps : (N, C, S, S) float32, modified in place (NaN kept).
    """
    for c in channels:
        level = _row_nanmedian(stamps[:, c, ::step, ::step].reshape(len(stamps), -1))
        stamps[:, c] -= np.nan_to_num(level, nan=0.0)[:, None, None]  # all-NaN: no level
    return stamps


def _row_nanmedian(rows: np.ndarray) -> np.ndarray:
    """``np.nanmedian(rows, axis=1)`` in the rows' precision, several times faster on
    (N, a few hundred) arrays: one partition when nothing is NaN, else one sort (NaN last)."""
    missing = np.isnan(rows)
    if not missing.any():
        return np.median(rows, axis=1)
    ordered = np.sort(rows, axis=1)
    count = rows.shape[1] - missing.sum(axis=1)
    lo = np.take_along_axis(ordered, np.maximum(count - 1, 0)[:, None] // 2, axis=1)[:, 0]
    hi = np.take_along_axis(ordered, (count // 2)[:, None], axis=1)[:, 0]
    return np.where(count > 0, (lo + hi) * rows.dtype.type(0.5), np.nan)


def preprocess(stamps_raw: np.ndarray, info: dict) -> np.ndarray:
    """Raw triplets -> the network's input as ``model.json`` prescribes: stamp size adapted,
    sky subtracted (``sky_subtract``), normalised (``normalisation``). Returns a new array."""
    from astrid.ml.data import normalise

    # One copy, then everything in place: the caller's stamps stay untouched.
    x = np.array(adapt_stamp_size(np.asarray(stamps_raw, dtype=np.float32),
                                  int(info["stamp_size"])), copy=True)
    if info.get("sky_subtract", False):
        subtract_sky(x)
    return normalise(x, info["normalisation"], copy=False)


class _Scorer:
    """One loaded model (onnxruntime session or torch module) and its batch buffer."""

    def __init__(self, model_dir: Path, backend: str, threads: int, batch_size: int):
        self.info = read_model_info(model_dir)
        self.size = int(self.info["stamp_size"])
        self.batch_size = batch_size
        self.backend = backend
        self.lock = threading.Lock()  # the buffer is shared: one batch at a time
        if backend == "onnx":
            import onnxruntime as ort

            path = model_dir / "model.onnx"
            if not path.exists():
                raise InputFileError(path, "ONNX model missing (run `astrid export MODEL_DIR`)")
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            try:
                self.session = ort.InferenceSession(str(path), opts,
                                                    providers=["CPUExecutionProvider"])
            except Exception as exc:  # onnxruntime raises its own exception types
                raise InputFileError(path, f"unreadable ONNX model ({type(exc).__name__})") from None
            self.buffer = np.empty((batch_size, 3, self.size, self.size), np.float32)
        elif backend == "torch":
            import torch

            from astrid.ml.export import probability_module
            from astrid.ml.models import load_weights

            torch.set_num_threads(threads)
            net, _ = load_weights(model_dir / "model.pt")
            self.module = probability_module(net, self.info.get("temperature", 1.0))
        else:
            raise AstridError(f"unknown scoring backend {backend!r} (use 'onnx' or 'torch')")

    def __call__(self, stamps_raw) -> np.ndarray:
        n = len(stamps_raw)
        out = np.empty(n, np.float32)
        with self.lock:
            for lo in range(0, n, self.batch_size):
                chunk = preprocess(stamps_raw[lo:lo + self.batch_size], self.info)
                m = len(chunk)
                if self.backend == "onnx":
                    self.buffer[:m] = chunk
                    out[lo:lo + m] = self.session.run(["score"], {"triplets": self.buffer[:m]})[0]
                else:
                    import torch

                    with torch.inference_mode():
                        x = torch.from_numpy(chunk).contiguous(memory_format=torch.channels_last)
                        out[lo:lo + m] = self.module(x).numpy()
        return out


def get_scorer(model_dir=None, backend: str = "onnx", threads: int = 2,
               batch_size: int = 1024) -> _Scorer:
    """The cached scorer of a model directory (reloaded when its files change)."""
    path = resolve_model_dir(model_dir).resolve()
    stamp = tuple(os.stat(path / f).st_mtime_ns if (path / f).exists() else 0
                  for f in ("model.json", "model.onnx", "model.pt"))
    key = (str(path), backend, threads, batch_size)
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        scorer = _Scorer(path, backend, threads, batch_size)
        _cache[key] = (stamp, scorer)
        return scorer


def score_triplets(stamps_raw, model_dir=None, backend: str = "onnx", *, threads: int = 2,
                   batch_size: int = 1024) -> np.ndarray:
    """Probability that each triplet is real.

    Parameters
    ----------
    stamps_raw : (N, 3, S, S) raw pixels (sci, ref, diff), any square size, NaN allowed.
    model_dir : model directory; default the packaged model.
    backend : ``"onnx"`` (onnxruntime) or ``"torch"``.
    threads : CPU threads for inference.
    batch_size : triplets per inference call.

    Returns
    -------
    (N,) float32 in [0, 1], 1 = real (temperature-calibrated).
    """
    shape = np.shape(stamps_raw)
    if len(shape) != 4 or shape[1] != 3:
        raise AstridError(f"triplets must have shape (N, 3, S, S), got {shape}")
    if shape[0] == 0:
        return np.zeros(0, np.float32)
    return get_scorer(model_dir, backend, threads, batch_size)(stamps_raw)
