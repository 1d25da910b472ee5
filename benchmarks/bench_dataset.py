"""Benchmark: time and peak memory of building a triplet dataset from a simulated survey.

Stage 1 simulates N 2048x2048 pairs and differences them (ZOGY + detection), writing diff dirs.
Stage 2 (optional, --replicas K) makes K copies of each diff dir as directories of symbolic
links (distinct pair ids, the same pixels) to reach tens of thousands of triplets without
hours of simulation on a shared 2-core machine.
Stage 3 runs astrid.ml.data.build_dataset in a fresh process and reports wall time, peak RSS,
triplet counts by label/kind, then writes a gallery.

usage: python benchmarks/bench_dataset.py [WORKDIR] [--pairs 8] [--replicas 12]
(results also written to benchmarks/results/bench_dataset.json)
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def stage_simulate_and_diff(work: Path, pairs: int) -> list[Path]:
    from astrid.config import SimSettings
    from astrid.diff.high_level import difference
    from astrid.diff.io import write_diff_dir
    from astrid.fitsio import read_image
    from astrid.sim import write_survey

    survey = work / "survey"
    t0 = time.perf_counter()
    dirs = write_survey(survey, SimSettings(pairs=pairs, size_px=2048))
    print(f"simulated {len(dirs)} pairs in {time.perf_counter() - t0:.0f} s", flush=True)
    out = []
    for d in dirs:
        target = work / "diffs" / d.name
        if not (target / "quality.json").exists():
            t1 = time.perf_counter()
            result, cands = difference(read_image(d / "ref.fits"), read_image(d / "sci.fits"))
            write_diff_dir(target, result, cands, {})
            print(f"{d.name}: {len(cands)} candidates, diff {time.perf_counter() - t1:.0f} s", flush=True)
        out.append(target)
    return out


def stage_replicate(work: Path, diff_dirs: list[Path], replicas: int) -> list[Path]:
    out = []
    for d in diff_dirs:
        for k in range(replicas):
            name = f"{d.name}-rep{k:03d}"
            for src_root, dst_root in ((d, work / "rep_diffs" / name),
                                       (work / "survey" / d.name, work / "rep_survey" / name)):
                dst_root.mkdir(parents=True, exist_ok=True)
                for f in src_root.iterdir():
                    link = dst_root / f.name
                    if not link.exists():
                        link.symlink_to(f.resolve())
            out.append(work / "rep_diffs" / name)
    return out


def stage_build(work: Path, diff_dirs: list[Path], truth_root: Path) -> dict:
    import threading

    import numpy as np

    from astrid.ml.data import build_dataset, load_dataset

    out = work / ("dataset" if diff_dirs[0].parent.name == "diffs" else "dataset_replicas")
    peak = {"rss": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith("RssAnon:"):
                        peak["rss"] = max(peak["rss"], int(line.split()[1]) * 1024)
            time.sleep(0.05)

    rss0 = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    build_dataset(diff_dirs, out, truth_dirs=[truth_root])
    build_s = time.perf_counter() - t0
    stop.set()
    thread.join()
    maxrss_build = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
    stamps, meta = load_dataset(out)
    t1 = time.perf_counter()
    from astrid.detect.gallery import save_gallery

    save_gallery(stamps, meta, work / "gallery.png", per_group=8)
    gallery_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    idx = np.sort(np.random.default_rng(0).choice(len(stamps), min(4096, len(stamps)), replace=False))
    _ = stamps[idx]
    read_s = time.perf_counter() - t2
    size_bytes = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return {
        "n_diff_dirs": len(diff_dirs), "n_triplets": len(stamps),
        "build_s": round(build_s, 1), "triplets_per_s": round(len(stamps) / build_s, 1),
        "rss_before_mb": round(rss0 / 1e6, 1), "peak_rss_anon_mb": round(peak["rss"] / 1e6, 1),
        "ru_maxrss_after_build_mb": round(maxrss_build, 1),
        "ru_maxrss_end_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3, 1),
        "dataset_mb": round(size_bytes / 1e6, 1), "gallery_s": round(gallery_s, 1),
        "random_read_4096_s": round(read_s, 2),
        "counts": meta.groupby(["label", "kind"]).size().rename(lambda x: x).to_dict(),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("work", type=Path, nargs="?", default=Path("/tmp/astrid-bench-dataset"))
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--stage", default="all", choices=["all", "diff", "build"])
    args = parser.parse_args()
    work = args.work
    if args.stage in ("all", "diff"):
        stage_simulate_and_diff(work, args.pairs)
    if args.stage in ("all", "build"):
        if args.stage == "all":
            # build in a fresh process, so its peak memory is its own
            subprocess.run([sys.executable, __file__, str(work), "--pairs", str(args.pairs),
                            "--replicas", str(args.replicas), "--stage", "build"], check=True)
            return
        diff_dirs = sorted(p for p in (work / "diffs").iterdir() if (p / "quality.json").exists())
        truth_root = work / "survey"
        if args.replicas > 1:
            diff_dirs = stage_replicate(work, diff_dirs, args.replicas)
            truth_root = work / "rep_survey"
        result = stage_build(work, diff_dirs, truth_root)
        result["counts"] = {f"{k[0]}:{k[1]}": int(v) for k, v in result["counts"].items()}
        print(json.dumps(result, indent=1))
        (work / "bench_result.json").write_text(json.dumps(result, indent=1))
        results = Path(__file__).resolve().parent / "results"
        results.mkdir(exist_ok=True)
        (results / "bench_dataset.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
