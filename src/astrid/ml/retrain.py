"""Retraining from reviewers' labels, and the versioned models root the service follows.

A models root is a directory::

    versions/v0001/         model directories (model.onnx, model.pt, model.json, retrain.json)
    versions/v0002/
    current                 the name of the version in use ("v0002"), replaced atomically
    versions.json           every version: parent, created, metrics, promoted or not

:func:`retrain` fine-tunes a base model on the labels of a label store plus the original
training set (replayed so that the model does not forget it), evaluates the base and the new
model on the same held-out labels, and promotes the new one only when it is better. The
service (``astrid serve --model ROOT``) notices the new ``current`` and switches without a
restart.

Which labels are held out is decided by a hash of the candidate id, so the held-out set is the
same across retraining rounds (a later round never trains on an earlier round's test labels)
and grows as reviewers label more.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from astrid.config import TrainSettings
from astrid.errors import AstridError, InputFileError
from astrid.provenance import file_sha256, provenance, write_json_atomic, write_text_atomic

CURRENT = "current"
VERSIONS = "versions"
_MODEL_FILES = ("model.onnx", "model.json")


# --------------------------------------------------------------------------------------------
# The models root
# --------------------------------------------------------------------------------------------

def is_models_root(path: str | Path) -> bool:
    """Whether ``path`` is a models root (has ``versions/`` or ``current``)."""
    path = Path(path)
    return (path / VERSIONS).is_dir() or (path / CURRENT).is_file()


def is_model_dir(path: str | Path) -> bool:
    path = Path(path)
    return all((path / name).is_file() for name in _MODEL_FILES)


def resolve_model_dir(path: str | Path) -> Path:
    """The model directory ``path`` stands for: itself, or a root's current version.

    Raises
    ------
    InputFileError
        ``path`` is neither a model directory nor a models root with a valid pointer.
    """
    path = Path(path)
    if is_models_root(path):
        pointer = path / CURRENT
        if not pointer.is_file():
            raise InputFileError(path, "models root has no 'current' pointer")
        version = pointer.read_text().strip()
        target = path / VERSIONS / version
        if not is_model_dir(target):
            raise InputFileError(pointer, f"points to {version!r}, which is not a model directory")
        return target
    if is_model_dir(path):
        return path
    if not path.exists():
        raise InputFileError(path, "model not found")
    raise InputFileError(path, "not a model directory (model.onnx + model.json) or models root")


def model_version(model_dir: str | Path) -> str:
    """A name that changes whenever the model does: ``<dir name>@<sha256 of model.onnx>[:8]``."""
    model_dir = Path(model_dir)
    return f"{model_dir.name}@{file_sha256(model_dir / 'model.onnx')[:8]}"


def pointer_path(root: str | Path) -> Path:
    return Path(root) / CURRENT


def list_versions(root: str | Path) -> list[dict]:
    """The records of ``versions.json`` (oldest first); empty for a new root."""
    path = Path(root) / "versions.json"
    return json.loads(path.read_text()) if path.is_file() else []


def add_version(root: str | Path, model_dir: str | Path, *, promote: bool,
                record: dict | None = None) -> str:
    """Copy a model into the root as the next version; point ``current`` at it if ``promote``.

    The copy is made in a temporary directory and renamed, and the pointer is replaced
    atomically, so a reader (the running service) sees the old model or the new one, never
    a half-copied one.

    Returns
    -------
    The new version's name (``v0001``, ``v0002``, ...).
    """
    root = Path(root)
    versions_dir = root / VERSIONS
    versions_dir.mkdir(parents=True, exist_ok=True)
    taken = [int(p.name[1:]) for p in versions_dir.glob("v[0-9]*") if p.name[1:].isdigit()]
    name = f"v{max(taken, default=0) + 1:04d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=versions_dir))
    try:
        shutil.copytree(model_dir, tmp, dirs_exist_ok=True)
        tmp.rename(versions_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    entry = {"version": name, "source": str(model_dir), "promoted": promote,
             "created_utc": datetime.now(UTC).isoformat(timespec="seconds"), **(record or {})}
    write_json_atomic(root / "versions.json", [*list_versions(root), entry])
    if promote:
        write_text_atomic(pointer_path(root), name + "\n")
    return name


def holdout_mask(ids, fraction: float) -> list[bool]:
    """True for the ids held out for evaluation: a stable hash, the same in every round."""
    cut = int(fraction * 2**32)
    return [int.from_bytes(hashlib.sha256(str(i).encode()).digest()[:4], "big") < cut
            for i in ids]


@dataclass(frozen=True)
class RetrainResult:
    """What a retraining round did.

    ``base_metrics`` and ``new_metrics`` are measured on the same held-out labels;
    ``metric`` names the one that decides promotion.
    """

    new_model_dir: Path
    base_metrics: dict
    new_metrics: dict
    metric: str
    n_train_labels: int
    n_holdout_labels: int
    n_replay: int
    promoted: bool
    version: str | None
    reason: str


def retrain(labels, base: str | Path, out_dir: str | Path, *,
            train_data: list[str | Path] | None = None, root: str | Path | None = None,
            settings: TrainSettings | None = None, epochs: int | None = None,
            holdout_fraction: float = 0.25, replay_max: int = 4096, min_gain: float = 0.0,
            lr_factor: float = 0.3) -> RetrainResult:
    """Fine-tune ``base`` on the store's labels, compare it with ``base``, promote if better.

    Parameters
    ----------
    labels : a label store URL/path, or an open :class:`~astrid.serve.store.LabelStore`.
    base : the model to start from: a model directory or a models root (its current model).
    out_dir : where the new model directory is written (always, promoted or not).
    train_data : the original training dataset(s) to replay (their ``train`` split), so the
        model keeps what it knew; default the dataset recorded in the base's ``model.json``
        when it still exists.
    root : models root to record the new version in (and promote to); default the base's
        root when ``base`` is, or lives in, one. A root without versions is started with the
        base as ``v0001``.
    settings : training settings (batch size, threads, seed, augmentation, lr).
    epochs : fine-tuning epochs (default ``min(settings.epochs, 5)``).
    holdout_fraction : share of labelled candidates held out (chosen by a hash of the id).
    replay_max : most original triplets replayed.
    min_gain : the held-out AUCPR must beat the base's by more than this to promote.
    lr_factor : fine-tuning learning rate = ``settings.lr * lr_factor``.

    Raises
    ------
    AstridError
        No labels, held-out labels without both classes, unusable base model.
    """
    import numpy as np

    from astrid.ml import metrics as M
    from astrid.ml.score import score_triplets

    settings = settings or TrainSettings()
    base_dir = resolve_model_dir(base)
    root = Path(root) if root is not None else _root_of(Path(base), base_dir)
    out_dir = Path(out_dir)
    from astrid.serve.store import open_store, redact_url

    store = labels if hasattr(labels, "labelled") else open_store(str(labels))
    try:
        stamps, table = store.labelled()
        labels_source = redact_url(store.url)
    finally:
        if store is not labels:
            store.close()
    _check_labels(table, holdout_fraction)
    y = table["label"].to_numpy().astype(np.int64)
    held = np.asarray(holdout_mask(table["id"], holdout_fraction))
    if len(np.unique(y[held])) < 2:
        raise AstridError(f"{int(held.sum())} held-out labels without both real and bogus: "
                          "label more candidates before retraining")
    if len(np.unique(y[~held])) < 2:
        raise AstridError("the training labels need both real and bogus candidates")

    base_info = json.loads((base_dir / "model.json").read_text())
    replay_x, replay_y, cal_x, cal_y, replay_sources = _replay(base_info, train_data,
                                                               replay_max, settings.seed)
    new_info = _fine_tune(base_dir, base_info, stamps[~held], y[~held], replay_x, replay_y,
                          cal_x, cal_y, out_dir, settings,
                          epochs or min(settings.epochs, 5), settings.lr * lr_factor)

    # The comparison runs through the served path (ONNX, same normalisation) on the same rows.
    x_hold, y_hold = stamps[held], y[held]
    base_prob = score_triplets(x_hold, model_dir=base_dir, threads=settings.threads)
    new_prob = score_triplets(x_hold, model_dir=out_dir, threads=settings.threads)
    base_metrics = M.classification_metrics(y_hold, base_prob, n_boot=200, seed=settings.seed)
    new_metrics = M.classification_metrics(y_hold, new_prob, n_boot=200, seed=settings.seed)
    base_ap, new_ap = base_metrics["aucpr"]["value"], new_metrics["aucpr"]["value"]
    better = new_ap > base_ap + min_gain
    if not better:
        reason = f"held-out AUCPR {new_ap:.4f} does not beat the base's {base_ap:.4f}"
    elif root is None:
        reason = (f"held-out AUCPR {base_ap:.4f} -> {new_ap:.4f}, but no models root to "
                  "promote into (give --root)")
    else:
        reason = f"held-out AUCPR {base_ap:.4f} -> {new_ap:.4f}"
    summary = {"base": str(base_dir), "base_version": model_version(base_dir),
               "n_train_labels": int((~held).sum()), "n_holdout_labels": int(held.sum()),
               "n_replay": int(len(replay_y)), "replay_sources": replay_sources,
               "holdout_fraction": holdout_fraction, "metric": "aucpr",
               "base_metrics": base_metrics, "new_metrics": new_metrics,
               "promoted": bool(better and root is not None), "reason": reason,
               "labels": labels_source,
               "provenance": provenance(settings, [str(base_dir), labels_source, *replay_sources],
                                        seed=settings.seed)}
    new_info["retrain"] = summary
    new_info["provenance"] = summary["provenance"]
    new_info["metrics"] = {**new_info.get("metrics", {}), "holdout_labels": new_metrics}
    write_json_atomic(out_dir / "model.json", new_info)
    write_json_atomic(out_dir / "retrain.json", summary)

    version = None
    if root is not None:
        if not list_versions(root) and not (root / CURRENT).exists():
            add_version(root, base_dir, promote=True, record={"note": "base of the first retrain"})
        version = add_version(root, out_dir, promote=summary["promoted"],
                              record={"parent": summary["base_version"],
                                      "aucpr_holdout": new_ap, "aucpr_holdout_base": base_ap})
    return RetrainResult(out_dir, base_metrics, new_metrics, "aucpr", summary["n_train_labels"],
                         summary["n_holdout_labels"], summary["n_replay"], summary["promoted"],
                         version, reason)


def _root_of(base: Path, base_dir: Path) -> Path | None:
    if is_models_root(base):
        return base
    if base_dir.parent.name == VERSIONS and is_models_root(base_dir.parent.parent):
        return base_dir.parent.parent
    return None


def _replay(base_info: dict, train_data, replay_max: int, seed: int):
    """Up to ``replay_max`` labelled rows of the original training split (and up to a quarter
    as many of its validation split, for calibration)."""
    import numpy as np

    from astrid.ml.data import load_dataset

    sources = [Path(p) for p in train_data] if train_data else []
    if not sources:
        recorded = base_info.get("training", {}).get("dataset")
        if recorded and (Path(recorded) / "dataset.json").is_file():
            sources = [Path(recorded)]
    rng = np.random.default_rng(seed)
    parts = {"train": ([], []), "val": ([], [])}
    for src in sources:
        stamps, meta = load_dataset(src)
        labelled = meta["label"].isin((0, 1)).to_numpy()
        split = meta["split"].astype(str).to_numpy()
        for name in parts:
            rows = np.flatnonzero(labelled & (split == name))
            if name == "train" and not len(rows):  # no saved split: everything labelled
                rows = np.flatnonzero(labelled)
            parts[name][0].append((stamps, rows))
            parts[name][1].append(meta["label"].to_numpy()[rows])

    def take(name: str, limit: int):
        chosen_x, chosen_y = [], []
        total = sum(len(r) for _, r in parts[name][0])
        for (stamps, rows), labels in zip(*parts[name], strict=True):
            k = int(round(limit * len(rows) / total)) if total > limit else len(rows)
            pick = np.sort(rng.choice(len(rows), size=min(k, len(rows)), replace=False))
            if len(pick):
                chosen_x.append(np.asarray(stamps[rows[pick]], dtype=np.float32))
                chosen_y.append(labels[pick])
        if not chosen_x:
            return None, np.zeros(0, np.int64)
        return np.concatenate(chosen_x), np.concatenate(chosen_y).astype(np.int64)

    x, y = take("train", replay_max)
    cx, cy = take("val", max(replay_max // 4, 1))
    return x, y, cx, cy, [str(s) for s in sources]


def _fine_tune(base_dir: Path, base_info: dict, x_lab, y_lab, x_rep, y_rep, x_cal, y_cal,
               out_dir: Path, settings: TrainSettings, epochs: int, lr: float) -> dict:
    """Fine-tune the base network; write ``model.pt``, ``model.json``, ``model.onnx``."""
    import numpy as np
    import torch

    from astrid.ml import metrics as M
    from astrid.ml.data import normalise
    from astrid.ml.export import export_onnx
    from astrid.ml.models import load_weights, save_weights
    from astrid.ml.score import adapt_stamp_size
    from astrid.ml.train import augment, predict_logits

    torch.set_num_threads(settings.threads)
    net, arch = load_weights(base_dir / "model.pt")
    size, method = int(arch["stamp_size"]), base_info["normalisation"]

    def prep(x):
        return torch.from_numpy(normalise(adapt_stamp_size(np.asarray(x, np.float32), size), method))

    xs, ys, group = [prep(x_lab)], [y_lab], [np.zeros(len(y_lab), int)]
    if x_rep is not None and len(y_rep):
        xs.append(prep(x_rep))
        ys.append(y_rep)
        group.append(np.ones(len(y_rep), int))
    x = torch.cat(xs)
    y_np, g = np.concatenate(ys).astype(np.float32), np.concatenate(group)
    # Each (source, class) cell gets an equal share of every epoch: the new labels weigh as
    # much as the whole replayed set, and reals as much as boguses.
    cells = {(gi, ci): np.flatnonzero((g == gi) & (y_np == ci)) for gi in (0, 1) for ci in (0, 1)}
    cells = {k: v for k, v in cells.items() if len(v)}
    weights = np.zeros(len(y_np))
    for rows in cells.values():
        weights[rows] = 1.0 / (len(cells) * len(rows))
    y = torch.from_numpy(y_np)
    per_epoch = max(len(y_np), 2 * settings.batch_size)

    torch.manual_seed(settings.seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=settings.weight_decay)
    sample_p = torch.from_numpy(weights)
    for epoch in range(1, epochs + 1):
        gen = torch.Generator().manual_seed(settings.seed * 100_003 + 7 * epoch)
        order = torch.multinomial(sample_p, per_epoch, replacement=True, generator=gen)
        net.train()
        for lo in range(0, per_epoch, settings.batch_size):
            idx = order[lo:lo + settings.batch_size]
            if len(idx) < 2:  # batch norm needs two examples
                continue
            xb = augment(x[idx], gen, settings.augment_shift_px, settings.augment_noise)
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                net(xb.contiguous(memory_format=torch.channels_last)), y[idx])
            loss.backward()
            opt.step()
    net.eval()

    info = dict(base_info)
    if x_cal is not None and len(np.unique(y_cal)) == 2:
        logits = predict_logits(net, prep(x_cal))
        # As training calibrates: a threshold no real passes is clamped to 1.0, never +inf
        # (which model.json could not hold as JSON).
        temperature, threshold = M.calibrate(logits, y_cal)
        info["temperature"], info["threshold"] = float(temperature), float(threshold)
        info["calibration"] = "temperature and threshold refit on the original validation split"
    else:
        info["calibration"] = "temperature and threshold kept from the base model"
    out_dir.mkdir(parents=True, exist_ok=True)
    save_weights(out_dir / "model.pt", net, arch)
    info["fine_tuned"] = {"from": model_version(base_dir), "epochs": epochs, "lr": lr,
                          "n_labels": int(len(y_lab)),
                          "n_replay": 0 if x_rep is None else int(len(y_rep))}
    write_json_atomic(out_dir / "model.json", info)
    export_onnx(out_dir, example=prep(x_lab[:32]).numpy())
    return info


def _check_labels(table, holdout_fraction: float) -> None:
    if not 0 < holdout_fraction < 1:
        raise AstridError(f"holdout fraction must be in (0, 1), got {holdout_fraction}")
    if len(table) == 0:
        raise AstridError("the label store holds no labels yet: nothing to retrain on")
