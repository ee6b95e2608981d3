"""Stages: the prepare and train stages' idempotent runs, as Ray tasks. The only module besides jobs/
that knows Ray. What the stages are (identities, families) is pipeline.plan, re-exported here.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import ray
import torch

from pipeline.config import Config
from pipeline.data.beton import read_beton, write_beton
from pipeline.data.datasets import load_dataset
from pipeline.execution import init_ray, run_tasks, task_options
from pipeline.gate import pass_gate
from pipeline.models import resolve_stacking
from pipeline.plan import (  # noqa: F401 - re-exported: the stages' vocabulary
    ORACLE_ROLES, PREPARED_SPLITS, SUBSET_POINT_CHUNK, SUBSET_ROLES, FamilySpec, Plan, StageError, check_prepared,
    family_store, output_specs, pending_blocks, prepared_file, stage_section, train_families,
)
from pipeline.status import stage_status  # noqa: F401 - re-exported
from pipeline.store import CorruptFile, Store, ensure_stage, file_sha256, is_complete, mark_complete
from pipeline.train import DeviceData, evaluate_members, retrain_example_passes, train_members


# ---------------------------------------------------------------------------------------- prepare
def run_prepare(plan: Plan, repair: bool = False) -> dict:
    """The prepare stage, written under its lease (pipeline.lease) unless already complete. A complete
    stage's files are checked against their recorded size and sha256: a missing one is written again;
    a damaged or foreign one stops it (CorruptFile), or is written again with `repair`."""
    from pipeline.lease import hold

    plan.store.check_reachable()
    _ = plan.forget_sets  # validate forget sets before any work
    if is_complete(plan.store, plan.prepare):
        meta = plan.prepared_meta()
        damaged = _prepared_problems(plan, meta, repair)
        if damaged:
            with hold(plan.store, [plan.prepare.rel], plan.cfg.execution):
                _rewrite_prepared(plan, meta, damaged)
        return meta
    with hold(plan.store, [plan.prepare.rel], plan.cfg.execution):
        meta = _run_prepare(plan)
    for k in {spec.neighbours for spec in plan.cfg.all_forget_sets() if spec.kind == "atypical"}:
        plan.neighbour_disagreement(k)  # cached beside the data from the validation's scores: no second search
    return meta


def _run_prepare(plan: Plan) -> dict:
    store, ref = plan.store, plan.prepare
    store.check_reachable()
    _ = plan.forget_sets  # validate forget sets before any work
    if is_complete(store, ref):
        return plan.prepared_meta()
    dataset = load_dataset(plan.cfg.data, plan.data_root)
    ensure_stage(store, ref, plan.cfg.data.model_dump(mode="json", exclude={"root"}), {}, plan.cfg.name)
    mean, std = dataset.channel_stats()
    files = {}  # size and sha256 of each .beton: workers verify their local copies against them
    with tempfile.TemporaryDirectory() as tmp:
        for split, x, y in (("train", dataset.train_x, dataset.train_y), ("val", dataset.val_x, dataset.val_y)):
            local = Path(tmp) / f"{split}.beton"
            write_beton(local, x, y)
            files[f"{split}.beton"] = {"size": local.stat().st_size, "sha256": file_sha256(local)}
            store.put_file(local, f"{ref.rel}/{split}.beton")
    group = store.open_group(f"{ref.rel}/arrays.zarr")
    labels = group.require_group("labels")
    for split, y in (("train", dataset.train_y), ("val", dataset.val_y)):
        labels.create_array(split, shape=y.shape, dtype="int64", chunks=y.shape, overwrite=True)[:] = y
    meta = {"dataset": dataset.name, "n_train": len(dataset.train_y), "n_val": len(dataset.val_y),
            "shape": list(dataset.shape), "classes": dataset.classes, "mean": mean, "std": std,
            "data_root": plan.cfg.data.root if plan.cfg.data.dataset == "cifar10" else None, "files": files}
    mark_complete(store, ref, meta)
    return meta


def _prepared_problems(plan: Plan, meta: dict, repair: bool) -> list[str]:
    """The splits whose .beton to write again: missing ones, and with `repair` damaged ones too;
    CorruptFile for a damaged one without `repair`."""
    todo = []
    for split in PREPARED_SPLITS:
        if not plan.store.exists(f"{plan.prepare.rel}/{split}.beton"):
            todo.append(split)
            continue
        try:
            prepared_file(plan.store, plan.prepare.rel, meta, split)
        except CorruptFile:
            if not repair:
                raise
            todo.append(split)
    return todo


def _rewrite_prepared(plan: Plan, meta: dict, splits: list[str]) -> None:
    """Write these splits' .beton files again from the dataset; they must come out as recorded."""
    dataset = load_dataset(plan.cfg.data, plan.data_root)
    arrays = {"train": (dataset.train_x, dataset.train_y), "val": (dataset.val_x, dataset.val_y)}
    with tempfile.TemporaryDirectory() as tmp:
        for split in splits:
            local = Path(tmp) / f"{split}.beton"
            write_beton(local, *arrays[split])
            want = meta.get("files", {}).get(f"{split}.beton", {}).get("sha256")
            if want and file_sha256(local) != want:
                raise CorruptFile(f"{plan.store.url(plan.prepare.rel)}/{split}.beton: the dataset now writes another file "
                                  "than the one prepare recorded (the source data changed): remove the whole prepare "
                                  f"stage {plan.store.url(plan.prepare.rel)} and every stage after it, or restore the data")
            plan.store.put_file(local, f"{plan.prepare.rel}/{split}.beton")
            print(f"prepare: wrote {plan.store.url(plan.prepare.rel)}/{split}.beton again", flush=True)


_DATA_CACHE: dict = {}


def load_device_data(store_root: str, prepare_rel: str, device: str, data_path: str = "resident") -> DeviceData:
    """The prepared dataset, once per worker process: read through FFCV into device tensors, or
    streamed through FFCV's Loader batch by batch (decision 12; `execution.data_path`)."""
    from pipeline.data.stream import StreamedData, resident_fits

    key = (store_root, prepare_rel, device, data_path)
    if key not in _DATA_CACHE:
        store = Store(store_root)
        meta = store.read_json(f"{prepare_rel}/COMPLETE.json")
        local = {split: prepared_file(store, prepare_rel, meta, split) for split in PREPARED_SPLITS}
        _DATA_CACHE.clear()
        if data_path == "stream" or (data_path == "auto" and not resident_fits(meta, device)):
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
    of every stage it writes (pipeline.lease) while it runs."""
    from pipeline.lease import hold

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
        family.ensure_arrays(fam.n_models)
        done = family.done_mask(fam.n_models)
        for start, end in pending_blocks(done, ex.block_size):
            jobs.append((fam, start, end, np.flatnonzero(~done[start:end]) + start))
    if not jobs:
        return {"trained": 0}
    init_ray(ex)
    remote = ray.remote(train_block_task).options(**task_options(ex))
    refs = [(remote.remote(plan.store.root, plan.cfg, fam, start, end, todo.tolist()), len(todo))
            for fam, start, end, todo in jobs]
    total = sum(w for _, w in refs)
    run_tasks("train", refs, total)
    return {"trained": total}


def train_block_task(store_root: str, cfg: Config, fam: FamilySpec, start: int, end: int, todo: list[int]) -> int:
    """One Ray task: train models start..end of a family, write the rows not yet done, then markers."""
    pass_gate(f"train-{fam.ref.kind}-{fam.role}-{start}")  # tests only (pipeline/gate.py): off by default
    torch.set_num_threads(cfg.execution.threads)
    store = Store(store_root)
    plan = Plan(cfg, store)
    meta = plan.prepared_meta()
    data = load_device_data(store_root, plan.prepare.rel, cfg.execution.device, cfg.execution.data_path)
    members, masks = zip(*(fam.member(i, meta["n_train"]) for i in range(start, end)))
    stacking = resolve_stacking(cfg.execution.stacking, data.device)
    model, counters = train_members(cfg.model, cfg.train, data, list(members), meta["classes"], stacking=stacking)
    outputs = evaluate_members(model, data)
    if fam.kind == "subset":
        outputs["masks"] = np.stack(masks)
    family = family_store(plan, fam, meta)
    info = {**counters, "threads": torch.get_num_threads(), "block": [start, end], "stacking": stacking,
            "retrain_example_passes": retrain_example_passes(cfg.train, meta["n_train"])}
    for run_start, run_end in _runs(todo):
        rows = slice(run_start - start, run_end - start)
        if fam.save_weights:
            save_weights(store, fam, model.select(list(range(rows.start, rows.stop))), run_start, run_end)
        family.write_block(run_start, {k: v[rows] for k, v in outputs.items()}, info)
    return len(todo)


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """Contiguous runs [a, b) of sorted indices."""
    runs = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return [tuple(r) for r in runs]


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


