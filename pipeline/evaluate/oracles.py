"""Scoring a group of models against a forget set's eval oracles, from the store (decisions 2, 3, 16, 17).

One place for what hyperparameter selection (`pipeline.stages.unlearn`) and the report (`pipeline.stages.report`)
both compute: per-point KLoM of N models' margins against the eval oracles, its P95 and mean over the
forget, retain and validation points (with a bootstrap interval over models where asked), accuracies,
and the loss-threshold membership-inference score. Neither caller imports the other.
"""

from __future__ import annotations

import numpy as np

from pipeline.evaluate.klom import bootstrap_p95_intervals, klom
from pipeline.evaluate.metrics import loss_from_margin, mia_balanced_accuracy
from pipeline.plan import FamilySpec, Plan, StageError, family_store

GROUPS = ("forget", "retain", "val")

# Decision 30's bar and rule. The bar: retain and val accuracy within ACC_SLACK of do-nothing's, retain and
# val P95 at most max(FLOOR_X x the floor's, NOTHING_X x do-nothing's), all on the set scored.
ACC_SLACK, FLOOR_X, NOTHING_X = 0.01, 1.5, 1.2
BAR_GROUPS = ("retain", "val")
_BAR_EPS = 1e-9  # a value on a limit passes: 1.5 x 0.6 is 0.8999999999999999 in floats

# The rule in words: the report prints it and every selection record stores it.
SELECTION_RULE = (f"per method and tuning set, among the grid points that keep the bar on the tuning set (retain and val "
                  f"accuracy within {ACC_SLACK:g} of do-nothing's, retain and val P95 at most max({FLOOR_X:g}x the floor, "
                  f"{NOTHING_X:g}x do-nothing's)), the lowest mean of the forget, retain and val P95 KLoM against the "
                  "tuning set's eval oracles; only when no point keeps it, the lowest mean, and the choice is marked "
                  "(passed_bar false); ties broken by compute (decision 30)")


def bar_checks(point: dict, floor: dict, nothing: dict) -> dict:
    """Decision 30's bar for one scored setting against the floor and do-nothing on the same set; each
    is {"p95": {group: x}, "accuracy": {group: x}}. Returns passed, its two halves (keeps_utility: the
    accuracies; keeps_klom: the retain and val P95s) and every check's value, limit and verdict."""
    checks = {}
    for g in BAR_GROUPS:
        limit = nothing["accuracy"][g] - ACC_SLACK
        value = point["accuracy"][g]
        checks[f"{g}_accuracy"] = {"value": value, "limit": limit, "ok": value is not None and value >= limit - _BAR_EPS}
        limit = max(FLOOR_X * floor["p95"][g], NOTHING_X * nothing["p95"][g])
        checks[f"{g}_p95"] = {"value": point["p95"][g], "limit": limit, "ok": point["p95"][g] <= limit + _BAR_EPS}
    utility = all(checks[f"{g}_accuracy"]["ok"] for g in BAR_GROUPS)
    klom_ok = all(checks[f"{g}_p95"]["ok"] for g in BAR_GROUPS)
    return {"passed": utility and klom_ok, "keeps_utility": utility, "keeps_klom": klom_ok, "checks": checks}


# Finished oracle arrays, by (store, stage, role, count, array): a stage's identity fixes its content, and
# the report and selection read each forget set's oracles once per row otherwise (about 100 reads).
_FINISHED: dict[tuple, np.ndarray] = {}
_FINISHED_MAX = 16


def oracle_margins(plan: Plan, forget_name: str, role: str, array: str = "margins") -> np.ndarray:
    """The `role` oracles' margins (or logits) of a forget set: (n_role, P[, classes]), read-only."""
    n = getattr(plan.cfg.train.oracle, role)
    key = (plan.store.root, plan.oracle(forget_name).rel, role, n, array)
    if key in _FINISHED:
        return _FINISHED[key]
    values = trained_oracles(plan, forget_name, role).read(array, n)
    values.flags.writeable = False
    while len(_FINISHED) >= _FINISHED_MAX:
        _FINISHED.pop(next(iter(_FINISHED)))
    _FINISHED[key] = values
    return values


def trained_oracles(plan: Plan, forget_name: str, role: str):
    """The `role` oracle family of a forget set (its markers only read); StageError if not all trained."""
    n = getattr(plan.cfg.train.oracle, role)
    family = family_store(plan, FamilySpec(plan.oracle(forget_name), role, n, "oracle"), plan.prepared_meta())
    if n == 0 or not family.done_mask(n).all():
        raise StageError(f"the {role} oracles of forget set {forget_name!r} are not trained: run `oracle-farm train`")
    return family


def all_labels(plan: Plan) -> np.ndarray:
    """Labels of train ++ val, in the order of the margins' point axis."""
    val = plan.store.open_group(f"{plan.prepare.rel}/arrays.zarr", mode="r")["labels/val"][:]
    return np.concatenate([plan.train_labels, val])


def group_points(plan: Plan, forget_name: str) -> dict[str, np.ndarray]:
    meta = plan.prepared_meta()
    n, p = meta["n_train"], meta["n_train"] + meta["n_val"]
    forget = plan.forget_sets[forget_name]
    return {"forget": forget, "retain": np.setdiff1d(np.arange(n), forget), "val": np.arange(n, p)}


def klom_kwargs(plan: Plan) -> dict:
    e = plan.cfg.evaluate
    return {"bins": e.bins, "clip": e.clip, "floor": e.floor, "compat": e.compat}


def logit_accuracy(logits: np.ndarray, labels: np.ndarray):
    """pts -> top-1 accuracy over models and those points."""
    correct = np.asarray(logits, dtype=np.float32).argmax(-1) == labels
    return lambda pts: float(correct[:, pts].mean())


def score(plan: Plan, forget_name: str, margins: np.ndarray, accuracy_of, labels: np.ndarray,
          bootstrap: int | None = None, threads: int | None = None) -> dict:
    """KLoM statistics, accuracies and MIA of margins (N, P) against the forget set's eval oracles.

    accuracy_of: pts -> accuracy, or None when unknown (imported margins). bootstrap: replicates of the
    P95 interval over models (None: the config's `evaluate.bootstrap`; 0: no interval); threads: the
    bootstrap's (None: every core)."""
    eval_m = oracle_margins(plan, forget_name, "eval")
    groups = group_points(plan, forget_name)
    kw = klom_kwargs(plan)
    n_boot = plan.cfg.evaluate.bootstrap if bootstrap is None else bootstrap
    per_point = klom(margins, eval_m, **kw)
    row = {"klom": {}, "accuracy": {}, "oracle_accuracy": {}}
    oracle_accuracy = logit_accuracy(oracle_margins(plan, forget_name, "eval", "logits"), labels)
    intervals = (bootstrap_p95_intervals(margins, eval_m, list(groups.values()), n_boot=n_boot, seed=0,
                                         threads=threads, **kw)
                 if n_boot else [(None, None)] * len(groups))
    for (g, pts), interval in zip(groups.items(), intervals):
        values = per_point[pts]
        row["klom"][g] = {"p95": float(np.percentile(values, 95)), "mean": float(values.mean()),
                          "p95_low": interval[0], "p95_high": interval[1]}
        row["accuracy"][g] = accuracy_of(pts) if accuracy_of is not None else None
        row["oracle_accuracy"][g] = oracle_accuracy(pts)
    forget = groups["forget"]
    row["mia"] = mia_balanced_accuracy(loss_from_margin(margins[:, forget]), loss_from_margin(eval_m[:, forget]))
    row["per_point"], row["_groups"] = per_point, groups
    return row


def selection_score(row: dict) -> float:
    """The mean of the forget, retain and val P95 that decision 30's rule minimizes."""
    return float(np.mean([row["klom"][g]["p95"] for g in GROUPS]))
