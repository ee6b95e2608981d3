"""The train stage: every pending block of the full, subset and oracle model families, trained as Ray tasks
under the stages' leases (idempotent: finished blocks are skipped); how a worker reads the prepared
dataset; the full models' saved weights.
"""

from __future__ import annotations

import numpy as np
import ray
import torch

from pipeline.config import Config
from pipeline.data.beton import read_beton
from pipeline.data.device import DeviceData
from pipeline.execution import init_ray, run_tasks, task_options
from pipeline.execution.gate import pass_gate
from pipeline.models import resolve_stacking
from pipeline.plan import (
    PREPARED_SPLITS, FamilySpec, Plan, StageError, check_prepared, contiguous_runs, family_store, pending_blocks,
    prepared_file, stage_section, train_families,
)
from pipeline.store import Store, ensure_stage
from pipeline.training.recipe import evaluate_members, retrain_example_passes, train_members


_DATA_CACHE: dict = {}


def load_device_data(store_root: str, prepare_rel: str, device: str, data_path: str = "resident") -> DeviceData:
    """The prepared dataset, once per worker process: read through FFCV into device tensors, or
    streamed through FFCV's Loader batch by batch (decision 12; `execution.data_path`)."""
    from pipeline.data.stream import StreamedData, resident_fits

    if data_path == "auto":  # keyed by what it resolves to: a worker that trains, then unlearns, reads it once
        held = [p for p in ("resident", "stream") if (store_root, prepare_rel, device, p) in _DATA_CACHE]
        data_path = held[0] if held else None  # what it holds (its own memory is not free), else decided below
    key = (store_root, prepare_rel, device, data_path)
    if key not in _DATA_CACHE:
        store = Store(store_root)
        meta = store.read_json(f"{prepare_rel}/COMPLETE.json")
        if data_path is None:
            data_path = "resident" if resident_fits(meta, device) else "stream"
            key = (store_root, prepare_rel, device, data_path)
        local = {split: prepared_file(store, prepare_rel, meta, split) for split in PREPARED_SPLITS}
        _DATA_CACHE.clear()
        if data_path == "stream":
            labels = store.open_group(f"{prepare_rel}/arrays.zarr", mode="r")["labels"]
            _DATA_CACHE[key] = StreamedData(local["train"], local["val"], meta["shape"], labels["train"][:],
                                            labels["val"][:], meta["mean"], meta["std"], device)
        else:
            train_x, train_y = read_beton(local["train"])
            val_x, val_y = read_beton(local["val"])
            _DATA_CACHE[key] = DeviceData(train_x, train_y, val_x, val_y, meta["mean"], meta["std"], device)
    return _DATA_CACHE[key]


# ---------------------------------------------------------------------------------------- families
def run_train(plan: Plan, kinds: tuple[str, ...] = ("full", "subset", "oracle")) -> dict:
    """Train every pending block of the chosen families as Ray tasks; finished blocks are skipped.
    Stage records made by another config stop it before anything is written; then it holds the lease
    of every stage it writes (pipeline.store.lease) while it runs."""
    from pipeline.store.lease import hold

    plan.store.check_reachable()
    check_prepared(plan)  # the files every task reads, as prepare recorded them: before any lease or write
    fams = [f for f in train_families(plan) if f.kind in kinds and f.n_models > 0]
    for fam in fams:  # read-only where a record exists: ensure_stage only compares it
        if plan.store.exists(f"{fam.ref.rel}/stage.json"):
            section, upstream = stage_section(plan, fam)
            ensure_stage(plan.store, fam.ref, section, upstream, plan.cfg.name)
    with hold(plan.store, [f.ref.rel for f in fams], plan.cfg.execution):
        return _run_train(plan, kinds)


def _run_train(plan: Plan, kinds: tuple[str, ...] = ("full", "subset", "oracle")) -> dict:
    plan.store.check_reachable()
    meta = plan.prepared_meta()
    fams = [f for f in train_families(plan) if f.kind in kinds and f.n_models > 0]
    ex = plan.cfg.execution
    jobs = []
    for fam in fams:
        section, upstream = stage_section(plan, fam)
        ensure_stage(plan.store, fam.ref, section, upstream, plan.cfg.name)
        family = family_store(plan, fam, meta)
        chunk = family.ensure_arrays(fam.n_models, ex.block_size)
        done = family.done_mask(fam.n_models)
        for start, end in pending_blocks(done, ex.block_size, chunk):
            jobs.append((fam, start, end, np.flatnonzero(~done[start:end]) + start))
    if not jobs:
        return {"trained": 0}
    # the longest blocks first (a subset model sees alpha of the data), so no worker starts a long block
    # when the others are done: the order of the tasks, not what they compute
    jobs.sort(key=lambda job: -len(job[3]) * (job[0].alpha if job[0].kind == "subset" else 1.0))
    init_ray(ex)
    remote = ray.remote(train_block_task).options(**task_options(ex))
    refs = [(remote.remote(plan.store.root, plan.cfg, fam, start, end, todo.tolist()), len(todo),
             f"{fam.ref.kind}/{fam.role} {start}..{end}") for fam, start, end, todo in jobs]
    total = sum(len(todo) for *_, todo in jobs)
    run_tasks("train", refs, total)
    return {"trained": total}


def train_block_task(store_root: str, cfg: Config, fam: FamilySpec, start: int, end: int, todo: list[int]) -> int:
    """One Ray task: train models start..end of a family, write the rows not yet done, then markers."""
    pass_gate(f"train-{fam.ref.kind}-{fam.role}-{start}")  # tests only (pipeline/execution/gate.py): off by default
    torch.set_num_threads(cfg.execution.threads)
    store = Store(store_root)
    plan = Plan(cfg, store)
    meta = plan.prepared_meta()
    data = load_device_data(store_root, plan.prepare.rel, cfg.execution.device, cfg.execution.data_path)
    members, masks = zip(*(fam.member(i, meta["n_train"]) for i in range(start, end)))
    stacking = resolve_stacking(cfg.execution.stacking, data.device)
    model, counters = train_members(cfg.model, cfg.train, data, list(members), meta["classes"], stacking=stacking,
                                    cuda_graphs=cfg.execution.cuda_graphs)
    outputs = evaluate_members(model, data)
    if fam.kind == "subset":
        outputs["masks"] = np.stack(masks)
    family = family_store(plan, fam, meta)
    info = {**counters, "threads": torch.get_num_threads(), "block": [start, end], "stacking": stacking,
            "retrain_example_passes": retrain_example_passes(cfg.train, meta["n_train"])}
    for run_start, run_end in contiguous_runs(todo):
        rows = slice(run_start - start, run_end - start)
        if fam.save_weights:
            save_weights(store, fam, model.select(list(range(rows.start, rows.stop))), run_start, run_end)
        family.write_block(run_start, {k: v[rows] for k, v in outputs.items()}, info)
    return len(todo)


def weights_rel(fam: FamilySpec, start: int, end: int) -> str:
    return f"{fam.ref.rel}/weights/{fam.role}/{start:07d}-{end:07d}.safetensors"


def save_weights(store: Store, fam: FamilySpec, model, start: int, end: int) -> None:
    from safetensors.torch import save

    store.write_bytes(weights_rel(fam, start, end), save(model.stacked_state()))


def load_full_models(plan: Plan, indices: list[int], device: str = "cpu"):
    """The stacked full models `indices` (weights from safetensors, never pickle)."""
    from safetensors.torch import load

    from pipeline.models import build_model

    meta = plan.prepared_meta()
    fam = FamilySpec(plan.full, "models", plan.cfg.train.full.models, "full", save_weights=True)
    family = family_store(plan, fam, meta)
    parts = {}
    for marker in family.markers():
        a, b = marker["start"], marker["end"]
        wanted = [i for i in indices if a <= i < b]
        if wanted:
            state = load(plan.store.read_bytes(weights_rel(fam, a, b)))
            parts.update({i: {k: v[i - a] for k, v in state.items()} for i in wanted})
    missing = [i for i in indices if i not in parts]
    if missing:
        raise StageError(f"full models {missing} are not trained: run `oracle-farm train` first")
    stacking = resolve_stacking(plan.cfg.execution.stacking, device)
    model = build_model(plan.cfg.model, [0] * len(indices), tuple(meta["shape"]), meta["classes"], stacking)
    state = {k: torch.stack([parts[i][k] for i in indices]) for k in parts[indices[0]]}
    model.load_state_dict(state)
    return model.to(device).eval()
