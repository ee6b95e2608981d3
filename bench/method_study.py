"""Method study (issue 29, items 4-5): every point of a method's grid on every forget set of a finished
store, scored against that set's own eval oracles (the optimistic view of decision 32), beside the floor
(the reference oracles) and do-nothing, with bootstrap intervals over models.

A point keeps the bar (decision 30) when its retain and val accuracy are within 0.01 of do-nothing's and
its retain and val P95 at most max(1.5 x floor, 1.2 x do-nothing); it beats do-nothing when it also
keeps its forget P95's interval wholly below do-nothing's. Per set and method the best point is the
lowest mean of the three P95s among those keeping the bar (else among all, marked).

It needs only the trained full models and oracles (`oracle-farm train`); it writes nothing to the store.
Points already in --out are not rerun (kill it and rerun at will). Example (the MLP study):

  PYTHONPATH=$PWD python bench/method_study.py configs/digits.yaml --set store=$PWD/store \\
      --grids configs/digits-study.yaml --methods del sfron camu --out bench/results/method_study_mlp.json

Methods run in this process, on one thread, through the same seeds as the unlearn stage would use
(`unlearn_ref` + `build_context`), so a point's models equal the stage's for the same config.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from pipeline.config import load_config
from pipeline.evaluate.oracles import GROUPS, all_labels, logit_accuracy, oracle_margins, score
from pipeline.plan import FamilySpec, Plan, family_store, n_unlearned, unlearn_ref
from pipeline.stages.train import load_device_data, load_full_models
from pipeline.stages.unlearn import build_context
from pipeline.store import Store
from pipeline.training.recipe import evaluate_members, retrain_example_passes
from pipeline.unlearn import expand_grid, get_method
from pipeline.unlearn.base import ComputeMeter


SATURATED = float(0.9 * np.log(1 / 1e-5))  # a P95 within 10 % of KLoM's ceiling (Q floored at 1e-5)


def summarize(row: dict) -> dict:
    return {"p95": {g: row["klom"][g]["p95"] for g in GROUPS},
            "interval": {g: [row["klom"][g]["p95_low"], row["klom"][g]["p95_high"]] for g in GROUPS},
            "accuracy": row["accuracy"]}


def references(plan: Plan, forget_name: str, labels: np.ndarray, n: int, boot: int) -> dict:
    """The floor (reference oracles) and do-nothing (the first n full models), scored like a point."""
    full = family_store(plan, FamilySpec(plan.full, "models", plan.cfg.train.full.models, "full"),
                        plan.prepared_meta())
    out = {}
    for name, margins, logits in (
            ("floor", oracle_margins(plan, forget_name, "reference"),
             oracle_margins(plan, forget_name, "reference", "logits")),
            ("do_nothing", full.read("margins", n), full.read("logits", n))):
        out[name] = summarize(score(plan, forget_name, margins, logit_accuracy(logits, labels), labels,
                                    bootstrap=boot, threads=1))
    return out


def verdict(point: dict, ref: dict) -> dict:
    """Decision 30's bar against do-nothing and the floor, and whether the forget P95 beats do-nothing's
    outside both bootstrap intervals (never while its forget P95 is saturated)."""
    dn, floor = ref["do_nothing"], ref["floor"]
    utility = all(point["accuracy"][g] >= dn["accuracy"][g] - 0.01 for g in ("retain", "val"))
    kl_ok = all(point["p95"][g] <= max(1.5 * floor["p95"][g], 1.2 * dn["p95"][g]) for g in ("retain", "val"))
    high = point["interval"]["forget"][1]
    saturated = bool(point["p95"]["forget"] >= SATURATED)  # decision 33: not ranked against other saturated rows
    beats = high is not None and high < dn["interval"]["forget"][0] and not saturated
    return {"keeps_utility": utility, "keeps_klom": kl_ok, "keeps_bar": utility and kl_ok,
            "forget_saturated": saturated, "forget_beats_do_nothing": beats,
            "beats_do_nothing": utility and kl_ok and beats}


def run_point(plan, data, method: str, hp, forget_name: str, indices: list[int], labels, boot: int,
              refs: dict) -> dict:
    meta = plan.prepared_meta()
    module = get_method(method)
    forget = plan.forget_sets[forget_name]
    retain = np.setdiff1d(np.arange(meta["n_train"]), forget)
    ref = unlearn_ref(plan, method, hp, forget_name)
    ctx = build_context(plan, meta, data, ref, forget_name, forget, indices, module.NEEDS)
    model = load_full_models(plan, indices, plan.cfg.execution.device)
    meter = ComputeMeter()
    out = module.run(ctx, model, forget, retain, hp, meter)
    outputs = evaluate_members(out.model, data)
    acc = logit_accuracy(outputs["logits"], labels)
    row = summarize(score(plan, forget_name, outputs["margins"], acc, labels, bootstrap=0))
    if verdict(row, refs)["keeps_bar"]:  # intervals only where they decide the verdict (they cost the most)
        row = summarize(score(plan, forget_name, outputs["margins"], acc, labels, bootstrap=boot, threads=1))
    notes = {k: (float(np.median(v)) if isinstance(v, list) and v and isinstance(v[0], (int, float)) else v)
             for k, v in out.notes.items()}
    return {**row, "compute_fraction": meter.equivalent_passes() / retrain_example_passes(plan.cfg.train, meta["n_train"]),
            "seconds": meter.seconds(), "notes": notes}


def changed(hp) -> dict:
    """The hyperparameters that differ from the method's defaults (a point's short name)."""
    default = type(hp)().model_dump(mode="json")
    return {k: v for k, v in hp.model_dump(mode="json").items() if default[k] != v}


def best(points: list[dict]) -> dict | None:
    passing = [p for p in points if p["verdict"]["keeps_bar"]]
    pool = passing or points
    if not pool:
        return None
    chosen = min(pool, key=lambda p: (np.mean(list(p["p95"].values())), p["compute_fraction"]))
    return {**chosen, "none_keeps_bar": not passing}


def fmt(p: dict) -> str:
    return " / ".join(f"{p['p95'][g]:.2f}" for g in GROUPS)


def report(paths: list[str]) -> str:
    """A markdown table from study files: per set and method, the best point (by the rule above), its
    P95s as multiples of the floor, whether it beats do-nothing, and how many grid points ran / kept the
    bar / beat do-nothing."""
    lines = ["| set | method | best point | forget / retain / val P95 (x floor) | acc retain / val | cost | "
             "points: run / keep bar / beat do-nothing |", "|---|---|---|---|---|---|---|"]
    merged: dict[str, dict] = {}
    for path in paths:
        for fs, entry in json.loads(Path(path).read_text())["sets"].items():
            m = merged.setdefault(fs, {"references": entry["references"], "points": []})
            m["points"] += entry["points"]
    for fs, entry in merged.items():
        ref = entry["references"]
        floor = ref["floor"]["p95"]
        dn = ref["do_nothing"]
        x = lambda p: " / ".join(f"{p['p95'][g] / floor[g]:.2f}" for g in GROUPS)  # noqa: E731
        lines.append(f"| {fs} | do-nothing | | {x(dn)} | {dn['accuracy']['retain']:.3f} / {dn['accuracy']['val']:.3f} | 0 | |")
        for method in sorted({p["method"] for p in entry["points"]}):
            points = [p for p in entry["points"] if p["method"] == method]
            for p in points:
                p["verdict"] = verdict(p, ref)
            b = best(points)
            tag = "**beats**" if b["verdict"]["beats_do_nothing"] else ("no point keeps the bar" if b["none_keeps_bar"] else "does not beat")
            name = ", ".join(f"{k} {v}" for k, v in b["changed"].items() if k not in ("batch_size", "forget_batch_size"))
            lines.append(f"| {fs} | {method} | {name} ({tag}) | {x(b)} | {b['accuracy']['retain']:.3f} / "
                         f"{b['accuracy']['val']:.3f} | {b['compute_fraction']:.2f} | {len(points)} / "
                         f"{sum(p['verdict']['keeps_bar'] for p in points)} / "
                         f"{sum(p['verdict']['beats_do_nothing'] for p in points)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--grids", help="a YAML whose unlearn.methods holds the grids (default: the config's)")
    ap.add_argument("--methods", nargs="+", default=[])
    ap.add_argument("--forget-sets", nargs="+", help="default: every reported set")
    ap.add_argument("--bootstrap", type=int, default=200)
    ap.add_argument("--out")
    ap.add_argument("--report", nargs="+", metavar="JSON", help="print the markdown table of these study files")
    args = ap.parse_args(argv)
    if args.report:
        print(report(args.report))
        return 0
    if not args.out or not args.methods:
        ap.error("a study run needs --methods and --out")
    torch.set_num_threads(1)
    cfg = load_config(args.config, args.overrides)
    plan = Plan(cfg, Store(cfg.store))
    source = yaml.safe_load(Path(args.grids).read_text()) if args.grids else {"unlearn": {"methods": cfg.unlearn.methods}}
    grids = {m: expand_grid(m, source["unlearn"]["methods"][m]) for m in args.methods}
    sets = args.forget_sets or [fs.name for fs in cfg.forget_sets]
    out_path = Path(args.out)
    results = json.loads(out_path.read_text()) if out_path.exists() else {"config": args.config, "sets": {}}
    labels = all_labels(plan)
    data = load_device_data(plan.store.root, plan.prepare.rel, cfg.execution.device)
    n = n_unlearned(cfg)
    indices = list(range(n))

    def save():
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(out_path)

    for fs in sets:
        entry = results["sets"].setdefault(fs, {"points": []})
        if "references" not in entry:
            entry["references"] = references(plan, fs, labels, n, args.bootstrap)
            save()
        ref = entry["references"]
        print(f"{fs}: floor {fmt(ref['floor'])}  do-nothing {fmt(ref['do_nothing'])} "
              f"(forget interval {ref['do_nothing']['interval']['forget']})", flush=True)
        for method, grid in grids.items():
            for hp in grid:
                key = {"method": method, "hparams": hp.model_dump(mode="json")}
                if any(p["method"] == method and p["hparams"] == key["hparams"] for p in entry["points"]):
                    continue
                start = time.perf_counter()
                point = {**key, "changed": changed(hp), **run_point(plan, data, method, hp, fs, indices, labels, args.bootstrap, ref)}
                point["verdict"] = verdict(point, ref)
                point["wall_s"] = time.perf_counter() - start
                entry["points"].append(point)
                save()
                v = point["verdict"]
                print(f"  {method} {point['changed']}: {fmt(point)} acc r/v {point['accuracy']['retain']:.3f}/"
                      f"{point['accuracy']['val']:.3f} cost {point['compute_fraction']:.3f} "
                      f"bar {'Y' if v['keeps_bar'] else 'n'} beats {'Y' if v['beats_do_nothing'] else 'n'} "
                      f"({point['wall_s']:.0f} s)", flush=True)
    print("\nbest point per set and method (lowest mean P95 among those keeping the bar):")
    for fs, entry in results["sets"].items():
        for p in entry["points"]:  # verdicts from the stored figures, by this version's rule
            p["verdict"] = verdict(p, entry["references"])
        for method in sorted({p["method"] for p in entry["points"]}):
            b = best([p for p in entry["points"] if p["method"] == method])
            mark = " (none keeps the bar)" if b["none_keeps_bar"] else ""
            print(f"  {fs} {method}: {b['changed']} {fmt(b)} beats do-nothing: "
                  f"{b['verdict']['beats_do_nothing']}{mark}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
