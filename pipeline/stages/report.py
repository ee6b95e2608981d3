"""Evaluation and the report, regenerated from the store alone.

Per method and reported forget set: KLoM (decision 2) against the eval oracles only (decision 3),
P95 and mean over forget / retain / validation points with a bootstrap interval over models; the
`retrain` row (the reference oracles, as many as the unlearned models: the oracle floor, decision 17);
accuracies against the oracles'; a loss-threshold membership-inference score; compute as a fraction
of one retraining (per request, and the amortized one-off costs in their own column, decision 22).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import ray

from pipeline.execution import init_ray, run_tasks, task_options
from pipeline.store import Store, runrecord
from pipeline.evaluate.oracles import (
    GROUPS, SELECTION_RULE, all_labels, group_points, logit_accuracy, oracle_margins, score, selection_score,
    trained_oracles,
)
from pipeline.plan import FamilySpec, Plan, StageError, family_store
from pipeline.unlearn import get_method
from pipeline.stages.unlearn import (
    method_grids, n_unlearned, select_hyperparameters, selection_records, unlearn_family, unlearn_ref,
)

# Kept for callers of the old private names (tests, exchange).
_oracle_margins = oracle_margins
_logit_accuracy = logit_accuracy
__all__ = ["GROUPS", "collect_rows", "group_points", "score", "selection_score", "write_report"]


def collect_rows(plan: Plan) -> list[dict]:
    """Every row of the report, in order: per forget set the floor (`retrain`), each method's chosen
    setting, then imported rows. Rows are scored in Ray tasks, one per row (reading 100 models' margins
    and logits and bootstrapping their P95s is the report's work; on a cluster it spreads out)."""
    from pipeline.maintenance.exchange import imported_rows

    plan.store.check_reachable(create=False)
    meta = plan.prepared_meta()
    labels = all_labels(plan)
    n_u = n_unlearned(plan.cfg)
    if plan.cfg.train.oracle.reference != n_u:
        raise StageError(f"train.oracle.reference ({plan.cfg.train.oracle.reference}) must equal the number of "
                         f"unlearned models ({n_u}) so every row compares the same number of models (decision 17)")
    chosen = select_hyperparameters(plan, method_grids(plan.cfg))
    jobs = []
    for fs in plan.cfg.forget_sets:
        trained_oracles(plan, fs.name, "reference")  # not trained: named here, before any task
        jobs.append(("retrain", {}, fs.name))
        for method, per_set in chosen.items():
            hp = per_set[fs.name]
            if not unlearn_family(plan, unlearn_ref(plan, method, hp, fs.name), meta).done_mask(n_u).all():
                raise StageError(f"unlearn[{method},{fs.name}] is not complete: run `oracle-farm unlearn`")
            jobs.append((method, hp.model_dump(mode="json"), fs.name))
    ex = plan.cfg.execution
    init_ray(ex)
    remote = ray.remote(score_row_task).options(**task_options(ex, gpu=False))
    retrain_cost = _retrain_seconds(plan, meta)
    refs = [(remote.remote(plan.store.root, plan.cfg, m, hp, fs, retrain_cost), 1) for m, hp, fs in jobs]
    scored = run_tasks("report", refs, len(refs), unit="rows")
    rows = []
    for fs in plan.cfg.forget_sets:
        rows += [row for row, (_, _, name) in zip(scored, jobs) if name == fs.name]
        rows += imported_rows(plan, fs.name, n_u, labels)  # `M (imported)`: margins from import-margins
    annotate(rows)
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
        return {"method": "retrain", "forget_set": forget_name, **score(plan, forget_name, ref_m, ref_acc, labels,
                                                                         threads=threads),
                "compute": 1.0, "seconds_fraction": 1.0, "amortized": 0.0, "hparams": {}}
    n_u = n_unlearned(cfg)
    hp = get_method(method).Config.model_validate(hparams)
    family = unlearn_family(plan, unlearn_ref(plan, method, hp, forget_name), plan.prepared_meta())
    margins = family.read("margins", n_u)
    acc = _logit_accuracy(family.read("logits", n_u).astype(np.float32), labels)
    infos = family.model_infos(n_u)
    passes = float(np.mean([i["equivalent_passes"] for i in infos]))
    seconds = float(np.mean([i["seconds"] / max(1, i["block"][1] - i["block"][0]) for i in infos]))
    return {"method": method, "forget_set": forget_name, **score(plan, forget_name, margins, acc, labels, threads=threads),
            "compute": passes / infos[0]["retrain_example_passes"],
            "seconds_fraction": seconds / retrain_cost if retrain_cost else None,
            "amortized": _amortized(plan, method), "hparams": hp.model_dump(mode="json"),
            "notes": infos[0].get("notes", {})}


# The bar a selected setting must meet not to count as breaking the model (issue 14, item 3): retain and
# val accuracy within ACC_SLACK of do-nothing's, retain and val P95 at most max(FLOOR_X x the floor,
# NOTHING_X x do-nothing's).
ACC_SLACK, FLOOR_X, NOTHING_X = 0.01, 1.5, 1.2


def _overlap(a: dict, b: dict) -> bool | None:
    if a["p95_low"] is None or b["p95_low"] is None:
        return None
    return a["p95_low"] <= b["p95_high"] and b["p95_low"] <= a["p95_high"]


def annotate(rows: list[dict]) -> None:
    """Per row, in place: `vs_floor` (per group, P95 and its interval as multiples of the retrain row's
    P95; whether the interval overlaps the floor's or do-nothing's) and `bar` (item 3's check of what
    the setting does to retain and val points against do-nothing and the floor; None where unknown)."""
    for fs in dict.fromkeys(r["forget_set"] for r in rows):
        sub = [r for r in rows if r["forget_set"] == fs]
        floor = next((r for r in sub if r["method"] == "retrain"), None)
        nothing = next((r for r in sub if r["method"] == "do_nothing"), None)
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
            r["bar"] = _bar(r, floor, nothing)


def _bar(r: dict, floor: dict | None, nothing: dict | None) -> dict | None:
    if r["method"] in ("retrain", "do_nothing") or floor is None or nothing is None or r["accuracy"]["retain"] is None:
        return None
    failures = []
    for g in ("retain", "val"):
        if r["accuracy"][g] < nothing["accuracy"][g] - ACC_SLACK:
            failures.append(f"{g} accuracy {r['accuracy'][g]:.3f} < do-nothing's {nothing['accuracy'][g]:.3f} - {ACC_SLACK}")
        limit = max(FLOOR_X * floor["klom"][g]["p95"], NOTHING_X * nothing["klom"][g]["p95"])
        if r["klom"][g]["p95"] > limit:
            failures.append(f"{g} P95 {r['klom'][g]['p95']:.2f} > {limit:.2f}")
    return {"ok": not failures, "failures": failures}


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
    this is asked, so an equal key means an equal report (imported families are listed too)."""
    from pipeline.config import stage_id

    refs = {"full": plan.full.id, "fit": plan.fit.id, "external": plan.store.list("external"),
            "oracle": {fs.name: plan.oracle(fs.name).id for fs in plan.cfg.forget_sets},
            "unlearn": sorted(unlearn_ref(plan, m, per_set[fs.name], fs.name).id for m, per_set in chosen.items()
                              for fs in plan.cfg.forget_sets)}
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
    (out / "report.json").write_text(json.dumps({"config": plan.cfg.name, "key": key, "rows": summary, "fit": fit,
                                                 "plots": plots}, indent=1, default=float))
    (out / "report.md").write_text(_markdown(plan, summary, fit, plots))
    if not plan.store.is_local:  # an object store: a copy beside the stages, readable from anywhere
        for name in ["report.json", "report.md", *plots]:
            plan.store.put_file(out / name, f"{runrecord.report_dir(plan.cfg)}/{name}")
    return out


def _fmt(x, digits=3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def p95_cell(r: dict, g: str) -> str:
    """A row's P95 on group g as the report prints it: the floor's own P95 on the retrain row, else
    `_ratio`."""
    return f"{r['klom'][g]['p95']:.3f} (1x)" if r["method"] == "retrain" else _ratio(r, g)


def _ratio(v: dict, g: str) -> str:
    """'2.31x [2.10, 2.52]' with marks: = where the interval overlaps the floor's, ~ where it overlaps
    do-nothing's."""
    x = v["vs_floor"][g]
    if x["x"] is None:
        return "–"
    text = f"{x['x']:.2f}x"
    if x["x_low"] is not None:
        text += f" [{x['x_low']:.2f}, {x['x_high']:.2f}]"
    if v["method"] not in ("retrain", "do_nothing"):
        if x["overlaps_floor"]:
            text += " ="
        if x["overlaps_nothing"]:
            text += " ~"
    return text


def _markdown(plan: Plan, rows: list[dict], fit: dict | None, plots: list[str]) -> str:
    n_u = n_unlearned(plan.cfg)
    lines = [f"# oracle-farm report: {plan.cfg.name}", "",
             f"KLoM = KL(unlearned ‖ oracle) per point over {n_u} unlearned models vs "
             f"{plan.cfg.train.oracle.eval} eval oracles ({plan.cfg.evaluate.bins} bins, "
             f"{'compat binning' if plan.cfg.evaluate.compat else 'every sample counted'}). `retrain` = "
             f"{plan.cfg.train.oracle.reference} reference oracles, disjoint from the eval oracles: the oracle floor "
             "(what retraining itself scores at these sample sizes). Each P95 is shown as a multiple of the floor's P95 "
             "on the same points (`retrain` shows its own P95), with the bootstrap 95% interval over models "
             f"({plan.cfg.evaluate.bootstrap} replicates) divided by the same floor. Marks: `=` the interval overlaps "
             "the floor's (indistinguishable from retraining at these sample sizes), `~` it overlaps do-nothing's "
             "(no better than doing nothing). Compute: example-passes per request as a fraction of one retraining "
             "(forward-only passes count 1/3); amortized: one-off retrainings the method relies on. `bar`: whether the "
             f"setting keeps retain and val accuracy within {ACC_SLACK:g} of do-nothing's and retain/val P95 at most "
             f"max({FLOOR_X:g}x the floor, {NOTHING_X:g}x do-nothing's) (✗: it does not; see below).", ""]
    for fs in dict.fromkeys(r["forget_set"] for r in rows):
        sub = [r for r in rows if r["forget_set"] == fs]
        floor = next((r for r in sub if r["method"] == "retrain"), None)
        lines += [f"## forget set `{fs}`", ""]
        if floor:
            fk = floor["klom"]
            lines.append("Floor (retrain) P95: " + ", ".join(
                f"{g} {fk[g]['p95']:.3f}" + (f" [{_fmt(fk[g]['p95_low'], 2)}, {_fmt(fk[g]['p95_high'], 2)}]"
                                             if fk[g]["p95_low"] is not None else "") for g in GROUPS) + ".")
            lines.append("")
        lines += ["| method | forget P95 / floor | retain P95 / floor | val P95 / floor | forget acc (oracle) | "
                  "retain acc | val acc | MIA | compute | time frac | amortized | bar |", "|" + "---|" * 12]
        for r in sub:
            bar = "" if r.get("bar") is None else ("✓" if r["bar"]["ok"] else "✗")
            cells = [p95_cell(r, g) for g in GROUPS]
            lines.append(
                f"| {r['method']} | {cells[0]} | {cells[1]} | {cells[2]} | "
                f"{_fmt(r['accuracy']['forget'], 2)} ({_fmt(r['oracle_accuracy']['forget'], 2)}) | "
                f"{_fmt(r['accuracy']['retain'], 3)} | {_fmt(r['accuracy']['val'], 3)} | {_fmt(r['mia'], 2)} | "
                f"{_fmt(r['compute'], 4)} | {_fmt(r['seconds_fraction'], 3)} | {_fmt(r['amortized'], 0)} | {bar} |")
        broken = [r for r in sub if r.get("bar") and not r["bar"]["ok"]]
        if broken:
            lines += ["", "Settings that do not meet the bar on this set: the point each method's grid gave as best "
                          "on the tuning set (its other points are run on the tuning set only, so whether one of "
                          "them would meet the bar here is not known):", ""]
            lines += [f"- `{r['method']}` {json.dumps(r['hparams'])}: " + "; ".join(r["bar"]["failures"]) for r in broken]
        lines.append("")
    if fit:
        lines += [f"Datamodels ({fit['estimator']}, {fit['models']} subset models): mean LDS "
                  f"{_fmt(fit.get('lds_mean'))} (train targets {_fmt(fit.get('lds_train_mean'))}, "
                  f"val targets {_fmt(fit.get('lds_val_mean'))}) on {fit['heldout']} held-out models.", ""]
    lines += _selection_section(plan, rows)
    lines += [""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _selection_section(plan: Plan, rows: list[dict]) -> list[str]:
    grids = method_grids(plan.cfg)
    records = selection_records(plan, grids)
    reported = {fs.name for fs in plan.cfg.forget_sets}
    tuning = ", ".join(f"`{t.name}` ({t.kind})" for t in plan.cfg.tuning_forget_sets) or "–"
    lines = ["## Hyperparameters", "",
             f"Selection rule: {SELECTION_RULE}. Tuning forget sets: {tuning}; a reported set is tuned on the one of "
             "its kind (decision 31). They are never reported sets, and their eval oracles are never a reported set's.", ""]
    used = {r["method"]: r["hparams"] for r in rows if r["method"] != "retrain" and r.get("compute") is not None}
    for method, grid in grids.items():
        if method not in records:
            lines.append(f"- `{method}`: {json.dumps(used.get(method, grid[0].model_dump(mode='json')))} (no grid)")
            continue
        for set_name, rec in records[method].items():
            lines += _selection_table(method, set_name, rec, set_name in reported)
    return lines


def _selection_table(method: str, set_name: str, rec: dict, optimistic: bool) -> list[str]:
    axes = {k: sorted({json.dumps(sc["hparams"][k]) for sc in rec["scores"]}, key=_grid_order)
            for k in rec["scores"][0]["hparams"]}
    varied = {k: v for k, v in axes.items() if len(v) > 1}
    chosen = rec["scores"][rec["chosen"]]
    searched = "; ".join(k + " in {" + ", ".join(v) + "}" for k, v in varied.items())
    where = (f"on the reported set `{set_name}`, tuned on its scored oracles (optimistic)" if optimistic
             else f"on the tuning set `{set_name}`")
    lines = [f"- `{method}` {where}: searched {searched}; chose {json.dumps({k: chosen['hparams'][k] for k in varied})}"
             + ("" if rec.get("passed_bar", True) else " (no point keeps the bar: the lowest mean)"), ""]
    lines += ["  | point | forget P95 | retain P95 | val P95 | mean | retain acc | val acc | compute | bar |",
              "  |---|---|---|---|---|---|---|---|---|"]
    for name in ("floor", "do_nothing"):
        ref = rec[name]
        lines.append(f"  | *{name} (this set)* | {ref['p95']['forget']:.2f} | {ref['p95']['retain']:.2f} | "
                     f"{ref['p95']['val']:.2f} | {sum(ref['p95'].values()) / 3:.2f} | "
                     f"{ref['accuracy']['retain']:.3f} | {ref['accuracy']['val']:.3f} | | |")
    for i, sc in enumerate(rec["scores"]):
        mark = " ←" if i == rec["chosen"] else ""
        point = ", ".join(f"{k}={sc['hparams'][k]}" for k in varied)
        lines.append(f"  | {point}{mark} | {sc['p95']['forget']:.2f} | {sc['p95']['retain']:.2f} | "
                     f"{sc['p95']['val']:.2f} | {sc['mean_p95']:.2f} | {sc['accuracy']['retain']:.3f} | "
                     f"{sc['accuracy']['val']:.3f} | {sc['compute_fraction']:.4f} | {'✓' if sc['bar']['passed'] else '✗'} |")
    return lines + [""]


def _grid_order(text: str):
    """Numbers by value, anything else after them by its JSON text."""
    value = json.loads(text)
    return (0, value, "") if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, 0, text)


# One colour and marker per method: no two methods share both (issue 14, item 5).
STYLES = {
    "retrain": ("#000000", "*"), "do_nothing": ("#7f7f7f", "X"), "dm_direct": ("#1f77b4", "o"),
    "dmm": ("#d62728", "s"), "oracle_matching": ("#2ca02c", "D"), "finetune": ("#ff7f0e", "^"),
    "gradient_ascent": ("#9467bd", "v"), "neggrad_plus": ("#8c564b", "<"), "scrub": ("#e377c2", ">"),
    "del": ("#17becf", "p"), "sfron": ("#bcbd22", "h"), "camu": ("#393b79", "P"),
}
_EXTRA = [("#ad494a", "d"), ("#637939", "8"), ("#8c6d31", "H"), ("#7b4173", "1"), ("#3182bd", "2")]


def style(method: str) -> tuple[str, str]:
    if method in STYLES:
        return STYLES[method]
    return _EXTRA[sum(map(ord, method)) % len(_EXTRA)]


def _plots(plan: Plan, rows: list[dict], out: Path) -> list[str]:
    """The figures, drawn in Ray tasks (a forget set's two in one, the overview in another) and written
    to out by the driver; returns their file names in order."""
    sets = list(dict.fromkeys(r["forget_set"] for r in rows))
    init_ray(plan.cfg.execution)
    remote = ray.remote(draw_task).options(**task_options(plan.cfg.execution, gpu=False))
    refs = [remote.remote(fs, [r for r in rows if r["forget_set"] == fs]) for fs in sets]
    refs.append(remote.remote(None, [{k: v for k, v in r.items() if k not in ("per_point", "_groups")} for r in rows]))
    names = []
    for figures in ray.get(refs):
        for name, png in figures:
            (out / name).write_bytes(png)
            names.append(name)
    return names


def draw_task(forget_set: str | None, rows: list[dict]) -> list[tuple[str, bytes]]:
    """One Ray task: a forget set's Pareto and ECDF figures (forget_set None: the forget-vs-retain
    overview of every set), as (file name, PNG bytes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if forget_set is None:
        sets = list(dict.fromkeys(r["forget_set"] for r in rows))
        return [_forget_vs_retain(plt, sets, rows)]
    return [_pareto(plt, forget_set, rows), _ecdfs(plt, forget_set, rows)]


def _png(plt, fig, dpi: int) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _pareto(plt, fs: str, sub: list[dict]) -> tuple[str, bytes]:
    """Forget P95 as a multiple of the floor against compute; zero-compute methods on their own axis."""
    fig, (ax0, ax) = plt.subplots(1, 2, figsize=(8, 4.5), sharey=True, gridspec_kw={"width_ratios": [1, 6]})
    floor = next(r for r in sub if r["method"] == "retrain")
    xf = floor["vs_floor"]["forget"]
    for a in (ax0, ax):
        if xf["x_low"] is not None:
            a.axhspan(xf["x_low"], xf["x_high"], color="grey", alpha=0.25, lw=0)
        a.axhline(1.0, color="grey", lw=1)
    nothing = next((r for r in sub if r["method"] == "do_nothing"), None)
    if nothing is not None:
        for a in (ax0, ax):
            a.axhline(nothing["vs_floor"]["forget"]["x"], color=style("do_nothing")[0], lw=1, ls="--")
    zero = [r for r in sub if r["method"] != "retrain" and r["compute"] is not None and r["compute"] <= 0]
    positive = [r for r in sub if r["method"] != "retrain" and r["compute"] is not None and r["compute"] > 0]
    for a, group, xs in ((ax0, zero, lambda i, r: i), (ax, positive, lambda i, r: r["compute"])):
        for i, r in enumerate(group):
            v = r["vs_floor"]["forget"]
            color, marker = style(r["method"])
            x = xs(i, r)
            err = None if v["x_low"] is None else [[max(0.0, v["x"] - v["x_low"])], [max(0.0, v["x_high"] - v["x"])]]
            a.errorbar([x], [v["x"]], yerr=err, color=color, marker=marker, ms=8, capsize=3, ls="none")
            a.annotate(r["method"], (x, v["x"]), textcoords="offset points", xytext=(6, 3), fontsize=7, color=color)
    ax0.set_xlim(-0.7, max(1, len(zero)) - 0.3)
    ax0.set_xticks([])
    ax0.set_xlabel("no training\n(compute 0)", fontsize=8)
    ax0.set_ylabel("forget-set P95 KLoM / floor's")
    ax0.text(-0.6, 1.0, "floor", fontsize=7, color="grey", va="bottom")
    ax.set_xscale("log")
    ax.set_xlabel("compute per request (fraction of one retraining)")
    ax.set_title(f"forget set {fs}: forget P95 (x floor; band: floor's 95% interval; dashed: do-nothing)", fontsize=9)
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    return f"pareto_{fs}.png", _png(plt, fig, 110)


def _ecdfs(plt, fs: str, sub: list[dict]) -> tuple[str, bytes]:
    """Small multiples: per method, the ECDF of per-point KLoM on forget, retain and val points, over
    the retrain row's (grey)."""
    methods = [r for r in sub if r["method"] != "retrain"]
    floor = next(r for r in sub if r["method"] == "retrain")
    cols = max(1, min(4, len(methods)))
    nrows = max(1, -(-len(methods) // cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(3.0 * cols, 2.4 * nrows), sharex=True, sharey=True, squeeze=False)
    top = max(float(np.max(r["per_point"])) for r in sub) * 1.05 + 1e-9
    dashes = {"forget": "-", "retain": "--", "val": ":"}
    for ax, r in zip(axes.flat, methods):
        color = style(r["method"])[0]
        for g in GROUPS:
            for row, c, lw in ((floor, "0.6", 1.0), (r, color, 1.4)):
                v = np.sort(np.clip(row["per_point"][row["_groups"][g]], 0, None))
                at = np.unique(np.linspace(0, len(v) - 1, min(len(v), 400)).round().astype(int))  # looks the same
                ax.step(v[at], (at + 1) / len(v), where="post", color=c, ls=dashes[g], lw=lw)
        ax.set_title(r["method"], fontsize=9, color=color)
        ax.set_xlim(0, top)
        ax.axhline(0.95, color="0.8", lw=0.8)
    for ax in axes.flat[len(methods):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("fraction of points")
    for ax in axes[-1, :]:
        ax.set_xlabel("KLoM")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="k", ls=dashes[g], label=f"{g} points") for g in GROUPS]
    handles.append(Line2D([], [], color="0.6", label="retrain (floor)"))
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(f"{fs}: ECDF of per-point KLoM\n(grey: retrain; a curve crosses the 0.95 line at its P95)",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return f"klom_ecdf_{fs}.png", _png(plt, fig, 100)


def _forget_vs_retain(plt, sets: list[str], rows: list[dict]) -> tuple[str, bytes]:
    """Per forget set, forget P95 against retain P95 (both x floor): a method that forgets by breaking
    the model sits high on the retain axis."""
    fig, axes = plt.subplots(1, len(sets), figsize=(4.2 * len(sets), 4), squeeze=False)
    for ax, fs in zip(axes[0], sets):
        top_x = top_y = 2.0
        for r in (r for r in rows if r["forget_set"] == fs):
            vf, vr = r["vs_floor"]["forget"], r["vs_floor"]["retain"]
            if vf["x"] is None or vr["x"] is None:
                continue
            color, marker = style(r["method"])
            ax.scatter([vr["x"]], [vf["x"]], color=color, marker=marker, s=50, zorder=3)
            top_x, top_y = max(top_x, vr["x"]), max(top_y, vf["x"])
            ax.annotate(r["method"], (vr["x"], vf["x"]), textcoords="offset points", xytext=(4, 3), fontsize=6,
                        color=color)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.axvline(1.0, color="grey", lw=0.8)
        ax.set_xlim(0, top_x * 1.2)
        ax.set_ylim(0, top_y * 1.1)
        ax.set_xlabel("retain P95 / floor")
        ax.set_title(fs, fontsize=9)
    axes[0][0].set_ylabel("forget P95 / floor")
    fig.suptitle("forget vs retain P95 KLoM, as multiples of the floor (1 = retraining)", fontsize=9)
    fig.tight_layout()
    return "forget_vs_retain.png", _png(plt, fig, 100)
