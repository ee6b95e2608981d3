"""Median latency of attribution queries on a synthetic 50,000 x 10,000 float16 matrix on local disk,
stored in the fit stage's two layouts (column chunks (4096, 16), row chunks (16, 4096)).
Goal: <= 50 ms for a top-k of one target and for one training point's row.

    python bench/query_latency.py [--n-train 50000] [--n-targets 10000] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.stages.fit import TARGET_CHUNK, TRAIN_CHUNK  # noqa: E402
from pipeline.stages.query import _extremes  # noqa: E402


def build(root: Path, n: int, t: int) -> tuple[zarr.Array, zarr.Array]:
    group = zarr.open_group(zarr.storage.LocalStore(str(root)), mode="w", zarr_format=3)
    cols = group.create_array("theta", shape=(n, t), chunks=(TRAIN_CHUNK, TARGET_CHUNK), dtype="float16")
    rows = group.create_array("theta_rows", shape=(n, t), chunks=(TARGET_CHUNK, TRAIN_CHUNK), dtype="float16")
    rng = np.random.default_rng(0)
    for start in range(0, n, TRAIN_CHUNK):
        block = rng.standard_normal((min(TRAIN_CHUNK, n - start), t), dtype=np.float32).astype(np.float16)
        cols[start : start + len(block)] = block
        rows[start : start + len(block)] = block
    return cols, rows


def median_ms(fn, repeats: int, rng) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(rng)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-train", type=int, default=50_000)
    ap.add_argument("--n-targets", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        cols, rows = build(Path(tmp) / "fit.zarr", args.n_train, args.n_targets)
        print(f"built {args.n_train} x {args.n_targets} float16 in {time.perf_counter() - t0:.0f} s")
        rng = np.random.default_rng(1)
        top_k = median_ms(lambda r: _extremes(cols[:, int(r.integers(args.n_targets))].astype(np.float32), 10,
                                              lambda i, v: (i, v)), args.repeats, rng)
        row = median_ms(lambda r: rows[int(r.integers(args.n_train)), :], args.repeats, rng)
        full_scan = median_ms(lambda r: rows[:, int(r.integers(args.n_targets))], 3, rng)
    print(f"top-k of one target (column layout): median {top_k:.1f} ms (goal <= 50 ms)")
    print(f"row of one training point (row layout): median {row:.1f} ms (goal <= 50 ms)")
    print(f"baseline, one target read from the row layout: median {full_scan:.0f} ms; ratio {full_scan / top_k:.0f}x")


if __name__ == "__main__":
    main()
