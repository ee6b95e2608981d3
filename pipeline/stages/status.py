"""`oracle-farm status`: what a config's stages hold, read from the store alone, without torch or Ray
(it answers in well under 2 s on a finished digits store).

One row (a dict) per stage or cell, in this order:
  section prepare   the prepared dataset
  section train     a training family (full, subset, oracle[<forget set>]): models done per role
  section fit       the datamodel fit: targets done, mean LDS (all, train, val points) once finished, and
                    the per-logit datamodels' LDS (mean, train, val, per class) where the fit recorded it;
                    with fit.attribution, a row for the imported attribution dm-direct and DMM read
  section unlearn   one per method x reported forget set: the method's point (the selected one for a
                    grid, none before the selection; tuning_set: the set it was selected on), models done
  section tune      one per grid point of a method with a grid and set it is scored on: each tuning set
                    the reported sets use (decision 31), then, with unlearn.upper_bound, each reported
                    set (upper_bound: true)
Every row has stage, section, id, state (done / partial / missing), done, total, detail; bytes when
asked (`sizes`, which walks every stage's files).
"""

from __future__ import annotations

from pipeline.plan import (
    Plan, chosen_point, done_targets, family_store, method_grids, n_unlearned, selection_rel, target_blocks,
    train_families, unlearn_family, unlearn_ref,
)


def stage_status(plan: Plan, sizes: bool = True) -> list[dict]:
    """Every row of the status (see the module docstring); ConfigError on bad method hyperparameters."""
    plan.store.check_reachable(create=False)
    grids = method_grids(plan.cfg)
    meta = plan.store.read_json(f"{plan.prepare.rel}/COMPLETE.json")
    rows = [_row("prepare", "prepare", plan.prepare.id, int(bool(meta)), 1,
                 f"{meta['n_train']} train, {meta['n_val']} val" if meta else "")]
    rows += _family_rows(plan, meta)
    rows.append(_fit_row(plan, meta))
    if plan.cfg.fit.attribution is not None:
        rows.append(_attribution_row(plan))
    rows += _unlearn_rows(plan, meta, grids)
    for row in rows:
        if sizes:
            row["bytes"] = plan.store.size(row.pop("_rel")) if row.get("_rel") else 0
        else:
            row.pop("_rel", None)
    return rows


def _row(stage: str, section: str, ref_id: str | None, done: int, total: int, detail: str = "",
         rel: str | None = None, **extra) -> dict:
    state = "done" if total and done >= total else ("partial" if done else "missing")
    return {"stage": stage, "section": section, "id": ref_id, "state": state, "done": done, "total": total,
            "detail": detail, **extra, "_rel": rel if rel is not None else (f"{section}/{section}-{ref_id}" if ref_id else None)}


def _family_rows(plan: Plan, meta: dict | None) -> list[dict]:
    by_stage: dict[str, list] = {}
    for fam in train_families(plan):
        label = fam.kind if fam.kind != "oracle" else f"oracle[{_forget_name(plan, fam)}]"
        by_stage.setdefault(label, []).append(fam)
    rows = []
    for label, fams in by_stage.items():
        done = total = 0
        roles = []
        for fam in fams:
            n_done = 0
            if meta is not None and fam.n_models:
                n_done = int(family_store(plan, fam, meta).done_mask(fam.n_models).sum())
            done, total = done + n_done, total + fam.n_models
            roles.append(f"{fam.role} {n_done}/{fam.n_models}")
        if len(fams) == 1:
            roles = []  # one role: the count says it all
        forget = label[len("oracle["):-1] if fams[0].kind == "oracle" else None
        rows.append(_row(label, "train", fams[0].ref.id, done, total, ", ".join(roles), fams[0].ref.rel,
                         family=fams[0].kind, forget_set=forget))
    return rows


def _forget_name(plan: Plan, fam) -> str:
    for name in plan.forget_sets:
        if plan.oracle(name) == fam.ref:
            return name
    return "?"


def _fit_row(plan: Plan, meta: dict | None) -> dict:
    ref = plan.fit
    lds = dict.fromkeys(LDS_FIELDS)
    if meta is None:
        return _row("fit", "fit", ref.id, 0, 0, "", ref.rel, **lds)
    n_points = meta["n_train"] + meta["n_val"]
    summary = plan.store.read_json(f"{ref.rel}/COMPLETE.json")
    if summary:
        done = n_points
        lds = {k: summary.get(k) for k in lds}
    else:
        covered = done_targets(plan.store, ref.rel, n_points)
        done = sum(b - a for a, b in target_blocks(n_points, plan.cfg.execution.fit_block_targets)
                   if covered[a:b].all())
        done = min(done, n_points - 1)  # the row-major copy and COMPLETE are still to be written
    return _row("fit", "fit", ref.id, done, n_points, _lds_detail(lds) or "targets", ref.rel, **lds)


# What a finished fit's COMPLETE.json says about its quality; the per-logit ones (decision 34) are absent
# from older stores, read with .get.
LDS_FIELDS = ("lds_mean", "lds_train_mean", "lds_val_mean", "lds_logit_mean", "lds_logit_train_mean",
              "lds_logit_val_mean", "lds_logit_per_class")


def _attribution_row(plan: Plan) -> dict:
    """The imported attribution dm-direct and DMM read (`fit.attribution`), with its LDS (the fit's fields)."""
    ref = plan.attribution  # StageError naming the fix when it is not imported
    summary = plan.store.read_json(f"{ref.rel}/COMPLETE.json") or {}
    lds = {k: summary.get(k) for k in LDS_FIELDS}
    return _row(f"attribution[{plan.cfg.fit.attribution}]", "fit", ref.id, 1, 1,
                f"imported; {_lds_detail(lds) or 'LDS not measured'}", ref.rel, **lds)


def _lds_detail(lds: dict) -> str:
    text = ", per-logit ".join(filter(None, (_one_lds(lds, ""), _one_lds(lds, "logit_"))))
    if text and lds.get("lds_logit_per_class"):
        text += " (per class " + " ".join(f"{v:.2f}" for v in lds["lds_logit_per_class"]) + ")"
    return text


def _one_lds(lds: dict, kind: str) -> str:
    if lds.get(f"lds_{kind}mean") is None:
        return ""
    parts = [f"{name} {lds[f'lds_{kind}{name}_mean']:.3f}" for name in ("train", "val")
             if lds.get(f"lds_{kind}{name}_mean") is not None]
    return f"LDS {lds[f'lds_{kind}mean']:.3f}" + (f" ({', '.join(parts)})" if parts else "")


def _unlearn_rows(plan: Plan, meta: dict | None, grids: dict) -> list[dict]:
    n = n_unlearned(plan.cfg)
    rows, tune_rows = [], []
    for method, grid in grids.items():
        if len(grid) > 1:
            for name in plan.selection_sets():  # the tuning sets, then the reported sets of the upper bound
                record = plan.store.read_json(selection_rel(plan, method, grid, name))
                chosen = record["chosen"] if record else None
                bound = name in {fs.name for fs in plan.cfg.forget_sets}
                tune_rows += [_unlearn_row(plan, meta, "tune", method, hp, name, n, chosen=i == chosen, point=i,
                                           upper_bound=bound) for i, hp in enumerate(grid)]
        for fs in plan.cfg.forget_sets:
            tuning = plan.cfg.tuning_set_for(fs.name)
            hp = chosen_point(plan, method, grid, fs.name) if len(grid) == 1 or tuning else None
            if hp is None:
                why = (f"needs a tuning set of kind {fs.kind}" if tuning is None
                       else f"grid of {len(grid)}: not selected yet on {tuning.name}")
                rows.append(_row(f"unlearn[{method},{fs.name}]", "unlearn", None, 0, n, why, None,
                                 method=method, forget_set=fs.name, hparams=None))
            else:
                rows.append(_unlearn_row(plan, meta, "unlearn", method, hp, fs.name, n,
                                         tuning_set=tuning.name if tuning and len(grid) > 1 else None))
    return rows + tune_rows


def _unlearn_row(plan: Plan, meta: dict | None, section: str, method: str, hp, forget: str, n: int,
                 **extra) -> dict:
    ref = unlearn_ref(plan, method, hp, forget)
    done = 0
    if meta is not None and plan.store.exists(ref.rel):
        done = unlearn_family(plan, ref, meta).listed_done(n)
    label = f"{section}[{method},{forget}" + (f",#{extra['point']}]" if "point" in extra else "]")
    return _row(label, section, ref.id, done, n, "", ref.rel, method=method, forget_set=forget,
                hparams=hp.model_dump(mode="json"), **extra)
