"""Store lifecycle (decision 26): list what a store root holds (`oracle-farm ls`) and remove what no
given config reaches (`oracle-farm gc`, a dry run unless told to delete).

A stage is any `<root>/<kind>/<kind>-<id>/` with kind in KINDS. Its state comes from the store alone:
prepare and fit are complete with their COMPLETE.json; a family (full, subset, oracle, unlearn,
external) is complete when the markers cover every row of each role's arrays (families grow, so
"every row" is what the arrays hold now, i.e. the size of the last run), partial otherwise; a live
LEASE.json names the driver writing it.

A config reaches: its prepare, full, subset and fit stages, the oracle stage of every forget set
(tuning set included), the unlearn stage of every method x grid point x forget set, the external
stages made on its prepared dataset and forget sets, the `selection/` records of its grids and
`reports/<config name>`. Only `pipeline.plan` computes these ids.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import numpy as np

from pipeline.store import Store
from pipeline.store.lease import Lease, LeaseHeld, holder_gone, is_stale, lease_rel

KINDS = ("prepare", "full", "subset", "oracle", "fit", "unlearn", "external")
FAMILY_KINDS = ("full", "subset", "oracle", "unlearn", "external")
OTHER_DIRS = ("selection", "reports")


# ---------------------------------------------------------------------------------------- listing
def walk_stages(store: Store) -> list[tuple[str, str, str]]:
    """(kind, id, rel) of every stage folder under the root."""
    out = []
    for kind in store.list(""):
        if kind not in KINDS:
            continue
        for entry in store.list(kind):
            if entry.startswith(f"{kind}-"):
                out.append((kind, entry[len(kind) + 1 :], f"{kind}/{entry}"))
    return sorted(out, key=lambda t: (KINDS.index(t[0]), t[2]))


def _coverage(markers: list[dict], n: int) -> int:
    done = np.zeros(n, dtype=bool)
    for m in markers:
        done[m["start"] : min(m["end"], n)] = True
    return int(done.sum())


def _read_markers(store: Store, rel: str) -> list[dict]:
    out = []
    for name in store.list(rel):
        if name.endswith(".json"):
            m = store.read_json(f"{rel}/{name}")
            if m is not None and "start" in m and "end" in m:
                out.append(m)
    return out


def _family_rows(store: Store, rel: str) -> dict[str, int]:
    """role -> rows its arrays hold (the first array of the role), from the Zarr metadata."""
    import zarr

    try:
        group = store.open_group(f"{rel}/arrays.zarr", mode="r")
    except Exception:  # noqa: BLE001 - no arrays yet
        return {}
    rows = {}
    for role, sub in group.groups():
        arrays = [a for _, a in sub.arrays() if isinstance(a, zarr.Array) and a.ndim >= 1]
        if arrays:
            rows[role] = int(arrays[0].shape[0])
    return rows


def stage_state(store: Store, kind: str, rel: str, record: dict | None) -> dict:
    """state (complete | partial | empty | no record), models per role, blocks (markers) done."""
    out = {"models": {}, "blocks": 0}
    if record is None:
        out["state"] = "no record"
        return out
    if kind in ("prepare", "fit") or (kind == "external" and (record.get("config") or {}).get("kind") == "attribution"):
        complete = store.read_json(f"{rel}/COMPLETE.json") is not None
        if kind == "fit":
            out["blocks"] = len(_read_markers(store, f"{rel}/markers/targets"))
        out["state"] = "complete" if complete else ("partial" if out["blocks"] else "empty")
        return out
    rows = _family_rows(store, rel)
    roles = sorted(set(rows) | set(store.list(f"{rel}/markers")))
    complete, any_done = bool(roles), False
    for role in roles:
        markers = _read_markers(store, f"{rel}/markers/{role}")
        n = rows.get(role, max([m["end"] for m in markers], default=0))
        done = _coverage(markers, n)
        out["models"][role] = [done, n]
        out["blocks"] += len(markers)
        complete &= n > 0 and done == n
        any_done |= done > 0
    out["state"] = "complete" if complete else ("partial" if any_done else "empty")
    return out


def _flatten(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def section_diff(stored: dict, wanted: dict, limit: int = 4) -> list[str]:
    """`key: stored -> config` for every differing leaf (at most `limit`, then a count)."""
    a, b = _flatten(stored or {}), _flatten(wanted or {})
    keys = [k for k in sorted(set(a) | set(b)) if json.dumps(a.get(k), sort_keys=True) != json.dumps(b.get(k), sort_keys=True)]
    lines = [f"{k}: {json.dumps(a.get(k, '<absent>'))} -> {json.dumps(b.get(k, '<absent>'))}" for k in keys[:limit]]
    if len(keys) > limit:
        lines.append(f"+{len(keys) - limit} more")
    return lines


def _config_sections(plan) -> dict:
    """kind -> (section, upstream) of a config's stage of that kind, as stage.json stores them."""
    from pipeline.plan import FamilySpec, stage_section

    recipe = plan._recipe()
    sub = plan.cfg.train.subset
    full_sec, full_up = stage_section(plan, FamilySpec(plan.full, "models", 1, "full"))
    sub_sec, sub_up = stage_section(plan, FamilySpec(plan.subset, "fit", 1, "subset", alpha=sub.alpha,
                                                     logits=sub.store_logits))
    return {"prepare": (plan.cfg.data.model_dump(mode="json", exclude={"root"}), {}),
            "full": (full_sec, full_up), "subset": (sub_sec, sub_up),
            "oracle": (recipe, {"prepare": plan.prepare.id}),
            "fit": (plan.cfg.fit.section(),
                    {"subset": plan.subset.id, "models": sub.models, "heldout": sub.heldout})}


def describe_difference(plan, kind: str, record: dict, sections: dict, grids: dict | None) -> list[str]:
    """Short diff of a stored stage's config section against the config's stage of the same kind."""
    if kind == "unlearn":
        method = (record.get("config") or {}).get("method")
        if grids is None or method not in grids:
            return [f"method {method!r} is not in this config"]
        diffs = [section_diff(record["config"].get("hparams", {}), hp.model_dump(mode="json")) for hp in grids[method]]
        best = min(diffs, key=len)
        return [f"hparams.{d}" if not d.startswith("+") else d for d in best] or ["same method and hyperparameters; "
                                                                                  "upstream differs"]
    if kind not in sections:
        return []
    section, upstream = sections[kind]
    diff = section_diff(record.get("config"), section)
    if diff:
        return diff
    stored_up = record.get("upstream") or {}
    if kind == "oracle":
        from pipeline.data.forget_sets import forget_set_id

        names = {forget_set_id(v): k for k, v in plan.forget_sets.items()}
        fid = stored_up.get("forget")
        up = [f"forget set {names[fid]}" if fid in names else "a forget set not in this config"]
        if stored_up.get("prepare") != plan.prepare.id:
            up.append("prepare")
        return ["same config section; upstream: " + ", ".join(up)]
    changed = [k for k in sorted(set(stored_up) | set(upstream)) if stored_up.get(k) != upstream.get(k)]
    return ["same config section" + (f"; upstream differs: {', '.join(changed)}" if changed else "")]


def list_stages(store: Store, plan=None) -> list[dict]:
    """One row per stage under the root (see the module docstring); with a plan, whether that config
    reaches each stage and how the stored config section differs from the config's."""
    now = time.time()
    reached = sections = grids = None
    if plan is not None:
        from pipeline.plan import method_grids

        reached, _ = reached_by(plan)
        sections = _config_sections(plan)
        grids = method_grids(plan.cfg)
    rows = []
    stages = [(kind, sid, rel, store.read_json(f"{rel}/stage.json")) for kind, sid, rel in walk_stages(store)]
    names = forget_set_names([r for *_, r in stages if r], plan)
    for kind, sid, rel, record in stages:
        lease = store.read_json(lease_rel(rel))
        state = stage_state(store, kind, rel, record)
        row = {"kind": kind, "id": sid, "rel": rel, "config": (record or {}).get("label"),
               "created": (record or {}).get("created"), "age_s": now - record["created"] if record and
               record.get("created") else None, **state, "bytes": store.size(rel), "lease": None}
        if lease is not None:
            row["lease"] = {k: lease.get(k) for k in ("host", "pid", "started", "heartbeat", "ttl", "command")}
            row["lease"]["live"] = not is_stale(lease)
            row["lease"]["holder_gone"] = holder_gone(lease)  # dead, but its lease has not expired yet
        if kind == "oracle" and record:
            fid = record.get("upstream", {}).get("forget")
            row["forget_set"] = names.get(fid)
            row["detail"] = f"forget set {' / '.join(names[fid])}" if fid in names else f"forget set {fid} (unnamed here)"
        elif kind == "unlearn" and record:
            row["detail"] = f"{record['config'].get('method')} on {record['config'].get('forget_set')}"
        elif kind == "external" and record and record["config"].get("kind") == "attribution":
            c = record["config"]
            matrices = "+".join(k.replace("_", "-") for k in ("per_logit", "per_margin") if c.get(k))
            row["detail"] = f"attribution {c.get('name')} ({matrices}) from {c.get('source')}"
        elif kind == "external" and record:
            c = record["config"]
            row["detail"] = f"{c.get('kind')} {c.get('method') or ''} {c.get('forget_set') or ''} from {c.get('source')}".replace("  ", " ")
        if plan is not None:
            row["reached"] = rel in reached
            row["diff"] = [] if row["reached"] or record is None else describe_difference(plan, kind, record, sections, grids)
        rows.append(row)
    return rows


def forget_set_names(records: list[dict], plan=None) -> dict[str, list[str]]:
    """Forget-set content id -> the names it goes by: the config's (with a plan), and those the unlearn
    and external stages of this store recorded with it (an oracle stage is named by content only)."""
    named: dict[str, set] = {}
    if plan is not None:
        from pipeline.data.forget_sets import forget_set_id

        for name, indices in plan.forget_sets.items():
            named.setdefault(forget_set_id(indices), set()).add(name)
    for record in records:
        fid, name = record.get("upstream", {}).get("forget"), (record.get("config") or {}).get("forget_set")
        if fid and name and record.get("kind") in ("unlearn", "external"):
            named.setdefault(fid, set()).add(name)
    return {fid: sorted(names) for fid, names in named.items()}


def state_text(row: dict) -> str:
    if row["state"] in ("complete", "no record", "empty") and not row["models"]:
        text = row["state"]
    else:
        parts = [f"{r} {d}/{n}" for r, (d, n) in row["models"].items()]
        blocks = f"{row['blocks']} block{'s' if row['blocks'] != 1 else ''} done"
        text = row["state"] + (f" ({', '.join(parts)}; {blocks})" if parts else f" ({blocks})")
    lease = row.get("lease")
    if lease:
        who = f"{lease.get('host')} pid {lease.get('pid')}"
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(lease.get("started") or 0))
        if not lease["live"]:
            text += f"; stale lease of {who}"
        else:
            text += f"; leased by {who} since {since}" + (" (that process is gone; the lease expires within its "
                                                          "ttl)" if lease.get("holder_gone") else "")
    return text


def human_age(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


# ---------------------------------------------------------------------------------------- reach
def reached_by(plan) -> tuple[set[str], set[str]]:
    """(stage rels, other rels) a config reaches (see the module docstring)."""
    from pipeline.maintenance.exchange import external_reached
    from pipeline.plan import method_grids, selection_rels, unlearn_ref
    from pipeline.store.runrecord import report_dir

    stages = {ref.rel for _, ref in plan.all_stage_refs()}
    others = {report_dir(plan.cfg)}
    grids = method_grids(plan.cfg)
    for method, grid in grids.items():
        for hp in grid:
            for fs in plan.forget_sets:
                stages.add(unlearn_ref(plan, method, hp, fs).rel)
    others.update(selection_rels(plan, grids))
    stages |= {r["ref"].rel for r in external_reached(plan)}
    return stages, others


# ---------------------------------------------------------------------------------------- gc
@dataclass
class GcPlan:
    remove: list[dict] = field(default_factory=list)  # {rel, kind, config, bytes}
    leased: list[dict] = field(default_factory=list)  # unreached but held by a live lease: kept
    kept: int = 0
    left_alone: list[str] = field(default_factory=list)  # top-level entries gc does not manage

    @property
    def bytes(self) -> int:
        return sum(r["bytes"] for r in self.remove)


def plan_gc(store: Store, plans: list) -> GcPlan:
    keep_stages, keep_others = set(), set()
    for plan in plans:
        s, o = reached_by(plan)
        keep_stages |= s
        keep_others |= o
    out = GcPlan()
    for kind, _sid, rel in walk_stages(store):
        if rel in keep_stages:
            out.kept += 1
            continue
        record = store.read_json(f"{rel}/stage.json")
        lease = store.read_json(lease_rel(rel))
        row = {"rel": rel, "kind": kind, "config": (record or {}).get("label"), "bytes": store.size(rel)}
        if lease is not None and not is_stale(lease):
            out.leased.append({**row, "lease": lease})
        else:
            out.remove.append(row)
    for top in OTHER_DIRS:
        for entry in store.list(top):
            rel = f"{top}/{entry}"
            if rel in keep_others:
                out.kept += 1
            else:
                out.remove.append({"rel": rel, "kind": top, "config": entry if top == "reports" else None,
                                   "bytes": store.size(rel)})
    out.left_alone = [e for e in store.list("") if e not in KINDS and e not in OTHER_DIRS]
    return out


def remove_stage(store: Store, rel: str) -> bool:
    """Delete a stage under its own lease (False when a live driver holds it): completion records
    first (COMPLETE.json, markers), so an interrupted delete leaves a stage that is simply not done,
    then everything else."""
    lease = Lease(store, [rel], wait=0, quiet=True)
    try:
        lease.acquire()
    except LeaseHeld:
        return False
    try:
        store.remove(f"{rel}/COMPLETE.json")
        store.remove(f"{rel}/markers")
        for entry in store.list(rel):
            if entry != "LEASE.json":
                store.remove(f"{rel}/{entry}")
    finally:
        lease.release()
    if not store.list(rel):
        store.remove(rel)  # the empty folder of a local store
    return True


def run_gc(store: Store, gc: GcPlan) -> tuple[list[dict], list[dict]]:
    """Delete what plan_gc found: (removed, skipped because a driver took them meanwhile)."""
    removed, skipped = [], []
    for row in gc.remove:
        if row["kind"] in OTHER_DIRS:
            store.remove(row["rel"])
            removed.append(row)
        elif remove_stage(store, row["rel"]):
            removed.append(row)
        else:
            skipped.append(row)
    return removed, skipped
