"""`oracle-farm` command line. Exit codes: 0 ok, 2 bad input, 1 failure."""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="oracle-farm: model farms, datamodels, unlearning, KLoM.")
console = Console()
err = Console(stderr=True)

SetOpt = typer.Option(None, "--set", help="override a config field, e.g. --set train.epochs=3 (repeatable)")
DataRootOpt = typer.Option(None, "--data-root", help="local folder holding the dataset (cifar10)")


def _bad_input_errors() -> tuple[type, ...]:
    from pipeline.config import ConfigError
    from pipeline.data.datasets import DataError
    from pipeline.data.forget_sets import ForgetSetError
    from pipeline.stages import StageError
    from pipeline.store import StoreError

    errors = [ConfigError, DataError, ForgetSetError, StageError, StoreError]
    try:
        from pipeline.query import QueryError

        errors.append(QueryError)
    except ImportError:
        pass
    return tuple(errors)


def _plan(config: str, overrides: Optional[list[str]], data_root: Optional[str] = None):
    from pipeline.config import load_config
    from pipeline.stages import Plan
    from pipeline.store import Store

    cfg = load_config(config, overrides or [])
    return Plan(cfg, Store(cfg.store), data_root)


def _guard(fn):
    """Run fn; bad input exits 2 with its message, any other failure exits 1."""
    try:
        return fn()
    except _bad_input_errors() as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2)
    except typer.Exit:
        raise
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        err.print(f"[red]failed:[/red] {type(exc).__name__}: {exc}", highlight=False)
        raise typer.Exit(1)


@app.command()
def config(config: str, set_: Optional[list[str]] = SetOpt, data_root: Optional[str] = DataRootOpt):
    """Print the resolved config and every stage identity."""
    from pipeline.config import to_yaml

    def go():
        plan = _plan(config, set_, data_root)
        console.print(to_yaml(plan.cfg), highlight=False)
        table = Table(title="stage identities")
        table.add_column("stage")
        table.add_column("id")
        table.add_column("path")
        for label, ref in plan.all_stage_refs():
            table.add_row(label, ref.id, plan.store.url(ref.rel))
        console.print(table)

    _guard(go)


@app.command()
def prepare(config: str, set_: Optional[list[str]] = SetOpt, data_root: Optional[str] = DataRootOpt):
    """Write the dataset as FFCV files and validate the forget sets."""
    from pipeline.stages import run_prepare

    def go():
        plan = _plan(config, set_, data_root)
        meta = run_prepare(plan)
        console.print(f"prepare {plan.prepare.id}: {meta['n_train']} train, {meta['n_val']} val, "
                      f"shape {meta['shape']} -> {plan.store.url(plan.prepare.rel)}", highlight=False)

    _guard(go)


@app.command()
def status(config: str, set_: Optional[list[str]] = SetOpt, json_out: bool = typer.Option(False, "--json")):
    """For each stage: identity, done / partial / missing, models or blocks done, bytes."""
    from pipeline.stages import stage_status

    def go():
        rows = stage_status(_plan(config, set_))
        if json_out:
            print(json.dumps(rows, indent=1))
            return
        table = Table(title="oracle-farm status")
        for col in ("stage", "id", "state", "done", "detail", "bytes"):
            table.add_column(col)
        for r in rows:
            colour = {"done": "green", "partial": "yellow"}.get(r["state"], "red")
            table.add_row(r["stage"], r["id"], f"[{colour}]{r['state']}[/{colour}]", f"{r['done']}/{r['total']}",
                          r.get("detail", ""), _human(r["bytes"]))
        console.print(table)

    _guard(go)


@app.command()
def train(config: str, set_: Optional[list[str]] = SetOpt,
          family: Optional[list[str]] = typer.Option(None, "--family", help="full, subset, oracle (repeatable)")):
    """Train the model families (pending blocks only) as Ray tasks."""
    from pipeline.stages import run_prepare, run_train

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


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.0f} PiB"


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
