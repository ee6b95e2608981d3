"""The fit stage: subset models' masks and outputs -> attribution matrices, target block by target block.

Arrays (see storage_layout.md), in <root>/fit/fit-<id>/arrays.zarr:
  theta       (n_train, P) float32, chunks (4096, 16)  per-margin datamodels, column reads (a target)
  theta_rows  (n_train, P) float32, chunks (16, 4096)  the same values, row reads (a training point)
  bias, lds, lam  (P,) float32
  theta_logit (n_train, P, C) float16, chunks (256, 16, C)  per-logit datamodels (dm-direct, DMM)
  bias_logit  (P, C) float32
and, derived from theta_logit per forget set (what dm-direct and DMM use; safe to delete):
  derived/forget-rows-<forget id>.npz  sums (P, C) = sum_{i in F} theta_logit[i], diagonal (|F|, C)
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import ray
import torch

from pipeline.config import Config
from pipeline.datamodels import get_estimator, lasso_design, lds
from pipeline.execution import init_ray, run_streaming_tasks, task_options
from pipeline.execution.gate import pass_gate
from pipeline.plan import TARGET_CHUNK, done_targets as _done_targets, target_blocks
from pipeline.plan import FamilySpec, Plan, StageError, family_store
from pipeline.store import Store, ensure_stage, is_complete, mark_complete

TRAIN_CHUNK = 4096
LOGIT_TRAIN_CHUNK = 256
FORGET_SUM_COLUMNS = 4096  # targets of theta_logit read at once when summing a forget set's rows

# Decoded bands of the finished subset families' arrays, per worker process, by (store, family, array,
# models, band of point chunks, the blocks' markers). A task reads whole chunks: where a chunk spans more
# points than a fit block (digits: one chunk of all 1,797 points per model), every task decoded all of
# them again (1.5 s of a 128-target digits task); a worker now decodes a band once for all the blocks it
# fits in it, and again only if a block was written since (its marker). Bands above _KEPT_BYTES are read
# by each task, as before.
_KEPT: dict[tuple, np.ndarray] = {}
_KEPT_MAX, _KEPT_BYTES = 8, 1 << 30


def _subset_family(plan: Plan, role: str) -> FamilySpec:
    sub = plan.cfg.train.subset
    n = sub.models if role == "fit" else sub.heldout
    return FamilySpec(plan.subset, role, n, "subset", alpha=sub.alpha, logits=sub.store_logits)


def _check_inputs(plan: Plan, meta: dict) -> None:
    sub = plan.cfg.train.subset
    if sub.models < 2:
        raise StageError(f"train.subset.models: the fit needs at least 2 subset models, got {sub.models}")
    if plan.cfg.fit.per_logit and not sub.store_logits:
        raise StageError("fit.per_logit needs train.subset.store_logits: true")
    for role in ("fit", "heldout"):
        fam = _subset_family(plan, role)
        if fam.n_models and not family_store(plan, fam, meta).done_mask(fam.n_models).all():
            raise StageError(f"the subset family ({role}) is not fully trained: run `oracle-farm train` first")


def _create_arrays(plan: Plan, meta: dict) -> None:
    n, p, c = meta["n_train"], meta["n_train"] + meta["n_val"], meta["classes"]
    group = plan.store.open_group(f"{plan.fit.rel}/arrays.zarr")
    specs = {
        "theta": ((n, p), (min(TRAIN_CHUNK, n), TARGET_CHUNK), "float32"),
        "theta_rows": ((n, p), (TARGET_CHUNK, min(TRAIN_CHUNK, p)), "float32"),
        "bias": ((p,), (TARGET_CHUNK,), "float32"),
        "lds": ((p,), (TARGET_CHUNK,), "float32"),
        "lam": ((p,), (TARGET_CHUNK,), "float32"),
    }
    if plan.cfg.fit.per_logit:
        specs["theta_logit"] = ((n, p, c), (min(LOGIT_TRAIN_CHUNK, n), TARGET_CHUNK, c), "float16")
        specs["bias_logit"] = ((p, c), (TARGET_CHUNK, c), "float32")
    for name, (shape, chunks, dtype) in specs.items():
        if name not in group:
            group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=0)


def run_fit(plan: Plan) -> dict:
    """The fit, written under the fit stage's lease (pipeline.store.lease) unless already complete."""
    from pipeline.store.lease import hold

    plan.store.check_reachable()
    meta = plan.prepared_meta()
    if is_complete(plan.store, plan.fit):
        return plan.store.read_json(f"{plan.fit.rel}/COMPLETE.json")
    _check_inputs(plan, meta)
    with hold(plan.store, [plan.fit.rel], plan.cfg.execution):
        return _run_fit(plan)


def _run_fit(plan: Plan) -> dict:
    """Fit every pending target block as a Ray task, then write the row-major copy and COMPLETE."""
    plan.store.check_reachable()
    meta = plan.prepared_meta()
    ref = plan.fit
    if is_complete(plan.store, ref):
        return plan.store.read_json(f"{ref.rel}/COMPLETE.json")
    _check_inputs(plan, meta)
    upstream = {"subset": plan.subset.id, "models": plan.cfg.train.subset.models,
                "heldout": plan.cfg.train.subset.heldout}
    ensure_stage(plan.store, ref, plan.cfg.fit.section(), upstream, plan.cfg.name)
    _create_arrays(plan, meta)
    n_points = meta["n_train"] + meta["n_val"]
    done = _done_targets(plan.store, ref.rel, n_points)
    todo = [(a, b) for a, b in target_blocks(n_points, plan.cfg.execution.fit_block_targets) if not done[a:b].all()]
    if todo:
        warm_kernels(plan.cfg)
        init_ray(plan.cfg.execution)
        # a generator task: it yields the targets it has done, chunk by chunk, so progress moves
        remote = ray.remote(fit_block_task).options(num_returns="streaming", **task_options(plan.cfg.execution))
        gens = [remote.remote(plan.store.root, plan.cfg, a, b) for a, b in todo]
        run_streaming_tasks("fit", gens, sum(b - a for a, b in todo), unit="targets",
                            names=[f"targets {a}..{b}" for a, b in todo])
    _write_rows_copy(plan, meta)
    scores = plan.store.open_group(f"{ref.rel}/arrays.zarr", mode="r")["lds"][:]
    n = meta["n_train"]
    summary = {"estimator": plan.cfg.fit.estimator, "models": plan.cfg.train.subset.models,
               "heldout": plan.cfg.train.subset.heldout,
               "lds_mean": _nanmean(scores), "lds_train_mean": _nanmean(scores[:n]),
               "lds_val_mean": _nanmean(scores[n:])}
    mark_complete(plan.store, ref, summary)
    return summary


def _nanmean(x: np.ndarray) -> float | None:
    return float(np.nanmean(x)) if np.isfinite(x).any() else None


def _estimate(cfg: Config, masks: torch.Tensor, outputs: torch.Tensor, design=None):
    est = cfg.fit.estimator
    if est == "lasso":
        lc = cfg.fit.lasso
        return get_estimator("lasso")(masks, outputs, n_lambdas=lc.n_lambdas, eps=lc.eps,
                                      val_fraction=lc.val_fraction, max_iter=lc.max_iter, tol=lc.tol, path_tol=lc.path_tol,
                                      patience=lc.patience or 1, design=design)
    if est == "ridge":
        return get_estimator("ridge")(masks, outputs, lam=cfg.fit.ridge_lambda)
    return get_estimator(est)(masks, outputs)


def warm_kernels(cfg: Config) -> None:
    """Compile (or load from numba's cache) the CPU LASSO solver's kernels in the driver, once, before
    the fan-out: tasks on this machine then load them from the cache instead of each compiling them."""
    if cfg.fit.estimator != "lasso" or cfg.execution.device != "cpu":
        return
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(64, 8, generator=g) < 0.5
    try:
        _estimate(cfg, masks, torch.randn(64, 2, generator=g))
    except ValueError:  # settings this toy problem cannot take (val_fraction): the tasks compile them
        pass


def fit_block_task(store_root: str, cfg: Config, start: int, end: int):
    """One Ray task (a generator): datamodels of targets start..end (per margin, and per logit when
    configured), fitted TARGET_CHUNK targets at a time on the CPU; yields the targets done after each chunk
    (the last chunk's once the block is written), so that progress moves within a block.

    The split of the models and the Gram matrices are made once for the block (``lasso_design``),
    and a chunk's margins and logits of every class are one call: all of them share the masks."""
    pass_gate(f"fit-{start}")  # tests only (pipeline/execution/gate.py): off by default
    torch.set_num_threads(cfg.execution.threads)
    plan = Plan(cfg, Store(store_root))
    meta = plan.prepared_meta()
    device = torch.device(cfg.execution.device)
    n_fit = cfg.train.subset.models
    subset = _subset_reader(plan, meta, "fit", n_fit)
    masks = torch.as_tensor(subset("masks"), device=device)
    margins = torch.as_tensor(subset("margins", start, end), device=device)
    classes = meta["classes"]
    logits = None
    if cfg.fit.per_logit:
        logits = torch.as_tensor(subset("logits", start, end), device=device).float()
    design = None
    if cfg.fit.estimator == "lasso":
        lc = cfg.fit.lasso
        design = lasso_design(masks, val_fraction=lc.val_fraction)
    # targets per call: on the CPU a chunk of the zarr arrays (progress every few seconds); on a GPU
    # enough for the batched solver's ~512 problems per call, as when margins and classes were apart
    chunk = TARGET_CHUNK
    if device.type != "cpu":
        chunk = max(TARGET_CHUNK, 512 // (1 + (classes if logits is not None else 0)) // TARGET_CHUNK * TARGET_CHUNK)
    weights, biases, lams, logit_weights, logit_biases = [], [], [], [], []
    for lo in range(0, end - start, chunk):
        hi = min(lo + chunk, end - start)
        k = hi - lo
        outputs = margins[:, lo:hi].float()
        if logits is not None:  # column k + t * classes + c: class c of target t
            outputs = torch.cat([outputs, logits[:, lo:hi].reshape(n_fit, k * classes)], 1)
        dm = _estimate(cfg, masks, outputs, design)
        weights.append(dm.weight[:, :k])
        biases.append(dm.bias[:k])
        lams.append(dm.lam[:k] if dm.lam is not None else torch.full_like(dm.bias[:k], float("nan")))
        if logits is not None:
            logit_weights.append(dm.weight[:, k:].reshape(-1, k, classes).half())
            logit_biases.append(dm.bias[k:].reshape(k, classes))
        if hi < end - start:
            yield k
    weight, bias = torch.cat(weights, 1), torch.cat(biases)
    out = {"theta": weight, "bias": bias, "lam": torch.cat(lams)}
    out["lds"] = _heldout_lds(plan, meta, weight, bias, start, end, device)
    group = plan.store.open_group(f"{plan.fit.rel}/arrays.zarr", mode="r+")
    if logits is not None:
        group["theta_logit"][:, start:end] = torch.cat(logit_weights, 1).cpu().numpy()
        group["bias_logit"][start:end] = torch.cat(logit_biases).cpu().numpy()
    written = {"theta": out["theta"].cpu().numpy()}
    written.update({name: out[name].float().cpu().numpy() for name in ("bias", "lam", "lds")})
    group["theta"][:, start:end] = written["theta"]
    for name in ("bias", "lam", "lds"):
        group[name][start:end] = written[name]
    checksums = {k: hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest() for k, v in written.items()}
    plan.store.write_json(f"{plan.fit.rel}/markers/targets/{start:07d}-{end:07d}.json",
                          {"start": start, "end": end, "checksums": checksums, "threads": torch.get_num_threads()})
    yield (end - start) - (len(weights) - 1) * chunk


def _heldout_lds(plan: Plan, meta: dict, weight, bias, start: int, end: int, device) -> torch.Tensor:
    n_held = plan.cfg.train.subset.heldout
    if n_held < 3:
        return torch.full((end - start,), float("nan"))
    held = _subset_reader(plan, meta, "heldout", n_held)
    masks = torch.as_tensor(held("masks"), device=device)
    actual = torch.as_tensor(held("margins", start, end), device=device)
    return lds(weight, bias, masks, actual)


def _subset_reader(plan: Plan, meta: dict, role: str, n: int):
    """read(name, start=0, end=None): rows 0..n, columns start..end (all by default) of the subset family's
    array, as a writable copy; from this worker's decoded band of the chunks that hold them when it is
    small enough (``_KEPT``). The family's markers, which key the band, are read once, here."""
    family = family_store(plan, _subset_family(plan, role), meta)
    markers = [m for m in family.markers() if m["start"] < n]

    def read(name: str, start: int = 0, end: int | None = None) -> np.ndarray:
        array = family.array(name)
        end = array.shape[1] if end is None else end
        width = array.chunks[1]
        lo, hi = start // width * width, min(array.shape[1], -(-end // width) * width)
        if n * (hi - lo) * int(np.prod(array.shape[2:])) * array.dtype.itemsize > _KEPT_BYTES:
            return array[:n, start:end]
        written = tuple(sorted((m["start"], m["end"], m.get("checksums", {}).get(name)) for m in markers))
        key = (plan.store.root, family.group_rel, name, n, lo, hi, written)
        if key not in _KEPT:
            while len(_KEPT) >= _KEPT_MAX:
                _KEPT.pop(next(iter(_KEPT)))
            _KEPT[key] = array[:n, lo:hi]
        return _KEPT[key][:, start - lo : end - lo].copy()

    return read


def _write_rows_copy(plan: Plan, meta: dict) -> None:
    """theta_rows = theta, written by blocks of whole row chunks (reads each column chunk once)."""
    group = plan.store.open_group(f"{plan.fit.rel}/arrays.zarr", mode="r+")
    n = meta["n_train"]
    step = min(TRAIN_CHUNK, n) // TARGET_CHUNK * TARGET_CHUNK or TARGET_CHUNK
    for start in range(0, n, step):
        group["theta_rows"][start : start + step] = group["theta"][start : start + step]


def sum_forget_rows(theta_logit, forget: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A forget set's per-logit rows, summed: (sum_{i in F} theta_logit[i] (P, C), the diagonal
    theta_logit[i, i] for i in F (|F|, C)), float32. Reads theta_logit by slabs of columns, so each
    chunk holding forget rows is read once and no more than |F| x FORGET_SUM_COLUMNS x C values are
    held at a time."""
    forget = np.asarray(forget, dtype=np.int64)
    n_points, classes = theta_logit.shape[1:]
    sums = np.zeros((n_points, classes), np.float32)
    diagonal = np.zeros((len(forget), classes), np.float32)
    for lo in range(0, n_points, FORGET_SUM_COLUMNS):
        hi = min(lo + FORGET_SUM_COLUMNS, n_points)
        rows = theta_logit.get_orthogonal_selection((forget, slice(lo, hi), slice(None))).astype(np.float32)
        sums[lo:hi] = rows.sum(0)
        inside = np.flatnonzero((forget >= lo) & (forget < hi))
        diagonal[inside] = rows[inside, forget[inside] - lo]
    return sums, diagonal


def forget_rows_rel(plan: Plan, forget: np.ndarray) -> str:
    from pipeline.data.forget_sets import forget_set_id

    return f"{plan.fit.rel}/derived/forget-rows-{forget_set_id(np.asarray(forget))}.npz"


def forget_rows(plan: Plan, forget: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``sum_forget_rows`` of the finished fit, computed once per forget set and kept under the fit
    stage (written whole, atomically; identical whoever writes it), so that unlearning tasks read
    (P, C) values instead of every theta_logit chunk holding a forget row."""
    forget = np.asarray(forget, dtype=np.int64)
    rel = forget_rows_rel(plan, forget)
    if plan.store.exists(rel):
        with np.load(io.BytesIO(plan.store.read_bytes(rel)), allow_pickle=False) as cached:
            if np.array_equal(cached["forget"], forget):
                return cached["sums"], cached["diagonal"]
    if not is_complete(plan.store, plan.fit):
        raise StageError("the fit stage is not finished: run `oracle-farm fit` first")
    theta_logit = plan.store.open_group(f"{plan.fit.rel}/arrays.zarr", mode="r")["theta_logit"]
    sums, diagonal = sum_forget_rows(theta_logit, forget)
    buf = io.BytesIO()
    np.savez(buf, forget=forget, sums=sums, diagonal=diagonal)
    plan.store.write_bytes(rel, buf.getvalue())
    return sums, diagonal
