"""`oracle-farm ls | gc | import-margins | import-attribution | export`: store lifecycle and exchange (registered on
the app of pipeline.cli.common; exit codes as everywhere: 0 ok, 2 bad input, 1 failure)."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.table import Table

from pipeline.cli.common import ConfigArg, SetOpt, _guard, _human, _plan, app, console, err


def _store(root: str):
    from pipeline.store import Store, StoreError

    store = Store(root)
    if store.is_local:
        from pathlib import Path

        if not Path(store.root).is_dir():
            raise StoreError(f"{store.root}: no store there (not a folder)")
    else:
        store.check_reachable(create=False)
    return store


def _config_plan(config: str, overrides: Optional[list[str]], store):
    from pipeline.config import load_config
    from pipeline.plan import Plan

    return Plan(load_config(config, overrides or []), store)


@app.command("ls")
def ls(root: Optional[str] = typer.Argument(None, help="store root (default: the --config's store)"),
       config: Optional[str] = typer.Option(None, "--config", help="compare every stage with this config"),
       set_: Optional[list[str]] = SetOpt, json_out: bool = typer.Option(False, "--json")):
    """Every stage in a store root: kind, id, config, state, models, bytes, age (and, with --config,
    whether that config reaches it and how its config section differs)."""
    from pipeline.config import ConfigError, load_config
    from pipeline.maintenance.lifecycle import human_age, list_stages, state_text

    def go():
        if root is None and config is None:
            raise ConfigError("give a store ROOT or --config CONFIG (whose `store` is listed)")
        store = _store(root if root is not None else load_config(config, set_ or []).store)
        plan = _config_plan(config, set_, store) if config else None
        rows = list_stages(store, plan)
        if json_out:
            print(json.dumps(rows, indent=1, default=float))
            return
        table = Table(title=f"oracle-farm ls {store.root}")
        cols = ["kind", "id", "config", "state", "bytes", "age"] + (["reached", "differs from --config"] if plan else [])
        for col in cols:
            table.add_column(col)
        for r in rows:
            colour = {"complete": "green", "partial": "yellow"}.get(r["state"], "red")
            detail = f" {r['detail']}" if r.get("detail") else ""
            cells = [r["kind"], r["id"] + detail, r["config"] or "–", f"[{colour}]{state_text(r)}[/{colour}]",
                     _human(r["bytes"]), human_age(r["age_s"])]
            if plan:
                cells += ["yes" if r["reached"] else "no", "; ".join(r["diff"])]
            table.add_row(*cells)
        console.print(table)
        console.print(f"{len(rows)} stages, {_human(sum(r['bytes'] for r in rows))}", highlight=False)

    _guard(go)


@app.command("gc")
def gc(root: str = typer.Argument(..., help="store root"),
       keep: list[str] = typer.Option(..., "--keep", help="a config whose stages are kept (repeatable)"),
       set_: Optional[list[str]] = SetOpt,
       yes: bool = typer.Option(False, "--yes", help="delete (default: a dry run that only lists)"),
       json_out: bool = typer.Option(False, "--json")):
    """Remove the stages (and selection records, reports) no --keep config reaches. Dry run unless --yes;
    a stage a live driver holds the lease of is never removed."""
    from pipeline.maintenance.lifecycle import plan_gc, run_gc

    def go():
        store = _store(root)
        plans = [_config_plan(c, set_, store) for c in keep]
        found = plan_gc(store, plans)
        removed, skipped = run_gc(store, found) if yes else ([], [])
        if json_out:
            print(json.dumps({"dry_run": not yes, "remove": found.remove, "bytes": found.bytes, "kept": found.kept,
                              "leased": [{k: v for k, v in r.items()} for r in found.leased],
                              "removed": [r["rel"] for r in removed], "skipped": [r["rel"] for r in skipped],
                              "left_alone": found.left_alone}, indent=1, default=str))
            return
        verb = "removed" if yes else "would remove"
        for r in found.remove:
            if r in skipped:
                continue
            console.print(f"{verb}  {r['rel']}  ({r['config'] or 'no config'}, {_human(r['bytes'])})", highlight=False)
        from pipeline.store.lease import describe_holder

        for r in found.leased + [{**s, "lease": None} for s in skipped]:
            held = describe_holder(r["lease"]) if r.get("lease") else "a driver took its lease meanwhile"
            console.print(f"kept (being written)  {r['rel']}: {held}", highlight=False)
        for e in found.left_alone:
            console.print(f"left alone (not a stage folder)  {e}", highlight=False)
        total = sum(r["bytes"] for r in (removed if yes else found.remove))
        n = len(removed) if yes else len(found.remove)
        tail = "" if yes else "; dry run: pass --yes to delete"
        console.print(f"{verb} {n} entries, {_human(total)}; kept {found.kept} reached by "
                      f"{', '.join(p.cfg.name for p in plans)}{tail}", highlight=False)

    _guard(go)


@app.command("import-margins")
def import_margins(config: str = ConfigArg, file: str = typer.Argument(..., metavar="FILE", help="the margins, .npy or .npz"),
                   kind: str = typer.Option(..., "--kind", help="full | oracle | unlearned"),
                   forget_set: Optional[str] = typer.Option(None, "--forget-set", help="oracle/unlearned: the forget set"),
                   method: Optional[str] = typer.Option(None, "--method", help="unlearned: the method's name"),
                   name: Optional[str] = typer.Option(None, "--name", help="a label told apart in the report"),
                   set_: Optional[list[str]] = SetOpt):
    """Bring externally produced margins (.npy/.npz, models x points, float32) into the store as an external
    family; imported `unlearned` margins appear in evaluate/report as `METHOD (imported)`."""
    from pipeline.maintenance import exchange

    def go():
        out = exchange.import_margins(_plan(config, set_), file, kind, forget_set, method, name)
        exchange.warn(out["warnings"])
        what = f"{out['written']} models written" if out["written"] else "already imported, nothing written"
        console.print(f"import-margins: {out['models']} models -> {out['url']} ({what})", highlight=False)

    _guard(go)


@app.command("import-attribution")
def import_attribution(config: str, file: str = typer.Argument(..., help=".npy, .npz or a Zarr group (a folder)"),
                       name: str = typer.Option(..., "--name", help="the name `fit.attribution: NAME` uses"),
                       kind: Optional[str] = typer.Option(None, "--kind", help="per_logit | per_margin: take only this "
                                                          "matrix (default: whatever the file holds)"),
                       set_: Optional[list[str]] = SetOpt):
    """Bring your own attribution: per-logit (train points x targets x classes) and/or per-margin (train points
    x targets) scores, as an external stage with a fit's arrays; its LDS is measured on the held-out subset
    models when they are trained. dm-direct and DMM read it with `--set fit.attribution=NAME`."""
    from pipeline.maintenance import exchange

    def go():
        out = exchange.import_attribution(_plan(config, set_), file, name, kind)
        what = "written" if out["written"] else "already imported, nothing written"
        scores = [f"{label} {out[key]:.3f}" for label, key in (("LDS", "lds_mean"), ("per-logit LDS", "lds_logit_mean"))
                  if out.get(key) is not None]
        lds = ", ".join(scores) + f" on {out['heldout']} held-out models" if scores else "LDS not measured (no "\
            "held-out subset models trained)"
        console.print(f"import-attribution {name}: {out['url']} ({what}); {lds}", highlight=False)

    _guard(go)


@app.command("export")
def export(config: str = ConfigArg,
           array: Optional[str] = typer.Option(None, "--array", help="fit/theta, full/margins, ... (forms: see below)"),
           out: str = typer.Option(..., "--out", help="FILE.npy or FILE.parquet"),
           forget_set: Optional[str] = typer.Option(None, "--forget-set", help="export this forget set's training "
                                                                              "indices instead of an array"),
           layout: str = typer.Option("long", "--layout", help="Parquet: long (a row per model x point, a column "
                                                               "per axis) or wide (a column per point)"),
           chunk_rows: Optional[int] = typer.Option(None, "--chunk-rows", help="rows per chunk (default: ~64 MiB)"),
           set_: Optional[list[str]] = SetOpt):
    """Write a stored array (an attribution matrix, margins, masks, ...) or a forget set to .npy or
    Parquet, chunk by chunk; Parquet columns are named by the array's axes (model, point, class, ...).

    --array forms: prepare/labels/train; fit/<theta|theta_rows|bias|lds|lam|theta_logit|bias_logit>;
    full/<margins|logits|accuracy>; subset/[fit|heldout/]<name>; oracle/<forget set>/<role>/<name>;
    unlearn/<method>/<forget set>/<name>; <kind>/<kind>-<id>/<path in arrays.zarr> (any stage)."""
    from pipeline.maintenance import exchange

    def go():
        plan = _plan(config, set_)
        if (array is None) == (forget_set is None):
            raise exchange.ExchangeError("give one of --array SPEC or --forget-set NAME")
        if forget_set is not None:
            info = exchange.export_forget_set(plan, forget_set, out)
            console.print(f"export forget set {forget_set}: {info['shape'][0]} training indices -> {info['out']}",
                          highlight=False)
            return
        arr, rows, source = exchange.resolve_array(plan, array)
        info = exchange.export_array(arr, out, rows, chunk_rows, source=f"{source}:{array}", layout=layout)
        shown = f", {info['layout']} layout" if info["layout"] else ""
        console.print(f"export {array}: {info['shape']} {info['dtype']} -> {info['out']} "
                      f"({info['chunks']} chunks of {info['rows_per_chunk']} rows{shown}, {_human(info['bytes'])})",
                      highlight=False)

    _guard(go)


__all__ = ["ls", "gc", "import_margins", "export", "err"]
