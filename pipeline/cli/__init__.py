"""`oracle-farm` command line: the typer app's stage commands (config, prepare, status, train, fit, unlearn,
evaluate, report, run) and the `query` group; the store commands (ls, gc, import-margins, export) are
`pipeline.cli.lifecycle`, the app and the helpers both share `pipeline.cli.common`.
Exit codes: 0 ok, 2 bad input, 1 failure."""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from pipeline.cli.common import (  # noqa: F401 - app, console, err, _plan: named from pipeline.cli too
    ConfigArg, DataRootOpt, SetOpt, _finished, _guard, _human, _plan, app, console, err,
)

@app.command()
def config(config: str = ConfigArg, set_: Optional[list[str]] = SetOpt, data_root: Optional[str] = DataRootOpt,
           json_out: bool = typer.Option(False, "--json")):
    """Print the resolved config and every stage identity."""
    from pipeline.config import to_yaml
    from pipeline.plan import method_grids

    def go():
        plan = _plan(config, set_, data_root)
        method_grids(plan.cfg)  # the methods' hyperparameters too, as the stages check them
        if json_out:
            stages = [{"stage": label, "id": ref.id, "path": plan.store.url(ref.rel)} for label, ref in plan.all_stage_refs()]
            print(json.dumps({"config": plan.cfg.model_dump(mode="json"), "stages": stages}, indent=1))
            return
        console.print(to_yaml(plan.cfg), highlight=False)
        table = Table(title="stage identities")
        table.add_column("stage")
        table.add_column("id")
        table.add_column("path")
        for label, ref in plan.all_stage_refs():
            table.add_row(escape(label), ref.id, plan.store.url(ref.rel))
        console.print(table)

    _guard(go)


@app.command()
def prepare(config: str = ConfigArg, set_: Optional[list[str]] = SetOpt, data_root: Optional[str] = DataRootOpt,
            repair: bool = typer.Option(False, "--repair", help="write again prepared files that differ from "
                                                                  "their recorded size or sha256")):
    """Write the dataset as FFCV files and validate the forget sets. On a prepared store, check the
    files against their recorded size and sha256: a missing one is written again, a damaged one with --repair."""
    from pipeline.stages.prepare import run_prepare

    def go():
        plan = _plan(config, set_, data_root)
        meta = run_prepare(plan, repair=repair)
        console.print(f"prepare {plan.prepare.id}: {meta['n_train']} train, {meta['n_val']} val, "
                      f"shape {meta['shape']} -> {plan.store.url(plan.prepare.rel)}", highlight=False)

    _guard(go)


@app.command()
def status(config: str = ConfigArg, set_: Optional[list[str]] = SetOpt, json_out: bool = typer.Option(False, "--json"),
           wide: bool = typer.Option(False, "--wide", help="also each stage's id and bytes")):
    """What the store holds for this config: stages done / partial / missing, unlearning as a method x
    forget-set grid. Reads the store only (no torch, no Ray)."""
    from pipeline.stages.status import stage_status

    def go():
        plan = _plan(config, set_)
        rows = stage_status(plan, sizes=wide or json_out)
        if json_out:
            print(json.dumps(rows, indent=1))
            return
        for renderable in _status_tables(plan, rows, wide):
            console.print(renderable)

    _guard(go)


_STATE = {"done": "green", "partial": "yellow", "missing": "red"}


def _state(row: dict, count: bool = False) -> str:
    text = f"{row['done']}/{row['total']}" if count and row["state"] == "partial" else row["state"]
    return f"[{_STATE[row['state']]}]{text}[/{_STATE[row['state']]}]"


def _status_tables(plan, rows: list[dict], wide: bool) -> list:
    """Stages (prepare, families, fit) as one table; unlearning as a method x forget-set grid, whose
    cells are done, k/N (partial) or missing; the tuning grid points below it. --wide adds ids and bytes."""
    from rich import box

    out = [f"config [bold]{escape(plan.cfg.name)}[/bold], store {escape(plan.store.root)}"]
    stages = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("stage", "state", "done", "detail") + (("id", "bytes") if wide else ()):
        stages.add_column(col, no_wrap=col in ("stage", "state", "done", "id"),
                          justify="right" if col in ("done", "bytes") else "left")
    for r in rows:
        if r["section"] not in ("prepare", "train", "fit"):
            continue
        cells = [escape(r["stage"]), _state(r), f"{r['done']}/{r['total']}", escape(r["detail"])]
        stages.add_row(*cells, *((r["id"] or "–", _human(r["bytes"])) if wide else ()))
    out.append(stages)
    unlearn = [r for r in rows if r["section"] == "unlearn"]
    if unlearn:
        forget_sets = list(dict.fromkeys(r["forget_set"] for r in unlearn))
        out.append(f"unlearning, {unlearn[0]['total']} models per method and forget set:")
        grid = Table(box=box.SIMPLE_HEAD, pad_edge=False)
        grid.add_column("method", no_wrap=True)
        for fs in forget_sets:
            grid.add_column(escape(fs), no_wrap=not wide)
        for method in dict.fromkeys(r["method"] for r in unlearn):
            cells = {r["forget_set"]: r for r in unlearn if r["method"] == method}
            grid.add_row(escape(method), *(_cell(cells[fs], wide) for fs in forget_sets))
        out.append(grid)
    tune = [r for r in rows if r["section"] == "tune"]
    if tune:
        out.append("hyperparameter grids, per set they are scored on:")
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
        for col in ("method", "set", "point", "state", "hyperparameters") + (("id", "bytes") if wide else ()):
            table.add_column(col, no_wrap=col != "hyperparameters")
        for r in tune:
            point = f"#{r['point']}" + (" chosen" if r["chosen"] else "")
            where = r["forget_set"] + (" (upper bound)" if r.get("upper_bound") else "")
            table.add_row(escape(r["method"]), escape(where), point, _state(r, count=True),
                          escape(_hparams_diff(r, tune)), *((r["id"], _human(r["bytes"])) if wide else ()))
        out.append(table)
    return out


def _cell(row: dict, wide: bool) -> str:
    if row["id"] is None:
        return "[red]missing[/red]" + (f" ({escape(row['detail'])})" if wide else "")
    return _state(row, count=True) + (f"\n{row['id']} {_human(row['bytes'])}" if wide else "")


def _hparams_diff(row: dict, rows: list[dict]) -> str:
    """The hyperparameters in which this grid point differs from the method's other points."""
    others = [r["hparams"] for r in rows if r["method"] == row["method"]]
    keys = [k for k in row["hparams"] if any(o[k] != row["hparams"][k] for o in others)]
    return ", ".join(f"{k}={row['hparams'][k]}" for k in keys)


@app.command()
def train(config: str = ConfigArg, set_: Optional[list[str]] = SetOpt,
          family: Optional[list[str]] = typer.Option(None, "--family", help="full, subset, oracle (repeatable)")):
    """Train the model families (pending blocks only) as Ray tasks."""
    from pipeline.stages.prepare import run_prepare
    from pipeline.stages.train import run_train

    def go():
        plan = _plan(config, set_)
        kinds = tuple(family or ("full", "subset", "oracle"))
        bad = [k for k in kinds if k not in ("full", "subset", "oracle")]
        if bad:
            from pipeline.config import ConfigError

            raise ConfigError(f"--family {bad[0]!r}: valid families are full, subset, oracle")
        run_prepare(plan)
        out = run_train(plan, kinds)
        console.print(f"train: {out['trained']} models trained", highlight=False)

    _guard(go)


@app.command()
def fit(config: str = ConfigArg, set_: Optional[list[str]] = SetOpt):
    """Fit datamodels (attribution matrices) from the subset models."""
    from pipeline.stages.fit import run_fit

    def go():
        summary = run_fit(_plan(config, set_))
        console.print(f"fit: {summary['estimator']} on {summary['models']} models, mean LDS {summary['lds_mean']}",
                      highlight=False)

    _guard(go)


@app.command()
def unlearn(config: str = ConfigArg, set_: Optional[list[str]] = SetOpt):
    """Run every configured unlearning method on the full models, for each forget set."""
    from pipeline.stages.unlearn import run_unlearn

    def go():
        chosen = run_unlearn(_plan(config, set_))
        for method, per_set in chosen.items():
            for forget_set, hp in per_set.items():
                console.print(f"unlearn {method} on {forget_set}: {hp}", highlight=False)

    _guard(go)


@app.command()
def evaluate(config: str = ConfigArg, set_: Optional[list[str]] = SetOpt, json_out: bool = typer.Option(False, "--json"),
             method: Optional[list[str]] = typer.Option(None, "--method", help="only this method (repeatable; the "
                                                        "floor and do-nothing rows stay)"),
             forget_set: Optional[list[str]] = typer.Option(None, "--forget-set", help="only this reported forget "
                                                            "set (repeatable)")):
    """KLoM, accuracies, MIA and compute per method and forget set (printed; `report` writes files). Rows are
    kept in the store and scored again only when what they read changed: on a finished store it answers
    at once, without torch or Ray."""
    from pipeline.evaluate.rowcache import recall_evaluation, remember_evaluation, store_fingerprint

    def go():
        plan = _plan(config, set_)
        filters = _evaluate_filters(plan, method, forget_set)
        plan.store.check_reachable(create=False)
        plan.prepared_meta()  # not prepared: said so here, before the forget sets are drawn
        record = recall_evaluation(plan, filters)
        if record is None:
            fingerprint = store_fingerprint(plan)  # before scoring: a change meanwhile is seen next time
            from pipeline.stages.report import collect_rows

            # with --json stdout is the JSON alone: the rows' progress goes to stderr
            with contextlib.redirect_stdout(sys.stderr) if json_out else contextlib.nullcontext():
                rows = collect_rows(plan, "evaluate", filters["methods"], filters["forget_sets"])
            summary = json.loads(json.dumps([{k: v for k, v in r.items() if k not in ("per_point", "_groups")}
                                             for r in rows], default=float))
            record = {"rows": summary, "table": _evaluate_cells(summary)}
            remember_evaluation(plan, filters, fingerprint, record)
        if json_out:
            print(json.dumps(record["rows"], indent=1))
            return
        table = Table(title=escape("KLoM P95 against the eval oracles: the retrain row's own (the floor), the others "
                                   "as multiples of it [bootstrap 95% interval]; = overlaps the floor, ~ overlaps "
                                   "do-nothing, sat saturated; headlines as the report defines them"))
        for col in EVALUATE_COLUMNS:
            table.add_column(col)
        for cells in record["table"]:
            table.add_row(*(escape(c) for c in cells))
        console.print(table)

    _guard(go)


EVALUATE_COLUMNS = ("forget set", "method", "headline", "forget", "retain", "val", "forget acc", "MIA", "compute")


def _evaluate_cells(rows: list[dict]) -> list[list[str]]:
    """The evaluate table's cells (EVALUATE_COLUMNS), kept with the evaluation so a recalled one prints
    without importing the report (torch, Ray)."""
    from pipeline.stages.report import p95_cell

    return [[r["forget_set"], r["method"] + (" (upper bound)" if r.get("optimistic") else ""), r["headline"],
             *(p95_cell(r, g) for g in ("forget", "retain", "val")),
             _num(r["accuracy"]["forget"], 2), f"{r['mia']:.2f}", _num(r["compute"], 4)] for r in rows]


def _evaluate_filters(plan, methods: Optional[list[str]], forget_sets: Optional[list[str]]) -> dict:
    """--method / --forget-set checked against the config (ConfigError naming the unknown one)."""
    from pipeline.config import ConfigError

    known = {"--method": list(plan.cfg.unlearn.methods), "--forget-set": [fs.name for fs in plan.cfg.forget_sets]}
    for flag, given in (("--method", methods), ("--forget-set", forget_sets)):
        for name in given or ():
            if name not in known[flag]:
                raise ConfigError(f"{flag} {name!r}: not in the config (it has {', '.join(known[flag]) or 'none'})")
    return {"methods": sorted(set(methods)) if methods else None,
            "forget_sets": sorted(set(forget_sets)) if forget_sets else None}


@app.command()
def report(config: str = ConfigArg, set_: Optional[list[str]] = SetOpt,
           out: Optional[str] = typer.Option(None, "--out", help="folder for report.md/json and plots")):
    """Write report.md, report.json and plots, from the store alone (at once when the report there shows
    what the store holds now)."""
    from pipeline.evaluate.rowcache import remember_report, report_is_current, store_fingerprint
    from pipeline.store.runrecord import report_path

    def go():
        plan = _plan(config, set_)
        path = report_path(plan.cfg, plan.store, out)
        plan.store.check_reachable(create=False)
        plan.prepared_meta()  # not prepared: said so here, before the forget sets are drawn
        if report_is_current(plan, path):
            console.print(f"report: {path / 'report.md'} (up to date: nothing it reads changed)", highlight=False)
            return
        fingerprint = store_fingerprint(plan)
        from pipeline.stages.report import write_report

        path = write_report(plan, out)
        remember_report(plan, path, fingerprint)
        console.print(f"report: {path / 'report.md'}", highlight=False)

    _guard(go)


@app.command()
def run(config: str = ConfigArg, set_: Optional[list[str]] = SetOpt, data_root: Optional[str] = DataRootOpt,
        out: Optional[str] = typer.Option(None, "--out", help="folder for the report")):
    """Every stage in order, each skipped when its outputs are complete; then the report."""

    def go():
        path = _finished(config, set_, out)  # before importing torch and Ray: a finished run answers at once
        if path is None:
            from pipeline.stages.run import run_all

            path = run_all(_plan(config, set_, data_root), out)
        console.print(f"report: {path / 'report.md'}", highlight=False)

    _guard(go)


query_app = typer.Typer(help="Read precomputed attribution matrices.", no_args_is_help=True)
app.add_typer(query_app, name="query")


def _points_table(title: str, result: dict) -> Table:
    table = Table(title=title)
    for col in ("direction", "index", "split", "label", "value"):
        table.add_column(col)
    for direction, points in result.items():
        for p in points:
            table.add_row(direction, str(p.index), p.split, str(p.label), f"{p.value:+.5f}")
    return table


def _emit(result, json_out: bool, title: str) -> None:
    if json_out:
        print(json.dumps({d: [p.as_dict() for p in pts] for d, pts in result.items()}, indent=1))
    else:
        console.print(_points_table(title, result))


@query_app.command("top-k")
def query_top_k(config: str = ConfigArg, target: int = typer.Option(..., "--target"), k: int = typer.Option(10, "--k"),
                set_: Optional[list[str]] = SetOpt, json_out: bool = typer.Option(False, "--json")):
    """Training points with the most positive / negative effect on a target's margin."""
    from pipeline.stages.query import open_attribution

    _guard(lambda: _emit(open_attribution(config, set_ or []).top_k(target, k), json_out, f"target {target}"))


@query_app.command("row")
def query_row(config: str = ConfigArg, train_index: int = typer.Option(..., "--index"), k: int = typer.Option(10, "--k"),
              set_: Optional[list[str]] = SetOpt, json_out: bool = typer.Option(False, "--json")):
    """Targets a training point moves most."""
    from pipeline.stages.query import open_attribution

    _guard(lambda: _emit(open_attribution(config, set_ or []).row_top_k(train_index, k), json_out,
                         f"training point {train_index}"))


@query_app.command("self-influence")
def query_self_influence(config: str = ConfigArg, k: int = typer.Option(10, "--k"), set_: Optional[list[str]] = SetOpt,
                         json_out: bool = typer.Option(False, "--json")):
    """Self-influence theta[i, i] of every training point: the k highest and the k lowest (a value tied
    beyond the cut, e.g. exact zeros, is left out and counted in a note)."""
    from pipeline.stages.query import open_attribution, ranked_ends

    def go():
        am = open_attribution(config, set_ or [])
        result, notes = ranked_ends(am.self_influence(), k, am._point)
        if json_out:
            print(json.dumps({**{d: [p.as_dict() for p in pts] for d, pts in result.items()}, "notes": notes}, indent=1))
            return
        console.print(_points_table("self-influence theta[i, i]", result))
        for note in notes:
            console.print(note, highlight=False)

    _guard(go)


@query_app.command("predict")
def query_predict(config: str = ConfigArg, forget_set: str = typer.Option(..., "--forget-set"),
                  model: int = typer.Option(0, "--model", help="which full model"),
                  set_: Optional[list[str]] = SetOpt, json_out: bool = typer.Option(False, "--json")):
    """dm-direct's predicted margins after removing a forget set from full model --model, beside the
    full model's and the forget set's eval oracles' (retrained without it: mean and standard deviation)."""
    from pipeline.stages.query import QueryError, open_attribution

    def go():
        am = open_attribution(config, set_ or [])
        plan = am.plan
        if forget_set not in plan.forget_sets:
            raise QueryError(f"unknown forget set {forget_set!r}; known: {sorted(plan.forget_sets)}")
        n_full = plan.cfg.train.full.models
        if not 0 <= model < n_full:
            raise QueryError(f"--model {model} is out of range: 0..{n_full - 1}")
        oracles = am.oracle_margins(forget_set)
        logits = am.full_logits(model)
        out = am.predict(plan.forget_sets[forget_set], logits, am.labels)
        forget = plan.forget_sets[forget_set]
        full_m = am.full_margins(model)
        rows = [{"index": int(i), "label": int(am.labels[i]), "full_margin": float(full_m[i]),
                 "predicted_margin": float(out["margins"][i]), "oracle_margin_mean": float(oracles[:, i].mean()),
                 "oracle_margin_std": float(oracles[:, i].std())} for i in forget]
        if json_out:
            print(json.dumps({"forget_set": forget_set, "model": model, "oracles": len(oracles), "points": rows}, indent=1))
            return
        table = Table(title=f"dm-direct on forget set {forget_set}, full model {model}; oracles: the "
                            f"{len(oracles)} eval oracles retrained without it")
        for col in ("index", "label", "full margin", "predicted margin", "oracle mean", "oracle std"):
            table.add_column(col, justify="left" if col == "label" else "right")
        for r in rows:
            table.add_row(str(r["index"]), str(r["label"]), f"{r['full_margin']:+.3f}", f"{r['predicted_margin']:+.3f}",
                          f"{r['oracle_margin_mean']:+.3f}", f"{r['oracle_margin_std']:.3f}")
        console.print(table)

    _guard(go)


def _num(x, digits: int) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


import pipeline.cli.lifecycle  # noqa: E402,F401 - registers ls, gc, import-margins, export on the app


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
