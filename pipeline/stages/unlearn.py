"""The unlearn stage: every configured method x forget set x hyperparameter point, applied to the
first N_u full models, as Ray tasks per block of models, resumable like `train`.

Grids (a list for a hyperparameter) are selected per method and tuning set (decision 31: a reported set
uses the tuning set of its own kind) against that tuning set's eval oracles by decision 30: among the
points that keep the bar, the lowest mean of the forget, retain and val P95 KLoM; only when none keeps it,
the lowest mean, marked; ties broken by compute. Reported runs use the chosen point. With
`unlearn.upper_bound` (decision 32) every grid point also runs on every reported set and the same rule
against that set's own eval oracles gives an optimistic bound, recorded apart (`selection_summary`).
Scores come from `pipeline.evaluate.oracles`, not the report.
"""

from __future__ import annotations

import numpy as np
import ray
import torch

from pipeline.batches import derive_seed
from pipeline.config import Config
from pipeline.execution import init_ray, run_tasks, task_options
from pipeline.execution.gate import pass_gate
from pipeline.models import build_model
from pipeline.stages.fit import dm_direct_error, forget_rows
from pipeline.plan import (  # noqa: F401 - re-exported: callers name them from here
    SELECTION_VERSION, FamilySpec, Plan, StageError, check_prepared, chosen_point, contiguous_runs, family_store,
    method_grids, n_unlearned, pending_blocks, selection_rel, unlearn_family, unlearn_ref,
)
from pipeline.stages.train import load_device_data, load_full_models
from pipeline.store import StageRef, Store, ensure_stage
from pipeline.training.recipe import evaluate_members, outputs_from_logits, retrain_example_passes
from pipeline.unlearn import get_method
from pipeline.unlearn.base import ComputeMeter, Context, ForgetRows


def check_needs(plan: Plan, grids: dict) -> None:
    for name in grids:
        needs = get_method(name).NEEDS
        if "datamodels" in needs and plan.cfg.fit.attribution is not None:
            section = plan.store.read_json(f"{plan.attribution.rel}/stage.json")["config"]
            if not section.get("per_logit"):
                raise StageError(f"unlearn.methods.{name} needs per-logit datamodels: fit.attribution "
                                 f"{plan.cfg.fit.attribution!r} holds per-margin ones only (import a per-logit matrix)")
        elif "datamodels" in needs and not plan.cfg.fit.per_logit:
            raise StageError(f"unlearn.methods.{name} needs per-logit datamodels: set fit.per_logit: true")
        if "target_oracles" in needs and plan.cfg.train.oracle.target < 1:
            raise StageError(f"unlearn.methods.{name} needs target oracles: set train.oracle.target >= 1")
    if plan.cfg.train.full.models < n_unlearned(plan.cfg):
        raise StageError(f"unlearn.models {n_unlearned(plan.cfg)} exceeds train.full.models {plan.cfg.train.full.models}")
    if any(len(g) > 1 for g in grids.values()):
        for fs in plan.cfg.forget_sets:
            plan.tuning_set(fs.name)  # a reported set with no tuning set of its kind: named here


# ---------------------------------------------------------------------------------------- running
def run_unlearn_jobs(plan: Plan, jobs: list[tuple[str, object, str]], label: str) -> None:
    """Run the jobs holding the lease of each job's stage (pipeline.store.lease)."""
    from pipeline.store.lease import hold

    plan.prepared_meta()
    with hold(plan.store, [unlearn_ref(plan, m, hp, fs).rel for m, hp, fs in jobs], plan.cfg.execution):
        _run_unlearn_jobs(plan, jobs, label)


def _run_unlearn_jobs(plan: Plan, jobs: list[tuple[str, object, str]], label: str) -> None:
    """jobs: (method, hparams, forget set name). Each is its own stage; pending blocks run as tasks."""
    meta = plan.prepared_meta()
    ex = plan.cfg.execution
    n = n_unlearned(plan.cfg)
    tasks = []
    for method, hp, fs in jobs:
        ref = unlearn_ref(plan, method, hp, fs)
        ensure_stage(plan.store, ref, {"method": method, "hparams": hp.model_dump(mode="json"), "forget_set": fs},
                     {"full": plan.full.id}, plan.cfg.name)
        family = unlearn_family(plan, ref, meta)
        chunk = family.ensure_arrays(n, ex.block_size)
        done = family.done_mask(n)
        for start, end in pending_blocks(done, ex.block_size, chunk):
            tasks.append((method, hp, fs, start, end, (np.flatnonzero(~done[start:end]) + start).tolist()))
    if not tasks:
        return
    check_prepared(plan)  # every task reads the prepared files: as prepare recorded them
    for fs in sorted({fs for m, _, fs, *_ in tasks if "datamodels" in get_method(m).NEEDS}):
        forget_rows(plan.datamodel_plan(), plan.forget_sets[fs])  # once here, not in every task
        dm_direct_error(plan.datamodel_plan(), fs)  # recorded beside them (decision 34), once its target oracles exist
    init_ray(ex)
    remote = ray.remote(unlearn_block_task).options(**task_options(ex))
    refs = [(remote.remote(plan.store.root, plan.cfg, m, hp.model_dump(mode="json"), fs, a, b, todo), len(todo),
             f"{m} on {fs}, models {a}..{b}") for m, hp, fs, a, b, todo in tasks]
    run_tasks(label, refs, sum(len(todo) for *_, todo in tasks))


def unlearn_block_task(store_root: str, cfg: Config, method: str, hparams: dict, forget_name: str,
                       start: int, end: int, todo: list[int]) -> int:
    pass_gate(f"unlearn-{method}-{forget_name}-{start}")  # tests only (pipeline/execution/gate.py): off by default
    torch.set_num_threads(cfg.execution.threads)
    plan = Plan(cfg, Store(store_root))
    meta = plan.prepared_meta()
    module = get_method(method)
    hp = module.Config.model_validate(hparams)
    ref = unlearn_ref(plan, method, hp, forget_name)
    data = load_device_data(store_root, plan.prepare.rel, cfg.execution.device)
    indices = list(range(start, end))
    model = load_full_models(plan, indices, cfg.execution.device)
    forget = plan.forget_sets[forget_name]
    retain = np.setdiff1d(np.arange(meta["n_train"]), forget)
    ctx = build_context(plan, meta, data, ref, forget_name, forget, indices, module.NEEDS)
    meter = ComputeMeter()
    out = module.run(ctx, model, forget, retain, hp, meter)
    if out.model is not None:
        outputs = evaluate_members(out.model, data)
    else:
        outputs = outputs_from_logits(out.logits, data)
    info = {**meter.summary(), "retrain_example_passes": retrain_example_passes(cfg.train, meta["n_train"]),
            "notes": {**ctx.notes, **out.notes}, "threads": torch.get_num_threads(), "block": [start, end]}
    family = unlearn_family(plan, ref, meta)
    for run_start, run_end in contiguous_runs(todo):  # one marker per run: per model, writes cost more than the work
        rows = slice(run_start - start, run_end - start)
        family.write_block(run_start, {k: v[rows] for k, v in outputs.items()}, info)
    return len(todo)


def build_context(plan: Plan, meta: dict, data, ref: StageRef, forget_name: str, forget: np.ndarray,
                  indices: list[int], needs: tuple) -> Context:
    device = data.device

    def datamodels() -> ForgetRows:
        sums, diagonal = forget_rows(plan.datamodel_plan(), forget)  # the fit, or the attribution it names
        return ForgetRows(torch.as_tensor(sums, device=device), torch.as_tensor(diagonal, device=device))

    def target_oracle_logits() -> torch.Tensor:
        n_t = plan.cfg.train.oracle.target
        fam = FamilySpec(plan.oracle(forget_name), "target", n_t, "oracle")
        family = family_store(plan, fam, meta)
        if not family.done_mask(n_t).all():
            raise StageError(f"target oracles of {forget_name!r} are not trained")
        return torch.as_tensor(family.read("logits", n_t), device=device).float().mean(0)

    def fresh(seeds: list[int]):
        return build_model(plan.cfg.model, seeds, tuple(meta["shape"]), meta["classes"]).to(device)

    return Context(data=data, classes=meta["classes"], seed=derive_seed(ref.id), model_indices=indices,
                   make_fresh_model=lambda members: fresh([derive_seed(ref.id, "fresh", i) for i in members]),
                   _forget_rows=datamodels if "datamodels" in needs else None,
                   _target_oracle_logits=target_oracle_logits if "target_oracles" in needs else None)


# ---------------------------------------------------------------------------------------- tuning
# What the report calls an upper-bound row (decision 32): never the headline.
UPPER_BOUND_LABEL = "tuned on the scored oracles (optimistic)"


def choose(scores: list[dict]) -> tuple[int, bool]:
    """Decision 30: (index, passed_bar). Among the points whose bar passed, the lowest mean of the three
    P95s; only when none passed, the lowest mean of all, with passed_bar False. Ties (to 1e-9) go to
    the lower compute, then to the earlier grid point."""
    passing = [i for i, sc in enumerate(scores) if sc["bar"]["passed"]]
    pool = passing or range(len(scores))
    best = min(pool, key=lambda i: (round(scores[i]["mean_p95"], 9), scores[i]["compute"], i))
    return best, bool(passing)


def score_grid_point(plan: Plan, method: str, hp, forget_name: str, labels: np.ndarray) -> dict:
    """What the selection record keeps for one grid point: P95 and mean KLoM of forget, retain and val
    against the set's eval oracles, top-1 accuracies, MIA and compute (example-passes per model)."""
    from pipeline.evaluate.oracles import GROUPS, logit_accuracy, score, selection_score

    meta = plan.prepared_meta()
    n = n_unlearned(plan.cfg)
    family = unlearn_family(plan, unlearn_ref(plan, method, hp, forget_name), meta)
    acc = logit_accuracy(family.read("logits", n), labels)
    row = score(plan, forget_name, family.read("margins", n), acc, labels, bootstrap=0)
    infos = family.model_infos(n)
    return {"hparams": hp.model_dump(mode="json"),
            "p95": {g: row["klom"][g]["p95"] for g in GROUPS},
            "mean_klom": {g: row["klom"][g]["mean"] for g in GROUPS},
            "mean_p95": selection_score(row),
            "accuracy": row["accuracy"], "oracle_accuracy": row["oracle_accuracy"], "mia": row["mia"],
            "compute": float(np.mean([i["equivalent_passes"] for i in infos])),
            "compute_fraction": float(np.mean([i["equivalent_passes"] / i["retrain_example_passes"] for i in infos]))}


def score_grid_point_task(store_root: str, cfg: Config, method: str, hparams: dict, forget_name: str) -> dict:
    """One Ray task: `score_grid_point` of a selection run (reading its models' outputs is most of it)."""
    from pipeline.evaluate.oracles import all_labels

    plan = Plan(cfg, Store(store_root))
    hp = get_method(method).Config.model_validate(hparams)
    return score_grid_point(plan, method, hp, forget_name, all_labels(plan))


def set_references(plan: Plan, forget_name: str, labels: np.ndarray) -> dict:
    """A set's floor (its reference oracles: the `retrain` row) and do-nothing (the first N_u full
    models), scored as the grid points are: the bar of decision 30 is measured against them."""
    from pipeline.evaluate.oracles import GROUPS, logit_accuracy, oracle_margins, score

    n = n_unlearned(plan.cfg)
    full = family_store(plan, FamilySpec(plan.full, "models", plan.cfg.train.full.models, "full"), plan.prepared_meta())
    out = {}
    for name, margins, logits in (
            ("floor", oracle_margins(plan, forget_name, "reference"), oracle_margins(plan, forget_name, "reference", "logits")),
            ("do_nothing", full.read("margins", n), full.read("logits", n))):
        row = score(plan, forget_name, margins, logit_accuracy(logits, labels), labels, bootstrap=0)
        out[name] = {"p95": {g: row["klom"][g]["p95"] for g in GROUPS}, "accuracy": row["accuracy"]}
    return out


def selection_record(plan: Plan, method: str, set_name: str, scores: list[dict], references: dict) -> dict:
    """The record of one grid scored on one set: every point with its bar, the rule's choice, and the
    floor and do-nothing it was measured against. On a reported set (the upper bound) it is marked
    optimistic: that set's own eval oracles chose it."""
    from pipeline.evaluate.oracles import SELECTION_RULE, bar_checks

    scores = [{**sc, "bar": bar_checks(sc, references["floor"], references["do_nothing"])} for sc in scores]
    index, passed = choose(scores)
    optimistic = set_name in {fs.name for fs in plan.cfg.forget_sets}
    return {"method": method, "set": set_name, "kind": plan.cfg.forget_set(set_name).kind,
            "role": "upper_bound" if optimistic else "tuning", "optimistic": optimistic,
            "scored_against": f"the eval oracles of {set_name!r}", "rule": SELECTION_RULE,
            "version": SELECTION_VERSION, "scores": scores, "chosen": index, "passed_bar": passed, **references}


def run_selections(plan: Plan, grids: dict) -> dict[tuple[str, str], dict]:
    """(method, set) -> selection record, for every grid of more than one point and every set it is
    scored on (`Plan.selection_sets`: the tuning sets, and the reported sets for the upper bound). Grid
    points run as unlearn stages and are scored against that set's eval oracles only (decisions 3, 16);
    a record in the store is reused."""
    to_tune = {m: g for m, g in grids.items() if len(g) > 1}
    pairs = [(m, s) for m in to_tune for s in plan.selection_sets()]
    missing = [(m, s) for m, s in pairs if plan.store.read_json(selection_rel(plan, m, to_tune[m], s)) is None]
    if missing:
        from pipeline.evaluate.oracles import all_labels

        points = [(m, hp, s) for m, s in missing for hp in to_tune[m]]
        run_unlearn_jobs(plan, points, "tune")
        labels = all_labels(plan)
        references = {s: set_references(plan, s, labels) for s in dict.fromkeys(s for _, s in missing)}
        init_ray(plan.cfg.execution)
        remote = ray.remote(score_grid_point_task).options(**task_options(plan.cfg.execution, gpu=False))
        refs = [(remote.remote(plan.store.root, plan.cfg, m, hp.model_dump(mode="json"), s), 1) for m, hp, s in points]
        scored = run_tasks("score", refs, len(refs), unit="grid points")
        for m, s in missing:
            scores = [sc for (pm, _, ps), sc in zip(points, scored) if (pm, ps) == (m, s)]
            plan.store.write_json(selection_rel(plan, m, to_tune[m], s), selection_record(plan, m, s, scores, references[s]))
    return {(m, s): plan.store.read_json(selection_rel(plan, m, to_tune[m], s)) for m, s in pairs}


def select_hyperparameters(plan: Plan, grids: dict) -> dict[str, dict[str, object]]:
    """method -> reported set -> the point it uses: the only one, or the one decision 30's rule chose on
    the set's tuning set (decision 31), running and recording the selection where no record exists."""
    records = run_selections(plan, grids)
    return {m: {fs.name: g[0] if len(g) == 1 else g[records[(m, plan.tuning_set(fs.name))]["chosen"]]
                for fs in plan.cfg.forget_sets} for m, g in grids.items()}


def selection_records(plan: Plan, grids: dict) -> dict[str, dict[str, dict]]:
    """method -> set scored on -> its selection record, for the records in the store (methods with a
    grid of one point have none)."""
    out: dict[str, dict[str, dict]] = {}
    for method, grid in grids.items():
        for name in plan.selection_sets() if len(grid) > 1 else ():
            record = plan.store.read_json(selection_rel(plan, method, grid, name))
            if record is not None:
                out.setdefault(method, {})[name] = record
    return out


def selection_summary(plan: Plan) -> dict[str, dict[str, dict]]:
    """What the report shows of the selection, read from the store: method -> reported set -> {

        "tuning_set": the tuning set its grid was selected on (None: no grid),
        "kind": that tuning set's kind (the reported set's own, or its `tuning_fallback`),
        "reported_kind": the reported set's kind,
        "chosen": the hyperparameters it uses, "unlearn_id": the unlearn stage scored for its row,
        "passed_bar": whether the chosen point kept decision 30's bar on the tuning set (None: no grid),
        "record": the selection record's path in the store (None: no grid),
        "upper_bound": None, or (config `unlearn.upper_bound`, a grid of more than one point) the point
            decision 30's rule picks against this reported set's OWN eval oracles: {"hparams",
            "unlearn_id" (the unlearn stage, on this reported set, the report scores for the row shown
            apart as UPPER_BOUND_LABEL, never the headline), "passed_bar", "record", "label"}}.

    StageError where a grid's selection has not run (`oracle-farm unlearn` runs it)."""
    grids = method_grids(plan.cfg)
    out: dict[str, dict[str, dict]] = {}
    for method, grid in grids.items():
        for fs in plan.cfg.forget_sets:
            entry = {"tuning_set": None, "kind": None, "reported_kind": fs.kind, "chosen": None, "unlearn_id": None,
                     "passed_bar": None, "record": None, "upper_bound": None}
            if len(grid) == 1:
                entry.update(chosen=grid[0].model_dump(mode="json"), unlearn_id=unlearn_ref(plan, method, grid[0], fs.name).id)
            else:
                tuning = plan.tuning_set(fs.name)
                hp, rec, rel = _recorded_choice(plan, method, grid, tuning)
                entry.update(tuning_set=tuning, kind=plan.cfg.forget_set(tuning).kind, chosen=hp.model_dump(mode="json"),
                             unlearn_id=unlearn_ref(plan, method, hp, fs.name).id, passed_bar=rec["passed_bar"], record=rel)
                if plan.cfg.unlearn.upper_bound:
                    hp, rec, rel = _recorded_choice(plan, method, grid, fs.name)
                    entry["upper_bound"] = {"hparams": hp.model_dump(mode="json"), "passed_bar": rec["passed_bar"],
                                            "unlearn_id": unlearn_ref(plan, method, hp, fs.name).id, "record": rel,
                                            "label": UPPER_BOUND_LABEL}
            out.setdefault(method, {})[fs.name] = entry
    return out


def _recorded_choice(plan: Plan, method: str, grid: list, set_name: str):
    rel = selection_rel(plan, method, grid, set_name)
    rec = plan.store.read_json(rel)
    if rec is None:
        raise StageError(f"the grid of {method} has not been selected on {set_name!r}: run `oracle-farm unlearn`")
    return grid[rec["chosen"]], rec, rel


def upper_bound_jobs(plan: Plan) -> list[tuple[str, dict, str]]:
    """(method, hparams, reported set) of every upper-bound row the report scores (against that set's
    eval oracles, as any row), from `selection_summary`; empty unless `unlearn.upper_bound`."""
    return [(m, e["upper_bound"]["hparams"], fs) for m, sets in selection_summary(plan).items()
            for fs, e in sets.items() if e["upper_bound"] is not None]


def run_unlearn(plan: Plan) -> dict[str, dict[str, dict]]:
    """Every method on every reported set at its selected point; method -> reported set -> hyperparameters."""
    grids = method_grids(plan.cfg)
    check_needs(plan, grids)
    plan.store.check_reachable()
    chosen = select_hyperparameters(plan, grids)
    jobs = [(m, per_set[fs.name], fs.name) for m, per_set in chosen.items() for fs in plan.cfg.forget_sets]
    run_unlearn_jobs(plan, jobs, "unlearn")
    return {m: {fs: hp.model_dump(mode="json") for fs, hp in per_set.items()} for m, per_set in chosen.items()}
