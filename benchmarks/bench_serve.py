"""Scoring service throughput: requests/s and latency percentiles for batches of 256 triplets.

Starts ``astrid serve`` as its own process on 127.0.0.1 (any free port), then POSTs the same
256 real ZTF triplets (the fink-client alerts, repeated) as an ``.npz`` to ``/v1/score`` from
1, 4 and 8 concurrent loopback clients, each with its own connection. Every level runs a fixed
number of requests after a short warm-up. The same batch scored in-process with
``score_triplets`` (same model, same thread count) is the baseline, measured in the same run
because the machine is shared and noisy.

Usage: ``python benchmarks/bench_serve.py [--model DIR | --tiny] [--requests 48]
[--concurrency 1 4 8]``; writes ``benchmarks/results/bench_serve.json`` (``_tiny`` with
``--tiny``, which isolates the service's own cost: upload, parsing, normalisation, JSON).
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from astrid.ml.score import default_model_dir, score_triplets
from astrid.provenance import provenance, write_json_atomic

HERE = Path(__file__).resolve().parent
DATA = Path(os.environ.get("ASTRID_SHARED_DATA", HERE.parent.parent / "shared" / "data"))
TOKEN = "bench-token"


def batch_npz(n: int) -> tuple[np.ndarray, bytes]:
    """``n`` real ZTF triplets (repeated to fill the batch) and the upload bytes."""
    with np.load(DATA / "ztf-alerts" / "fink-client" / "fink-client_triplets.npz") as npz:
        stamps = np.stack([npz["sci"], npz["ref"], npz["diff"]], axis=1).astype(np.float32)
    stamps = np.resize(stamps, (n, *stamps.shape[1:]))
    buf = io.BytesIO()
    np.savez(buf, sci=stamps[:, 0], ref=stamps[:, 1], diff=stamps[:, 2])
    return stamps, buf.getvalue()


def untrained_model(tmp: Path, *, tiny: bool) -> Path:
    """An untrained network: the default architecture (same cost to run as a trained one,
    for when the packaged model is not there yet), or a tiny one (4-8-8 channels on 21x21
    crops) that costs almost nothing, so that the service's own overhead shows."""
    from astrid.config import TrainSettings
    from astrid.ml.export import export_onnx
    from astrid.ml.models import architecture_record, build_model, save_weights

    cfg = TrainSettings()
    size, widths = (21, [4, 8, 8]) if tiny else (63, [cfg.width, 2 * cfg.width, 4 * cfg.width])
    tmp.mkdir(parents=True, exist_ok=True)
    arch = architecture_record("astrid", size, widths=widths)
    save_weights(tmp / "model.pt", build_model("astrid", size, widths=widths).eval(), arch)
    write_json_atomic(tmp / "model.json", {
        "architecture": "astrid", "architecture_kwargs": arch["kwargs"], "stamp_size": size,
        "channels": ["sci", "ref", "diff"], "normalisation": cfg.normalisation,
        "temperature": 1.0, "threshold": 0.5, "note": "untrained, benchmark only"})
    export_onnx(tmp)
    return tmp


def start_server(model: Path, db: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "ASTRID_TOKEN": TOKEN}
    proc = subprocess.Popen(
        [sys.executable, "-m", "astrid", "serve", "--host", "127.0.0.1", "--port", "0",
         "--model", str(model), "--db", f"sqlite:///{db}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    for line in proc.stderr:
        if "Uvicorn running on http://" in line:
            # Keep draining stderr so the server never blocks on a full pipe.
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, line.split("running on ", 1)[1].split()[0]
        if time.monotonic() > deadline:
            break
    proc.terminate()
    raise RuntimeError("astrid serve did not start")


def load_level(url: str, payload: bytes, clients: int, requests: int) -> dict:
    """``requests`` POSTs shared among ``clients`` threads; latencies of each request."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            for _ in range(3):  # warm-up: connection, model session, allocations
                http.post("/v1/score", files={"file": ("b.npz", payload)})
            barrier.wait()
            while True:
                with lock:
                    if next(counter, None) is None:
                        return
                t0 = time.perf_counter()
                r = http.post("/v1/score", files={"file": ("b.npz", payload)})
                dt = time.perf_counter() - t0
                with lock:
                    (latencies if r.status_code == 200 else errors).append(
                        dt if r.status_code == 200 else f"{r.status_code} {r.text[:100]}")

    barrier = threading.Barrier(clients + 1)
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat_ms = np.array(latencies) * 1e3
    return {"clients": clients, "requests": len(latencies), "errors": errors[:5],
            "n_errors": len(errors), "wall_s": wall,
            "requests_per_s": len(latencies) / wall,
            "triplets_per_s": len(latencies) * BATCH / wall,
            "latency_ms": {f"p{q}": float(np.percentile(lat_ms, q)) for q in (50, 90, 99)}
            | {"mean": float(lat_ms.mean()), "max": float(lat_ms.max())}}


BATCH = 256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None,
                        help="model directory (default: the packaged model)")
    parser.add_argument("--tiny", action="store_true",
                        help="an untrained tiny network instead: measures the service overhead")
    parser.add_argument("--requests", type=int, default=48, help="requests per level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="astrid-bench-serve-") as tmp:
        tmp = Path(tmp)
        model = args.model or default_model_dir()
        if args.tiny:
            model = untrained_model(tmp / "model", tiny=True)
        elif not (model / "model.onnx").exists():
            print(f"{model}: no model there; using an untrained default-architecture network")
            model = untrained_model(tmp / "model", tiny=False)
        stamps, payload = batch_npz(BATCH)
        score_triplets(stamps, model)  # warm the in-process session
        direct = []
        for _ in range(10):
            t0 = time.perf_counter()
            score_triplets(stamps, model)
            direct.append(time.perf_counter() - t0)
        baseline_ms = float(np.median(direct) * 1e3)
        print(f"in-process score_triplets, {BATCH} triplets: {baseline_ms:.1f} ms median "
              f"({BATCH / baseline_ms * 1e3:.0f} triplets/s); upload {len(payload) / 2**20:.2f} MiB")

        proc, url = start_server(model, tmp / "labels.db")
        try:
            levels = []
            for clients in args.concurrency:
                level = load_level(url, payload, clients, args.requests)
                levels.append(level)
                lat = level["latency_ms"]
                print(f"{clients:>2} clients: {level['requests_per_s']:6.1f} req/s "
                      f"{level['triplets_per_s']:7.0f} triplets/s  latency p50 {lat['p50']:.0f} "
                      f"p90 {lat['p90']:.0f} p99 {lat['p99']:.0f} ms  errors {level['n_errors']}")
            metrics = httpx.get(f"{url}/metrics").text
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    served = [line for line in metrics.splitlines() if line.startswith("astrid_scores_served")]
    out = {"batch": BATCH, "model": "tiny (untrained)" if args.tiny else str(model),
           "baseline_in_process_ms": baseline_ms,
           "levels": levels, "server_metrics": served, "cpu_count": os.cpu_count(),
           "provenance": provenance(None, [str(model)])}
    name = "bench_serve_tiny.json" if args.tiny else "bench_serve.json"
    path = write_json_atomic(HERE / "results" / name, out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
