"""Wall time of the whole digits pipeline in a fresh store, each stage's share, and a no-op re-run.

Goals (issue 15): whole run <= 5 min on 2 cores, no-op re-run <= 1 s.

The whole run is `oracle-farm run CONFIG` in a fresh store, in one child process (so it includes the
command's start-up: imports, Ray); each stage's seconds come from that same run (``run_all``'s
``timings``, written by the child as JSON), and "start-up and the rest" is the whole run less the
stages. The no-op re-run is the CLI again on the finished store (it answers from the run record).

    python bench/pipeline_digits.py [--config configs/digits.yaml] [--store DIR] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# the child: `oracle-farm run` with its per-stage timings kept (the same steps the CLI runs)
CHILD = """
import json, sys
from pipeline.cli.common import _plan
from pipeline.stages.run import run_all
config, timings_path, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
timings = {}
try:
    run_all(_plan(config, overrides), None, timings)
finally:
    with open(timings_path, "w") as f:
        json.dump(timings, f)
"""


def oracle_farm() -> str:
    """The venv's oracle-farm beside this interpreter (or the repository's .venv)."""
    here = Path(sys.executable).parent / "oracle-farm"
    return str(here if here.exists() else ROOT / ".venv/bin/oracle-farm")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/digits.yaml")
    ap.add_argument("--store", default=None, help="a fresh store folder (default: a temporary one, removed)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config overrides, KEY=VALUE")
    args = ap.parse_args()
    store = args.store or tempfile.mkdtemp(prefix="bench-digits-")
    overrides = [f"store={store}", *args.overrides]
    timings_path = Path(store) / "bench-timings.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", CHILD, args.config, str(timings_path), *overrides],
                       check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
        whole = time.perf_counter() - start
        stages = json.loads(timings_path.read_text())
        start = time.perf_counter()
        cli = [oracle_farm(), "run", args.config, *[x for o in overrides for x in ("--set", o)]]
        subprocess.run(cli, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
        again = time.perf_counter() - start
    finally:
        if args.store is None:
            shutil.rmtree(store, ignore_errors=True)
    rest = whole - sum(stages.values())
    print(f"digits pipeline ({args.config}{', ' + ', '.join(args.overrides) if args.overrides else ''}): "
          f"whole run {whole:.1f} s (goal <= 300 s), no-op re-run {again:.2f} s (goal <= 1 s); "
          f"load average {os.getloadavg()[0]:.1f}")
    for name, seconds in [*stages.items(), ("start-up and the rest", rest)]:
        print(f"  {name:>22}: {seconds:7.1f} s  {100 * seconds / whole:5.1f} %")


if __name__ == "__main__":
    main()
