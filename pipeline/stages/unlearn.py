"""The unlearn stage: every configured method x forget set x hyperparameter point, applied to the
first N_u full models, as Ray tasks per block of models, resumable like `train`.

Grids (a list for a hyperparameter) are selected on the tuning forget set against that set's eval
oracles by decision 27: the lowest mean of the forget, retain and val P95 KLoM, ties broken by compute;
reported runs use the chosen point. Scores come from `pipeline.evaluate.oracles`, not the report.
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
from pipeline.stages.fit import forget_rows
from pipeline.plan import (  # noqa: F401 - re-exported: callers name them from here
    SELECTION_VERSION, FamilySpec, Plan, StageError, check_prepared, contiguous_runs, family_store, method_grids,
    n_unlearned, pending_blocks, selection_rel, unlearn_family, unlearn_ref,
)
from pipeline.stages.train import load_device_data, load_full_models
from pipeline.store import StageRef, Store, ensure_stage
from pipeline.training.recipe import evaluate_members, outputs_from_logits, retrain_example_passes
from pipeline.unlearn import get_method
from pipeline.unlearn.base import ComputeMeter, Context, ForgetRows


def check_needs(plan: Plan, grids: dict) -> None:
    for name in grids:
        needs = get_method(name).NEEDS
        if "datamodels" in needs and not plan.cfg.fit.per_logit:
            raise StageError(f"unlearn.methods.{name} needs per-logit datamodels: set fit.per_logit: true")
        if "target_oracles" in needs and plan.cfg.train.oracle.target < 1:
            raise StageError(f"unlearn.methods.{name} needs target oracles: set train.oracle.target >= 1")
    if plan.cfg.train.full.models < n_unlearned(plan.cfg):
        raise StageError(f"unlearn.models {n_unlearned(plan.cfg)} exceeds train.full.models {plan.cfg.train.full.models}")


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
        forget_rows(plan, plan.forget_sets[fs])  # once here, not in every task
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
        sums, diagonal = forget_rows(plan, forget)
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
def choose(scores: list[dict]) -> int:
    """Decision 27: the lowest mean of the three P95s, ties (to 1e-9) broken by the lower compute, then
    by the earlier grid point."""
    return min(range(len(scores)), key=lambda i: (round(scores[i]["mean_p95"], 9), scores[i]["compute"], i))


def score_grid_point(plan: Plan, method: str, hp, forget_name: str, labels: np.ndarray) -> dict:
    """What the selection record keeps for one grid point: P95 and mean KLoM of forget, retain and val
    against the tuning set's eval oracles, top-1 accuracies, MIA and compute (example-passes per model)."""
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
    """One Ray task: `score_grid_point` of a tuning run (reading its models' outputs is most of it)."""
    from pipeline.evaluate.oracles import all_labels

    plan = Plan(cfg, Store(store_root))
    hp = get_method(method).Config.model_validate(hparams)
    return score_grid_point(plan, method, hp, forget_name, all_labels(plan))


def tuning_references(plan: Plan, forget_name: str, labels: np.ndarray) -> dict:
    """The tuning set's own floor (its reference oracles) and do-nothing (the first N_u full models),
    scored as the grid points are, so the record shows what each point costs the model."""
    from pipeline.evaluate.oracles import GROUPS, logit_accuracy, oracle_margins, score
    from pipeline.plan import FamilySpec, family_store

    n = n_unlearned(plan.cfg)
    full = family_store(plan, FamilySpec(plan.full, "models", plan.cfg.train.full.models, "full"), plan.prepared_meta())
    out = {}
    for name, margins, logits in (
            ("floor", oracle_margins(plan, forget_name, "reference"), oracle_margins(plan, forget_name, "reference", "logits")),
            ("do_nothing", full.read("margins", n), full.read("logits", n))):
        row = score(plan, forget_name, margins, logit_accuracy(logits, labels), labels, bootstrap=0)
        out[name] = {"p95": {g: row["klom"][g]["p95"] for g in GROUPS}, "accuracy": row["accuracy"]}
    return out


def select_hyperparameters(plan: Plan, grids: dict) -> dict[str, object]:
    """method -> chosen point. Grids run on the tuning forget set and are scored against its eval
    oracles only (decisions 3 and 16) by decision 27's rule (`choose`); the choice and every grid
    point's scores are recorded in the store and reused while the record exists."""
    from pipeline.evaluate.oracles import SELECTION_RULE, all_labels

    chosen = {m: g[0] for m, g in grids.items() if len(g) == 1}
    to_tune = {m: g for m, g in grids.items() if len(g) > 1}
    if not to_tune:
        return chosen
    tuning = plan.cfg.tuning_forget_set
    if tuning is None:
        raise StageError("a hyperparameter grid needs a tuning_forget_set in the config")
    missing = {m: g for m, g in to_tune.items() if plan.store.read_json(selection_rel(plan, m, g)) is None}
    if missing:
        run_unlearn_jobs(plan, [(m, hp, tuning.name) for m, g in missing.items() for hp in g], "tune")
        references = tuning_references(plan, tuning.name, all_labels(plan))
        points = [(m, hp) for m, g in missing.items() for hp in g]
        init_ray(plan.cfg.execution)
        remote = ray.remote(score_grid_point_task).options(**task_options(plan.cfg.execution, gpu=False))
        refs = [(remote.remote(plan.store.root, plan.cfg, m, hp.model_dump(mode="json"), tuning.name), 1) for m, hp in points]
        scored = run_tasks("score", refs, len(refs), unit="grid points")
    for method, grid in to_tune.items():
        rel = selection_rel(plan, method, grid)
        record = plan.store.read_json(rel)
        if record is None:
            scores = [s for (m, _), s in zip(points, scored) if m == method]
            record = {"method": method, "tuning_forget_set": tuning.name, "rule": SELECTION_RULE,
                      "version": SELECTION_VERSION, "scores": scores, "chosen": choose(scores), **references}
            plan.store.write_json(rel, record)
        chosen[method] = grid[record["chosen"]]
    return chosen


def selection_records(plan: Plan, grids: dict) -> dict[str, dict]:
    """method -> its selection record (methods with a grid of one point have none)."""
    out = {}
    for method, grid in grids.items():
        if len(grid) > 1 and plan.cfg.tuning_forget_set is not None:
            record = plan.store.read_json(selection_rel(plan, method, grid))
            if record is not None:
                out[method] = record
    return out


def run_unlearn(plan: Plan) -> dict:
    grids = method_grids(plan.cfg)
    check_needs(plan, grids)
    plan.store.check_reachable()
    chosen = select_hyperparameters(plan, grids)
    jobs = [(m, hp, fs.name) for m, hp in chosen.items() for fs in plan.cfg.forget_sets]
    run_unlearn_jobs(plan, jobs, "unlearn")
    return {m: hp.model_dump(mode="json") for m, hp in chosen.items()}
