"""Train a real/bogus network on a triplet dataset (``astrid train``).

The recipe, in order:

1. **Grouped splits.** The dataset's saved ``split`` column is used when it covers the
   labelled rows; otherwise :func:`astrid.ml.data.grouped_split` assigns whole groups
   (``settings.group_by``: pair, field, SN or night) to train/val/test. Either way a group
   found in two splits is an error: triplets of one object must not leak.
2. **Augmentation after the split**, on training batches only: a random element of D4
   (rotations by 90° and reflections), a random sub-pixel shift of the whole triplet (half
   the batches), Gaussian noise scaled to each channel's spread.
3. **Class imbalance**: balanced sampling (each epoch draws reals and boguses equally) or a
   class-weighted loss (``settings.balance``).
4. **AdamW**, cosine learning-rate decay, **early stopping** on validation AUCPR.
5. **Checkpoint every epoch** (atomic), holding everything the next epoch needs (weights,
   optimiser, scheduler, history, best weights, patience). Every random draw of epoch *e*
   comes from generators seeded by ``(seed, e)``, so a run killed after epoch *k* and resumed
   ends in the same state as an uninterrupted run.
6. **Temperature scaling** fitted on the validation logits of the best epoch; the probability
   threshold at 1% validation FPR is stored as the operating point.

The model directory then holds ``model.pt``, ``model.json``, ``model.onnx`` (exported and
verified), ``history.json``/``history.csv``, ``split.parquet`` (triplet_id -> split used) and
``checkpoint.pt``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from astrid.config import TrainSettings
from astrid.errors import AstridError
from astrid.ml import metrics as M
from astrid.ml.data import LABEL_BOGUS, LABEL_REAL, SPLITS, grouped_split, load_dataset
from astrid.progress import new_bar
from astrid.provenance import (
    atomic_path,
    config_hash,
    provenance,
    write_json_atomic,
    write_table_atomic,
)

CHECKPOINT = "checkpoint.pt"
SPLIT_FILE = "split.parquet"


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` produced.

    Attributes
    ----------
    model_dir : the model directory.
    history : one row per epoch (train_loss, val_loss, val_aucpr, val_roc_auc,
        val_fnr_at_fpr1, lr, elapsed_s).
    best_epoch : epoch (1-based) whose weights were kept.
    temperature : fitted on validation.
    threshold : probability threshold at 1% validation FPR.
    finished : False if stopped early on request (``stop_after_epoch``); resume by calling again.
    """

    model_dir: Path
    history: pd.DataFrame
    best_epoch: int
    temperature: float
    threshold: float
    finished: bool


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------

def split_rows(meta: pd.DataFrame, settings: TrainSettings,
               split: pd.Series | None = None) -> dict[str, np.ndarray]:
    """Row indices of the labelled triplets in each split, checked for group leaks.

    Parameters
    ----------
    meta : dataset metadata.
    settings : ``group_by``, fractions and seed for a new grouped split.
    split : optional split (aligned with ``meta``) overriding the dataset's own.

    Raises
    ------
    AstridError
        No labelled triplets, a split without both classes in train, or one group in two splits.
    """
    labelled = meta["label"].isin((LABEL_REAL, LABEL_BOGUS)).to_numpy()
    if not labelled.any():
        raise AstridError("the dataset has no labelled triplets (label 0 or 1) to train on")
    if split is None:
        saved = meta["split"].astype(str)
        if saved[labelled].isin(SPLITS).all():
            split = saved
        else:
            fractions = (1 - settings.val_fraction - settings.test_fraction,
                         settings.val_fraction, settings.test_fraction)
            if fractions[0] <= 0:
                raise AstridError("train.val_fraction + train.test_fraction must be below 1")
            sub = meta.loc[labelled]
            split = pd.Series("", index=meta.index, dtype=object)
            split[labelled] = grouped_split(sub, settings.group_by, fractions, seed=settings.seed)
    split = pd.Series(np.asarray(split, dtype=object), index=meta.index).astype(str)
    rows = {name: np.flatnonzero(labelled & (split == name).to_numpy()) for name in SPLITS}
    check_no_group_leak(meta, rows, settings.group_by)
    y_train = meta["label"].to_numpy()[rows["train"]]
    if len(rows["val"]) == 0 or len(np.unique(y_train)) < 2:
        raise AstridError("training needs real and bogus triplets in 'train' and a non-empty 'val' split")
    return rows


def check_no_group_leak(meta: pd.DataFrame, rows: dict[str, np.ndarray], group_col: str) -> None:
    """Raise AstridError if a non-empty value of ``group_col`` appears in two splits."""
    if group_col not in meta:
        raise AstridError(f"cannot group by {group_col!r}: no such metadata column")
    groups = meta[group_col].astype(str).to_numpy()
    owner: dict[str, str] = {}
    for name, idx in rows.items():
        for g in np.unique(groups[idx]):
            if g in ("", "nan"):
                continue
            if owner.setdefault(g, name) != name:
                raise AstridError(f"{group_col} {g!r} is in both the {owner[g]!r} and {name!r} "
                                  "splits: triplets of one object would leak between them")


# --------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------

def augment(x, gen, shift_px: float, noise: float):
    """Random D4 transform, sub-pixel shift and noise for a training batch.

    Parameters
    ----------
    x : torch tensor (B, C, S, S), normalised triplets (not modified).
    gen : torch.Generator, the only source of randomness (for exact resumption).
    shift_px : largest shift in pixels, applied to half of the batches.
    noise : Gaussian noise std in units of each channel's std.
    """
    import torch

    from astrid.ml.models import d4_views

    b = x.shape[0]
    which = torch.randint(0, 8, (b,), generator=gen)
    out = torch.empty_like(x)
    for t in range(8):
        sel = which == t
        if sel.any():
            out[sel] = d4_views(x[sel])[t]
    if shift_px > 0 and torch.rand((), generator=gen) < 0.5:
        import torch.nn.functional as F

        size = x.shape[-1]
        shift = (torch.rand((b, 2), generator=gen) * 2 - 1) * shift_px
        theta = torch.zeros((b, 2, 3))
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0
        theta[:, :, 2] = shift * 2.0 / size  # affine_grid works in [-1, 1] units
        grid = F.affine_grid(theta, list(out.shape), align_corners=False)
        out = F.grid_sample(out, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if noise > 0:
        std = out.flatten(2).std(dim=2).clamp_min(1e-8)[:, :, None, None]
        out = out + noise * std * torch.randn(out.shape, generator=gen)
    return out


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

def predict_logits(model, x, batch_size: int = 1024) -> np.ndarray:
    """Logits (N,) of a torch tensor (N, C, S, S) in evaluation mode."""
    import torch

    model.eval()
    out = []
    with torch.inference_mode():
        for lo in range(0, len(x), batch_size):
            xb = x[lo:lo + batch_size].contiguous(memory_format=torch.channels_last)
            out.append(model(xb).float().cpu())
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


def _load_split_tensor(stamps, idx: np.ndarray, info: dict, chunk: int = 4096):
    """Network inputs of the rows ``idx``, preprocessed exactly as scoring will do it."""
    import torch

    from astrid.ml.score import preprocess

    arr = np.empty((len(idx), *stamps.shape[1:]), np.float32)
    for lo in range(0, len(idx), chunk):
        arr[lo:lo + chunk] = preprocess(stamps[idx[lo:lo + chunk]], info)
    return torch.from_numpy(arr)


def _epoch_generator(seed: int, epoch: int):
    import torch

    return torch.Generator().manual_seed(int(seed) * 100_003 + int(epoch))


def train(dataset_path, out_dir, settings: TrainSettings | None = None, *,
          split: pd.Series | None = None, stop_after_epoch: int | None = None,
          restart: bool = False) -> TrainResult:
    """Train a real/bogus network and write a complete model directory.

    Parameters
    ----------
    dataset_path : triplet dataset directory (:mod:`astrid.ml.data`).
    out_dir : model directory to write (created); a checkpoint there is resumed.
    settings : training settings (defaults: :class:`astrid.config.TrainSettings`).
    split : optional split column overriding the dataset's (cross-regime validation).
    stop_after_epoch : stop cleanly after this epoch, leaving the checkpoint (as a kill between
        epochs would); calling again resumes.
    restart : ignore an existing checkpoint.

    Returns
    -------
    TrainResult

    Raises
    ------
    AstridError
        Unusable dataset or split, or a checkpoint from different settings/data in ``out_dir``.
    """
    import torch

    settings = settings or TrainSettings()
    dataset_path, out_dir = Path(dataset_path), Path(out_dir)
    torch.set_num_threads(settings.threads)
    device = torch.device(settings.device)

    stamps, meta = load_dataset(dataset_path)
    rows = split_rows(meta, settings, split)
    labels = meta["label"].to_numpy().astype(np.float32)
    size = int(stamps.shape[-1])
    prep = {"stamp_size": size, "normalisation": settings.normalisation,
            "sky_subtract": settings.sky_subtract}
    x_train = _load_split_tensor(stamps, rows["train"], prep)
    x_val = _load_split_tensor(stamps, rows["val"], prep)
    y_train = torch.from_numpy(labels[rows["train"]])
    y_val = labels[rows["val"]].astype(np.int64)

    from astrid.ml.export import write_model_dir
    from astrid.ml.models import architecture_record, build_model

    kwargs = {"widths": [settings.width, 2 * settings.width, 4 * settings.width]} \
        if settings.model == "astrid" else {}
    arch = architecture_record(settings.model, size, **kwargs)
    torch.manual_seed(settings.seed)
    model = build_model(settings.model, size, **kwargs).to(device, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=settings.epochs)

    n_pos = float(y_train.sum())
    n_neg = float(len(y_train) - n_pos)
    pos_weight = (torch.tensor(n_neg / max(n_pos, 1.0), device=device)
                  if settings.balance == "weight" else None)
    per_epoch = settings.max_train_per_epoch or len(y_train)
    sample_p = None
    if settings.balance == "sample":
        w = np.where(labels[rows["train"]] == 1, 0.5 / max(n_pos, 1), 0.5 / max(n_neg, 1))
        sample_p = torch.from_numpy(w)

    # What a checkpoint must agree with to be resumed.
    fingerprint = {"config_hash": config_hash(settings), "dataset": str(dataset_path.resolve()),
                   "n_train": int(len(rows["train"])), "n_val": int(len(rows["val"])),
                   "train_rows_sum": int(rows["train"].sum())}
    state = {"epoch": 0, "history": [], "best_score": -math.inf, "best_epoch": 0,
             "best_state": None, "bad_epochs": 0}
    ckpt_path = out_dir / CHECKPOINT
    if ckpt_path.exists() and not restart:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ckpt.get("fingerprint") != fingerprint:
            raise AstridError(f"{ckpt_path}: checkpoint of a different dataset or settings "
                              "(use another output directory, or restart)")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        state = ckpt["state"]
    out_dir.mkdir(parents=True, exist_ok=True)

    finished = True
    with _TrainProgress(settings.epochs, per_epoch, settings.batch_size) as bar:
        bar.start_at(state["epoch"], state["history"])
        while state["epoch"] < settings.epochs and state["bad_epochs"] < settings.patience:
            epoch = state["epoch"] + 1
            t0 = time.perf_counter()
            gen = _epoch_generator(settings.seed, epoch)
            torch.manual_seed(settings.seed * 7919 + epoch)  # dropout draws
            if sample_p is not None:
                order = torch.multinomial(sample_p, per_epoch, replacement=True, generator=gen)
            else:
                order = torch.randperm(len(y_train), generator=gen)[:per_epoch]
            model.train()
            total, count = 0.0, 0
            for lo in range(0, len(order), settings.batch_size):
                idx = order[lo:lo + settings.batch_size]
                if len(idx) < 2:  # batch norm needs two examples
                    continue
                xb = augment(x_train[idx], gen, settings.augment_shift_px, settings.augment_noise)
                xb = xb.to(device).contiguous(memory_format=torch.channels_last)
                yb = y_train[idx].to(device)
                opt.zero_grad(set_to_none=True)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(
                    model(xb), yb, pos_weight=pos_weight)
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
                count += len(idx)
                bar.step(len(idx), total / count)
            sched.step()

            val_logits = predict_logits(model, x_val.to(device))
            val_prob = M.sigmoid(val_logits)
            row = {"epoch": epoch, "train_loss": total / max(count, 1),
                   "val_loss": M.log_loss(y_val, val_prob), **_val_metrics(y_val, val_prob),
                   "lr": opt.param_groups[0]["lr"], "elapsed_s": time.perf_counter() - t0}
            state["history"].append(row)
            if row["val_aucpr"] > state["best_score"]:
                state.update(best_score=row["val_aucpr"], best_epoch=epoch, bad_epochs=0,
                             best_state={k: v.detach().clone() for k, v in model.state_dict().items()})
            else:
                state["bad_epochs"] += 1
            state["epoch"] = epoch
            with atomic_path(ckpt_path) as tmp:
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                            "scheduler": sched.state_dict(), "state": state,
                            "fingerprint": fingerprint}, tmp)
            _write_history(out_dir, state["history"])
            bar.epoch_done(row)
            if stop_after_epoch is not None and epoch >= stop_after_epoch \
                    and epoch < settings.epochs and state["bad_epochs"] < settings.patience:
                finished = False
                break

    history = pd.DataFrame(state["history"])
    if not finished:
        return TrainResult(out_dir, history, state["best_epoch"], float("nan"), float("nan"), False)

    model.load_state_dict(state["best_state"])
    model = model.cpu().eval()
    val_logits = predict_logits(model, x_val)
    temperature, threshold = M.calibrate(val_logits, y_val)
    val_prob = M.sigmoid(val_logits / temperature)
    # the split used, so that evaluation finds the same held-out rows
    used = pd.Series("", index=meta.index, dtype=object)
    for name, idx in rows.items():
        used.iloc[idx] = name
    write_table_atomic(out_dir / SPLIT_FILE, pd.DataFrame(
        {"triplet_id": meta["triplet_id"].astype(str), "split": used.astype(str)}))
    write_model_dir(
        out_dir, model, arch, stamp_size=size, normalisation=settings.normalisation,
        temperature=temperature, threshold=float(threshold), example=x_val[:64].numpy(),
        sky_subtract=settings.sky_subtract,
        threshold_rule="probability at 1% FPR on validation",
        best_epoch=state["best_epoch"], epochs_run=state["epoch"],
        metrics={"val": M.classification_metrics(y_val, val_prob, threshold=threshold,
                                                 groups=meta[settings.group_by].to_numpy()[rows["val"]],
                                                 n_boot=200)},
        training={"dataset": str(dataset_path), "group_by": settings.group_by,
                  "split_counts": {k: int(len(v)) for k, v in rows.items()},
                  "n_train_real": int(n_pos), "n_train_bogus": int(n_neg),
                  "settings": settings.model_dump(mode="json")},
        provenance=provenance(settings, [dataset_path], seed=settings.seed))
    return TrainResult(out_dir, history, state["best_epoch"], temperature, float(threshold), True)


def _val_metrics(y: np.ndarray, prob: np.ndarray) -> dict:
    if len(np.unique(y)) < 2:
        return {"val_aucpr": float("nan"), "val_roc_auc": float("nan"), "val_fnr_at_fpr1": float("nan")}
    return {"val_aucpr": M.average_precision(y, prob), "val_roc_auc": M.roc_auc(y, prob),
            "val_fnr_at_fpr1": M.fnr_at_fpr(y, prob, 0.01)[0]}


def _write_history(out_dir: Path, history: list[dict]) -> None:
    write_json_atomic(out_dir / "history.json", history)
    write_table_atomic(out_dir / "history.csv", pd.DataFrame(history))


class _TrainProgress:
    """Rich progress bar over the training steps, showing live loss and validation AUCPR."""

    def __init__(self, epochs: int, per_epoch: int, batch_size: int):
        self.total = epochs * per_epoch
        self.per_epoch = per_epoch
        self.bar = None
        self.status = ""

    def __enter__(self):
        self.bar = new_bar(with_status=True)
        if self.bar is not None:
            self.bar.__enter__()
            self.task = self.bar.add_task("training", total=self.total, status="")
        return self

    def start_at(self, epoch: int, history: list[dict]) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=epoch * self.per_epoch)
            if history:
                self.epoch_done(history[-1])

    def step(self, n: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=n, status=f"loss {loss:.4f} {self.status}")

    def epoch_done(self, row: dict) -> None:
        self.status = f"| epoch {row['epoch']} val AUCPR {row['val_aucpr']:.4f}"
        if self.bar is not None:
            self.bar.update(self.task, completed=row["epoch"] * self.per_epoch,
                            status=f"loss {row['train_loss']:.4f} {self.status}")

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

