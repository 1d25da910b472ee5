"""Real/bogus networks on (sci, ref, diff) triplets: the braai baseline, AstrID's own model and
an ensemble of trained networks.

All take normalised triplets of shape (B, 3, S, S), any odd S >= 21, and return one **logit**
per triplet, shape (B,); the probability of "real" is ``sigmoid(logit / temperature)``.

``braai``
    The VGG6 of Duev et al. (2019, MNRAS 489, 3582), as published: two 3×3 convolutions of 16
    filters, 2×2 max-pool, dropout 0.25, two 3×3 convolutions of 32 filters, 4×4 max-pool,
    dropout 0.25, dense 256, dropout 0.5, one output. Convolutions are unpadded ("valid") as in
    the original; the flattened size is computed from the stamp size (1152 for 63×63).
``braai_fast``
    braai's layers and widths (3×3 convolutions of 16, 16, 32, 32 filters, 2×2 and 4×4
    max-pools, the same dropouts, dense 256) with two changes for speed: the first
    convolution has stride 2 and all convolutions are padded ("same"), and each is followed by
    batch norm (folded into the convolution when exported to ONNX, so it costs nothing at
    inference). It does 12.9 MFLOP per 63×63 triplet against braai's 38.1, which is what lets
    it pass 5,000 triplets/s on two CPU cores, where braai's arithmetic alone exceeds what the
    cores can do. Batch norm is what makes it train with our loop: without it, the stride-2
    stem on L2-normalised stamps (values ~1/63) stalled at chance.
``astrid``
    A small residual CNN with batch norm and global average pooling. In evaluation mode its
    output is the mean logit over the 8 rotations and reflections of the stamp (the dihedral
    group D4), so the score does not depend on the orientation of the detector, the trail or
    the bleed. In training mode it runs one view (augmentation supplies random orientations),
    which keeps training 8× cheaper. The backbone downsamples early (stride 2 in the stem) so
    that 8 views cost about as much as three braai passes.
``ensemble``
    The mean logit of several member networks (each built as above, e.g. one ``astrid`` and one
    ``braai``), which see the same normalised input. Members keep their own behaviour (astrid
    still averages over D4 in evaluation mode) and sit in an ``nn.ModuleList``, so the state
    dict is namespaced ``members.0.*``, ``members.1.*``. :func:`load_ensemble` assembles one
    from trained model directories; its temperature and threshold are then fitted anew on
    validation (members' own temperatures are not used).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

MODEL_NAMES = ("braai", "braai_fast", "astrid", "ensemble")
MIN_STAMP_PX = 21


class Braai(nn.Module):
    """The braai VGG6 real/bogus network (Duev et al. 2019), returning logits.

    Parameters
    ----------
    stamp_size : odd stamp side in pixels (63 in braai); fixes the dense layer's input size.
    in_channels : number of channels (3: sci, ref, diff).
    """

    def __init__(self, stamp_size: int = 63, in_channels: int = 3):
        super().__init__()
        self.stamp_size = stamp_size
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3), nn.ReLU(inplace=True),
            nn.Conv2d(16, 16, 3), nn.ReLU(inplace=True),
            nn.MaxPool2d(2), nn.Dropout(0.25),
            nn.Conv2d(16, 32, 3), nn.ReLU(inplace=True),
            nn.Conv2d(32, 32, 3), nn.ReLU(inplace=True),
            nn.MaxPool2d(4), nn.Dropout(0.25),
        )
        self.classifier = _braai_head(((stamp_size - 4) // 2 - 4) // 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x)).squeeze(1)


def _braai_head(side: int) -> nn.Sequential:
    """braai's classifier on its (32, side, side) features: dense 256, dropout 0.5, one logit."""
    return nn.Sequential(nn.Flatten(), nn.Linear(32 * side * side, 256), nn.ReLU(inplace=True),
                         nn.Dropout(0.5), nn.Linear(256, 1))


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class BraaiFast(nn.Module):
    """braai's layers and widths with a stride-2 padded stem and batch norm (module docstring).

    Parameters
    ----------
    stamp_size : odd stamp side in pixels; fixes the dense layer's input size.
    in_channels : number of channels (3: sci, ref, diff).
    """

    def __init__(self, stamp_size: int = 63, in_channels: int = 3):
        super().__init__()
        self.stamp_size = stamp_size
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, 16, stride=2), *_conv_bn_relu(16, 16),
            nn.MaxPool2d(2), nn.Dropout(0.25),
            *_conv_bn_relu(16, 32), *_conv_bn_relu(32, 32),
            nn.MaxPool2d(4), nn.Dropout(0.25),
        )
        self.classifier = _braai_head(((stamp_size + 1) // 2 // 2) // 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x)).squeeze(1)


class _ResBlock(nn.Module):
    """Pre-activation-free basic block: conv-BN-ReLU-conv-BN plus (projected) shortcut, ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
        )
        self.shortcut = (nn.Identity() if stride == 1 and c_in == c_out else
                         nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(c_out)))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class AstridNet(nn.Module):
    """Small residual CNN, global average pooling, D4-averaged logits in evaluation mode.

    Parameters
    ----------
    stamp_size : stamp side in pixels; kept for the record (the network takes any size).
    in_channels : number of channels (3: sci, ref, diff).
    widths : channels of the stem and of the two residual stages.
    dropout : dropout before the final linear layer.
    d4_average : average the logit over the 8 D4 views in evaluation mode.
    """

    def __init__(self, stamp_size: int = 63, in_channels: int = 3,
                 widths: tuple[int, int, int] = (16, 32, 64), dropout: float = 0.2,
                 d4_average: bool = True):
        super().__init__()
        self.stamp_size = stamp_size
        self.d4_average = d4_average
        w0, w1, w2 = widths
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, w0, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(w0), nn.ReLU(inplace=True))
        self.stages = nn.Sequential(_ResBlock(w0, w1, 2), _ResBlock(w1, w2, 2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(w2, 1))

    def single_view(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B,) of the stamps as given, no orientation averaging."""
        return self.head(self.stages(self.stem(x))).squeeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or not self.d4_average:
            return self.single_view(x)
        # All 8 views in one batch: one large convolution call is faster than 8 small ones.
        views = torch.cat(d4_views(x), dim=0)
        return self.single_view(views).reshape(8, -1).mean(dim=0)


class Ensemble(nn.Module):
    """Mean logit of member networks.

    Parameters
    ----------
    stamp_size : odd stamp side in pixels, shared by every member.
    members : member records ``{"name": ..., "kwargs": {...}}``, as :func:`build_model` takes them.
    """

    def __init__(self, stamp_size: int = 63, members: Sequence[dict] = ()):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.stamp_size = stamp_size
        self.members = nn.ModuleList(build_model(m["name"], stamp_size, **m.get("kwargs", {}))
                                     for m in members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(x) for member in self.members]).mean(dim=0)


def d4_views(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 images of ``x`` (B, C, S, S) under the dihedral group D4 (rotations, reflections).

    D4 of a square is {identity, flip rows, flip columns, both} × {no transpose, transpose};
    written with flips and transposes (not ``rot90``) so that it exports to ONNX.
    """
    views = []
    for base in (x, x.transpose(2, 3)):
        views += [base, torch.flip(base, dims=(2,)), torch.flip(base, dims=(3,)),
                  torch.flip(base, dims=(2, 3))]
    return views


def build_model(name: str, stamp_size: int = 63, **kwargs) -> nn.Module:
    """Build a real/bogus network returning logits of shape (B,).

    Parameters
    ----------
    name : ``"braai"``, ``"braai_fast"``, ``"astrid"`` or ``"ensemble"``.
    stamp_size : odd stamp side in pixels (>= 21).
    **kwargs : architecture arguments (e.g. ``widths`` for ``astrid``, ``members`` for
        ``ensemble``).

    Raises
    ------
    ValueError
        Unknown name or a stamp size that is even or too small.
    """
    if stamp_size < MIN_STAMP_PX or stamp_size % 2 == 0:
        raise ValueError(f"stamp size must be odd and >= {MIN_STAMP_PX}, got {stamp_size}")
    if name == "braai":
        return Braai(stamp_size, **kwargs)
    if name == "braai_fast":
        return BraaiFast(stamp_size, **kwargs)
    if name == "astrid":
        if "widths" in kwargs:
            kwargs["widths"] = tuple(kwargs["widths"])
        return AstridNet(stamp_size, **kwargs)
    if name == "ensemble":
        return Ensemble(stamp_size, **kwargs)
    raise ValueError(f"unknown model {name!r} (choose from {', '.join(MODEL_NAMES)})")


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --- weights on disk -------------------------------------------------------------------------

def architecture_record(name: str, stamp_size: int, **kwargs) -> dict:
    """What ``model.pt`` and ``model.json`` store to rebuild a network: name, size, arguments."""
    return {"name": name, "stamp_size": int(stamp_size), "kwargs": _plain(kwargs)}


def _plain(value):
    """Tuples as lists, recursively (ensemble members nest records): JSON and torch.load
    with ``weights_only`` then read back exactly what was written."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def save_weights(path, model: nn.Module, architecture: dict) -> None:
    """Write ``model.pt`` (architecture record + state dict) atomically."""
    from astrid.provenance import atomic_path

    with atomic_path(path) as tmp:
        torch.save({"architecture": architecture, "state_dict": model.state_dict()}, tmp)


def load_weights(path) -> tuple[nn.Module, dict]:
    """Rebuild the network saved by :func:`save_weights`, in evaluation mode.

    Raises
    ------
    InputFileError
        Missing or unreadable file, or weights that do not fit the recorded architecture.
    """
    from astrid.errors import InputFileError

    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        arch = blob["architecture"]
        model = build_model(arch["name"], arch["stamp_size"], **arch.get("kwargs", {}))
        model.load_state_dict(blob["state_dict"])
    except FileNotFoundError:
        raise InputFileError(path, "model weights not found") from None
    except (RuntimeError, KeyError, TypeError, ValueError, EOFError, OSError) as exc:
        raise InputFileError(path, f"not AstrID model weights ({type(exc).__name__})") from None
    return model.eval(), arch


PREPROCESSING_KEYS = ("stamp_size", "normalisation", "sky_subtract")


def load_ensemble(model_dirs) -> tuple[nn.Module, dict, dict]:
    """An :class:`Ensemble` of trained model directories, their weights copied in.

    Returns
    -------
    (network in evaluation mode, its architecture record, the preprocessing the members share:
    ``stamp_size``, ``normalisation``, ``sky_subtract`` from their ``model.json``).

    Raises
    ------
    ValueError
        Members preprocess their input differently: one input cannot serve them all.
    """
    from pathlib import Path

    from astrid.ml.score import read_model_info

    nets, records, preps = [], [], []
    for d in map(Path, model_dirs):
        net, arch = load_weights(d / "model.pt")
        info = read_model_info(d)
        nets.append(net)
        records.append({"name": arch["name"], "kwargs": arch.get("kwargs", {})})
        preps.append({k: info.get(k, False if k == "sky_subtract" else None)
                      for k in PREPROCESSING_KEYS})
    if any(p != preps[0] for p in preps):
        raise ValueError(f"ensemble members preprocess differently: {preps}")
    size = int(preps[0]["stamp_size"])
    arch = architecture_record("ensemble", size, members=records)
    ensemble = build_model("ensemble", size, **arch["kwargs"])
    for member, net in zip(ensemble.members, nets, strict=True):
        member.load_state_dict(net.state_dict())
    return ensemble.eval(), arch, preps[0]
