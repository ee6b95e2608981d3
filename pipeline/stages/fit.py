"""The fit stage: subset models' masks and outputs -> attribution matrices, target block by target block.

Arrays (see storage_layout.md), in <root>/fit/fit-<id>/arrays.zarr:
  theta       (n_train, P) float32, chunks (4096, 16)  per-margin datamodels, column reads (a target)
  theta_rows  (n_train, P) float32, chunks (16, 4096)  the same values, row reads (a training point)
  bias, lds, lam  (P,) float32, chunks (4096,)          consolidated by the driver from the blocks' objects
  theta_logit (n_train, P, C) float16, chunks (256, 16, C)  per-logit datamodels (dm-direct, DMM); dropped
              once copied when fit.store_theta_logit is false
  theta_logit_rows (n_train, P, C) float16, inner chunks (1, P, C) in shards of (256, P, C): a row contiguous
  bias_logit  (P, C) float32, chunks (4096, C)
Per target block, written by its task before its marker: blocks/targets/<start>-<end>.npz (its 1-D slices)
and, for every forget set the config names, derived/forget-parts/<forget id>/<start>-<end>.npz (its
targets' columns of sum_{i in F} theta_logit[i] and the diagonal entries it holds). From those:
  derived/forget-rows-<forget id>.npz  sums (P, C), diagonal (|F|, C): what dm-direct and DMM use
  derived/dm-direct-error-<forget id>.json  dm-direct's error against the target oracles (decision 34)
"""

from __future__ import annotations

import hashlib
import io
import json
import os

import numpy as np
import ray
import torch

from pipeline.config import Config
from pipeline.datamodels import MODEL_BATCH, get_estimator, lasso_design, lds
from pipeline.datamodels.lasso_problem import GRAM_MAX_FEATURES
from pipeline.datamodels.memory import FitMemory, fit_peak_bytes, gib
from pipeline.execution import init_ray, run_streaming_tasks, run_tasks, task_options
from pipeline.execution.gate import pass_gate
from pipeline.plan import TARGET_CHUNK, target_blocks, target_markers
from pipeline.plan import FamilySpec, Plan, StageError, family_store
from pipeline.store import CorruptFile, Store, ensure_stage, is_complete, mark_complete

TRAIN_CHUNK = 4096
LOGIT_TRAIN_CHUNK = 256
ROW_BAND = TRAIN_CHUNK  # training rows per rows-copy task: each theta chunk is read by one task, once
LOGIT_ROWS_SHARD = 256  # rows per object of theta_logit_rows (307 MB at CIFAR-10 size); a row is one inner chunk
VECTOR_CHUNK = 4096  # targets per chunk of bias, lds, lam, bias_logit: 15 objects at CIFAR-10 size, not 3,750
VECTORS = ("bias", "lam", "lds", "bias_logit", "lds_logit")  # the per-target arrays the driver consolidates
FORGET_SUM_COLUMNS = 4096  # targets of theta_logit read at once by `sum_forget_rows` (stores made before parts)
LATE_ROWS = 64  # forget rows of theta_logit_rows read at once for a forget set without parts

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
    vector = min(VECTOR_CHUNK, p)
    specs = {
        "theta": ((n, p), (min(TRAIN_CHUNK, n), TARGET_CHUNK), "float32", None),
        "theta_rows": ((n, p), (TARGET_CHUNK, min(TRAIN_CHUNK, p)), "float32", None),
        "bias": ((p,), (vector,), "float32", None),
        "lds": ((p,), (vector,), "float32", None),
        "lam": ((p,), (vector,), "float32", None),
    }
    if plan.cfg.fit.per_logit:
        specs["theta_logit"] = ((n, p, c), (min(LOGIT_TRAIN_CHUNK, n), TARGET_CHUNK, c), "float16", None)
        specs["theta_logit_rows"] = ((n, p, c), (1, p, c), "float16", (min(LOGIT_ROWS_SHARD, n), p, c))
        specs["bias_logit"] = ((p, c), (vector, c), "float32", None)
        specs["lds_logit"] = ((p, c), (vector, c), "float32", None)
    for name, (shape, chunks, dtype, shards) in specs.items():
        if name not in group:
            plan.store.create_array(group, name, stage=plan.fit, shape=shape, chunks=chunks, shards=shards, dtype=dtype)


def run_fit(plan: Plan) -> dict:
    """The fit, written under the fit stage's lease (pipeline.store.lease) unless already complete."""
    from pipeline.store.lease import hold

    plan.store.check_reachable()
    meta = plan.prepared_meta()
    if is_complete(plan.store, plan.fit):
        return plan.store.read_json(f"{plan.fit.rel}/COMPLETE.json")
    _check_inputs(plan, meta)
    check_memory(plan, meta)
    with hold(plan.store, [plan.fit.rel], plan.cfg.execution):
        return _run_fit(plan)


def _run_fit(plan: Plan) -> dict:
    """Fit every pending target block as a Ray task, then the row-major copies (Ray tasks by row band),
    the 1-D arrays from the blocks' objects, and COMPLETE; then dm-direct's error where it can be scored."""
    plan.store.check_reachable()
    meta = plan.prepared_meta()
    ref = plan.fit
    if is_complete(plan.store, ref):
        return plan.store.read_json(f"{ref.rel}/COMPLETE.json")
    _check_inputs(plan, meta)
    upstream = {"subset": plan.subset.id, "models": plan.cfg.train.subset.models,
                "heldout": plan.cfg.train.subset.heldout}
    ensure_stage(plan.store, ref, plan.cfg.fit.section(), upstream, plan.cfg.name)
    markers, todo = _pending_blocks(plan, meta["n_train"] + meta["n_val"])
    group = plan.store.open_group(f"{ref.rel}/arrays.zarr")
    if todo and plan.cfg.fit.per_logit and "theta_logit" not in group and "theta_logit_rows" in group:
        raise StageError(f"{plan.store.url(ref.rel)}: theta_logit was dropped (fit.store_theta_logit: false) but "
                         f"target blocks {todo[:3]}... have no marker: remove the fit stage and run it again")
    _create_arrays(plan, meta)
    if todo:
        warm_kernels(plan.cfg)
        init_ray(plan.cfg.execution)
        forget = _forget_sets_by_id(plan) if plan.cfg.fit.per_logit else {}
        # a generator task: it yields the targets it has done, chunk by chunk, so progress moves
        remote = ray.remote(fit_block_task).options(num_returns="streaming", **task_options(plan.cfg.execution))
        gens = [remote.remote(plan.store.root, plan.cfg, a, b, forget) for a, b in todo]
        run_streaming_tasks("fit", gens, sum(b - a for a, b in todo), unit="targets",
                            names=[f"targets {a}..{b}" for a, b in todo])
        markers = _finished_blocks(plan)
    _write_rows_copy(plan, meta, markers)
    scores = _consolidate_vectors(plan, markers)
    if plan.cfg.fit.per_logit and not plan.cfg.fit.store_theta_logit:
        plan.store.remove(f"{ref.rel}/arrays.zarr/theta_logit")  # its row-major copy is complete
    summary = {**_summary(plan, meta, scores), "blocks": sorted([m["start"], m["end"]] for m in markers)}
    mark_complete(plan.store, ref, summary)
    if plan.cfg.fit.per_logit:
        dm_direct_errors(plan)  # for the forget sets whose target oracles are trained; the rest later
    return summary


def _pending_blocks(plan: Plan, n_points: int) -> tuple[list[dict], list[tuple[int, int]]]:
    """(the finished blocks' markers, the target blocks still to fit): blocks of another size from an
    earlier run still count."""
    markers = _finished_blocks(plan)
    done = np.zeros(n_points, dtype=bool)
    for m in markers:
        done[m["start"] : m["end"]] = True
    blocks = target_blocks(n_points, plan.cfg.execution.fit_block_targets)
    return markers, [(a, b) for a, b in blocks if not done[a:b].all()]


def _forget_sets_by_id(plan: Plan) -> dict[str, list[int]]:
    """Every forget set the config names (reported and tuning), by content id: what a fit task writes
    parts for. Not part of the fit's identity: a set added later gets its rows on demand."""
    from pipeline.data.forget_sets import forget_set_id

    return {forget_set_id(f): f.tolist() for f in plan.forget_sets.values()}


def _block_rel(plan: Plan, start: int, end: int) -> str:
    return f"{plan.fit.rel}/blocks/targets/{start:07d}-{end:07d}.npz"


def _finished_blocks(plan: Plan) -> list[dict]:
    """The target blocks' markers whose block object is there too (a marker without it, left by a fit
    made before blocks had objects, is not taken as done: its block is fitted again)."""
    have = set(plan.store.list(f"{plan.fit.rel}/blocks/targets"))
    return [m for m in target_markers(plan.store, plan.fit.rel) if _block_rel(plan, m["start"], m["end"]).rsplit("/", 1)[1] in have]


def _consolidate_vectors(plan: Plan, markers: list[dict]) -> np.ndarray:
    """bias, lam, lds (and bias_logit) written whole from the blocks' objects (read concurrently, each
    checked against its marker's sha256), in chunks of VECTOR_CHUNK targets: decision 18 holds, since
    the driver alone writes them. Returns lds."""
    group = plan.store.open_group(f"{plan.fit.rel}/arrays.zarr", mode="r+")
    names = [name for name in VECTORS if name in group]
    out = {name: np.zeros(group[name].shape, group[name].dtype) for name in names}
    blobs = plan.store.read_many([_block_rel(plan, m["start"], m["end"]) for m in markers])
    for m, blob in zip(markers, blobs):
        rel = _block_rel(plan, m["start"], m["end"])
        block = _load_npz(blob) if blob is not None else None
        if block is None:
            raise CorruptFile(f"{plan.store.url(rel)}: missing or unreadable; remove the marker of targets "
                              f"{m['start']}..{m['end']} and run the fit again")
        for name in names:
            want = m.get("checksums", {}).get(name)
            if want is not None and hashlib.sha256(np.ascontiguousarray(block[name]).tobytes()).hexdigest() != want:
                raise CorruptFile(f"{plan.store.url(rel)}: {name} differs from the sha256 in its marker; remove the "
                                  f"marker of targets {m['start']}..{m['end']} and run the fit again")
            out[name][m["start"] : m["end"]] = block[name]
    for name in names:
        group[name][:] = out[name]
    return out["lds"]


def _load_npz(blob: bytes) -> dict[str, np.ndarray] | None:
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (ValueError, OSError, EOFError):  # not an npz: treated as missing
        return None


def _save_npz(store: Store, rel: str, **arrays) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    store.write_bytes(rel, buf.getvalue())


def _summary(plan: Plan, meta: dict, scores: np.ndarray) -> dict:
    """COMPLETE.json's figures: the LDS of the per-margin datamodels (mean, training and validation
    targets) and, with fit.per_logit, of the per-logit ones (decision 34; per (target, class), averaged,
    and per class)."""
    n = meta["n_train"]
    summary = {"estimator": plan.cfg.fit.estimator, "models": plan.cfg.train.subset.models,
               "heldout": plan.cfg.train.subset.heldout,
               "lds_mean": _nanmean(scores), "lds_train_mean": _nanmean(scores[:n]),
               "lds_val_mean": _nanmean(scores[n:])}
    if plan.cfg.fit.per_logit:
        logit = plan.store.open_group(f"{plan.fit.rel}/arrays.zarr", mode="r")["lds_logit"][:]
        summary.update({"lds_logit_mean": _nanmean(logit),
                        "lds_logit_per_class": [_nanmean(logit[:, c]) for c in range(logit.shape[1])],
                        "lds_logit_train_mean": _nanmean(logit[:n]), "lds_logit_val_mean": _nanmean(logit[n:])})
    return summary


def _nanmean(x: np.ndarray) -> float | None:
    return float(np.nanmean(x)) if np.isfinite(x).any() else None


def check_memory(plan: Plan, meta: dict) -> FitMemory:
    """Refuse (StageError, exit 2), before any task and touching nothing stored, a config whose fit task
    is predicted to need more memory than its device has (decision 35): the numbers, what they are made
    of, and the fields that change them."""
    prediction = predict_task_memory(plan.cfg, meta)
    limit = device_memory(plan.cfg)
    if limit is None or prediction.peak <= limit[0]:
        return prediction
    raise StageError(
        f"fit: a fit task is predicted to peak at {gib(prediction.peak)} ({prediction.phase}: {prediction.describe()}), "
        f"more than the {gib(limit[0])} it may use ({limit[1]}). Lower execution.fit_block_targets (targets per task, "
        f"now {plan.cfg.execution.fit_block_targets}: outputs, results, scoring) or fit.model_batch (models per float "
        f"batch, now {model_batch(plan.cfg)}), choose another fit.estimator, or set execution.fit_memory_gb"
    )


def predict_task_memory(cfg: Config, meta: dict) -> FitMemory:
    """``fit_peak_bytes`` of this config's largest fit task."""
    from pipeline.plan import SUBSET_POINT_CHUNK

    n, p, c = meta["n_train"], meta["n_train"] + meta["n_val"], meta["classes"]
    sub, block = cfg.train.subset, min(cfg.execution.fit_block_targets, meta["n_train"] + meta["n_val"])
    cpu = cfg.execution.device == "cpu"
    bands = 0
    if cpu:  # the decoded bands a worker keeps (``_KEPT``), at most _KEPT_BYTES each
        width = min(p, SUBSET_POINT_CHUNK * (-(-block // SUBSET_POINT_CHUNK) + 1))
        for rows in (sub.models, sub.heldout):
            for size in (rows * n, rows * width * 4, rows * width * c * 2 if cfg.fit.per_logit else 0):
                bands += size if size <= _KEPT_BYTES else 0
    return fit_peak_bytes(
        estimator=cfg.fit.estimator, models=sub.models, n_train=n, targets=block, call_targets=call_targets(cfg, c),
        classes=c, per_logit=cfg.fit.per_logit, heldout=sub.heldout if sub.heldout >= 3 else 0,
        model_batch=model_batch(cfg), solver="cd" if cpu and n <= GRAM_MAX_FEATURES else "fista",
        val_fraction=cfg.fit.lasso.val_fraction, host_bands=bands,
    )


def device_memory(cfg: Config) -> tuple[int, str] | None:
    """(bytes a fit task may use, where the figure comes from), or None where the driver cannot know (a
    CUDA config on a driver without a GPU: set execution.fit_memory_gb to check it)."""
    ex = cfg.execution
    if ex.fit_memory_gb is not None:
        return int(ex.fit_memory_gb * 2**30), f"execution.fit_memory_gb = {ex.fit_memory_gb}"
    if ex.device == "cuda":
        if not torch.cuda.is_available():
            return None
        total, share = torch.cuda.get_device_properties(0).total_memory, min(ex.num_gpus, 1.0) or 1.0
        return int(total * share), f"the GPU's {gib(total)} x execution.num_gpus {share}"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    at_once = max(1, ex.num_cpus // ex.threads)
    return total // at_once, f"this machine's {gib(total)} shared by {at_once} tasks at once (num_cpus // threads)"


def _estimate(cfg: Config, masks: torch.Tensor, outputs: torch.Tensor, design=None):
    est, batch = cfg.fit.estimator, model_batch(cfg)
    if est == "lasso":
        lc = cfg.fit.lasso
        return get_estimator("lasso")(masks, outputs, n_lambdas=lc.n_lambdas, eps=lc.eps,
                                      val_fraction=lc.val_fraction, max_iter=lc.max_iter, tol=lc.tol, path_tol=lc.path_tol,
                                      patience=lc.patience or 1, design=design, model_batch=batch)
    if est == "ridge":
        return get_estimator("ridge")(masks, outputs, lam=cfg.fit.ridge_lambda, model_batch=batch)
    return get_estimator(est)(masks, outputs, model_batch=batch)


def model_batch(cfg: Config) -> int:
    """Models per float batch of the masks in every product of a fit task (``pipeline.datamodels.Masks``)."""
    return cfg.fit.model_batch or MODEL_BATCH


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


def fit_block_task(store_root: str, cfg: Config, start: int, end: int, forget_sets: dict | None = None):
    """One Ray task (a generator): datamodels of targets start..end (per margin, and per logit when
    configured), fitted TARGET_CHUNK targets at a time on the CPU; yields the targets done after each chunk
    (the last chunk's once the block is written), so that progress moves within a block.

    The split of the models and the Gram matrices are made once for the block (``lasso_design``),
    and a chunk's margins and logits of every class are one call: all of them share the masks. The masks
    stay bool; every product with them runs over fit.model_batch models at a time, and what a chunk's
    result keeps is copied out of it, so no view holds a call's whole output (``pipeline.datamodels.memory``
    predicts the task's peak from these sizes).

    forget_sets: {forget id: indices}, the sets whose part of the forget rows this block writes."""
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
        design = lasso_design(masks, val_fraction=lc.val_fraction, model_batch=model_batch(cfg))
    chunk = call_targets(cfg, classes)
    weights, biases, lams, logit_weights, logit_biases = [], [], [], [], []
    for lo in range(0, end - start, chunk):
        hi = min(lo + chunk, end - start)
        k = hi - lo
        outputs = margins[:, lo:hi].float()
        if logits is not None:  # column k + t * classes + c: class c of target t
            outputs = torch.cat([outputs, logits[:, lo:hi].reshape(n_fit, k * classes)], 1)
        dm = _estimate(cfg, masks, outputs, design)
        del outputs
        weights.append(dm.weight[:, :k].clone())
        biases.append(dm.bias[:k].clone())
        lams.append(dm.lam[:k].clone() if dm.lam is not None else torch.full_like(dm.bias[:k], float("nan")))
        if logits is not None:
            logit_weights.append(dm.weight[:, k:].reshape(-1, k, classes).half())
            logit_biases.append(dm.bias[k:].reshape(k, classes).clone())
        del dm
        if hi < end - start:
            yield k
    del masks, margins, logits, design
    weight, bias = torch.cat(weights, 1), torch.cat(biases)
    out = {"theta": weight, "bias": bias, "lam": torch.cat(lams)}
    del weights, biases, lams
    fits = {"margins": (weight, bias)}
    if cfg.fit.per_logit:
        theta_logit, bias_logit = torch.cat(logit_weights, 1), torch.cat(logit_biases)
        del logit_weights, logit_biases
        fits["logits"] = (theta_logit, bias_logit)
    scores = _heldout_lds(plan, meta, fits, start, end, device)
    out["lds"] = scores["margins"]
    group = plan.store.open_group(f"{plan.fit.rel}/arrays.zarr", mode="r+")
    written = {"theta": out["theta"].cpu().numpy()}
    written.update({name: out[name].float().cpu().numpy() for name in ("bias", "lam", "lds")})
    vectors = {name: written[name] for name in ("bias", "lam", "lds")}
    if cfg.fit.per_logit:
        theta_logit = theta_logit.cpu().numpy()
        vectors["bias_logit"] = bias_logit.cpu().numpy()
        written["lds_logit"] = vectors["lds_logit"] = scores["logits"].float().cpu().numpy()
        write_forget_parts(plan, start, end, theta_logit, forget_sets or {})
        group["theta_logit"][:, start:end] = theta_logit
    group["theta"][:, start:end] = written["theta"]
    _save_npz(plan.store, _block_rel(plan, start, end), **vectors)  # its 1-D slices: the driver consolidates
    checksums = {k: hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest() for k, v in written.items()}
    plan.store.write_json(f"{plan.fit.rel}/markers/targets/{start:07d}-{end:07d}.json",
                          {"start": start, "end": end, "checksums": checksums, "threads": torch.get_num_threads()})
    yield (end - start) - (-(-(end - start) // chunk) - 1) * chunk


def call_targets(cfg: Config, classes: int) -> int:
    """Targets per estimator call: on the CPU a chunk of the zarr arrays (progress every few seconds); on a
    GPU enough for the batched solver's ~512 problems per call, as when margins and classes were apart."""
    if cfg.execution.device == "cpu":
        return TARGET_CHUNK
    return max(TARGET_CHUNK, 512 // (1 + (classes if cfg.fit.per_logit else 0)) // TARGET_CHUNK * TARGET_CHUNK)


def _heldout_lds(plan: Plan, meta: dict, fits: dict, start: int, end: int, device) -> dict[str, torch.Tensor]:
    """LDS on the held-out subset models of each fit: {"margins": (weight (n, k), bias (k,)) -> (k,),
    "logits": (weight (n, k, C), bias (k, C)) -> (k, C), scored per (target, class), of the weights as
    stored (float16 for theta_logit)}. NaN where there are fewer than 3 held-out models."""
    n_held = plan.cfg.train.subset.heldout
    if n_held < 3:
        return {name: torch.full(bias.shape, float("nan")) for name, (_, bias) in fits.items()}
    held = _subset_reader(plan, meta, "heldout", n_held)
    masks = torch.as_tensor(held("masks"), device=device)
    batch, scores = model_batch(plan.cfg), {}
    for name, (weight, bias) in fits.items():
        actual = torch.as_tensor(held(name, start, end), device=device)
        w = weight.reshape(weight.shape[0], -1).float()
        scores[name] = lds(w, bias.reshape(-1).float(), masks, actual.reshape(n_held, -1), batch).reshape(bias.shape)
    return scores


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


# ---------------------------------------------------------------------------------------- rows copy
def _rows_key(markers: list[dict]) -> str:
    """What a rows-copy marker was made from: the target blocks' markers (a block fitted again after the
    copy makes every band's copy stale)."""
    blocks = sorted((m["start"], m["end"], m.get("checksums", {}).get("theta")) for m in markers)
    return hashlib.sha256(json.dumps(blocks).encode()).hexdigest()[:16]


def _write_rows_copy(plan: Plan, meta: dict, markers: list[dict]) -> None:
    """theta_rows (and theta_logit_rows) = theta (theta_logit), written by Ray tasks owning whole bands of
    ROW_BAND rows (whole row chunks and shards; each column chunk is read by one task, once), each band
    marked under markers/rows/ after its data."""
    n = meta["n_train"]
    key = _rows_key(markers)
    rel = f"{plan.fit.rel}/markers/rows"
    names = plan.store.list(rel)
    done = {(m["start"], m["end"]) for m in plan.store.read_jsons([f"{rel}/{x}" for x in names])
            if m is not None and m.get("targets") == key}
    todo = [(a, min(a + ROW_BAND, n)) for a in range(0, n, ROW_BAND) if (a, min(a + ROW_BAND, n)) not in done]
    if not todo:
        return
    init_ray(plan.cfg.execution)
    remote = ray.remote(rows_block_task).options(**task_options(plan.cfg.execution, gpu=False))
    refs = [(remote.remote(plan.store.root, plan.cfg, a, b, key), b - a) for a, b in todo]
    run_tasks("fit rows", refs, sum(b - a for a, b in todo), unit="rows")


def rows_block_task(store_root: str, cfg: Config, start: int, end: int, key: str) -> int:
    """One Ray task: rows start..end of theta_rows (and theta_logit_rows, a shard at a time: 256 rows of
    theta_logit read, 307 MB at CIFAR-10 size), then their marker."""
    torch.set_num_threads(cfg.execution.threads)
    plan = Plan(cfg, Store(store_root))
    group = plan.store.open_group(f"{plan.fit.rel}/arrays.zarr", mode="r+")
    theta = group["theta"][start:end]
    group["theta_rows"][start:end] = theta
    checksums = {"theta_rows": hashlib.sha256(theta.tobytes()).hexdigest()}
    if "theta_logit_rows" in group:
        digest, step = hashlib.sha256(), group["theta_logit_rows"].shards[0]
        for lo in range(start, end, step):
            band = group["theta_logit"][lo : min(lo + step, end)]
            group["theta_logit_rows"][lo : lo + len(band)] = band
            digest.update(band.tobytes())
        checksums["theta_logit_rows"] = digest.hexdigest()
    plan.store.write_json(f"{plan.fit.rel}/markers/rows/{start:07d}-{end:07d}.json",
                          {"start": start, "end": end, "targets": key, "checksums": checksums})
    return end - start


# ---------------------------------------------------------------------------------------- forget rows
def _sum_rows(rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """sum over the first axis, in float32, one row after another in the given order: what
    ``rows.astype(float32).sum(0)`` gives (numpy adds along a non-contiguous axis row by row), whatever
    the rows' width, so a block's columns and a late set's whole rows sum to the same bits."""
    out = np.zeros(rows.shape[1:], np.float32) if out is None else out
    for row in rows:
        out += row
    return out


def forget_part_rel(plan: Plan, forget_id: str, start: int, end: int) -> str:
    return f"{plan.fit.rel}/derived/forget-parts/{forget_id}/{start:07d}-{end:07d}.npz"


def write_forget_parts(plan: Plan, start: int, end: int, theta_logit: np.ndarray, forget_sets: dict) -> None:
    """A fit task's part of each forget set's rows, from its block theta_logit[:, start:end] (float16, as
    stored): sums (end - start, C) = sum_{i in F} theta_logit[i, start:end] and the diagonal entries
    theta_logit[i, i] of the i in F that fall in start..end, each set its own object."""
    for forget_id, forget in forget_sets.items():
        forget = np.asarray(forget, dtype=np.int64)
        inside = forget[(forget >= start) & (forget < end)]
        _save_npz(plan.store, forget_part_rel(plan, forget_id, start, end), forget=forget,
                  sums=_sum_rows(theta_logit[forget]), diagonal=theta_logit[inside, inside - start].astype(np.float32))


def sum_forget_rows(theta_logit, forget: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A forget set's per-logit rows, summed: (sum_{i in F} theta_logit[i] (P, C), the diagonal
    theta_logit[i, i] for i in F (|F|, C)), float32, read from the column-major theta_logit by slabs of
    columns (every chunk holding a forget row: the whole array for a spread set). Fits made before the
    row-major copy have no other source; the rest use the parts or `read_forget_rows`."""
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


def read_forget_rows(theta_logit_rows, forget: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`sum_forget_rows` from the row-major copy: only F's rows are read (LATE_ROWS at a time, each an
    inner chunk of its shard: the rows' bytes and one shard index per shard touched), same bits."""
    forget = np.asarray(forget, dtype=np.int64)
    sums = np.zeros(theta_logit_rows.shape[1:], np.float32)
    diagonal = np.zeros((len(forget), sums.shape[1]), np.float32)
    for lo in range(0, len(forget), LATE_ROWS):
        part = forget[lo : lo + LATE_ROWS]
        rows = theta_logit_rows.get_orthogonal_selection((part, slice(None), slice(None)))
        _sum_rows(rows, sums)
        diagonal[lo : lo + len(part)] = rows[np.arange(len(part)), part]
    return sums, diagonal


def forget_rows_rel(plan: Plan, forget: np.ndarray) -> str:
    from pipeline.data.forget_sets import forget_set_id

    return f"{plan.fit.rel}/derived/forget-rows-{forget_set_id(np.asarray(forget))}.npz"


def forget_rows(plan: Plan, forget: np.ndarray, keep: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``sum_forget_rows`` of the finished fit, assembled from the parts its tasks wrote (one small
    object per target block) without reading theta_logit, and kept under the fit stage (keep: written
    whole, atomically, identical whoever writes it), so unlearning tasks read (P, C) values. A block
    without a part (a set added after the fit, a part removed) takes its columns from F's rows of
    theta_logit_rows, read once for all such blocks."""
    forget = np.asarray(forget, dtype=np.int64)
    rel = forget_rows_rel(plan, forget)
    blob = plan.store.read_many([rel])[0]
    cached = _load_npz(blob) if blob is not None else None
    if cached is not None and np.array_equal(cached["forget"], forget):
        return cached["sums"], cached["diagonal"]
    complete = plan.store.read_json(f"{plan.fit.rel}/COMPLETE.json")
    if complete is None:
        raise StageError("the fit stage is not finished: run `oracle-farm fit` first")
    sums, diagonal = _assemble_forget_rows(plan, forget, complete)
    if keep:
        _save_npz(plan.store, rel, forget=forget, sums=sums, diagonal=diagonal)
    return sums, diagonal


def _assemble_forget_rows(plan: Plan, forget: np.ndarray, complete: dict) -> tuple[np.ndarray, np.ndarray]:
    from pipeline.data.forget_sets import forget_set_id

    group = plan.store.open_group(f"{plan.fit.rel}/arrays.zarr", mode="r")
    if "theta_logit_rows" not in group:  # a fit made before the parts and the row-major copy
        return sum_forget_rows(group["theta_logit"], forget)
    blocks = complete.get("blocks") or [(m["start"], m["end"]) for m in target_markers(plan.store, plan.fit.rel)]
    fid = forget_set_id(forget)
    sums = np.zeros(group["theta_logit_rows"].shape[1:], np.float32)
    diagonal = np.zeros((len(forget), sums.shape[1]), np.float32)
    missing = []
    for (a, b), blob in zip(blocks, plan.store.read_many([forget_part_rel(plan, fid, a, b) for a, b in blocks])):
        part = _load_npz(blob) if blob is not None else None
        if part is None or not np.array_equal(part["forget"], forget):
            missing.append((a, b))
            continue
        sums[a:b] = part["sums"]
        diagonal[(forget >= a) & (forget < b)] = part["diagonal"]
    if missing:
        rows_sums, rows_diagonal = read_forget_rows(group["theta_logit_rows"], forget)
        for a, b in missing:
            sums[a:b] = rows_sums[a:b]
            inside = (forget >= a) & (forget < b)
            diagonal[inside] = rows_diagonal[inside]
    return sums, diagonal


# ---------------------------------------------------------------------------------------- dm-direct's error
def dm_direct_error_rel(plan: Plan, forget: np.ndarray) -> str:
    from pipeline.data.forget_sets import forget_set_id

    return f"{plan.fit.rel}/derived/dm-direct-error-{forget_set_id(np.asarray(forget))}.json"


def dm_direct_errors(plan: Plan, compute: bool = True) -> dict[str, dict]:
    """forget set name -> dm-direct's error against its target oracles (decision 34), for every forget
    set of the config (tuning sets included) whose record exists or, with compute, can be made now
    (fit complete with per-logit datamodels, the unlearned full models and the set's target oracles
    trained): `dm_direct_error`. compute=False only reads the records (for `status`)."""
    out = {}
    for name, forget in plan.forget_sets.items():
        record = dm_direct_error(plan, name) if compute else _dm_direct_record(plan, name, forget)
        if record is not None:
            out[name] = record
    return out


def _dm_direct_inputs(plan: Plan, name: str) -> dict:
    from pipeline.plan import n_unlearned

    return {"fit": plan.fit.id, "full": plan.full.id, "models": n_unlearned(plan.cfg),
            "oracle": plan.oracle(name).id, "targets": plan.cfg.train.oracle.target}


def _dm_direct_record(plan: Plan, name: str, forget: np.ndarray) -> dict | None:
    record = plan.store.read_json(dm_direct_error_rel(plan, forget))
    return record if record is not None and record.get("inputs") == _dm_direct_inputs(plan, name) else None


def dm_direct_error(plan: Plan, name: str) -> dict | None:
    """dm-direct's predicted logits (each of the N_u full models' logits minus the forget rows' sum)
    against the mean logits of the forget set's target oracles, over forget, retain and val points;
    None when an input is not there yet. Recorded in derived/dm-direct-error-<forget id>.json, with the
    stages and counts it was made from; a record made from others is made again."""
    record = _dm_direct_record(plan, name, plan.forget_sets[name])
    if record is not None:
        return record
    inputs = _dm_direct_inputs(plan, name)
    if not plan.cfg.fit.per_logit or inputs["targets"] < 1 or not is_complete(plan.store, plan.fit):
        return None
    meta = plan.prepared_meta()
    full = family_store(plan, FamilySpec(plan.full, "models", plan.cfg.train.full.models, "full"), meta)
    oracle = family_store(plan, FamilySpec(plan.oracle(name), "target", inputs["targets"], "oracle"), meta)
    if not full.done_mask(inputs["models"]).all() or not oracle.done_mask(inputs["targets"]).all():
        return None
    forget = plan.forget_sets[name]
    sums, _ = forget_rows(plan, forget)
    full_logits = full.read("logits", inputs["models"]).astype(np.float32)
    target = oracle.read("logits", inputs["targets"]).astype(np.float32).mean(0)
    groups = {"forget": forget, "retain": np.setdiff1d(np.arange(meta["n_train"]), forget),
              "val": np.arange(meta["n_train"], meta["n_train"] + meta["n_val"])}
    record = {"inputs": inputs, "forget_set": name,
              **{group: prediction_error(full_logits[:, idx], sums[idx], target[idx]) for group, idx in groups.items()}}
    plan.store.write_json(dm_direct_error_rel(plan, forget), record)
    return record


def prediction_error(full_logits: np.ndarray, sums: np.ndarray, target: np.ndarray) -> dict:
    """dm-direct's error on some points: full_logits (M, K, C) of the full models, sums (K, C) the
    forget rows' sum, target (K, C) the target oracles' mean logits. rmse and mean_abs: over models,
    points and classes of (full - sums - target); rmse_of_mean: the models' mean prediction against the
    target (the datamodels' own error, without one model's noise); correlation: Pearson, over points and
    classes, of the mean prediction and the target; shift_correlation: of the predicted shift (-sums) and
    the oracles' (target - the models' mean); do_nothing_*: the same for the full models uncorrected."""
    pred = full_logits - sums[None]
    mean = full_logits.mean(0)

    def corr(a, b):
        a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
        scale = float(np.sqrt((a * a).sum() * (b * b).sum()))
        return float((a * b).sum() / scale) if scale > 0 else None

    return {"points": int(target.shape[0]),
            "rmse": float(np.sqrt(np.mean((pred - target[None]) ** 2))),
            "mean_abs": float(np.mean(np.abs(pred - target[None]))),
            "rmse_of_mean": float(np.sqrt(np.mean((mean - sums - target) ** 2))),
            "correlation": corr(mean - sums, target),
            "shift_correlation": corr(-sums, target - mean),
            "do_nothing_rmse": float(np.sqrt(np.mean((full_logits - target[None]) ** 2))),
            "do_nothing_mean_abs": float(np.mean(np.abs(full_logits - target[None])))}
