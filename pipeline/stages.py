"""Stages: (config, store) -> identities and idempotent runs. The only module besides jobs/ that knows Ray.

Identities (decision 15): a stage's own config section with defaults + upstream ids + schema version.
Family sizes, block size, CPUs/GPUs, threads and the store root are execution settings, not identity.
"""

from __future__ import annotations

import io
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import ray
import torch

from pipeline.config import Config, stage_id
from pipeline.data.beton import read_beton, write_beton
from pipeline.data.datasets import load_dataset
from pipeline.data.forget_sets import forget_set_id, resolve_forget_set
from pipeline.execution import init_ray, run_tasks, task_options
from pipeline.models import resolve_stacking
from pipeline.store import (
    ArraySpec, Family, StageRef, Store, ensure_stage, file_sha256, is_complete, mark_complete,
)
from pipeline.train import DeviceData, Member, derive_seed, evaluate_members, retrain_example_passes, train_members

ORACLE_ROLES = ("target", "reference", "eval")
SUBSET_ROLES = ("fit", "heldout")


class StageError(RuntimeError):
    """A stage cannot run: an upstream stage is missing, or the input does not fit."""


# ---------------------------------------------------------------------------------------- the plan
@dataclass
class Plan:
    """Every stage identity of a config, and the store they live in."""

    cfg: Config
    store: Store
    data_root: str | None = None
    _scores: dict = field(default_factory=dict, repr=False, compare=False)  # k -> neighbour disagreement

    @cached_property
    def prepare(self) -> StageRef:
        section = self.cfg.data.model_dump(mode="json", exclude={"root"})
        return StageRef("prepare", stage_id("prepare", section))

    def prepared_meta(self) -> dict:
        meta = self.store.read_json(f"{self.prepare.rel}/COMPLETE.json")
        if meta is None:
            raise StageError(f"the prepare stage {self.prepare.id} is not complete: run `oracle-farm prepare` first")
        return meta

    @cached_property
    def train_labels(self) -> np.ndarray:
        if is_complete(self.store, self.prepare):
            return self.store.open_group(f"{self.prepare.rel}/arrays.zarr", mode="r")["labels/train"][:]
        return load_dataset(self.cfg.data, self.data_root).train_y

    @cached_property
    def forget_sets(self) -> dict[str, np.ndarray]:
        """name -> sorted training indices, validated (reported sets and the tuning set)."""
        return {spec.name: resolve_forget_set(spec, self.train_labels, disagreement=self.neighbour_disagreement)
                for spec in self.cfg.all_forget_sets()}

    def neighbour_disagreement(self, k: int) -> np.ndarray:
        """Scores of the `atypical` forget-set kind, computed once per prepared dataset and kept beside
        it (`derived/`): the k-NN search takes minutes on CIFAR-10 and every task's plan needs them."""
        from pipeline.data.forget_sets import neighbour_disagreement

        rel = f"{self.prepare.rel}/derived/neighbour-disagreement-k{k}.npy"
        prepared = is_complete(self.store, self.prepare)
        if prepared and self.store.exists(rel):
            return np.load(io.BytesIO(self.store.read_bytes(rel)), allow_pickle=False)
        if k not in self._scores:
            self._scores[k] = neighbour_disagreement(self.train_images(), self.train_labels, k)
        if prepared:  # the driver writes it right after prepare, before any task needs it
            buf = io.BytesIO()
            np.save(buf, self._scores[k], allow_pickle=False)
            self.store.write_bytes(rel, buf.getvalue())
        return self._scores[k]

    def train_images(self) -> np.ndarray:
        """The training images: the prepared .beton once there is one, else the dataset itself."""
        if not is_complete(self.store, self.prepare):
            return load_dataset(self.cfg.data, self.data_root).train_x
        sha = self.prepared_meta().get("files", {}).get("train.beton", {}).get("sha256")
        return read_beton(self.store.local_file(f"{self.prepare.rel}/train.beton", sha256=sha))[0]

    def _recipe(self) -> dict:
        return {"model": self.cfg.model.model_dump(mode="json"), "train": self.cfg.train.recipe()}

    @cached_property
    def full(self) -> StageRef:
        return StageRef("full", stage_id("full", self._recipe(), {"prepare": self.prepare.id}))

    @cached_property
    def subset(self) -> StageRef:
        sub = self.cfg.train.subset
        section = {**self._recipe(), "alpha": sub.alpha, "store_logits": sub.store_logits}
        return StageRef("subset", stage_id("subset", section, {"prepare": self.prepare.id}))

    def oracle(self, name: str) -> StageRef:
        fid = forget_set_id(self.forget_sets[name])
        return StageRef("oracle", stage_id("oracle", self._recipe(), {"prepare": self.prepare.id, "forget": fid}))

    @cached_property
    def fit(self) -> StageRef:
        sub = self.cfg.train.subset
        upstream = {"subset": self.subset.id, "models": sub.models, "heldout": sub.heldout}
        return StageRef("fit", stage_id("fit", self.cfg.fit.model_dump(mode="json"), upstream))

    def all_stage_refs(self) -> list[tuple[str, StageRef]]:
        refs = [("prepare", self.prepare), ("full", self.full), ("subset", self.subset)]
        refs += [(f"oracle[{n}]", self.oracle(n)) for n in self.forget_sets]
        refs.append(("fit", self.fit))
        return refs


# ---------------------------------------------------------------------------------------- prepare
def run_prepare(plan: Plan) -> dict:
    """The prepare stage, written under its lease (pipeline.lease) unless already complete."""
    from pipeline.lease import hold

    plan.store.check_reachable()
    _ = plan.forget_sets  # validate forget sets before any work
    if is_complete(plan.store, plan.prepare):
        return plan.prepared_meta()
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


_DATA_CACHE: dict = {}


def load_device_data(store_root: str, prepare_rel: str, device: str, data_path: str = "resident") -> DeviceData:
    """The prepared dataset, once per worker process: read through FFCV into device tensors, or
    streamed through FFCV's Loader batch by batch (decision 12; `execution.data_path`)."""
    from pipeline.data.stream import StreamedData, resident_fits

    key = (store_root, prepare_rel, device, data_path)
    if key not in _DATA_CACHE:
        store = Store(store_root)
        meta = store.read_json(f"{prepare_rel}/COMPLETE.json")
        files = meta.get("files", {})  # stores prepared before hashes were recorded: size check only
        local = {split: store.local_file(f"{prepare_rel}/{split}.beton",
                                         sha256=files.get(f"{split}.beton", {}).get("sha256"))
                 for split in ("train", "val")}
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
# The subset family's margins and logits are chunked by this many points, so that a fit task reads
# only the chunks of its target block (every model's, a band of columns) instead of whole rows.
SUBSET_POINT_CHUNK = 4096


def output_specs(meta: dict, logits: bool, mask: bool = False) -> list[ArraySpec]:
    """The arrays of a family; ``mask``: the subset family's (masks, and outputs chunked by points)."""
    points = meta["n_train"] + meta["n_val"]
    band = SUBSET_POINT_CHUNK if mask else None
    specs = [ArraySpec("margins", (points,), "float32", band), ArraySpec("accuracy", (2,), "float32")]
    if logits:
        specs.append(ArraySpec("logits", (points, meta["classes"]), "float16", band))
    if mask:
        specs.append(ArraySpec("masks", (meta["n_train"],), "bool"))
    return specs


@dataclass(frozen=True)
class FamilySpec:
    """One role of one training stage: how many models, and how model i's data is chosen."""

    ref: StageRef
    role: str
    n_models: int
    kind: str  # full | subset | oracle
    alpha: float = 0.5
    forget: tuple[int, ...] = ()
    logits: bool = True
    save_weights: bool = False

    def member(self, i: int, n_train: int) -> tuple[Member, np.ndarray | None]:
        seed = derive_seed(self.ref.id, self.role, i)
        if self.kind == "subset":
            gen = np.random.default_rng(derive_seed(self.ref.id, self.role, i, "mask"))
            mask = gen.random(n_train) < self.alpha
            return Member(seed, np.flatnonzero(mask)), mask
        keep = np.ones(n_train, dtype=bool)
        keep[list(self.forget)] = False
        return Member(seed, np.flatnonzero(keep)), None


def train_families(plan: Plan) -> list[FamilySpec]:
    t = plan.cfg.train
    fams = [FamilySpec(plan.full, "models", t.full.models, "full", save_weights=True)]
    fams += [FamilySpec(plan.subset, role, n, "subset", alpha=t.subset.alpha, logits=t.subset.store_logits)
             for role, n in (("fit", t.subset.models), ("heldout", t.subset.heldout))]
    for name, indices in plan.forget_sets.items():
        for role in ORACLE_ROLES:
            fams.append(FamilySpec(plan.oracle(name), role, getattr(t.oracle, role), "oracle",
                                   forget=tuple(int(i) for i in indices)))
    return fams


def family_store(plan: Plan, fam: FamilySpec, meta: dict) -> Family:
    return Family(plan.store, fam.ref, fam.role, output_specs(meta, fam.logits, mask=fam.kind == "subset"))


def stage_section(plan: Plan, fam: FamilySpec) -> tuple[dict, dict]:
    section = plan._recipe()
    upstream = {"prepare": plan.prepare.id}
    if fam.kind == "subset":
        section = {**section, "alpha": fam.alpha, "store_logits": fam.logits}
    if fam.kind == "oracle":
        upstream["forget"] = forget_set_id(np.asarray(fam.forget))
    return section, upstream


def pending_blocks(done: np.ndarray, block: int) -> list[tuple[int, int]]:
    """Block-aligned ranges [k*block, (k+1)*block) holding any model not yet done."""
    n = len(done)
    return [(s, min(s + block, n)) for s in range(0, n, block) if not done[s : s + block].all()]


def run_train(plan: Plan, kinds: tuple[str, ...] = ("full", "subset", "oracle")) -> dict:
    """Train every pending block of the chosen families as Ray tasks; finished blocks are skipped.
    Stage records made by another config stop it before anything is written; then it holds the lease
    of every stage it writes (pipeline.lease) while it runs."""
    from pipeline.lease import hold

    plan.store.check_reachable()
    plan.prepared_meta()
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


# ---------------------------------------------------------------------------------------- status
def stage_status(plan: Plan) -> list[dict]:
    """For each stage: identity, state, blocks/models done, bytes."""
    plan.store.check_reachable(create=False)
    rows = []
    meta = plan.store.read_json(f"{plan.prepare.rel}/COMPLETE.json")
    rows.append({"stage": "prepare", "id": plan.prepare.id, "state": "done" if meta else "missing",
                 "done": int(bool(meta)), "total": 1, "bytes": plan.store.size(plan.prepare.rel)})
    by_stage: dict[str, list] = {}
    for fam in train_families(plan):
        label = fam.kind if fam.kind != "oracle" else f"oracle[{_forget_name(plan, fam)}]"
        by_stage.setdefault(label, []).append(fam)
    for label, fams in by_stage.items():
        done = total = 0
        roles = []
        for fam in fams:
            n_done = 0
            if meta is not None and fam.n_models:
                n_done = int(family_store(plan, fam, meta).done_mask(fam.n_models).sum())
            done, total = done + n_done, total + fam.n_models
            roles.append(f"{fam.role} {n_done}/{fam.n_models}")
        state = "done" if done == total else ("partial" if done else "missing")
        rows.append({"stage": label, "id": fams[0].ref.id, "state": state, "done": done, "total": total,
                     "detail": ", ".join(roles), "bytes": plan.store.size(fams[0].ref.rel)})
    return rows + extra_status(plan)


def _forget_name(plan: Plan, fam: FamilySpec) -> str:
    for name in plan.forget_sets:
        if plan.oracle(name) == fam.ref:
            return name
    return "?"


def extra_status(plan: Plan) -> list[dict]:
    """Status rows of the later stages (fit, unlearn), registered by their modules."""
    rows = []
    for provider in STATUS_PROVIDERS:
        rows.extend(provider(plan))
    return rows


STATUS_PROVIDERS: list = []

