"""A PNG preview of a simulated pair: reference, science and what changed between them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Marker per truth kind: real ones as circles, bogus ones as squares / crosses.
_STYLE = {
    "sn": ("o", "#00e5ff"), "sn_nuclear": ("o", "#00ff7f"), "sn_hostless": ("o", "#ffd400"),
    "variable": ("D", "#ff66ff"), "asteroid": ("^", "#ff9f1a"),
    "cosmic_ray": ("s", "#ff3b3b"), "hot_pixel": ("s", "#ff8080"), "bad_column": ("|", "#b0b0b0"),
    "trail": (".", "#c0c0ff"), "bleed": ("|", "#ffffff"),
}


def save_preview(pair_dir: str | Path, png_path: str | Path, max_px: int = 1024) -> Path:
    """Save a three-panel PNG of ``pair_dir`` (written by :func:`astrid.sim.write_pair`):
    the reference, the science image (zscale, asinh stretch) and the science image with the
    truth markers. Images larger than ``max_px`` are block-averaged for display only.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    from astropy.visualization import AsinhStretch, ImageNormalize, ZScaleInterval

    from astrid.fitsio import read_image
    from astrid.provenance import atomic_path

    pair_dir = Path(pair_dir)
    ref = read_image(pair_dir / "ref.fits")
    sci = read_image(pair_dir / "sci.fits")
    truth = pd.read_csv(pair_dir / "truth.csv")
    factor = max(1, int(np.ceil(max(sci.data.shape) / max_px)))

    fig, axes = plt.subplots(1, 3, figsize=(18, 6.4), constrained_layout=True)
    for ax, image, title in ((axes[0], ref, "reference"), (axes[1], sci, "science"),
                             (axes[2], sci, "science + truth")):
        data = _block_mean(image.data, factor)
        norm = ImageNormalize(data, interval=ZScaleInterval(), stretch=AsinhStretch(0.1))
        ax.imshow(data, origin="lower", cmap="gray", norm=norm, interpolation="nearest")
        meta = image.meta
        ax.set_title(f"{title}  (FWHM {image.header.get('FWHM', float('nan')):.2f} px, "
                     f"ZP {meta.zero_point:.2f})", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    ax = axes[2]
    for kind, rows in truth.groupby("kind"):
        marker, colour = _STYLE.get(kind, ("x", "yellow"))
        # Extended artefacts are sampled densely in truth.csv; thin them for display.
        rows = rows.iloc[::10] if kind in ("trail", "bad_column", "bleed") else rows
        hollow = marker in "oDs^"
        style = {"facecolors": "none", "edgecolors": colour} if hollow else {"color": colour}
        ax.scatter((rows["x"] + 0.5) / factor - 0.5, (rows["y"] + 0.5) / factor - 0.5,
                   marker=marker, s=60 if hollow else 12, linewidths=1.0,
                   label=f"{kind} ({len(truth[truth.kind == kind])})", **style)
    if len(truth):
        ax.legend(loc="upper right", fontsize=7, framealpha=0.6)
    fig.suptitle(f"{pair_dir.name}: circles real, squares/lines bogus", fontsize=11)
    png_path = Path(png_path)
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return png_path


def _block_mean(data: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return data
    ny, nx = (s // factor * factor for s in data.shape)
    view = data[:ny, :nx].reshape(ny // factor, factor, nx // factor, factor)
    return np.nanmean(view, axis=(1, 3))
