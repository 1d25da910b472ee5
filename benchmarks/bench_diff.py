"""Differencing speed, memory and quality: ZOGY against the Gaussian baseline.

For each size (2048² and 4096² by default) a simulated pair with truth is written once; then each
method runs in a fresh subprocess that reads both images (not timed), times one float32
``rfft2 + irfft2`` round trip of the same size on the same workers, runs align + ZOGY + S_corr +
detection (``astrid.diff.difference``) twice (the first pair of a process also loads numba's
cached kernel; both times are reported, the second as ``elapsed_s``, the steady state of a
pipeline worker) and reports the time per stage, the peak resident
memory (``ru_maxrss``; tracemalloc misses numpy/FFT buffers), the noise ratio, the false
positives (candidates off the border matching no change in truth.csv) and the completeness of
real transients by S/N. A clean pair (nothing changed) of the first size counts pure false
positives. The side-by-side DECam comparison picture is saved too.

Usage: ``python benchmarks/bench_diff.py [--sizes 2048 4096] [--quick]``; writes
``benchmarks/results/bench_diff.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SHARED = Path(os.environ.get("ASTRID_SHARED_DATA", HERE.parent.parent / "shared" / "data"))

TARGETS_S = {2048: 1.0, 4096: 4.0}  # DESIGN.md: align + ZOGY + S_corr + detection, 2 cores
TARGET_PEAK_MB = {4096: 1024.0}
STEADY_RUNS = 3  # steady-state runs per pair; the median is reported


def write_pair(folder: Path, size: int, clean: bool, seed: int = 7) -> Path:
    """Simulate one pair and write ref.fits, sci.fits, truth.csv into ``folder``."""
    from astropy.io import fits

    from astrid.config import SimSettings
    from astrid.sim import simulate_pair

    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "truth.csv").exists():
        return folder
    pair = simulate_pair(SimSettings(size_px=size, clean=clean, seed=seed), 0)
    fits.PrimaryHDU(pair.ref.data, pair.ref.header).writeto(folder / "ref.fits", overwrite=True)
    fits.PrimaryHDU(pair.sci.data, pair.sci.header).writeto(folder / "sci.fits", overwrite=True)
    pair.truth.to_csv(folder / "truth.csv", index=False)
    return folder


def run_case(folder: Path, method: str) -> dict:
    """Run in a fresh process: one method on one pair; returns the measurements."""
    import numpy as np
    import pandas as pd
    from scipy import fft
    from scipy.spatial import cKDTree

    from astrid.config import DiffSettings
    from astrid.diff import difference
    from astrid.fitsio import read_image

    warnings.simplefilter("ignore")
    ref, sci = read_image(folder / "ref.fits"), read_image(folder / "sci.fits")
    rss_inputs_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    settings = DiffSettings(method=method)

    a = np.random.default_rng(0).normal(size=sci.data.shape).astype(np.float32)
    fft_s, fft_cpu_s = [], []
    for _ in range(3):
        t0, c0 = time.perf_counter(), time.process_time()
        fft.irfft2(fft.rfft2(a, workers=settings.fft_workers), s=a.shape,
                   workers=settings.fft_workers)
        fft_s.append(time.perf_counter() - t0)
        fft_cpu_s.append(time.process_time() - c0)
    del a
    # The first pair of a fresh process also loads numba's compiled alignment kernel from its
    # disk cache (about 0.7 s); a pipeline worker pays that once, so the pair is differenced
    # twice: "first" is the cold figure, the second run the steady state reported as elapsed.
    first, _ = difference(ref, sci, diff_settings=settings)
    first_q = first.quality
    peak_first_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    del first
    # CPU time (all threads) beside wall time: on a shared machine it is the steadier figure.
    # The steady state is the median of three runs (their spread is reported too): one run
    # on this shared machine scatters by 20%.
    # Only the figures of each run are kept (the results are the same; holding three would
    # triple the memory measured).
    runs = []
    for _ in range(STEADY_RUNS):
        result = cands = None  # the previous run's maps freed before the next is made
        c0 = time.process_time()
        result, cands = difference(ref, sci, diff_settings=settings)
        runs.append((result.quality["elapsed_s"], time.process_time() - c0,
                     result.quality["timings_s"]))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    runs.sort(key=lambda run: run[0])
    elapsed_runs = [run[0] for run in runs]
    elapsed_s, cpu_s, timings = runs[len(runs) // 2]
    q = {**result.quality, "elapsed_s": elapsed_s, "timings_s": timings}

    truth = pd.read_csv(folder / "truth.csv")
    inner = ~cands.flag_edge.to_numpy(bool) if len(cands) else np.zeros(0, bool)
    if len(truth) and len(cands):
        dist, _ = cKDTree(truth[["x", "y"]].to_numpy()).query(cands[["x", "y"]].to_numpy())
        false_pos = int(np.sum((dist > 3.0) & inner))
    else:
        false_pos = int(inner.sum())
    completeness = {}
    real = truth[truth.is_real] if len(truth) else truth
    if len(real):
        if len(cands):
            dist, _ = cKDTree(cands[["x", "y"]].to_numpy()).query(real[["x", "y"]].to_numpy())
        else:
            dist = np.full(len(real), np.inf)
        for lo, hi in ((3, 5), (5, 8), (8, 15), (15, 1e9)):
            sel = (real.snr >= lo) & (real.snr < hi)
            if sel.any():
                completeness[f"snr_{lo}_{hi if hi < 1e9 else 'inf'}"] = [
                    float(np.mean(dist[sel.to_numpy()] < 1.5)), int(sel.sum())]
    fft_best = min(fft_s)
    return {
        "method": method, "size_px": int(sci.data.shape[0]),
        "elapsed_s": q["elapsed_s"], "elapsed_runs_s": elapsed_runs, "timings_s": q["timings_s"],
        "elapsed_first_s": first_q["elapsed_s"], "timings_first_s": first_q["timings_s"],
        "peak_rss_first_run_mb": peak_first_mb,
        "fft_roundtrip_s": fft_best, "elapsed_over_fft": q["elapsed_s"] / fft_best,
        "cpu_s": cpu_s, "fft_roundtrip_cpu_s": min(fft_cpu_s),
        "cpu_over_fft_cpu": cpu_s / min(fft_cpu_s),
        "zogy_over_fft": q["timings_s"].get("zogy", q["timings_s"].get("gaussian", 0)) / fft_best,
        "peak_rss_mb": peak_mb, "rss_after_reading_mb": rss_inputs_mb,
        "noise_ratio": q["noise_ratio"], "noise_ratio_diff": q["noise_ratio_diff"],
        "star_residual_chi2": q["star_residual_chi2"], "n_candidates": len(cands),
        "false_positives": false_pos, "completeness": completeness,
        "n_real": int(len(real)),
    }


def subprocess_case(folder: Path, method: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--case", str(folder), method],
                         capture_output=True, text=True, cwd=HERE.parent)
    if out.returncode:
        return {"method": method, "error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def decam_picture(path: Path) -> dict | None:
    """Our D and S_corr beside the other tool's difference of the same DECam stacks."""
    folder = SHARED / "diffpairs" / "decam" / "4check"
    if not folder.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from astrid.diff import difference
    from astrid.diff.quality import robust_std
    from astrid.fitsio import read_image

    warnings.simplefilter("ignore")
    result, cands = difference(read_image(folder / "Stack-DEC-OBS18.fits"),
                               read_image(folder / "Stack-DEC-OBS04.fits"))
    theirs = read_image(folder / "FinalDifference.DeCorr.fits").data
    panels = [(result.sci, "science (stack OBS04)", None),
              (result.diff / robust_std(result.diff), "AstrID ZOGY D / robust std", 5),
              (theirs / robust_std(theirs), "4check FinalDifference.DeCorr / robust std", 5),
              (result.scorr, "AstrID S_corr (candidates +)", 5)]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.4))
    for ax, (img, title, lim) in zip(axes, panels, strict=True):
        if lim is None:
            lo, hi = np.nanpercentile(img, [1, 99.5])
            ax.imshow(img, origin="lower", cmap="gray", vmin=lo, vmax=hi)
        else:
            ax.imshow(img, origin="lower", cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    clean = cands[~(cands.flag_edge | cands.flag_saturated | cands.flag_masked)]
    axes[3].plot(clean.x, clean.y, "k+", ms=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    q = result.quality
    return {"png": str(path.relative_to(HERE.parent)), "noise_ratio": q["noise_ratio"],
            "star_residual_chi2": q["star_residual_chi2"], "n_candidates_unflagged": len(clean)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--quick", action="store_true", help="one 1024² size (a smoke run)")
    parser.add_argument("--case", nargs=2, metavar=("FOLDER", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(Path(args.case[0]), args.case[1]), default=float))
        return 0
    sizes = [1024] if args.quick else args.sizes
    cache = Path(os.environ.get("ASTRID_BENCH_CACHE", Path(tempfile.gettempdir())
                                / "astrid-bench-diff"))
    rows = []
    for size in sizes:
        t0 = time.perf_counter()
        folder = write_pair(cache / f"full-{size}", size, clean=False)
        print(f"simulated {size}² pair in {time.perf_counter() - t0:.1f} s", flush=True)
        for method in ("zogy", "gaussian"):
            rows.append({"pair": "full", **subprocess_case(folder, method)})
            print(_row_text(rows[-1]), flush=True)
    clean = write_pair(cache / f"clean-{sizes[0]}", sizes[0], clean=True)
    for method in ("zogy", "gaussian"):
        rows.append({"pair": "clean", **subprocess_case(clean, method)})
        print(_row_text(rows[-1]), flush=True)
    decam = decam_picture(RESULTS / "decam_comparison.png")

    checks = {}
    for row in rows:
        if row.get("method") == "zogy" and row.get("pair") == "full" and "error" not in row:
            size = row["size_px"]
            if size in TARGETS_S:
                checks[f"elapsed_{size}_le_{TARGETS_S[size]}s"] = row["elapsed_s"] <= TARGETS_S[size]
            if size in TARGET_PEAK_MB:
                checks[f"peak_{size}_le_1GB"] = row["peak_rss_mb"] <= TARGET_PEAK_MB[size]
    record = {"rows": rows, "decam": decam, "targets_met": checks,
              "note": "times on a shared 2-core machine; compare elapsed_over_fft across runs"}
    from astrid.provenance import provenance, write_json_atomic

    record["provenance"] = provenance({"sizes": sizes}, inputs=[])
    write_json_atomic(RESULTS / "bench_diff.json", record)
    print(f"targets: {checks}")
    print(f"DECam comparison: {decam}")
    print(f"wrote {RESULTS / 'bench_diff.json'}")
    return 0


def _row_text(row: dict) -> str:
    if "error" in row:
        return f"{row['pair']:5s} {row['method']:8s} ERROR {row['error']}"
    stages = " ".join(f"{k}={v:.2f}" for k, v in row["timings_s"].items())
    runs = row["elapsed_runs_s"]
    return (f"{row['pair']:5s} {row['size_px']:5d}² {row['method']:8s} elapsed {row['elapsed_s']:6.2f} s "
            f"(median of {min(runs):.2f}-{max(runs):.2f} s; first pair of the process "
            f"{row['elapsed_first_s']:.2f} s) "
            f"(= {row['elapsed_over_fft']:5.1f} FFT round trips of {row['fft_roundtrip_s']:.3f} s) "
            f"cpu {row['cpu_s']:6.2f} s (= {row['cpu_over_fft_cpu']:5.1f} x "
            f"{row['fft_roundtrip_cpu_s']:.3f} s) "
            f"peak {row['peak_rss_mb']:6.0f} MB  noise {row['noise_ratio']:.3f}  "
            f"cands {row['n_candidates']:4d}  FP {row['false_positives']:4d}  "
            f"compl {row['completeness']}\n      stages: {stages}")


if __name__ == "__main__":
    sys.exit(main())
