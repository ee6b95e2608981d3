"""The prepare stage: the dataset written once as FFCV files (train and val) with its labels, mean and std,
under its lease, idempotent; a complete stage's files checked against their recorded size and sha256.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from pipeline.data.beton import write_beton
from pipeline.data.datasets import load_dataset
from pipeline.plan import PREPARED_SPLITS, Plan, prepared_file
from pipeline.store import CorruptFile, ensure_stage, file_sha256, is_complete, mark_complete


# ---------------------------------------------------------------------------------------- prepare
def run_prepare(plan: Plan, repair: bool = False) -> dict:
    """The prepare stage, written under its lease (pipeline.store.lease) unless already complete. A complete
    stage's files are checked against their recorded size and sha256: a missing one is written again;
    a damaged or foreign one stops it (CorruptFile), or is written again with `repair`."""
    from pipeline.store.lease import hold

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
        store.create_array(labels, split, stage=ref, shape=y.shape, dtype="int64", chunks=y.shape, overwrite=True)[:] = y
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
