"""Evaluation and the report, regenerated from the store alone.

Per method and reported forget set: KLoM (decision 2) against the eval oracles only (decision 3),
P95 and mean over forget / retain / validation points with a bootstrap interval over models; the
`retrain` row (the reference oracles, as many as the unlearned models: the oracle floor, decision 17);
accuracies against the oracles'; a loss-threshold membership-inference score; compute as a fraction
of one retraining (per request, and the amortized one-off costs in their own column, decision 22).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline import runrecord
from pipeline.evaluate.klom import bootstrap_p95_interval, klom
from pipeline.evaluate.metrics import loss_from_margin, mia_balanced_accuracy
from pipeline.stages import FamilySpec, Plan, StageError, family_store
from pipeline.unlearn import get_method

GROUPS = ("forget", "retain", "val")


def _oracle_margins(plan: Plan, forget_name: str, role: str, array: str = "margins") -> np.ndarray:
    meta = plan.prepared_meta()
    n = getattr(plan.cfg.train.oracle, role)
    family = family_store(plan, FamilySpec(plan.oracle(forget_name), role, n, "oracle"), meta)
    if n == 0 or not family.done_mask(n).all():
        raise StageError(f"the {role} oracles of forget set {forget_name!r} are not trained: run `oracle-farm train`")
    return family.read(array, n)


def group_points(plan: Plan, forget_name: str) -> dict[str, np.ndarray]:
    meta = plan.prepared_meta()
    n, p = meta["n_train"], meta["n_train"] + meta["n_val"]
    forget = plan.forget_sets[forget_name]
    return {"forget": forget, "retain": np.setdiff1d(np.arange(n), forget), "val": np.arange(n, p)}


def _klom_kwargs(plan: Plan) -> dict:
    e = plan.cfg.evaluate
    return {"bins": e.bins, "clip": e.clip, "floor": e.floor, "compat": e.compat}


def forget_p95_against_eval(plan: Plan, forget_name: str, margins: np.ndarray) -> float:
    forget = plan.forget_sets[forget_name]
    eval_m = _oracle_margins(plan, forget_name, "eval")
    return float(np.percentile(klom(margins[:, forget], eval_m[:, forget], **_klom_kwargs(plan)), 95))


def score(plan: Plan, forget_name: str, margins: np.ndarray, accuracy_of, labels: np.ndarray) -> dict:
    """KLoM statistics, accuracies and MIA of unlearned margins (N_u, P) against the eval oracles."""
    eval_m = _oracle_margins(plan, forget_name, "eval")
    groups = group_points(plan, forget_name)
    kw = _klom_kwargs(plan)
    per_point = klom(margins, eval_m, **kw)
    row = {"klom": {}, "accuracy": {}, "oracle_accuracy": {}}
    oracle_accuracy = _logit_accuracy(_oracle_margins(plan, forget_name, "eval", "logits").astype(np.float32), labels)
    rng_seed = 0
    for g, pts in groups.items():
        values = per_point[pts]
        interval = (bootstrap_p95_interval(margins, eval_m, pts, n_boot=plan.cfg.evaluate.bootstrap, seed=rng_seed, **kw)
                    if plan.cfg.evaluate.bootstrap else (None, None))
        row["klom"][g] = {"p95": float(np.percentile(values, 95)), "mean": float(values.mean()),
                          "p95_low": interval[0], "p95_high": interval[1]}
        row["accuracy"][g] = accuracy_of(pts)
        row["oracle_accuracy"][g] = oracle_accuracy(pts)
    forget = groups["forget"]
    row["mia"] = mia_balanced_accuracy(loss_from_margin(margins[:, forget]), loss_from_margin(eval_m[:, forget]))
    row["per_point"], row["_groups"] = per_point, groups
    return row


def _logit_accuracy(logits: np.ndarray, labels: np.ndarray):
    correct = logits.argmax(-1) == labels
    return lambda pts: float(correct[:, pts].mean())


def collect_rows(plan: Plan) -> list[dict]:
    from pipeline.exchange import imported_rows
    from pipeline.unlearn_stage import method_grids, n_unlearned, select_hyperparameters, unlearn_family, unlearn_ref

    plan.store.check_reachable(create=False)
    meta = plan.prepared_meta()
    labels = np.concatenate([plan.train_labels,
                             plan.store.open_group(f"{plan.prepare.rel}/arrays.zarr", mode="r")["labels/val"][:]])
    n_u = n_unlearned(plan.cfg)
    chosen = select_hyperparameters(plan, method_grids(plan.cfg))
    retrain_cost = _retrain_seconds(plan, meta)
    rows = []
    for fs in plan.cfg.forget_sets:
        ref_m = _oracle_margins(plan, fs.name, "reference")
        if len(ref_m) != n_u:
            raise StageError(f"train.oracle.reference ({len(ref_m)}) must equal the number of unlearned models ({n_u}) "
                             "so every row compares the same number of models (decision 17)")
        ref_acc = _logit_accuracy(_oracle_margins(plan, fs.name, "reference", "logits").astype(np.float32), labels)
        row = score(plan, fs.name, ref_m, ref_acc, labels)
        rows.append({"method": "retrain", "forget_set": fs.name, **row, "compute": 1.0, "seconds_fraction": 1.0,
                     "amortized": 0.0, "hparams": {}})
        for method, hp in chosen.items():
            family = unlearn_family(plan, unlearn_ref(plan, method, hp, fs.name), meta)
            if not family.done_mask(n_u).all():
                raise StageError(f"unlearn[{method},{fs.name}] is not complete: run `oracle-farm unlearn`")
            margins = family.read("margins", n_u)
            acc = _logit_accuracy(family.read("logits", n_u).astype(np.float32), labels)
            infos = [m["info"] for m in family.markers() if m["start"] < n_u]
            passes = float(np.mean([i["equivalent_passes"] for i in infos]))
            seconds = float(np.mean([i["seconds"] / max(1, i["block"][1] - i["block"][0]) for i in infos]))
            rows.append({"method": method, "forget_set": fs.name, **score(plan, fs.name, margins, acc, labels),
                         "compute": passes / infos[0]["retrain_example_passes"],
                         "seconds_fraction": seconds / retrain_cost if retrain_cost else None,
                         "amortized": _amortized(plan, method), "hparams": hp.model_dump(mode="json"),
                         "notes": infos[0].get("notes", {})})
        rows += imported_rows(plan, fs.name, n_u, labels)  # `M (imported)`: margins from import-margins
    return rows


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
    from pipeline.unlearn_stage import n_unlearned, unlearn_ref

    refs = {"full": plan.full.id, "fit": plan.fit.id, "external": plan.store.list("external"),
            "oracle": {fs.name: plan.oracle(fs.name).id for fs in plan.cfg.forget_sets},
            "unlearn": sorted(unlearn_ref(plan, m, hp, fs.name).id for m, hp in chosen.items()
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
    plots = _plots(rows, out)
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


def _markdown(plan: Plan, rows: list[dict], fit: dict | None, plots: list[str]) -> str:
    from pipeline.unlearn_stage import n_unlearned

    n_u = n_unlearned(plan.cfg)
    lines = [f"# oracle-farm report: {plan.cfg.name}", "",
             f"KLoM = KL(unlearned ‖ oracle) per point over {n_u} unlearned models vs "
             f"{plan.cfg.train.oracle.eval} eval oracles ({plan.cfg.evaluate.bins} bins, "
             f"{'compat binning' if plan.cfg.evaluate.compat else 'every sample counted'}); P95 with a "
             f"bootstrap 95% interval over models. `retrain` = {plan.cfg.train.oracle.reference} reference oracles, "
             "disjoint from the eval oracles: the oracle floor. Compute: example-passes per request as a fraction "
             "of one retraining (forward-only passes count 1/3); amortized: one-off retrainings the method relies on.", ""]
    head = ("| forget set | method | forget P95 [95% CI] | retain P95 | val P95 | forget acc (oracle) | "
            "retain acc | val acc | MIA | compute | time frac | amortized |")
    lines += [head, "|" + "---|" * 12]
    for r in rows:
        k = r["klom"]
        ci = f" [{_fmt(k['forget']['p95_low'], 2)}, {_fmt(k['forget']['p95_high'], 2)}]" if k["forget"]["p95_low"] is not None else ""
        lines.append(
            f"| {r['forget_set']} | {r['method']} | {_fmt(k['forget']['p95'])}{ci} | {_fmt(k['retain']['p95'])} | "
            f"{_fmt(k['val']['p95'])} | {_fmt(r['accuracy']['forget'], 2)} ({_fmt(r['oracle_accuracy']['forget'], 2)}) | "
            f"{_fmt(r['accuracy']['retain'], 2)} | {_fmt(r['accuracy']['val'], 2)} | {_fmt(r['mia'], 2)} | "
            f"{_fmt(r['compute'], 4)} | {_fmt(r['seconds_fraction'], 3)} | {_fmt(r['amortized'], 0)} |")
    if fit:
        lines += ["", f"Datamodels ({fit['estimator']}, {fit['models']} subset models): mean LDS "
                      f"{_fmt(fit.get('lds_mean'))} (train targets {_fmt(fit.get('lds_train_mean'))}, "
                      f"val targets {_fmt(fit.get('lds_val_mean'))}) on {fit['heldout']} held-out models."]
    tuned = {r["method"]: r["hparams"] for r in rows if r["method"] != "retrain"}
    lines += ["", "Hyperparameters used (grids selected on the tuning forget set against its eval oracles):", ""]
    lines += [f"- `{m}`: {json.dumps(hp)}" for m, hp in tuned.items()]
    lines += [""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _plots(rows: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for fs in sorted({r["forget_set"] for r in rows}):
        sub = [r for r in rows if r["forget_set"] == fs]
        fig, ax = plt.subplots(figsize=(6, 4))
        floor = next(r for r in sub if r["method"] == "retrain")["klom"]["forget"]
        if floor["p95_low"] is not None:
            ax.axhspan(floor["p95_low"], floor["p95_high"], color="grey", alpha=0.3, label="oracle floor (retrain)")
        ax.axhline(floor["p95"], color="grey", lw=1)
        for r in sub:
            if r["method"] == "retrain" or r["compute"] is None:  # imported rows: compute unknown
                continue
            ax.scatter(max(r["compute"], 1e-5), r["klom"]["forget"]["p95"], label=r["method"])
        ax.set_xscale("log")
        ax.set_xlabel("compute (fraction of one retraining)")
        ax.set_ylabel("forget-set P95 KLoM")
        ax.set_title(f"forget set {fs}")
        ax.legend(fontsize=7)
        name = f"pareto_{fs}.png"
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        names.append(name)
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
        for ax, g in zip(axes, GROUPS):
            pts = group_points_from_row(sub[0], g)
            for r in sub:
                ax.hist(np.clip(r["per_point"][pts], 0, None), bins=30, histtype="step", label=r["method"])
            ax.set_title(f"{fs}: KLoM on {g} points")
            ax.set_yscale("log")
        axes[0].legend(fontsize=6)
        name = f"klom_hist_{fs}.png"
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        names.append(name)
    return names


def group_points_from_row(row: dict, group: str) -> np.ndarray:
    return row["_groups"][group]
