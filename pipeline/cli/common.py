"""What the `oracle-farm` command groups share: the typer app they register on, the consoles, the common
options, the config-to-plan helper and the guard that turns errors into exit codes (0 ok, 2 bad input,
1 failure). Imports no command module, so `pipeline.cli` and `pipeline.cli.lifecycle` form no cycle.
"""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(add_completion=False, no_args_is_help=True, help="oracle-farm: model farms, datamodels, unlearning, KLoM.")
console = Console()
err = Console(stderr=True)

SetOpt = typer.Option(None, "--set", help="override a config field, e.g. --set train.epochs=3 (repeatable)")
DataRootOpt = typer.Option(None, "--data-root", help="local folder holding the dataset (cifar10)")


def _bad_input_errors() -> tuple[type, ...]:
    from pipeline.config import ConfigError
    from pipeline.data.datasets import DataError
    from pipeline.data.forget_sets import ForgetSetError
    from pipeline.plan import StageError
    from pipeline.store import StoreError

    from pipeline.maintenance.exchange import ExchangeError
    from pipeline.store.lease import LeaseHeld

    errors = [ConfigError, DataError, ForgetSetError, StageError, StoreError, LeaseHeld, ExchangeError]
    try:
        from pipeline.stages.query import QueryError

        errors.append(QueryError)
    except ImportError:
        pass
    return tuple(errors)


def _plan(config: str, overrides: Optional[list[str]], data_root: Optional[str] = None):
    from pipeline.config import load_config
    from pipeline.plan import Plan
    from pipeline.store import Store

    cfg = load_config(config, overrides or [])
    return Plan(cfg, Store(cfg.store), data_root)


def _finished(config: str, overrides: Optional[list[str]], out: Optional[str]):
    from pipeline.config import load_config
    from pipeline.store import Store
    from pipeline.store.runrecord import finished_run

    cfg = load_config(config, overrides or [])
    return finished_run(cfg, Store(cfg.store), out)


def _guard(fn):
    """Run fn; bad input exits 2 with its message, any other failure exits 1."""
    try:
        return fn()
    except _bad_input_errors() as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2)
    except typer.Exit:
        raise
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        err.print(f"[red]failed:[/red] {type(exc).__name__}: {escape(str(exc))}", highlight=False)
        raise typer.Exit(1)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.0f} PiB"
