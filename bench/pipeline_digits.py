"""Wall time of the whole digits pipeline (`oracle-farm run configs/digits.yaml`) in a fresh store,
and of a no-op re-run of the finished config.  Goals: whole run <= 10 min on 2 cores, re-run <= 5 s.

    python bench/pipeline_digits.py [--config configs/digits.yaml] [--store DIR]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed_run(config: str, store: str) -> float:
    start = time.perf_counter()
    subprocess.run([str(ROOT / ".venv/bin/oracle-farm"), "run", config, "--set", f"store={store}"],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/digits.yaml")
    ap.add_argument("--store", default=None)
    args = ap.parse_args()
    store = args.store or tempfile.mkdtemp(prefix="bench-digits-")
    try:
        whole = timed_run(args.config, store)
        again = timed_run(args.config, store)
    finally:
        if args.store is None:
            shutil.rmtree(store, ignore_errors=True)
    print(f"digits pipeline: whole run {whole:.1f} s (goal <= 600 s), no-op re-run {again:.1f} s (goal <= 5 s)")


if __name__ == "__main__":
    main()
