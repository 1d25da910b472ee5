"""Pipeline throughput: pairs per minute and peak memory per executor, 1 -> 2 workers.

Each configuration runs the same small simulated survey (simulate -> diff -> stamps -> score)
from an empty run directory. Peak memory is the largest summed RSS of this process and all
its children (pool workers, Dask nanny and worker processes), sampled every 50 ms. The machine
is shared and noisy, so the serial run measured in the same invocation is the baseline.

Usage: ``python benchmarks/bench_pipeline.py [--pairs 6] [--size 1024] [--executors ...]``;
writes ``benchmarks/results/bench_pipeline.json``.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import psutil

from astrid.config import Settings
from astrid.ml.score import default_model_dir
from astrid.pipeline import run_pipeline
from astrid.progress import set_quiet
from astrid.provenance import versions, write_json_atomic

HERE = Path(__file__).resolve().parent
CONFIGS = {  # name: (executor, workers)
    "serial": ("serial", 1),
    "processes-1": ("processes", 1),
    "processes-2": ("processes", 2),
    "dask-1": ("dask", 1),
    "dask-2": ("dask", 2),
}


class PeakRss:
    """Sample the summed RSS of this process tree in a thread; ``peak_mb`` when stopped."""

    def __init__(self, interval_s: float = 0.05):
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.peak_bytes = max(self.peak_bytes, total)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20


def bench(name: str, pairs: int, size_px: int, workdir: Path) -> dict:
    executor, workers = CONFIGS[name]
    stages = ["simulate", "diff", "stamps"]
    if (default_model_dir() / "model.onnx").exists():
        stages.append("score")
    settings = Settings.model_validate({
        "sim": {"pairs": pairs, "size_px": size_px, "seed": 3},
        "pipeline": {"source": "sim", "stages": stages, "executor": executor,
                     "workers": workers}})
    run_dir = workdir / name
    with PeakRss() as rss:
        start = time.perf_counter()
        summary = run_pipeline(settings, run_dir)
        wall_s = time.perf_counter() - start
    per_stage = {}
    from astrid.pipeline import open_state

    with open_state(run_dir, create=False) as state:
        for rec in state.records():
            per_stage.setdefault(rec.stage, []).append(rec.elapsed_s)
    return {"config": name, "executor": executor, "workers": workers, "pairs": pairs,
            "size_px": size_px, "stages": stages, "failed": summary.failed,
            "wall_s": round(wall_s, 2), "pairs_per_min": round(60 * pairs / wall_s, 2),
            "peak_rss_mb": round(rss.peak_mb, 1),
            "mean_stage_s": {k: round(sum(v) / len(v), 3) for k, v in per_stage.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--executors", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("-o", "--out", type=Path, default=HERE / "results" / "bench_pipeline.json")
    args = parser.parse_args()
    set_quiet(True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="astrid-bench-") as tmp:
        for name in args.executors:
            row = bench(name, args.pairs, args.size, Path(tmp))
            rows.append(row)
            print(f"{name:12s} {row['pairs_per_min']:7.2f} pairs/min  wall {row['wall_s']:7.1f} s"
                  f"  peak RSS {row['peak_rss_mb']:7.0f} MB  failed {row['failed']}", flush=True)
    by_name = {r["config"]: r for r in rows}
    scaling = {}
    for kind in ("processes", "dask"):
        one, two = by_name.get(f"{kind}-1"), by_name.get(f"{kind}-2")
        if one and two:
            scaling[kind] = round(two["pairs_per_min"] / one["pairs_per_min"], 2)
            print(f"scaling {kind} 1 -> 2 workers: x{scaling[kind]}")
    write_json_atomic(args.out, {"rows": rows, "scaling_1_to_2": scaling,
                                 "cpu_count": psutil.cpu_count(), "versions": versions()})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
