"""Evaluation and the report, regenerated from the store alone.

Per method and reported forget set: KLoM (decision 2) against the eval oracles only (decision 3),
P95 and mean over forget / retain / validation points with a bootstrap interval over models; the
`retrain` row (the reference oracles, as many as the unlearned models: the oracle floor, decision 17);
accuracies against the oracles'; a loss-threshold membership-inference score; compute as a fraction
of one retraining (per request, and the amortized one-off costs in their own column, decision 22); the
saturation diagnostics (decision 33); per row a headline (`HEADLINES`, judged in `judge`) that an expert
reads at a glance, with every column defined once in the report (`legend`). The figures are drawn by
`pipeline.stages.report_plots`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import ray

from pipeline.evaluate.diagnostics import SATURATION_BAND, ceiling, diagnose, is_saturated, saturation_threshold
from pipeline.execution import init_ray, task_options
from pipeline.store import Store, runrecord
from pipeline.evaluate.oracles import (
    ACC_SLACK, FLOOR_X, GROUPS, NOTHING_X, SELECTION_RULE, all_labels, bar_checks, group_points, logit_accuracy,
    oracle_margins, score, selection_score, trained_oracles,
)
from pipeline.evaluate.rowcache import score_rows
from pipeline.plan import FamilySpec, Plan, StageError, family_store
from pipeline.unlearn import get_method
from pipeline.stages.report_plots import draw, style
from pipeline.stages.unlearn import (
    UPPER_BOUND_LABEL, method_grids, n_unlearned, select_hyperparameters, selection_records, selection_summary,
    unlearn_family, unlearn_ref,
)

# Kept for callers of the old private names (tests, exchange).
_oracle_margins = oracle_margins
_logit_accuracy = logit_accuracy
__all__ = ["GROUPS", "HEADLINES", "annotate", "collect_rows", "group_points", "score", "selection_score", "style",
           "write_report"]


def collect_rows(plan: Plan, label: str = "report", methods: list[str] | None = None,
                 forget_sets: list[str] | None = None) -> list[dict]:
    """Every row of the report, in order: per forget set the floor (`retrain`), each method's chosen
    setting, then imported rows, then (config `unlearn.upper_bound`) the upper-bound rows, marked
    `optimistic` (decision 32: shown apart, never a headline). Rows are scored in Ray tasks, one per row
    (reading 100 models' margins and logits and bootstrapping their P95s is the report's work; on a
    cluster it spreads out), and kept: a row whose inputs did not change is read back
    (`pipeline.evaluate.rowcache`). `methods` / `forget_sets`: only these (do-nothing and the floor stay:
    the other rows are read against them); `label`: the progress line's."""
    from pipeline.maintenance.exchange import imported_rows

    plan.store.check_reachable(create=False)
    meta = plan.prepared_meta()
    labels = all_labels(plan)
    n_u = n_unlearned(plan.cfg)
    if plan.cfg.train.oracle.reference != n_u:
        raise StageError(f"train.oracle.reference ({plan.cfg.train.oracle.reference}) must equal the number of "
                         f"unlearned models ({n_u}) so every row compares the same number of models (decision 17)")
    chosen = select_hyperparameters(plan, method_grids(plan.cfg))
    chosen = {m: v for m, v in chosen.items() if methods is None or m in methods or m == "do_nothing"}
    sets = [fs for fs in plan.cfg.forget_sets if forget_sets is None or fs.name in forget_sets]
    tuning = tuning_info(plan)
    jobs = []
    for fs in sets:
        trained_oracles(plan, fs.name, "reference")  # not trained: named here, before any task
        jobs.append(("retrain", {}, fs.name, False))
        for method, per_set in chosen.items():
            jobs.append((method, per_set[fs.name].model_dump(mode="json"), fs.name, False))
            bound = (tuning.get((method, fs.name)) or {}).get("upper_bound")
            if bound is not None:
                jobs.append((method, bound["hparams"], fs.name, True))
    for method, hp, fs, _ in jobs:
        hp = get_method(method).Config.model_validate(hp) if method != "retrain" else None
        if hp is not None and not unlearn_family(plan, unlearn_ref(plan, method, hp, fs), meta).done_mask(n_u).all():
            raise StageError(f"unlearn[{method},{fs}] is not complete: run `oracle-farm unlearn`")
    scored = score_rows(plan, [(m, hp, fs) for m, hp, fs, _ in jobs], score_row_task,
                        (_retrain_seconds(plan, meta),), label)
    for row, (_, _, _, optimistic) in zip(scored, jobs):
        row["optimistic"] = optimistic
        if row["method"] != "retrain":
            row["tuning"] = tuning.get((row["method"], row["forget_set"]))
    rows = []
    for fs in sets:
        rows += [row for row, (_, _, name, optimistic) in zip(scored, jobs) if name == fs.name and not optimistic]
        rows += imported_rows(plan, fs.name, n_u, labels)  # `M (imported)`: margins from import-margins
        rows += [row for row, (_, _, name, optimistic) in zip(scored, jobs) if name == fs.name and optimistic]
    annotate(rows, plan.cfg.evaluate.floor)
    return rows


def score_row_task(store_root: str, cfg, method: str, hparams: dict, forget_name: str,
                   retrain_cost: float | None) -> dict:
    """One Ray task: a report row, the floor's (method `retrain`: the reference oracles) or a method's
    chosen setting's (its 100 unlearned models), scored against the forget set's eval oracles."""
    plan = Plan(cfg, Store(store_root))
    labels = all_labels(plan)
    threads = cfg.execution.threads
    if method == "retrain":
        ref_m = _oracle_margins(plan, forget_name, "reference")
        ref_acc = _logit_accuracy(_oracle_margins(plan, forget_name, "reference", "logits").astype(np.float32), labels)
        row = score(plan, forget_name, ref_m, ref_acc, labels, threads=threads)
        return {"method": "retrain", "forget_set": forget_name, **row,
                "diagnostics": _diagnostics(plan, forget_name, ref_m, row),
                "compute": 1.0, "seconds_fraction": 1.0, "amortized": 0.0, "hparams": {}}
    n_u = n_unlearned(cfg)
    hp = get_method(method).Config.model_validate(hparams)
    family = unlearn_family(plan, unlearn_ref(plan, method, hp, forget_name), plan.prepared_meta())
    margins = family.read("margins", n_u)
    acc = _logit_accuracy(family.read("logits", n_u).astype(np.float32), labels)
    infos = family.model_infos(n_u)
    passes = float(np.mean([i["equivalent_passes"] for i in infos]))
    seconds = float(np.mean([i["seconds"] / max(1, i["block"][1] - i["block"][0]) for i in infos]))
    row = score(plan, forget_name, margins, acc, labels, threads=threads)
    return {"method": method, "forget_set": forget_name, **row,
            "diagnostics": _diagnostics(plan, forget_name, margins, row),
            "compute": passes / infos[0]["retrain_example_passes"],
            "seconds_fraction": seconds / retrain_cost if retrain_cost else None,
            "amortized": _amortized(plan, method), "hparams": hp.model_dump(mode="json"),
            "notes": infos[0].get("notes", {})}


def _diagnostics(plan: Plan, forget_name: str, margins: np.ndarray, row: dict) -> dict:
    """Decision 33's saturation and shift of a scored row, against the same eval oracles."""
    return diagnose(margins, oracle_margins(plan, forget_name, "eval"), row["per_point"], row["_groups"],
                    {g: row["klom"][g]["p95"] for g in GROUPS}, plan.cfg.evaluate.floor)


# ---------------------------------------------------------------------------------------- judging a row
# The bar a setting must keep not to count as breaking the model (decision 30, `bar_checks`), in two
# halves the report marks apart: "keeps utility" (retain and val accuracy within ACC_SLACK of
# do-nothing's) and "keeps retain/val" (retain and val P95 at most max(FLOOR_X x the floor, NOTHING_X x
# do-nothing's)).
REFERENCE_ROWS = ("retrain", "do_nothing")

# The headline of a method's row, tested in this order (issue 29, item 7): defined here once, printed in
# the report's legend. "Overlap" is of bootstrap 95% intervals over models.
HEADLINES = {
    "breaks the model": "fails the bar: does not keep utility or does not keep retain/val",
    "indistinguishable from retraining": "keeps the bar, and on forget, retain and val points its P95's interval "
                                         "overlaps the floor's",
    "better than doing nothing": "keeps the bar and forgets: its forget P95, not saturated, has an interval "
                                 "wholly below do-nothing's",
    "no better than doing nothing": "keeps the bar, but its forget P95's interval reaches do-nothing's (or is "
                                    "saturated)",
    "not judged": "accuracies or bootstrap intervals unknown (an imported row, or `evaluate.bootstrap: 0`)",
}
BEST_FIRST = ("indistinguishable from retraining", "better than doing nothing", "no better than doing nothing",
              "breaks the model", "not judged")
SHORT = {"breaks the model": "BREAKS", "indistinguishable from retraining": "≈ retrain",
         "better than doing nothing": "better", "no better than doing nothing": "no better", "not judged": "?"}


def _overlap(a: dict, b: dict) -> bool | None:
    if a["p95_low"] is None or b["p95_low"] is None:
        return None
    return a["p95_low"] <= b["p95_high"] and b["p95_low"] <= a["p95_high"]


def annotate(rows: list[dict], ceiling_floor: float = 1e-5) -> None:
    """Per row, in place: `vs_floor` (per group, P95 and its interval as multiples of the retrain row's
    P95; whether the interval overlaps the floor's or do-nothing's), `bar` (decision 30's, in its two
    halves; None where unknown), `forgets`, `saturated`, `headline` and `rank` (see `judge`)."""
    for fs in dict.fromkeys(r["forget_set"] for r in rows):
        sub = [r for r in rows if r["forget_set"] == fs]
        floor = next((r for r in sub if r["method"] == "retrain"), None)
        nothing = next((r for r in sub if r["method"] == "do_nothing" and not r.get("optimistic")), None)
        for r in sub:
            r["vs_floor"] = {}
            for g in GROUPS:
                k, f = r["klom"][g], floor["klom"][g] if floor else None
                scale = f["p95"] if f and f["p95"] > 0 else None
                r["vs_floor"][g] = {
                    "x": k["p95"] / scale if scale else None,
                    "x_low": k["p95_low"] / scale if scale and k["p95_low"] is not None else None,
                    "x_high": k["p95_high"] / scale if scale and k["p95_high"] is not None else None,
                    "overlaps_floor": _overlap(k, f) if f else None,
                    "overlaps_nothing": _overlap(k, nothing["klom"][g]) if nothing else None}
        judge(sub, floor, nothing, ceiling_floor)


def judge(sub: list[dict], floor: dict | None, nothing: dict | None, ceiling_floor: float = 1e-5) -> None:
    """One forget set's rows (vs_floor set), in place: `bar`, `forgets`, `saturated`, `headline`, `rank`.
    A row is saturated when any group's P95 is (decision 33); saturated rows get no rank, the others are
    ranked by decision 30's criterion (the mean of the three P95s), retrain and upper-bound rows excluded."""
    for r in sub:
        r["bar"] = keeps_utility(r, floor, nothing)
        r["saturated"] = any(is_saturated(r["klom"][g]["p95"], ceiling_floor) for g in GROUPS)
        r["forgets"] = forgets(r, nothing, is_saturated(r["klom"]["forget"]["p95"], ceiling_floor))
        r["headline"] = headline(r)
    ranked = sorted((r for r in sub if r["method"] != "retrain" and not r["saturated"] and not r.get("optimistic")),
                    key=selection_score)
    for r in sub:
        r["rank"] = ranked.index(r) + 1 if r in ranked else None


def keeps_utility(r: dict, floor: dict | None, nothing: dict | None) -> dict | None:
    """Decision 30's bar on a reported set (`bar_checks`): {"ok", "accuracy_ok", "klom_ok", "failures" (in
    multiples of the floor)}; None for the reference rows and where accuracies, the floor or do-nothing are
    unknown."""
    if (r["method"] in REFERENCE_ROWS or floor is None or nothing is None or r["accuracy"]["retain"] is None):
        return None

    def scored(row: dict) -> dict:
        return {"p95": {g: row["klom"][g]["p95"] for g in GROUPS}, "accuracy": row["accuracy"]}

    bar = bar_checks(scored(r), scored(floor), scored(nothing))
    failures = []
    for name, check in bar["checks"].items():
        group, what = name.split("_", 1)
        if check["ok"]:
            continue
        if what == "accuracy":
            failures.append(f"{group} accuracy {check['value']:.3f} < do-nothing's {nothing['accuracy'][group]:.3f} "
                            f"- {ACC_SLACK:g}")
        else:
            scale = floor["klom"][group]["p95"]
            failures.append(f"{group} P95 {check['value'] / scale:.2f}x the floor > {check['limit'] / scale:.2f}x "
                            f"(max({FLOOR_X:g}x the floor, {NOTHING_X:g}x do-nothing's))")
    return {"ok": bar["passed"], "accuracy_ok": bar["keeps_utility"], "klom_ok": bar["keeps_klom"],
            "failures": failures}


def forgets(r: dict, nothing: dict | None, saturated: bool = False) -> bool | None:
    """Whether the forget P95's interval lies wholly below do-nothing's (None: a reference row, or no
    intervals). A saturated forget P95 never forgets: below the ceiling's band KLoM cannot tell it from
    do-nothing's (decision 33)."""
    if r["method"] in REFERENCE_ROWS or nothing is None:
        return None
    if saturated:
        return False
    mine, theirs = r["klom"]["forget"], nothing["klom"]["forget"]
    if mine["p95_high"] is None or theirs["p95_low"] is None:
        return None
    return mine["p95_high"] < theirs["p95_low"]


def headline(r: dict) -> str:
    """The row's category of HEADLINES (`floor` and `do-nothing` for the two reference rows)."""
    if r["method"] == "retrain":
        return "floor"
    if r["method"] == "do_nothing":
        return "do-nothing"
    if r["bar"] is None:
        return "not judged"
    if not r["bar"]["ok"]:
        return "breaks the model"
    if all(r["vs_floor"][g]["overlaps_floor"] for g in GROUPS):
        return "indistinguishable from retraining"
    if r["forgets"] is None:
        return "not judged"
    return "better than doing nothing" if r["forgets"] else "no better than doing nothing"


def good_corner(sub: list[dict]) -> dict | None:
    """Where a method lands when it forgets and keeps retain points, as multiples of the floor: forget
    P95 below do-nothing's interval, retain P95 within the bar's limit."""
    floor = next((r for r in sub if r["method"] == "retrain"), None)
    nothing = next((r for r in sub if r["method"] == "do_nothing"), None)
    if floor is None or nothing is None or not floor["klom"]["retain"]["p95"]:
        return None
    forget = nothing["vs_floor"]["forget"]
    return {"retain": max(FLOOR_X, NOTHING_X * nothing["vs_floor"]["retain"]["x"]),
            "forget": forget["x_low"] if forget["x_low"] is not None else forget["x"]}


def tuning_info(plan: Plan) -> dict[tuple[str, str], dict]:
    """(method, reported set) -> `selection_summary`'s entry: the tuning set behind the row, its kind,
    whether the chosen point kept the bar there, and the upper bound (None unless configured)."""
    return {(m, fs): info for m, per_set in selection_summary(plan).items() for fs, info in per_set.items()}


def _retrain_seconds(plan: Plan, meta: dict) -> float | None:
    """Wall-clock seconds of one retraining: mean per model over the full family's blocks."""
    n = plan.cfg.train.full.models
    fam = family_store(plan, FamilySpec(plan.full, "models", n, "full"), meta)
    infos = [m["info"] for m in fam.markers()]
    if not infos:
        return None
    return float(np.mean([i["seconds"] / max(1, i["block"][1] - i["block"][0]) for i in infos]))


def _amortized(plan: Plan, method: str) -> float:
    """One-off costs in retrainings: OM's target oracles; the subset models behind datamodels."""
    needs = get_method(method).NEEDS
    t = plan.cfg.train
    cost = 0.0
    if "target_oracles" in needs:
        cost += t.oracle.target
    if "datamodels" in needs:
        cost += (t.subset.models + t.subset.heldout) * t.subset.alpha
    return cost


# ---------------------------------------------------------------------------------------- writing
def report_key(plan: Plan, chosen: dict) -> str:
    """Identity of a report: what it scores. Every input stage is content-addressed and complete when
    this is asked, so an equal key means an equal report (imported families and the upper bound's
    unlearn stages are listed too; a report without a bound keeps the key it had before bounds existed)."""
    from pipeline.config import stage_id

    refs = {"full": plan.full.id, "fit": plan.fit.id, "external": plan.store.list("external"),
            "oracle": {fs.name: plan.oracle(fs.name).id for fs in plan.cfg.forget_sets},
            "unlearn": sorted(unlearn_ref(plan, m, per_set[fs.name], fs.name).id for m, per_set in chosen.items()
                              for fs in plan.cfg.forget_sets)}
    bounds = sorted(info["upper_bound"]["unlearn_id"] for info in tuning_info(plan).values() if info["upper_bound"])
    if bounds:
        refs["upper_bound"] = bounds
    section = {"evaluate": plan.cfg.evaluate.model_dump(mode="json"), "models": n_unlearned(plan.cfg),
               "oracles": plan.cfg.train.oracle.model_dump(mode="json")}
    return stage_id("report", section, refs)


def report_path(plan: Plan, out_dir: Path | None = None) -> Path:
    return runrecord.report_path(plan.cfg, plan.store, out_dir)


def is_current(plan: Plan, out_dir: Path | None, key: str) -> bool:
    try:
        return json.loads((report_path(plan, out_dir) / "report.json").read_text()).get("key") == key
    except (OSError, ValueError):
        return False


def write_report(plan: Plan, out_dir: Path | None = None, key: str | None = None) -> Path:
    rows = collect_rows(plan)
    out = report_path(plan, out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fit = plan.store.read_json(f"{plan.fit.rel}/COMPLETE.json")
    plots = _plots(plan, rows, out)
    summary = [{k: v for k, v in r.items() if k not in ("per_point", "_groups")} for r in rows]
    errors = dm_direct_errors_or_none(plan)
    (out / "report.json").write_text(json.dumps(
        {"config": plan.cfg.name, "key": key, "stamp": run_stamp(plan), "headlines": SHORT, "rows": summary, "fit": fit,
         "dm_direct_errors": errors, "plots": plots}, indent=1, default=float))
    (out / "report.md").write_text(_markdown(plan, summary, fit, plots, errors))
    if not plan.store.is_local:  # an object store: a copy beside the stages, readable from anywhere
        for name in ["report.json", "report.md", *plots]:
            plan.store.put_file(out / name, f"{runrecord.report_dir(plan.cfg)}/{name}")
    return out


def run_stamp(plan: Plan) -> dict:
    """When, from which commit and on what the report was made (the README's table quotes it)."""
    import datetime
    import os
    import platform
    import subprocess

    repo = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short=12", "HEAD")
    if commit and git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    cpu = ""
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    except OSError:
        pass
    ex = plan.cfg.execution
    machine = ", ".join(filter(None, [platform.machine(), cpu, f"{os.cpu_count()} CPUs on the machine",
                                      f"{ex.num_cpus} used", ex.device if ex.device != "cpu" else ""]))
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": commit or "unknown", "machine": machine}


def dm_direct_errors_or_none(plan: Plan) -> dict | None:
    """dm-direct's error against the target oracles per forget set (decision 34), where the fit stage
    offers it and the config runs dm-direct."""
    from pipeline.stages.fit import dm_direct_errors

    if "dm_direct" not in method_grids(plan.cfg):
        return None
    reported = {fs.name for fs in plan.cfg.forget_sets}
    return {name: e for name, e in dm_direct_errors(plan).items() if name in reported}


def _fmt(x, digits=3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def p95_cell(r: dict, g: str) -> str:
    """A row's P95 on group g as the report prints it: the floor's own P95 on the retrain row, else
    `_ratio`; ` sat` where the P95 is saturated."""
    text = f"{r['klom'][g]['p95']:.3f} (1x)" if r["method"] == "retrain" else _ratio(r, g)
    return text + (" sat" if r.get("diagnostics") and r["diagnostics"][g]["saturated"] else "")


def _ratio(v: dict, g: str) -> str:
    """'2.31x [2.10, 2.52]' with marks: = where the interval overlaps the floor's, ~ where it overlaps
    do-nothing's."""
    x = v["vs_floor"][g]
    if x["x"] is None:
        return "–"
    text = f"{x['x']:.2f}x"
    if x["x_low"] is not None:
        text += f" [{x['x_low']:.2f}, {x['x_high']:.2f}]"
    if v["method"] not in REFERENCE_ROWS:
        if x["overlaps_floor"]:
            text += " ="
        if x["overlaps_nothing"]:
            text += " ~"
    return text


def _bar_cells(r: dict) -> list[str]:
    bar = r.get("bar")
    return ["", ""] if bar is None else [_yes_no(bar["accuracy_ok"]), _yes_no(bar["klom_ok"])]


def _yes_no(value: bool | None) -> str:
    return "" if value is None else ("yes" if value else "**no**")


def _tuning_cell(r: dict) -> str:
    info = r.get("tuning")
    if info is None:
        return ""
    if info.get("tuning_set") is None:
        return "– (one setting)"
    kind = f" ({info['kind']})" if info.get("kind") else ""
    if info.get("kind") and info.get("reported_kind") and info["kind"] != info["reported_kind"]:
        kind = f" ({info['kind']}: no {info['reported_kind']} tuning set)"  # the config's tuning_fallback
    return f"`{info['tuning_set']}`{kind}" + (" †" if info.get("passed_bar") is False else "")


def _headline_text(r: dict) -> str:
    return r["headline"] + (" (saturated)" if r.get("saturated") else "")


def _shift_cells(r: dict) -> list[str]:
    d = r.get("diagnostics")
    if not d:
        return ["–"] * 2
    shifts = " / ".join("–" if d[g]["shift"] is None else f"{d[g]['shift']:+.2f}" for g in GROUPS)
    ceil = " / ".join("–" if d[g]["at_ceiling"] is None else f"{100 * d[g]['at_ceiling']:.0f}%" for g in GROUPS)
    return [shifts, ceil]


def legend(plan: Plan) -> list[str]:
    """The definitions section: every column and mark of the report, once."""
    cfg = plan.cfg
    n_u, e = n_unlearned(cfg), cfg.evaluate
    top = ceiling(e.floor)
    lines = ["## What the columns mean", "",
             f"- **KLoM** (decision 2): per point, KL(unlearned ‖ oracle) between 20-bin histograms of the margins "
             f"of {n_u} unlearned models and of {cfg.train.oracle.eval} eval oracles (retrained without the forget set; "
             f"{e.bins} bins on shared edges, margins clipped to ±{e.clip:g}, the oracle side floored at {e.floor:g}, "
             f"{'compat binning' if e.compat else 'every sample counted'}). It cannot exceed ln(1/{e.floor:g}) = "
             f"{top:.2f}, **the ceiling**.",
             f"- **forget / retain / val P95** (`×floor`): the 95th percentile of KLoM over the forget set's points, "
             f"the other training points, or the validation points, as a **multiple of the floor**: the `retrain` "
             f"row's P95 on the same points (`retrain` = {cfg.train.oracle.reference} reference oracles, disjoint from "
             "the eval oracles, scored the same way: what retraining itself scores at these sample sizes; its row "
             "shows its own P95). `[a, b]`: the bootstrap 95% interval over models "
             f"({e.bootstrap} replicates), divided by the same floor. Marks: `=` the interval overlaps the floor's; "
             "`~` it overlaps do-nothing's; `sat` saturated.",
             f"- **saturated** (`sat`, decision 33): a P95 within {100 * SATURATION_BAND:.0f}% of the ceiling "
             f"(≥ {saturation_threshold(e.floor):.2f}). There KLoM no longer tells a little off from far off, so "
             "saturated rows are not ranked against each other; read their `shift` instead.",
             "- **headline**, tested in this order: " + "; ".join(f"*{k}*: {v}" for k, v in HEADLINES.items()) + ".",
             f"- **keeps utility**: retain and val accuracy within {ACC_SLACK:g} of do-nothing's. **keeps retain/val**: "
             f"retain and val P95 at most max({FLOOR_X:g}x the floor, {NOTHING_X:g}x do-nothing's). Together they are "
             "**the bar** (decision 30); a row that fails either breaks the model, and the bullets under its table say "
             "by how much.",
             "- **forgets**: the forget P95's interval lies wholly below do-nothing's, and the forget P95 is not "
             "saturated.",
             "- **rank**: by decision 30's criterion on this set (the mean of the forget, retain and val P95), among "
             "the rows that are not saturated; `sat.`: saturated, not ranked.",
             "- **tuning set**: the forget set the row's setting was selected on, against that set's own eval oracles "
             "(never a reported set's), with its kind (another kind than the row's where the config has no tuning set "
             "of the row's kind, `tuning_fallback`); `†`: the chosen point did not keep the bar there (no grid point "
             "did, or the rule picked a failing one); `– (one setting)`: no grid.",
             "- **shift f / r / v** (decision 33): per group, the median over its points of the standardized margin "
             "shift, (mean unlearned margin − mean eval-oracle margin) / the oracles' SD. Negative: the unlearned "
             "models are less sure of the label than retraining; positive: surer (the forget set remembered).",
             f"- **at ceiling f / r / v**: the share of each group's points whose KLoM is within "
             f"{100 * SATURATION_BAND:.0f}% of the ceiling.",
             "- **forget acc (oracle)**: top-1 accuracy on the forget points, over the unlearned models (the eval "
             "oracles' in brackets: what retraining gives). **retain acc**, **val acc**: the same on those points.",
             "- **MIA**: balanced accuracy of the best single loss threshold separating the unlearned models' forget-set "
             "losses from the eval oracles' (0.5: cannot tell them apart; 1: always can; the threshold is chosen on "
             "the samples it scores, so it leans high on small sets).",
             "- **compute**: example-passes of one request (forward+backward = 1, forward only = 1/3) as a fraction of "
             "one retraining's (decision 22). **time frac**: wall-clock seconds per unlearned model over one "
             "retraining's (the full models' mean), on this machine.",
             f"- **amortized**: one-off retrainings a method relies on, not in `compute`: OM's "
             f"{cfg.train.oracle.target} target oracles; for datamodel methods (dm-direct, DMM) the "
             f"{cfg.train.subset.models} + {cfg.train.subset.heldout} subset models at alpha {cfg.train.subset.alpha:g} "
             f"({(cfg.train.subset.models + cfg.train.subset.heldout) * cfg.train.subset.alpha:g} retrainings' "
             "worth of passes). The figures draw each method at its per-request cost (filled) and at that plus its "
             "amortized cost (hollow).", ""]
    return lines


def _markdown(plan: Plan, rows: list[dict], fit: dict | None, plots: list[str], errors: dict | None = None) -> str:
    main = [r for r in rows if not r.get("optimistic")]
    sets = list(dict.fromkeys(r["forget_set"] for r in main))
    lines = [f"# oracle-farm report: {plan.cfg.name}", ""]
    lines += _glance(main, sets, plots)
    lines += legend(plan)
    for fs in sets:
        lines += _forget_set_section(fs, [r for r in main if r["forget_set"] == fs], plots)
    lines += upper_bound_section(rows)
    lines += _fit_section(fit, errors)
    lines += _selection_section(plan, rows)
    return "\n".join(lines) + "\n"


def _glance(rows: list[dict], sets: list[str], plots: list[str]) -> list[str]:
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m not in REFERENCE_ROWS]
    by = {(r["method"], r["forget_set"]): r for r in rows}
    lines = ["## At a glance", "",
             "Each method's headline per forget set (defined under *What the columns mean*), with its forget P95 as a "
             "multiple of the floor; do-nothing's forget P95 in the first row.", "",
             "| method | " + " | ".join(f"`{fs}`" for fs in sets) + " |", "|---" * (len(sets) + 1) + "|",
             "| *do-nothing* | " + " | ".join(_forget_x(by.get(("do_nothing", fs))) for fs in sets) + " |"]
    for m in methods:
        cells = []
        for fs in sets:
            r = by.get((m, fs))
            cells.append("" if r is None else f"{SHORT.get(r['headline'], r['headline'])}"
                         f"{' (sat)' if r.get('saturated') else ''}, {_forget_x(r)}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append("")
    if "forget_vs_retain.png" in plots:
        lines += ["![forget vs retain](forget_vs_retain.png)", "",
                  "*Forget against retain P95, as multiples of the floor, per forget set, with bootstrap 95% "
                  "intervals. The green corner: forget P95 below do-nothing's interval and retain P95 within the bar. "
                  "A method that forgets by breaking the model lands to the right; one that does nothing, high.*", ""]
    return lines


def _forget_x(r: dict | None) -> str:
    if r is None or r["vs_floor"]["forget"]["x"] is None:
        return "–"
    return f"{r['vs_floor']['forget']['x']:.2f}x"


def _forget_set_section(fs: str, sub: list[dict], plots: list[str]) -> list[str]:
    floor = next((r for r in sub if r["method"] == "retrain"), None)
    lines = [f"## forget set `{fs}`", ""]
    verdicts: dict[str, list[str]] = {}
    for r in sorted(sub, key=lambda r: (r["rank"] is None, r["rank"] or 0)):
        if r["method"] not in REFERENCE_ROWS:
            verdicts.setdefault(r["headline"], []).append(r["method"] + (" (saturated)" if r["saturated"] else ""))
    lines.append("**Headline.** " + " ".join(
        f"*{h[0].upper() + h[1:]}:* {', '.join(verdicts[h])}." for h in BEST_FIRST if h in verdicts))
    lines.append("")
    if floor:
        fk = floor["klom"]
        lines += ["Floor (retrain) P95: " + ", ".join(
            f"{g} {fk[g]['p95']:.3f}" + (f" [{_fmt(fk[g]['p95_low'], 2)}, {_fmt(fk[g]['p95_high'], 2)}]"
                                         if fk[g]["p95_low"] is not None else "") for g in GROUPS) + ".", ""]
    lines += ["| method | headline | forget P95 ×floor | retain P95 ×floor | val P95 ×floor | keeps utility | "
              "keeps retain/val | forgets | rank | tuning set |", "|" + "---|" * 10]
    for r in sub:
        rank = "" if r["method"] == "retrain" else ("sat." if r["saturated"] else str(r["rank"] or ""))
        lines.append(f"| {r['method']} | {_headline_text(r) if r['method'] not in REFERENCE_ROWS else ''} | "
                     + " | ".join(p95_cell(r, g) for g in GROUPS)
                     + " | " + " | ".join(_bar_cells(r)) + f" | {_yes_no(r.get('forgets'))} | {rank} | {_tuning_cell(r)} |")
    lines += ["", "| method | shift f / r / v | at ceiling f / r / v | forget acc (oracle) | retain acc | val acc | "
                  "MIA | compute | time frac | amortized |", "|" + "---|" * 10]
    for r in sub:
        lines.append(f"| {r['method']} | " + " | ".join(_shift_cells(r)) + " | "
                     f"{_fmt(r['accuracy']['forget'], 2)} ({_fmt(r['oracle_accuracy']['forget'], 2)}) | "
                     f"{_fmt(r['accuracy']['retain'], 3)} | {_fmt(r['accuracy']['val'], 3)} | {_fmt(r['mia'], 2)} | "
                     f"{_fmt(r['compute'], 4)} | {_fmt(r['seconds_fraction'], 3)} | {_fmt(r['amortized'], 0)} |")
    lines.append("")
    if f"pareto_{fs}.png" in plots:
        lines += [f"![compute, {fs}](pareto_{fs}.png)", "",
                  f"*`{fs}`: forget P95 (multiple of the floor, log) against compute per request (fraction of one "
                  "retraining, log), with bootstrap intervals. Filled markers: per request; hollow: per request plus "
                  "the amortized one-off cost. Grey band: the floor's interval; dashed: do-nothing; dotted red: "
                  "KLoM's ceiling. Methods that train nothing per request sit on the left strip.*", ""]
    if f"klom_ecdf_{fs}.png" in plots:
        lines += [f"![KLoM ECDFs, {fs}](klom_ecdf_{fs}.png)", "",
                  f"*`{fs}`: the distribution of per-point KLoM (log axis) on forget, retain and val points, every "
                  "method in each panel; a marker sits at each method's P95 (where its curve crosses 0.95). Black: "
                  "retrain (the floor); dashed: do-nothing; the shaded band at the right is saturation.*", ""]
    broken = [r for r in sub if r.get("bar") and not r["bar"]["ok"]]
    if broken:
        lines += ["Settings that fail the bar on this set (P95s as multiples of the floor):", ""]
        lines += [f"- `{r['method']}` {json.dumps(r['hparams'])}: " + "; ".join(r["bar"]["failures"]) for r in broken]
        lines.append("")
    return lines


# Where the held-out choice is far from the upper bound (decision 32), tested in this order.
FAR_RULE = ("the bound keeps the bar where the held-out choice fails it, or the bound's P95 interval lies wholly below "
            "the held-out choice's on forget, retain or val points")


def far_from_bound(held: dict, bound: dict) -> list[str]:
    """Why the held-out choice is far from its upper bound (FAR_RULE), as phrases; empty when it is not."""
    reasons = []
    if held.get("bar") and bound.get("bar") and bound["bar"]["ok"] and not held["bar"]["ok"]:
        reasons.append("the held-out choice fails the bar, the bound keeps it")
    for g in GROUPS:
        h, b = held["vs_floor"][g], bound["vs_floor"][g]
        if b["x_high"] is not None and h["x_low"] is not None and b["x_high"] < h["x_low"]:
            reasons.append(f"{g} P95 {h['x']:.2f}x against the bound's {b['x']:.2f}x")
    return reasons


def upper_bound_section(rows: list[dict]) -> list[str]:
    """The upper-bound rows apart (decision 32), each beside the held-out row it bounds."""
    bounds = [r for r in rows if r.get("optimistic")]
    if not bounds:
        return []
    held = {(r["method"], r["forget_set"]): r for r in rows if not r.get("optimistic")}
    lines = [f"## Upper bound: {UPPER_BOUND_LABEL}", "",
             "Every grid point also ran on every reported set; the bound is the point decision 30's rule picks against "
             "the reported set's own eval oracles, the very oracles it is scored on (as the KLoM benchmark tunes). It "
             "is optimistic by construction and never a headline. *Far*: " + FAR_RULE + ".", "",
             "| forget set | method | held-out choice: headline; forget / retain / val ×floor | bound: headline; "
             "forget / retain / val ×floor | bound's setting | far from the bound |", "|" + "---|" * 6]
    for b in bounds:
        h = held.get((b["method"], b["forget_set"]))
        if h is None:
            continue
        reasons = far_from_bound(h, b)
        same = b["hparams"] == h["hparams"]
        setting = "the same point" if same else json.dumps({k: v for k, v in b["hparams"].items()
                                                            if h["hparams"].get(k) != v})
        lines.append(f"| `{b['forget_set']}` | {b['method']} | {_summary_cell(h)} | {_summary_cell(b)} | {setting} | "
                     + ("**the held-out choice is far from the bound**: " + "; ".join(reasons) if reasons else "no")
                     + " |")
    return lines + [""]


def _summary_cell(r: dict) -> str:
    return f"{_headline_text(r)}; " + " / ".join("–" if r["vs_floor"][g]["x"] is None else f"{r['vs_floor'][g]['x']:.2f}x"
                                                  for g in GROUPS)


def _fit_section(fit: dict | None, errors: dict | None) -> list[str]:
    if not fit:
        return []
    lines = ["## Datamodels", "",
             f"{fit['estimator']}, {fit['models']} subset models, scored on {fit['heldout']} held-out models by the LDS "
             "(Spearman correlation across held-out models of predicted and actual outputs, per target, averaged; "
             "decision 4).", "",
             f"- per-margin datamodels (the attribution matrix): LDS {_fmt(fit.get('lds_mean'))} (train targets "
             f"{_fmt(fit.get('lds_train_mean'))}, val targets {_fmt(fit.get('lds_val_mean'))})"]
    if fit.get("lds_logit_mean") is not None:
        per_class = fit.get("lds_logit_per_class") or []
        lines.append(f"- per-logit datamodels (what dm-direct and DMM use, decision 34): LDS "
                     f"{_fmt(fit.get('lds_logit_mean'))} (train targets {_fmt(fit.get('lds_logit_train_mean'))}, val "
                     f"targets {_fmt(fit.get('lds_logit_val_mean'))}); per class "
                     + ", ".join(f"{c}: {v:.3f}" for c, v in enumerate(per_class)))
    elif fit.get("per_logit"):
        lines.append("- per-logit datamodels: no LDS recorded by this fit (an older store)")
    lines.append("")
    return lines + _dm_direct_table(errors)


def _dm_direct_table(errors: dict | None) -> list[str]:
    """dm-direct's predicted logits (each full model's minus the forget rows' sum) against the target
    oracles' mean logits, per forget set and group (decision 34), in logits; do-nothing's error beside it."""
    if not errors:
        return []
    lines = ["dm-direct against the target oracles' mean logits (decision 34; in logits, over models, points and "
             "classes): `RMSE` of each model's prediction, do-nothing's (the full models uncorrected) in brackets; "
             "`RMSE of mean`: the models' mean prediction's; `corr`: Pearson correlation of the mean prediction "
             "with the target; `shift corr`: of the predicted shift (minus the forget rows' sum) with the oracles' "
             "(target minus the full models' mean).", "",
             "| forget set | points | RMSE (do-nothing) | RMSE of mean | corr | shift corr |", "|---|---|---|---|---|---|"]
    for fs, record in errors.items():
        for g in GROUPS:
            e = record.get(g) if isinstance(record, dict) else None
            if not isinstance(e, dict):
                continue
            lines.append(f"| `{fs}` {g} | {e.get('points', '–')} | {_fmt(e.get('rmse'))} ({_fmt(e.get('do_nothing_rmse'))}) "
                         f"| {_fmt(e.get('rmse_of_mean'))} | {_fmt(e.get('correlation'))} | "
                         f"{_fmt(e.get('shift_correlation'))} |")
    return lines + [""]


def _selection_section(plan: Plan, rows: list[dict]) -> list[str]:
    grids = method_grids(plan.cfg)
    records = selection_records(plan, grids)
    reported = {fs.name for fs in plan.cfg.forget_sets}
    tuning = ", ".join(f"`{t.name}` ({t.kind})" for t in plan.cfg.tuning_forget_sets) or "–"
    lines = ["## Hyperparameters", "",
             f"Selection rule: {SELECTION_RULE}. Tuning forget sets: {tuning}; a reported set is tuned on the one of "
             "its kind (decision 31). They are never reported sets, and their eval oracles are never a reported "
             "set's. P95s below are multiples of the scored set's own floor (its reference oracles); `mean` is the "
             "mean of the three P95s over the mean of the floor's three, in the rule's order.", ""]
    used = {r["method"]: r["hparams"] for r in rows if r["method"] != "retrain" and r.get("compute") is not None}
    for method, grid in grids.items():
        if method not in records:
            lines.append(f"- `{method}`: {json.dumps(used.get(method, grid[0].model_dump(mode='json')))} (no grid)")
            continue
        for set_name, rec in records[method].items():
            lines += _grid_table(method, set_name, rec, set_name in reported)
    return lines


def _grid_table(method: str, set_name: str, rec: dict, optimistic: bool) -> list[str]:
    """One selection record as a table: every grid point's P95s (multiples of that set's floor),
    accuracies, compute and whether it keeps the bar; the chosen point marked."""
    axes = {k: sorted({json.dumps(sc["hparams"][k]) for sc in rec["scores"]}, key=_grid_order)
            for k in rec["scores"][0]["hparams"]}
    varied = {k: v for k, v in axes.items() if len(v) > 1}
    chosen = rec["scores"][rec["chosen"]]
    searched = "; ".join(k + " in {" + ", ".join(v) + "}" for k, v in varied.items())
    where = (f"on the reported set `{set_name}`, {UPPER_BOUND_LABEL}" if optimistic
             else f"on the tuning set `{set_name}`")
    lines = [f"- `{method}` {where}: searched {searched}; chose {json.dumps({k: chosen['hparams'][k] for k in varied})}"
             + ("" if rec.get("passed_bar", True) else " (no point keeps the bar: the lowest mean, marked †)"), ""]
    floor = rec["floor"]

    def x(p95: dict, g: str) -> str:
        return f"{p95[g] / floor['p95'][g]:.2f}x" if floor["p95"][g] > 0 else f"{p95[g]:.2f}"

    def mean_x(p95: dict) -> str:
        scale = sum(floor["p95"].values())
        return f"{sum(p95.values()) / scale:.2f}x" if scale > 0 else f"{sum(p95.values()) / 3:.2f}"

    lines += ["  | point | forget P95 | retain P95 | val P95 | mean | retain acc | val acc | compute | the bar |",
              "  |---|---|---|---|---|---|---|---|---|"]
    for name in ("floor", "do_nothing"):
        ref = rec[name]
        lines.append(f"  | *{name} (this set)* | " + " | ".join(x(ref["p95"], g) for g in GROUPS)
                     + f" | {mean_x(ref['p95'])} | {ref['accuracy']['retain']:.3f} | {ref['accuracy']['val']:.3f} | | |")
    for i, sc in enumerate(rec["scores"]):
        mark = " ←" if i == rec["chosen"] else ""
        point = ", ".join(f"{k}={sc['hparams'][k]}" for k in varied)
        lines.append(f"  | {point}{mark} | " + " | ".join(x(sc["p95"], g) for g in GROUPS)
                     + f" | {mean_x(sc['p95'])} | {sc['accuracy']['retain']:.3f} | {sc['accuracy']['val']:.3f} | "
                     f"{sc['compute_fraction']:.4f} | {_yes_no(sc['bar']['passed'])} |")
    return lines + [""]


def _grid_order(text: str):
    """Numbers by value, anything else after them by its JSON text."""
    value = json.loads(text)
    return (0, value, "") if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, 0, text)


def _plots(plan: Plan, rows: list[dict], out: Path) -> list[str]:
    """The figures (`report_plots`), drawn in Ray tasks (a forget set's two in one, the overview in
    another) and written to out by the driver; returns their file names in order."""
    rows = [r for r in rows if not r.get("optimistic")]  # the upper bound is never drawn with the rows it bounds
    sets = list(dict.fromkeys(r["forget_set"] for r in rows))
    floor = plan.cfg.evaluate.floor
    context = {"ceiling": ceiling(floor), "saturated_at": saturation_threshold(floor),
               "corner": {fs: good_corner([r for r in rows if r["forget_set"] == fs]) for fs in sets}}
    init_ray(plan.cfg.execution)
    remote = ray.remote(draw).options(**task_options(plan.cfg.execution, gpu=False))
    refs = [remote.remote(fs, [r for r in rows if r["forget_set"] == fs], context) for fs in sets]
    refs.append(remote.remote(None, [{k: v for k, v in r.items() if k not in ("per_point", "_groups")} for r in rows],
                              context))
    names = []
    for figures in ray.get(refs):
        for name, png in figures:
            (out / name).write_bytes(png)
            names.append(name)
    return names
