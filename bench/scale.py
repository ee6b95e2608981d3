"""Scale simulation (issue 28, item 5): the fit stage and the unlearn driver's datamodel path at CIFAR-10
size, on a synthetic store, measured per stage; the line through the measurements extrapolated in m.

    PYTHONPATH=$PWD .venv/bin/python bench/scale.py                  # m = 1000, 2000, 4000 (~15 min)
    PYTHONPATH=$PWD .venv/bin/python bench/scale.py --quick          # m = 200, 400 (seconds; tests)
    PYTHONPATH=$PWD .venv/bin/python bench/scale.py --sizing         # infra/README.md's sizing tables

The store: `data.dataset: synthetic` with CIFAR-10's 50,000 training and 10,000 validation points and 10
classes (images of shape (1, 2, 2): prepare stays cheap, nothing here reads pixels), prepared by the real
prepare stage; a subset family of m fit and `heldout` held-out models written block by block through the
real family code (`Family.write_block`: arrays, then the marker with its checksums, exactly as a training
task writes its rows; masks drawn by `FamilySpec.member`, Bernoulli(alpha)), whose margins and logits
follow planted sparse linear effects plus noise instead of a training. Local disk, and S3 on a moto server
bound to 127.0.0.1 (as tests/test_s3.py starts it).

Full width, reduced depth: every model and all 50,000 training points, but only the first `blocks` fit
blocks of `fit_block_targets` targets are fitted (`target_blocks` cut in the driver: the tasks themselves
are the stage's own); the outputs of the other targets are zero, so their chunks are never stored. Per-task
figures are measured; the stage's totals for the 60,000 targets are the tasks' sums scaled by 60,000 over
the targets fitted (said in the table).

Measured, per stage: wall time, peak host RSS of the driver (VmHWM, reset before the stage) and of each
task (the same, inside the task: `fit_block_task` wrapped), device memory on CUDA, and requests and bytes
read and written: on S3 every botocore call (operation, body bytes), on local disk every Zarr store call
and every file call of the store (`pipeline.store.Store`, fsspec's local file system).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
EXTRAPOLATE_TO = (20_000, 40_000, 300_000)
RSS_CAP = 6.5e9  # bytes, the bench's whole process tree (driver, Ray, moto): it stops above this


# ---------------------------------------------------------------------------------------- counting
class Counts:
    """Requests and bytes of this process, by kind: get (found), miss (get of an absent object),
    put, list, head (exists / info), delete. Thread-safe (Zarr's calls run on its event loop thread)."""

    KINDS = ("get", "miss", "put", "list", "head", "delete")

    def __init__(self):
        self.lock = threading.Lock()
        self.n = dict.fromkeys(self.KINDS, 0)
        self.bytes = dict.fromkeys(self.KINDS, 0)

    def add(self, kind: str, nbytes: int = 0) -> None:
        with self.lock:
            self.n[kind] += 1
            self.bytes[kind] += int(nbytes)

    def snapshot(self) -> dict:
        with self.lock:
            return {"n": dict(self.n), "bytes": dict(self.bytes)}


COUNTS = Counts()
_INSTALLED: set[str] = set()
_LOCAL = threading.local()


def _nbytes(value) -> int:
    if value is None:
        return 0
    if isinstance(value, (bytes, bytearray, memoryview)):
        return len(value)
    for attr in ("nbytes", "__len__"):
        if hasattr(value, attr):
            return int(getattr(value, attr)) if attr == "nbytes" else len(value)
    return 0


def install_counters() -> None:
    """Count this process's store traffic (idempotent): S3 through botocore, local disk through Zarr's
    LocalStore and the file calls of `Store` (only the outermost call of a nest counts)."""
    if "s3" not in _INSTALLED:
        _count_s3()
        _INSTALLED.add("s3")
    if "local" not in _INSTALLED:
        _count_local()
        _INSTALLED.add("local")


_S3_KIND = {"GetObject": "get", "PutObject": "put", "UploadPart": "put", "CreateMultipartUpload": "put",
            "CompleteMultipartUpload": "put", "ListObjectsV2": "list", "ListObjects": "list",
            "HeadObject": "head", "HeadBucket": "head", "DeleteObject": "delete", "DeleteObjects": "delete",
            "CopyObject": "put"}


def _count_s3() -> None:
    from aiobotocore.client import AioBaseClient

    original = AioBaseClient._make_api_call

    async def counted(self, operation_name, api_params):
        kind = _S3_KIND.get(operation_name, "head")
        try:
            response = await original(self, operation_name, api_params)
        except Exception as exc:
            code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
            COUNTS.add("miss" if kind in ("get", "head") and code in ("NoSuchKey", "404", "NotFound") else kind)
            raise
        if kind == "get":
            COUNTS.add("get", response.get("ContentLength", 0))
        elif kind == "put":
            COUNTS.add("put", _nbytes(api_params.get("Body")))
        else:
            COUNTS.add(kind)
        return response

    AioBaseClient._make_api_call = counted


def _outermost(kind: str, size=None):
    """A sync method wrapper counting only the outermost of nested counted calls in this thread."""

    def wrap(fn):
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            if getattr(_LOCAL, "depth", 0):
                return fn(*args, **kwargs)
            _LOCAL.depth = 1
            try:
                out = fn(*args, **kwargs)
            except FileNotFoundError:
                COUNTS.add("miss" if kind in ("get", "head") else kind)
                raise
            finally:
                _LOCAL.depth = 0
            COUNTS.add(kind, size(args, out) if size else 0)
            return out

        return counted

    return wrap


def _count_local() -> None:
    import fsspec.implementations.local as fs_local
    import zarr.storage

    from pipeline import store as store_mod

    lfs = fs_local.LocalFileSystem
    for name, kind, size in (("cat_file", "get", lambda a, out: len(out)), ("ls", "list", None),
                             ("exists", "head", None), ("info", "head", None), ("du", "list", None),
                             ("get_file", "get", lambda a, out: os.path.getsize(a[2]) if os.path.exists(a[2]) else 0),
                             ("put_file", "put", lambda a, out: os.path.getsize(a[1])), ("rm", "delete", None)):
        setattr(lfs, name, _outermost(kind, size)(getattr(lfs, name)))
    # Store.write_bytes writes local files itself (a temporary name, then a rename)
    store_mod.Store.write_bytes = _outermost("put", lambda a, out: len(a[2]))(store_mod.Store.write_bytes)

    local = zarr.storage.LocalStore
    get, set_, delete, exists = local.get, local.set, local.delete, local.exists
    list_dir, list_prefix, get_partial = local.list_dir, local.list_prefix, local.get_partial_values

    async def counted_get(self, key, prototype=None, byte_range=None):
        out = await get(self, key, prototype, byte_range)
        COUNTS.add("miss" if out is None else "get", 0 if out is None else len(out))
        return out

    async def counted_set(self, key, value):
        COUNTS.add("put", len(value))
        return await set_(self, key, value)

    async def counted_delete(self, key):
        COUNTS.add("delete")
        return await delete(self, key)

    async def counted_exists(self, key):
        COUNTS.add("head")
        return await exists(self, key)

    async def counted_partial(self, prototype, key_ranges):
        out = await get_partial(self, prototype, key_ranges)
        for buf in out:
            COUNTS.add("miss" if buf is None else "get", 0 if buf is None else len(buf))
        return out

    def listing(fn):
        async def counted_list(self, *args):
            COUNTS.add("list")
            async for item in fn(self, *args):
                yield item

        return counted_list

    local.get, local.set, local.delete, local.exists = counted_get, counted_set, counted_delete, counted_exists
    local.get_partial_values = counted_partial
    local.list_dir, local.list_prefix = listing(list_dir), listing(list_prefix)


# ---------------------------------------------------------------------------------------- memory
def _status_kb(field: str, pid: str = "self") -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1))


def reset_peak_rss() -> None:
    """Reset this process's VmHWM to its current RSS (Linux: clear_refs 5)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss() -> int:
    return _status_kb("VmHWM") * 1024


def _cuda_peak() -> int | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return int(torch.cuda.max_memory_allocated())


def _cuda_reset() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


class Probe:
    """One measured span of this process: wall time, peak RSS, device peak, store traffic."""

    def __enter__(self):
        install_counters()
        reset_peak_rss()
        _cuda_reset()
        self.before = COUNTS.snapshot()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.result = {"wall_s": time.perf_counter() - self.t0, "peak_rss": peak_rss(),
                       "device_peak": _cuda_peak(), "io": _delta(self.before, COUNTS.snapshot())}
        return False


def _delta(a: dict, b: dict) -> dict:
    return {part: {k: b[part][k] - a[part][k] for k in Counts.KINDS} for part in ("n", "bytes")}


class TreeWatch:
    """Samples the RSS of this process's whole tree (Ray's processes, the moto server) every 0.2 s:
    its peak, and a stop (SystemExit) when it passes RSS_CAP, so the bench never swamps the machine."""

    def __init__(self, cap: float = RSS_CAP):
        import psutil

        self.cap, self.peak, self.over = cap, 0, None
        self.me = psutil.Process()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import psutil

        while not self.stop.wait(0.2):
            total = 0
            for p in [self.me, *self.me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += p.memory_info().rss
            self.peak = max(self.peak, total)
            if total > self.cap and self.over is None:
                self.over = total
                for p in self.me.children(recursive=True):  # ours: Ray's workers and daemons, moto
                    with contextlib.suppress(psutil.Error):
                        p.kill()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        return False


# ---------------------------------------------------------------------------------------- the task
def measured_fit_block_task(store_root: str, cfg, start: int, end: int, *rest):
    """The fit stage's own task (`fit_block_task`), measured inside its worker: a record per task in
    $SCALE_RECORDS. A generator as the original: it yields what the original yields."""
    from pipeline.stages import fit

    with Probe() as probe:
        yield from fit.fit_block_task(store_root, cfg, start, end, *rest)
    _record("task", start, end, probe.result)


def measured_rows_block_task(store_root: str, cfg, start: int, end: int, *rest):
    """The fit's rows-copy task (`rows_block_task`, where the fit has one), measured as the fit task."""
    from pipeline.stages import fit

    with Probe() as probe:
        out = fit.rows_block_task(store_root, cfg, start, end, *rest)
    _record("rows", start, end, probe.result)
    return out


def _record(kind: str, start: int, end: int, result: dict) -> None:
    record = {"start": start, "end": end, "pid": os.getpid(), **result}
    Path(os.environ["SCALE_RECORDS"], f"{kind}-{start:07d}-{end:07d}.json").write_text(json.dumps(record))


# ---------------------------------------------------------------------------------------- the store
def bench_config(root: str, m: int, heldout: int, estimator: str, block_targets: int, lasso: dict | None = None,
                 points: tuple[int, int] = (50_000, 10_000)):
    """configs/cifar10.yaml on the synthetic CIFAR-shaped dataset, on the CPU, with m subset models."""
    from pipeline.config import load_config

    sets = [f"data.synthetic.{k}={v}" for k, v in
            (("n_train", points[0]), ("n_val", points[1]), ("classes", 10), ("shape", "[1,2,2]"))]
    overrides = [f"store={root}", "data.dataset=synthetic", "data.verify_md5=false", *sets,
                 "model.name=mlp", "model.hidden=8", f"train.subset.models={m}", f"train.subset.heldout={heldout}",
                 f"fit.estimator={estimator}", "execution.device=cpu", "execution.num_gpus=0",
                 "execution.num_cpus=1", "execution.threads=1", f"execution.fit_block_targets={block_targets}",
                 "execution.block_size=16"]
    if points[0] < 50_000:  # the published sets index CIFAR-10's 50,000 points: like-sized random sets instead
        overrides.append("forget_sets=[{name: q-random, kind: random, size: 100, seed: 1}, "
                         "{name: q-class, kind: class, class_id: 3, size: 250}]")
    for key, value in (lasso or {}).items():
        overrides.append(f"fit.lasso.{key}={value}")
    return load_config(REPO / "configs" / "cifar10.yaml", overrides)


class Planted:
    """Planted per-target effects: each of the first `width` targets depends on `k` training points
    (per class for logits) plus Gaussian noise; the other targets are 0."""

    def __init__(self, n_train: int, width: int, classes: int, k: int = 8, noise: float = 1.0, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.width, self.noise = width, noise
        self.support = rng.integers(0, n_train, size=(width, k))
        self.w_margin = rng.normal(0, 1, size=(width, k)).astype(np.float32)
        self.w_logit = rng.normal(0, 1, size=(width, k, classes)).astype(np.float32)
        self.bias = rng.normal(0, 1, size=(width, classes)).astype(np.float32)

    def outputs(self, masks: np.ndarray, points: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        included = masks[:, self.support].astype(np.float32)  # (b, width, k)
        n, c = masks.shape[0], self.w_logit.shape[2]
        margins = np.zeros((n, points), np.float32)
        logits = np.zeros((n, points, c), np.float16)
        margins[:, : self.width] = np.einsum("bwk,wk->bw", included, self.w_margin) + \
            rng.normal(0, self.noise, (n, self.width))
        z = self.bias + np.einsum("bwk,wkc->bwc", included, self.w_logit) + rng.normal(0, self.noise, (n, self.width, c))
        logits[:, : self.width] = z.astype(np.float16)
        return margins, logits


def write_subset_families(plan, planted: Planted) -> None:
    """Both roles of the subset family, block by block, as train tasks write them (no training)."""
    from pipeline.plan import contiguous_runs, family_store, stage_section, train_families
    from pipeline.store import ensure_stage

    meta = plan.prepared_meta()
    points, block = meta["n_train"] + meta["n_val"], plan.cfg.execution.block_size
    for fam in [f for f in train_families(plan) if f.kind == "subset" and f.n_models]:
        section, upstream = stage_section(plan, fam)
        ensure_stage(plan.store, fam.ref, section, upstream, plan.cfg.name)
        family = family_store(plan, fam, meta)
        family.ensure_arrays(fam.n_models, block)
        done = family.done_mask(fam.n_models)
        for start in range(0, fam.n_models, block):
            if done[start : start + block].all():  # a kept working folder: written already
                continue
            end = min(start + block, fam.n_models)
            masks = np.stack([fam.member(i, meta["n_train"])[1] for i in range(start, end)])
            margins, logits = planted.outputs(masks, points, seed=zlib.crc32(f"{fam.role}-{start}".encode()))
            outputs = {"margins": margins, "logits": logits, "masks": masks,
                       "accuracy": np.full((end - start, 2), 0.5, np.float32)}
            for a, b in contiguous_runs(list(range(start, end))):
                family.write_block(a, {k: v[a - start : b - start] for k, v in outputs.items()},
                                   {"planted": True, "block": [start, end]})


def build_store(plan, width: int) -> None:
    """Prepare (the real stage) and the planted subset family, unless already there."""
    from pipeline.stages.prepare import run_prepare

    run_prepare(plan)
    meta = plan.prepared_meta()
    write_subset_families(plan, Planted(meta["n_train"], width, meta["classes"]))


# ---------------------------------------------------------------------------------------- moto
class Moto:
    """A moto S3 server on 127.0.0.1 (its own session; stopped by pid) and a bucket."""

    def __init__(self, log: Path):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    break
            time.sleep(0.2)
        else:
            raise RuntimeError("moto server did not start")

    def env(self) -> dict:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "scalebench", "AWS_SECRET_ACCESS_KEY":
                "scalebench", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}

    def bucket(self, name: str) -> None:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="scalebench",
                     aws_secret_access_key="scalebench", region_name="us-east-1").create_bucket(Bucket=name)

    def rss(self) -> int:
        import psutil

        with contextlib.suppress(psutil.Error):
            return psutil.Process(self.proc.pid).memory_info().rss
        return 0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


# ---------------------------------------------------------------------------------------- stages
def _records(folder: Path, kind: str = "task") -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob(f"{kind}-*.json"))]


def run_fit_stage(plan, blocks: int, records: Path) -> dict:
    """`run_fit` as the CLI runs it (through Ray), its target blocks cut to the first `blocks`, its task
    measured (`measured_fit_block_task`). -> the driver's probe and the tasks' records."""
    import pipeline.stages.fit as fit
    from bench import scale as me  # by reference, so Ray's workers import it (and the original task)

    for p in [*records.glob("task-*.json"), *records.glob("rows-*.json")]:
        p.unlink()
    cut = lambda n, size, _real=fit.target_blocks: _real(n, size)[:blocks]  # noqa: E731
    saved = fit.target_blocks, fit.fit_block_task, fit._write_rows_copy
    fit.target_blocks, fit.fit_block_task = cut, me.measured_fit_block_task
    fit._write_rows_copy = lambda *a: None  # noqa: E731 - measured apart (run_rows_copy): m-independent
    try:
        with Probe() as probe:
            summary = fit.run_fit(plan)
    finally:
        fit.target_blocks, fit.fit_block_task, fit._write_rows_copy = saved
    return {"driver": probe.result, "tasks": _records(records), "summary": summary}


def run_rows_copy(plan, records: Path) -> dict:
    """The fit's row-major copies (`_write_rows_copy`: theta_rows, and theta_logit_rows where the fit
    has it, by Ray tasks there), measured on its own: its work is theta's shape, whatever m. -> the
    driver's probe, with the tasks' records under "tasks" (none where the driver copies)."""
    import inspect

    import pipeline.stages.fit as fit
    from bench import scale as me

    args = [plan, plan.prepared_meta()]
    if len(inspect.signature(fit._write_rows_copy).parameters) == 3:  # the fit with row-copy tasks
        args.append(fit._finished_blocks(plan))
    saved = getattr(fit, "rows_block_task", None)
    if saved is not None:
        fit.rows_block_task = me.measured_rows_block_task
    try:
        with Probe() as probe:
            fit._write_rows_copy(*args)
    finally:
        if saved is not None:
            fit.rows_block_task = saved
    return {**probe.result, "tasks": _records(records, "rows")}


def forget_row_sets(plan) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The forget sets the unlearn driver sums rows for (the config's nine published sets and its
    tuning set), and a late one: published set 10, which no config names."""
    from pipeline.config import PublishedForget, RandomForget
    from pipeline.data.forget_sets import resolve_forget_set


    sets = dict(plan.forget_sets)
    n_train = len(plan.train_labels)
    spec = PublishedForget(kind="published", name="late-10", number=10) if n_train >= 50_000 else \
        RandomForget(kind="random", name="late", size=n_train // 50, seed=10)
    late = resolve_forget_set(spec, plan.train_labels)
    return sets, late


class _Columns:
    """theta_logit seen through its first `width` targets (the fitted ones): `sum_forget_rows` reads
    exactly the chunks it reads of the whole array there, so requests and bytes scale by 60,000 / width."""

    def __init__(self, array, width: int):
        self.array, self.width = array, width
        self.shape = (array.shape[0], width, *array.shape[2:])
        self.chunks = array.chunks

    def get_orthogonal_selection(self, selection):
        rows, cols, rest = selection
        return self.array.get_orthogonal_selection((rows, slice(cols.start, min(cols.stop, self.width)), rest))


def run_forget_rows(plan, width: int) -> dict:
    """The unlearn driver's datamodel path: the summed per-logit rows of every forget set it needs,
    then of a late set; with today's code (`sum_forget_rows` over theta_logit's fitted columns)."""
    from pipeline.stages import fit

    sets, late = forget_row_sets(plan)
    group = plan.store.open_group(f"{plan.fit.rel}/arrays.zarr", mode="r")
    shape = (group["theta_logit_rows"] if "theta_logit_rows" in group else group["theta_logit"]).shape
    row_bytes = int(np.prod(shape[1:])) * 2
    parts = hasattr(fit, "write_forget_parts")  # the fit writes forget rows (issue 28, item 2)
    if parts:  # the driver's own function, whole: it never reads theta_logit's columns
        rows = lambda forget: fit.forget_rows(plan, forget, keep=False)  # noqa: E731
    else:  # today's: theta_logit's column chunks, over the fitted columns only (x 60,000 / width after)
        narrowed = _Columns(group["theta_logit"], width)
        rows = lambda forget: fit.sum_forget_rows(narrowed, forget)  # noqa: E731
    out = {}
    with Probe() as probe:
        for forget in sets.values():
            rows(forget)
    out["configured"] = {**probe.result, "rows": int(sum(len(f) for f in sets.values())),
                         "row_bytes": row_bytes, "sets": len(sets), "requests_scale": not parts}
    with Probe() as probe:
        rows(late)
    out["late"] = {**probe.result, "rows": len(late), "row_bytes": row_bytes, "sets": 1, "requests_scale": not parts}
    return out


# ---------------------------------------------------------------------------------------- one case
def run_case(backend: str, m: int, estimator: str, args, work: Path, moto: Moto | None, tail: bool) -> dict:
    """Build (or reuse) the store for (backend, m), run the fit; with `tail` also the fit driver's
    row-major copy and the forget rows (both independent of m: measured once per backend), all measured."""
    import ray

    from pipeline.plan import Plan
    from pipeline.store import Store

    root = str(work / f"local-m{m}") if backend == "local" else f"s3://scale/m{m}"
    lasso = {"n_lambdas": args.lasso_lambdas, "max_iter": args.lasso_iter} if estimator == "lasso" else None
    cfg = bench_config(root, m, args.heldout, estimator, args.block_targets, lasso, tuple(args.points))
    plan = Plan(cfg, Store(cfg.store))
    width = args.blocks * args.block_targets
    t0 = time.perf_counter()
    # planted over the whole point chunks the fitted blocks read (a fit task reads its band of 4,096 points)
    from pipeline.plan import SUBSET_POINT_CHUNK

    build_store(plan, min(sum(args.points), -(-width // SUBSET_POINT_CHUNK) * SUBSET_POINT_CHUNK))
    built = time.perf_counter() - t0
    records = work / "records"
    records.mkdir(exist_ok=True)
    os.environ["SCALE_RECORDS"] = str(records)
    plan.store.remove(plan.fit.rel)  # a kept working folder's fit: fitted again, measured
    try:
        fit_result = run_fit_stage(plan, args.blocks, records)
        copy = run_rows_copy(plan, records) if tail and backend in args.rows_copy_on else None
        rows = run_forget_rows(plan, width) if tail else None
    finally:
        ray.shutdown()  # fresh workers for the next case: a worker's caches would carry over
    return {"backend": backend, "m": m, "estimator": estimator, "heldout": args.heldout, "blocks": args.blocks,
            "block_targets": args.block_targets, "fitted_targets": width, "targets": sum(args.points), "points": list(args.points), "build_s": built,
            "moto_rss": moto.rss() if moto else None, "fit": fit_result, "forget_rows": rows, "rows_copy": copy}


# ---------------------------------------------------------------------------------------- analysis
def task_totals(tasks: list[dict]) -> dict:
    """Sums over the tasks of wall time and traffic; the largest peak RSS."""
    n = {k: sum(t["io"]["n"][k] for t in tasks) for k in Counts.KINDS}
    b = {k: sum(t["io"]["bytes"][k] for t in tasks) for k in Counts.KINDS}
    return {"wall_s": sum(t["wall_s"] for t in tasks), "peak_rss": max(t["peak_rss"] for t in tasks),
            "device_peak": max((t["device_peak"] or 0) for t in tasks) or None, "io": {"n": n, "bytes": b}}


def reads(io: dict) -> tuple[int, int]:
    n = io["n"]
    return n["get"] + n["miss"] + n["list"] + n["head"], io["bytes"]["get"]


def writes(io: dict) -> tuple[int, int]:
    return io["n"]["put"] + io["n"]["delete"], io["bytes"]["put"]


def metrics(case: dict) -> dict[str, float]:
    """The figures per case that the table shows and the line extrapolates. Per task: measured, per
    task of `fit_block_targets` targets; stage: the tasks' sums x 60,000 / targets fitted, plus the
    driver's own traffic as measured."""
    fit, scale = case["fit"], case["targets"] / case["fitted_targets"]
    tasks = task_totals(fit["tasks"])
    per = len(fit["tasks"])
    t_req, t_bytes = reads(tasks["io"])
    w_req, w_bytes = writes(tasks["io"])
    d_req, d_bytes = reads(fit["driver"]["io"])
    dw_req, dw_bytes = writes(fit["driver"]["io"])
    out = {
        "fit.task.wall_s": tasks["wall_s"] / per, "fit.task.peak_rss_gb": tasks["peak_rss"] / 1e9,
        "fit.task.read_req": t_req / per, "fit.task.read_gb": t_bytes / per / 1e9,
        "fit.task.write_req": w_req / per, "fit.task.write_gb": w_bytes / per / 1e9,
        "fit.driver.wall_s": fit["driver"]["wall_s"], "fit.driver.peak_rss_gb": fit["driver"]["peak_rss"] / 1e9,
        "fit.driver.read_req": d_req, "fit.driver.read_gb": d_bytes / 1e9,
        "fit.driver.write_req": dw_req, "fit.driver.write_gb": dw_bytes / 1e9,
        "fit.stage.task_hours": tasks["wall_s"] * scale / 3600,
        "fit.stage.read_req": t_req * scale + d_req, "fit.stage.read_gb": t_bytes * scale / 1e9 + d_bytes / 1e9,
        "fit.stage.write_req": w_req * scale + dw_req,
        "fit.stage.write_gb": w_bytes * scale / 1e9 + dw_bytes / 1e9,
    }
    if tasks["device_peak"]:
        out["fit.task.device_peak_gb"] = tasks["device_peak"] / 1e9
    rows = case.get("forget_rows")
    if rows:
        for part in ("configured", "late"):
            r = rows[part]
            req, nbytes = reads(r["io"])
            own = r["rows"] * r["row_bytes"]
            out[f"rows.{part}.wall_s_all"] = r["wall_s"] * scale
            out[f"rows.{part}.peak_rss_gb"] = r["peak_rss"] / 1e9
            out[f"rows.{part}.read_req_all"] = req * (scale if r.get("requests_scale", True) else 1)
            out[f"rows.{part}.read_gb_all"] = nbytes * scale / 1e9
            out[f"rows.{part}.rows_own_gb"] = own / 1e9
            out[f"rows.{part}.read_over_own"] = nbytes * scale / own
    copy = case.get("rows_copy")
    if copy:  # the whole array (its unfitted columns empty: requests as at full depth, bytes not)
        req, w_req = reads(copy["io"])[0], writes(copy["io"])[0]
        if copy.get("tasks"):  # the copy by Ray tasks: theirs too
            io = task_totals(copy["tasks"])["io"]
            req, w_req = req + reads(io)[0], w_req + writes(io)[0]
            out["fit.rows_copy.task_peak_rss_gb"] = max(t["peak_rss"] for t in copy["tasks"]) / 1e9
        out.update({"fit.rows_copy.wall_s": copy["wall_s"], "fit.rows_copy.peak_rss_gb": copy["peak_rss"] / 1e9,
                    "fit.rows_copy.read_req": req, "fit.rows_copy.write_req": w_req})
    return out


def fit_line(ms: list[int], ys: list[float]) -> tuple[float, float]:
    """Least squares y = a + b m (the mean when there is one m)."""
    x, y = np.asarray(ms, float), np.asarray(ys, float)
    if len(set(ms)) < 2:
        return float(y.mean()), 0.0
    b, a = np.polyfit(x, y, 1)
    return float(a), float(b)


def summarize(cases: list[dict]) -> list[dict]:
    """One row per (backend, estimator, metric): the measured values by m and the line's values."""
    rows = []
    groups: dict = {}
    for case in cases:
        groups.setdefault((case["backend"], case["estimator"]), []).append(case)
    for (backend, estimator), group in groups.items():
        group.sort(key=lambda c: c["m"])
        per_case = [metrics(c) for c in group]
        ms = [c["m"] for c in group]
        names = list(dict.fromkeys(name for p in per_case for name in p))
        for name in names:
            have = [(m, p[name]) for m, p in zip(ms, per_case) if name in p]
            a, b = fit_line([m for m, _ in have], [y for _, y in have])
            rows.append({"backend": backend, "estimator": estimator, "metric": name,
                         "measured": {str(m): y for m, y in have}, "slope_per_1k_models": b * 1000,
                         "line": {str(x): a + b * x for x in EXTRAPOLATE_TO}})
    return rows


def _fmt(x: float) -> str:
    if abs(x) >= 1e5:
        return f"{x:.3g}"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}"


def table(rows: list[dict]) -> str:
    if not rows:
        return ""
    ms = sorted({m for r in rows for m in r["measured"]}, key=int)
    head = ["backend", "estimator", "metric", *[f"m={m}" for m in ms], *[f"line m={x}" for x in EXTRAPOLATE_TO]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["backend"], r["estimator"], r["metric"], *[_fmt(r["measured"][m]) if m in r["measured"] else "" for m in ms],
                 *[_fmt(r["line"][str(x)]) for x in EXTRAPOLATE_TO]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


LEGEND = """\
fit.task.*: one fit task of {bt} targets (measured; per-logit, so {bt} x 11 outputs), mean over its {blocks}
tasks, peak RSS the largest. fit.driver.*: the driver of `run_fit` (markers, the row-major copy of theta,
COMPLETE) as measured, with only {width} of {targets:,} targets fitted. fit.stage.*: the tasks' sums scaled
to the {targets:,} targets (x {scale:g}) plus the driver's own. rows.configured.*: `sum_forget_rows` for the
config's {nsets} forget sets; rows.late.*: for published set 10 added later; both over the fitted columns,
scaled x {scale:g} to all {targets:,} (`*_all`); read_over_own: bytes read / the rows' own bytes
(|F| x {targets:,} x 10 float16). read_req counts GET (found or absent), LIST and HEAD; write_req PUT and
DELETE. GB = 1e9 bytes. The rows copy and the forget rows do not depend on m (theta's and theta_logit's
shapes do not): measured once per backend, at the largest m; fit.rows_copy.* runs over the whole array,
whose unfitted columns are empty chunks (its requests are as at full depth, its bytes are not shown)."""


# ---------------------------------------------------------------------------------------- predictions
def predictions(cases: list[dict]) -> list[dict]:
    """Where the fit predicts a task's peak before it starts (decision 35, `predict_task_memory`): the
    prediction for each measured case beside its measured peak, and for configs/cifar10.yaml as it is
    (fit_block_targets 2,048, on CUDA) at 20k, 40k and 300k models. Empty where the fit has none."""
    import pipeline.stages.fit as fit
    from pipeline.config import load_config

    if not hasattr(fit, "predict_task_memory"):
        return []
    meta = {"n_train": 50_000, "n_val": 10_000, "classes": 10}
    out = []
    for case in cases:
        cfg = bench_config(str(REPO / "unused-store"), case["m"], case["heldout"], case["estimator"],
                           case["block_targets"], points=tuple(case["points"]))
        points = {"n_train": case["points"][0], "n_val": case["points"][1], "classes": 10}
        pred = fit.predict_task_memory(cfg, points)
        out.append({"config": "bench", "backend": case["backend"], "estimator": case["estimator"], "m": case["m"],
                    "block_targets": case["block_targets"], "predicted_gb": pred.peak / 1e9, "phase": pred.phase,
                    "measured_gb": max(t["peak_rss"] for t in case["fit"]["tasks"]) / 1e9})
    for estimator in ("diff_in_means", "lasso"):
        for m in EXTRAPOLATE_TO:
            cfg = load_config(REPO / "configs" / "cifar10.yaml", [f"train.subset.models={m}", f"fit.estimator={estimator}"])
            pred = fit.predict_task_memory(cfg, meta)
            out.append({"config": "configs/cifar10.yaml", "estimator": estimator, "m": m,
                        "block_targets": cfg.execution.fit_block_targets, "device": cfg.execution.device,
                        "predicted_gb": pred.peak / 1e9, "phase": pred.phase, "parts": pred.describe()})
    return out


def predictions_table(preds: list[dict]) -> str:
    if not preds:
        return ""
    lines = ["| config | estimator | m | targets per task | predicted peak (GB) | measured peak RSS (GB) | phase |",
             "|---|---|---|---|---|---|---|"]
    for p in preds:
        measured = f"{p['measured_gb']:.2f}" if "measured_gb" in p else ""
        where = p["config"] + (f" ({p['backend']})" if "backend" in p else f" ({p['device']})")
        lines.append(f"| {where} | {p['estimator']} | {p['m']:,} | {p['block_targets']:,} | {p['predicted_gb']:.2f} | "
                     f"{measured} | {p['phase']} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- main
def run_bench(args) -> dict:
    work = Path(args.work or tempfile.mkdtemp(prefix="scale-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    cases, moto = [], None
    started = time.perf_counter()
    try:
        with TreeWatch() as watch:
            for backend in args.backends:
                if backend == "s3":
                    moto = Moto(work / "moto.log")
                    os.environ.update(moto.env())
                    moto.bucket("scale")
                for estimator in args.estimators:
                    ms = args.m if estimator == "diff_in_means" else args.m_lasso
                    for m in ms:
                        print(f"scale: {backend} {estimator} m={m}", file=sys.stderr, flush=True)
                        tail = estimator == "diff_in_means" and m == ms[-1]
                        cases.append(run_case(backend, m, estimator, args, work, moto, tail))
                        if args.json:  # as it goes: a run stopped later keeps what it measured
                            Path(args.json + ".partial").write_text(json.dumps(cases))
                        if watch.over:
                            raise SystemExit(f"scale: stopped, the process tree passed {RSS_CAP / 1e9:.1f} GB")
                if moto:
                    moto.stop()
                    moto = None
                    for key in moto_env_keys():
                        os.environ.pop(key, None)
            tree_peak = watch.peak
    finally:
        if moto:
            moto.stop()
        if not args.work and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    import platform

    return {"command": " ".join(["bench/scale.py", *sys.argv[1:]]), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
            "bench_s": time.perf_counter() - started, "tree_peak_rss": tree_peak, "cases": cases,
            "rows": summarize(cases), "predictions": predictions(cases), "legend": LEGEND.format(bt=args.block_targets, blocks=args.blocks,
                                                              width=args.blocks * args.block_targets,
                                                              scale=sum(args.points) / (args.blocks * args.block_targets),
                                                              targets=sum(args.points),
                                                              nsets=next((c["forget_rows"]["configured"]["sets"] for c in cases if c["forget_rows"]), 0))}


def moto_env_keys() -> tuple[str, ...]:
    return ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_REGION")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="m = 100, 200, diff-in-means on local disk, 5,000 + 1,000 points, one block of 16 targets (tests)")
    p.add_argument("--m", type=int, nargs="+", default=[1000, 2000, 4000])
    p.add_argument("--m-lasso", type=int, nargs="+", default=[500, 1000, 2000],
                   help="LASSO's m (its designs take ~5x the masks' float32 bytes today: 4k would pass the cap)")
    p.add_argument("--backends", nargs="+", default=["local", "s3"], choices=["local", "s3"])
    p.add_argument("--estimators", nargs="+", default=["diff_in_means", "lasso"], choices=["diff_in_means", "lasso"])
    p.add_argument("--heldout", type=int, default=500)
    p.add_argument("--points", type=int, nargs=2, default=[50_000, 10_000], metavar=("N_TRAIN", "N_VAL"))
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--block-targets", type=int, default=32)
    p.add_argument("--lasso-lambdas", type=int, default=3)
    p.add_argument("--lasso-iter", type=int, default=20)
    p.add_argument("--rows-copy-on", nargs="*", default=["local"], choices=["local", "s3"],
                   help="backends on which the fit's row-major copy is measured (m-independent; on moto it is "
                        "~100,000 requests of empty chunks)")
    p.add_argument("--work", help="working folder (kept); default a temporary one, removed")
    p.add_argument("--keep", action="store_true", help="keep the temporary working folder")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--sizing", action="store_true", help="print infra/README.md's sizing tables and exit")
    args = p.parse_args(argv)
    if args.quick:
        args.m, args.heldout, args.block_targets, args.blocks, args.points = [100, 200], 20, 16, 1, [5_000, 1_000]
        args.backends, args.estimators = ["local"], ["diff_in_means"]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.sizing:
        from bench.sizing import sizing_markdown

        print(sizing_markdown())
        return 0
    result = run_bench(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"# scale simulation: {result['command']}  ({result['date']}, {result['machine']}, "
          f"{result['bench_s']:.0f} s, process tree peak {result['tree_peak_rss'] / 1e9:.2f} GB)")
    print(result["legend"])
    print(table(result["rows"]))
    if result["predictions"]:
        print("\nA fit task's peak as the fit predicts it before it starts (decision 35):\n")
        print(predictions_table(result["predictions"]))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
