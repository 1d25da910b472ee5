"""Scoring throughput (triplets/s) of the real/bogus models on this machine's CPU.

    python benchmarks/bench_score.py [--model DIR] [--n 20000] [--threads 2]

Times, for the braai-size network and AstrID's D4-averaged model, each part of
:func:`astrid.ml.score.score_triplets` separately (normalisation, onnxruntime inference, the
whole call) and the torch backend for comparison (eager, contiguous vs channels_last). The
triplets are the real ZTF stamps of ../shared/data tiled to ``--n``. Not run by the tests;
numbers depend on the load of the machine (run it when the cores are otherwise idle).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _best_rate(fn, n: int, repeat: int = 3) -> float:
    best = np.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n / best


def triplets(n: int) -> np.ndarray:
    """Real ZTF triplets tiled to ``n`` (sky + noise stand-ins if the shared data is absent;
    the speed does not depend on the pixel values)."""
    shared = Path(os.environ.get("ASTRID_SHARED_DATA", ROOT.parent / "shared" / "data"))
    path = shared / "ztf-alerts" / "fink-client" / "fink-client_triplets.npz"
    if path.exists():
        z = np.load(path)
        base = np.stack([z["sci"], z["ref"], z["diff"]], axis=1)
    else:
        base = np.random.default_rng(0).normal(150.0, 20.0, (64, 3, 63, 63)).astype(np.float32)
    return np.ascontiguousarray(np.resize(base, (n, *base.shape[1:])))


def bench(model_dir: Path, stamps: np.ndarray, threads: int, batch: int) -> dict:
    import torch

    from astrid.ml.data import normalise
    from astrid.ml.export import probability_module
    from astrid.ml.models import load_weights
    from astrid.ml.score import get_scorer, read_model_info, score_triplets

    info = read_model_info(model_dir)
    n = len(stamps)
    out = {"model": info["architecture"]}
    out["normalise"] = _best_rate(lambda: normalise(stamps, info["normalisation"]), n)
    scorer = get_scorer(model_dir, "onnx", threads, batch)
    x = normalise(stamps[:batch], info["normalisation"])
    reps = max(1, n // batch)
    out["onnx_inference"] = _best_rate(
        lambda: [scorer.session.run(["score"], {"triplets": x}) for _ in range(reps)], reps * batch)
    out["score_triplets_onnx"] = _best_rate(
        lambda: score_triplets(stamps, model_dir, "onnx", threads=threads, batch_size=batch), n)
    torch.set_num_threads(threads)
    net, _ = load_weights(model_dir / "model.pt")
    module = probability_module(net, info.get("temperature", 1.0))
    xt = torch.from_numpy(x[:256])
    with torch.inference_mode():
        out["torch_contiguous"] = _best_rate(lambda: module(xt), len(xt), repeat=2)
        xc = xt.contiguous(memory_format=torch.channels_last)
        module = module.to(memory_format=torch.channels_last)
        out["torch_channels_last"] = _best_rate(lambda: module(xc), len(xt), repeat=2)
    return out


def untrained_braai(path: Path, stamp_size: int = 63) -> Path:
    """A braai model directory with random weights: speed does not depend on the weights, so
    the benchmark runs on a fresh clone where the trained baseline (runs/) is absent."""
    import torch

    from astrid.ml.export import write_model_dir
    from astrid.ml.models import architecture_record, build_model

    torch.manual_seed(0)
    write_model_dir(path, build_model("braai", stamp_size).eval(),
                    architecture_record("braai", stamp_size), stamp_size=stamp_size)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help="model directory (repeatable); default: "
                    "the packaged model and runs/default/models/braai if present")
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1024)
    args = ap.parse_args()
    from astrid.ml.score import default_model_dir

    braai_dir = ROOT / "runs" / "default" / "models" / "braai"
    if not args.model and not braai_dir.exists():
        braai_dir = untrained_braai(Path(tempfile.mkdtemp()) / "braai")
    models = [Path(m) for m in args.model] if args.model else [braai_dir, default_model_dir()]
    stamps = triplets(args.n)
    print(f"{args.n} triplets 63x63, threads={args.threads}, batch={args.batch}, cpus={os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    for model_dir in models:
        t0 = time.process_time()
        res = bench(model_dir, stamps, args.threads, args.batch)
        print(f"  (CPU time used: {time.process_time() - t0:.1f} s)")
        print(f"{res.pop('model')} ({model_dir}):")
        for key, rate in res.items():
            print(f"  {key:<22} {rate:>10,.0f} triplets/s")


if __name__ == "__main__":
    main()
