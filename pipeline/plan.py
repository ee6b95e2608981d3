"""What a config's stages are and where they live, without torch or Ray: stage identities (the plan),
the model families of the training stages, the unlearn stages' identities and the fit's target blocks.
`oracle-farm status` and the stages read these; the stages (pipeline.stages: prepare, train, fit, unlearn)
run them.

Identities (decision 15): a stage's own config section with defaults + upstream ids + schema version.
Family sizes, block size, CPUs/GPUs, threads and the store root are execution settings, not identity.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from pipeline.config import Config, stage_id
from pipeline.data.forget_sets import forget_set_id, resolve_forget_set
from pipeline.store import ArraySpec, CorruptFile, Family, StageRef, Store, StoreError, file_sha256, is_complete
from pipeline.unlearn import expand_grid, method_config, method_needs, method_provider

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
        from pipeline.data.datasets import load_dataset  # only before prepare: status needs none of it

        return load_dataset(self.cfg.data, self.data_root).train_y

    @cached_property
    def forget_sets(self) -> dict[str, np.ndarray]:
        """name -> sorted training indices, validated: the reported sets, then the tuning sets, drawn
        outside every reported set and checked disjoint from each (decision 31; ForgetSetError naming
        both sets and a shared index otherwise)."""
        from pipeline.data.forget_sets import ForgetSetError

        scores = self.neighbour_disagreement
        out = {spec.name: resolve_forget_set(spec, self.train_labels, disagreement=scores)
               for spec in self.cfg.forget_sets}
        reported = np.unique(np.concatenate([np.zeros(0, np.int64), *out.values()]))
        for spec in self.cfg.tuning_forget_sets:
            indices = resolve_forget_set(spec, self.train_labels, disagreement=scores, outside=reported)
            for name in list(out)[: len(self.cfg.forget_sets)]:
                shared = np.intersect1d(indices, out[name])
                if shared.size:
                    raise ForgetSetError(f"tuning forget set {spec.name!r} shares training point {int(shared[0])} "
                                         f"({shared.size} in all) with the reported forget set {name!r}: a tuning "
                                         "set must be disjoint from every reported set (decision 31)")
            out[spec.name] = indices
        return out

    def tuning_set(self, forget_name: str) -> str:
        """The name of the tuning set a reported set's grids are selected on (decision 31); StageError when
        the config has none of its kind and no `tuning_fallback` for it."""
        spec = self.cfg.tuning_set_for(forget_name)
        if spec is None:
            kind = self.cfg.forget_set(forget_name).kind
            given = ", ".join(f"{t.name} ({t.kind})" for t in self.cfg.tuning_forget_sets) or "none"
            raise StageError(f"forget set {forget_name!r} (kind {kind}) has no tuning set of its kind to select "
                             f"hyperparameter grids on (tuning_forget_sets: {given}): add one of kind {kind}, or "
                             f"name one in `tuning_fallback: {{{kind}: <kind>}}`")
        return spec.name

    def selection_sets(self) -> list[str]:
        """Every set grids are scored on: the tuning sets the reported sets use, then (upper bound,
        decision 32) the reported sets themselves."""
        tuning = [self.cfg.tuning_set_for(fs.name) for fs in self.cfg.forget_sets]
        sets = list(dict.fromkeys(t.name for t in tuning if t is not None))  # a missing one: check_needs says so
        if self.cfg.unlearn.upper_bound:
            sets += [fs.name for fs in self.cfg.forget_sets]
        return sets

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
        from pipeline.data.beton import read_beton
        from pipeline.data.datasets import load_dataset

        if not is_complete(self.store, self.prepare):
            return load_dataset(self.cfg.data, self.data_root).train_x
        return read_beton(prepared_file(self.store, self.prepare.rel, self.prepared_meta(), "train"))[0]

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
        return StageRef("fit", stage_id("fit", self.cfg.fit.section(), upstream))

    @cached_property
    def attribution(self) -> StageRef:
        """The fit datamodel methods read: this config's fit, or (`fit.attribution: NAME`) the external
        stage `oracle-farm import-attribution --name NAME` made on this prepared dataset (StageError
        when there is none, or it is not complete)."""
        name = self.cfg.fit.attribution
        if name is None:
            return self.fit
        found = attribution_stages(self.store, self.prepare.id)
        if name not in found:
            known = ", ".join(sorted(found)) or "none"
            raise StageError(f"fit.attribution {name!r}: no attribution of that name is imported on this prepared "
                             f"dataset (imported: {known}); run `oracle-farm import-attribution CONFIG FILE --name {name}`")
        ref = found[name]
        if not is_complete(self.store, ref):
            raise StageError(f"fit.attribution {name!r}: {ref.rel} is not complete: import it again")
        return ref

    def reading_fit(self, ref: StageRef) -> Plan:
        """A copy of this plan whose `fit` is ref: the functions that read a finished fit (forget_rows) then
        read an imported attribution stage, which has the fit's arrays and layout, the same way."""
        view = copy.copy(self)
        view.__dict__["fit"] = ref
        return view

    def datamodel_plan(self) -> Plan:
        """The plan dm-direct and DMM read datamodels through (`attribution`)."""
        return self if self.cfg.fit.attribution is None else self.reading_fit(self.attribution)

    def all_stage_refs(self) -> list[tuple[str, StageRef]]:
        refs = [("prepare", self.prepare), ("full", self.full), ("subset", self.subset)]
        refs += [(f"oracle[{n}]", self.oracle(n)) for n in self.forget_sets]
        refs.append(("fit", self.fit))
        name = self.cfg.fit.attribution
        found = attribution_stages(self.store, self.prepare.id) if name is not None else {}
        if name in found:
            refs.append((f"attribution[{name}]", found[name]))
        return refs


EXTERNAL_ATTRIBUTION = "attribution"  # the import kind of an external stage holding attribution matrices


def attribution_stages(store: Store, prepare_id: str) -> dict[str, StageRef]:
    """name -> external attribution stage made on this prepared dataset (`import-attribution` keeps names
    unique per prepared dataset)."""
    out = {}
    for entry in store.list("external"):
        if not entry.startswith("external-"):
            continue
        rec = store.read_json(f"external/{entry}/stage.json") or {}
        section = rec.get("config") or {}
        if section.get("kind") == EXTERNAL_ATTRIBUTION and (rec.get("upstream") or {}).get("prepare") == prepare_id:
            out[section["name"]] = StageRef("external", rec["id"])
    return out


# ---------------------------------------------------------------------------------------- prepared files
PREPARED_SPLITS = ("train", "val")
REPAIR_HINT = ("remove it and run `oracle-farm prepare CONFIG`, which writes a missing file again, or run "
               "`oracle-farm prepare CONFIG --repair`")
_HASHED: dict = {}  # (path, size, mtime_ns) -> sha256: a file is hashed once per process


def prepared_file(store: Store, prepare_rel: str, meta: dict, split: str) -> Path:
    """A local path to a prepared split's .beton, checked against the size and sha256 the prepare
    stage recorded (CorruptFile naming the file and the fix otherwise). A remote store's copy is
    checked by `Store.local_file`; a local file in place, its hash computed once per process."""
    name = f"{split}.beton"
    rel = f"{prepare_rel}/{name}"
    record = meta.get("files", {}).get(name, {})  # stores prepared before hashes were recorded: none
    if not store.is_local:
        try:
            return store.local_file(rel, sha256=record.get("sha256"))
        except CorruptFile:
            raise
        except StoreError as exc:
            raise CorruptFile(f"{exc}; {REPAIR_HINT}") from None
    problem = prepared_file_problem(store, rel, record)
    if problem:
        raise CorruptFile(f"{store.url(rel)}: {problem}; {REPAIR_HINT}")
    return Path(store.path(rel))


def prepared_file_problem(store: Store, rel: str, record: dict) -> str | None:
    """What is wrong with a local prepared file against its record (None when nothing is)."""
    path = Path(store.path(rel))
    if not path.is_file():
        return "missing (the prepare stage wrote it)"
    st = path.stat()
    if record.get("size") is not None and st.st_size != record["size"]:
        return (f"{st.st_size} bytes where the prepare stage recorded {record['size']} (truncated, or replaced by "
                "another file)")
    if record.get("sha256"):
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in _HASHED:
            _HASHED[key] = file_sha256(path)
        if _HASHED[key] != record["sha256"]:
            return (f"its sha256 {_HASHED[key][:16]}... differs from the {record['sha256'][:16]}... the prepare stage "
                    "recorded (damaged, or replaced by another file)")
    return None


def check_prepared(plan: Plan) -> None:
    """Before a stage reads the prepared files: each as the prepare stage recorded it (CorruptFile).
    Local files are hashed; on an object store the sizes are compared here and every worker hashes
    its own copy (Store.local_file)."""
    meta = plan.prepared_meta()
    for split in PREPARED_SPLITS:
        rel = f"{plan.prepare.rel}/{split}.beton"
        record = meta.get("files", {}).get(f"{split}.beton", {})
        if plan.store.is_local:
            prepared_file(plan.store, plan.prepare.rel, meta, split)
            continue
        try:
            size = int(plan.store.fs.info(plan.store.path(rel))["size"])
        except FileNotFoundError:
            raise CorruptFile(f"{plan.store.url(rel)}: missing (the prepare stage wrote it); {REPAIR_HINT}") from None
        if record.get("size") is not None and size != record["size"]:
            raise CorruptFile(f"{plan.store.url(rel)}: {size} bytes where the prepare stage recorded {record['size']} "
                              f"(truncated, or replaced by another file); {REPAIR_HINT}")


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
        from pipeline.batches import Member, derive_seed

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


def pending_blocks(done: np.ndarray, block: int, chunk: int = 1) -> list[tuple[int, int]]:
    """Block-aligned ranges [k*block, (k+1)*block) holding any model not yet done. The block is a whole
    number of the family's model chunks (rounded down, at least one), so no two tasks write one chunk."""
    n = len(done)
    block = max(chunk, block // chunk * chunk)
    return [(s, min(s + block, n)) for s in range(0, n, block) if not done[s : s + block].all()]


def contiguous_runs(indices: list[int]) -> list[tuple[int, int]]:
    """Contiguous runs [a, b) of sorted indices: the rows a block task writes under one marker each."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return [(a, b) for a, b in runs]


# ---------------------------------------------------------------------------------------- fit
TARGET_CHUNK = 16  # targets per chunk of the fit's column-read arrays (theta, bias, lds, lam)


def target_blocks(n_points: int, block: int) -> list[tuple[int, int]]:
    block = max(TARGET_CHUNK, block // TARGET_CHUNK * TARGET_CHUNK)  # a block owns whole chunks
    return [(s, min(s + block, n_points)) for s in range(0, n_points, block)]


def done_targets(store: Store, rel: str, n_points: int) -> np.ndarray:
    """Targets covered by a marker: blocks of another size from an earlier run still count."""
    done = np.zeros(n_points, dtype=bool)
    for marker in target_markers(store, rel):
        done[marker["start"] : marker["end"]] = True
    return done


def target_markers(store: Store, rel: str) -> list[dict]:
    """The fit's readable target-block markers: one listing, read concurrently."""
    names = store.list(f"{rel}/markers/targets")
    return [m for m in store.read_jsons([f"{rel}/markers/targets/{n}" for n in names]) if m is not None]


# ---------------------------------------------------------------------------------------- unlearn
def n_unlearned(cfg: Config) -> int:
    return cfg.unlearn.models or cfg.train.full.models


# How a method's randomness is drawn; part of every unlearn stage's identity. 2 (issue 14): model i's
# from (stage, model i) alone, so no two unlearned models share batch order or noise (1: one stream per
# stage, shared by every model of a block).
UNLEARN_RNG = 2
# 1: forget P95 alone; 2: decision 27 (mean of forget, retain and val P95); 3: decision 30 (that mean among
# the points that keep the bar), per method and tuning set (decision 31), each point's bar recorded
SELECTION_VERSION = 3


def unlearn_ref(plan: Plan, method: str, hparams, forget_name: str) -> StageRef:
    """Identity: method + its full hyperparameters + the full models, forget set, count and the
    upstream stages the method reads (fit for datamodel methods, oracles for OM)."""
    needs = method_needs(method)
    upstream = {"full": plan.full.id, "forget": forget_set_id(plan.forget_sets[forget_name]),
                "models": n_unlearned(plan.cfg), "seed": plan.cfg.unlearn.seed, "rng": UNLEARN_RNG}
    if "datamodels" in needs:
        upstream["fit"] = plan.attribution.id  # the config's fit, or the imported attribution it names
    if "target_oracles" in needs:
        upstream["oracle"] = plan.oracle(forget_name).id
        upstream["targets"] = plan.cfg.train.oracle.target
    section = {"method": method, "hparams": hparams.model_dump(mode="json")}
    if (provider := method_provider(method)) is not None:  # a plugin: who provides it (decision 37)
        section["provider"] = provider
    return StageRef("unlearn", stage_id("unlearn", section, upstream))


def unlearn_family(plan: Plan, ref: StageRef, meta: dict) -> Family:
    return Family(plan.store, ref, "models", output_specs(meta, logits=True))


def method_grids(cfg: Config) -> dict[str, list]:
    """method -> validated hyperparameter points; ConfigError, worded like any config error
    (`unlearn.methods.finetune.lr: must be > 0, got -1`), on an unknown method or a bad value."""
    from pydantic import ValidationError

    from pipeline.config import ConfigError, error_lines

    grids, problems = {}, []
    for name, params in cfg.unlearn.methods.items():
        try:
            grids[name] = expand_grid(name, params)
        except KeyError as exc:
            problems.append(f"unlearn.methods.{name}: {exc.args[0]}")
        except ValidationError as exc:
            problems += error_lines(exc, root=method_config(name), prefix=f"unlearn.methods.{name}")
    if problems:
        raise ConfigError("\n".join(problems))
    return grids


def selection_rel(plan: Plan, method: str, grid: list, set_name: str) -> str:
    """Where the selection record of a method's grid scored on one set lives (a tuning set, or a reported
    set for the upper bound): named by the grid, the set's first grid-point stage, its oracles and the
    rule's version, so any change to them makes a new record."""
    payload = json.dumps([method, [g.model_dump(mode="json") for g in grid], unlearn_ref(plan, method, grid[0], set_name).id,
                          plan.oracle(set_name).id, SELECTION_VERSION], sort_keys=True)
    return f"selection/{method}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}.json"


def chosen_point(plan: Plan, method: str, grid: list, forget_name: str):
    """The point a reported set uses: the only one, or the one its tuning set's record chose (None before
    the selection has run)."""
    if len(grid) == 1:
        return grid[0]
    record = plan.store.read_json(selection_rel(plan, method, grid, plan.tuning_set(forget_name)))
    return None if record is None else grid[record["chosen"]]


def selection_rels(plan: Plan, grids: dict) -> list[str]:
    """Every selection record a config's grids have (none for a grid of one point)."""
    return [selection_rel(plan, m, g, s) for m, g in grids.items() if len(g) > 1 for s in plan.selection_sets()]
