"""Export a trained model to ONNX and check that onnxruntime agrees with torch.

The exported graph takes ``triplets`` (B, 3, S, S) float32, *normalised* as ``model.json``
says, with a dynamic batch axis, and returns ``score`` (B,) = sigmoid(logit / T): the
calibrated probability that the triplet is real, temperature T included. Opset 17.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from astrid.errors import AstridError
from astrid.provenance import atomic_path

OPSET = 17
TOLERANCE = 1e-5


@dataclass(frozen=True)
class ExportReport:
    """Result of :func:`export_onnx`: the file and the largest |onnx − torch| score difference."""

    path: Path
    max_abs_diff: float
    n_checked: int


def probability_module(net, temperature: float):
    """Wrap a logit network as ``sigmoid(net(x) / temperature)`` (what the ONNX graph holds)."""
    import torch

    class _Probability(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net
            self.register_buffer("inv_temperature", torch.tensor(1.0 / float(temperature)))

        def forward(self, triplets):
            return torch.sigmoid(self.net(triplets) * self.inv_temperature)

    return _Probability().eval()


def write_model_dir(path, net, architecture: dict, *, stamp_size: int,
                    normalisation: str = "l2", temperature: float = 1.0, threshold: float = 0.5,
                    example: np.ndarray | None = None, **info) -> ExportReport:
    """Write a complete model directory: ``model.pt``, ``model.json`` and a verified
    ``model.onnx``.

    Parameters
    ----------
    path : the directory (created).
    net : the network (evaluation mode); ``architecture`` its record from
        :func:`astrid.ml.models.architecture_record`.
    stamp_size, normalisation, temperature, threshold : what scoring needs to know.
    example : optional normalised triplets to verify the ONNX export on.
    **info : further ``model.json`` fields (metrics, training record, provenance, ...).
    """
    from astrid.ml.models import save_weights
    from astrid.provenance import write_json_atomic

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_weights(path / "model.pt", net, architecture)
    write_json_atomic(path / "model.json", {
        "format": "astrid-model", "format_version": 1,
        "architecture": architecture["name"], "architecture_kwargs": architecture["kwargs"],
        "stamp_size": stamp_size, "channels": ["sci", "ref", "diff"],
        "normalisation": normalisation, "temperature": temperature, "threshold": threshold,
        **info})
    return export_onnx(path, example=example)


def export_onnx(model_dir, example: np.ndarray | None = None, *, seed: int = 0) -> ExportReport:
    """Write ``model_dir/model.onnx`` from ``model.pt`` + ``model.json`` and verify it.

    Parameters
    ----------
    model_dir : model directory (``model.pt``, ``model.json``).
    example : optional normalised triplets (N, 3, S, S) to verify on; random ones are added.
    seed : seed of the random verification triplets.

    Raises
    ------
    AstridError
        onnxruntime's scores differ from torch's by more than 1e-5.
    """
    import onnxruntime as ort
    import torch

    from astrid.ml.models import load_weights
    from astrid.ml.score import read_model_info

    model_dir = Path(model_dir)
    info = read_model_info(model_dir)
    net, arch = load_weights(model_dir / "model.pt")
    size = int(arch["stamp_size"])
    wrapped = probability_module(net, info.get("temperature", 1.0))
    rng = np.random.default_rng(seed)
    check = rng.normal(0, 1 / size, (16, 3, size, size)).astype(np.float32)
    if example is not None and len(example):
        check = np.concatenate([np.asarray(example, np.float32), check])
    dummy = torch.from_numpy(check[:2])
    out_path = model_dir / "model.onnx"
    with atomic_path(out_path) as tmp, torch.no_grad():
        torch.onnx.export(wrapped, (dummy,), str(tmp), input_names=["triplets"],
                          output_names=["score"], opset_version=OPSET, dynamo=False,
                          dynamic_axes={"triplets": {0: "batch"}, "score": {0: "batch"}})
        sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        onnx_scores = sess.run(["score"], {"triplets": check})[0]
        torch_scores = wrapped(torch.from_numpy(check)).numpy()
        diff = float(np.max(np.abs(onnx_scores - torch_scores)))
        if not diff <= TOLERANCE:
            raise AstridError(f"{out_path}: ONNX scores differ from torch by {diff:.2e} "
                              f"(> {TOLERANCE:g}); export not written")
    return ExportReport(out_path, diff, len(check))
