"""Run every benchmark script (``bench_*.py``) in turn; each prints its own table and writes
``benchmarks/results/<name>.json``. Benchmarks compare against a baseline measured in the same
run, because this machine is shared and noisy. Usage: ``python benchmarks/run_all.py [NAME...]``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(names: list[str]) -> int:
    scripts = sorted(HERE.glob("bench_*.py"))
    if names:
        scripts = [s for s in scripts if any(n in s.stem for n in names)]
    failed = []
    for script in scripts:
        print(f"\n=== {script.stem} ===", flush=True)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, str(script)], cwd=HERE.parent)
        print(f"--- {script.stem}: exit {proc.returncode} in {time.perf_counter() - start:.1f} s")
        if proc.returncode:
            failed.append(script.stem)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
