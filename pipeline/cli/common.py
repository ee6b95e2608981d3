"""What the `oracle-farm` command groups share: the typer app they register on, the consoles, the common
options, the config-to-plan helper and the guard that turns errors into exit codes (0 ok, 2 bad input,
1 failure). Imports no command module, so `pipeline.cli` and `pipeline.cli.lifecycle` form no cycle.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(add_completion=False, no_args_is_help=True, help="oracle-farm: model farms, datamodels, unlearning, KLoM.")


def _console(stderr: bool = False) -> Console:
    """A terminal gets rich's layout at its width; a pipe or a file (logs, `| tee`) gets every line and
    table whole, never cut or wrapped (COLUMNS, when set, still decides)."""
    stream = sys.stderr if stderr else sys.stdout
    whole = not (hasattr(stream, "isatty") and stream.isatty()) and not os.environ.get("COLUMNS")
    return Console(stderr=stderr, width=UNLIMITED_WIDTH if whole else None, soft_wrap=whole)


UNLIMITED_WIDTH = 100_000
console = _console()
err = _console(stderr=True)

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
    from pipeline.unlearn import MethodError

    errors = [ConfigError, DataError, ForgetSetError, StageError, StoreError, LeaseHeld, ExchangeError, MethodError]
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
    """Run fn; bad input exits 2 with its message, any other failure exits 1. A failure inside a Ray
    task reads as its cause (Ray's wrapper repeats the worker's traceback, with terminal colours)."""
    try:
        return fn()
    except typer.Exit:
        raise
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        cause = _task_cause(exc)
        if isinstance(cause, _bad_input_errors()):
            err.print(f"[red]error:[/red] {escape(str(cause))}", highlight=False)
            raise typer.Exit(2)
        err.print(f"[red]failed:[/red] {type(cause).__name__}: {escape(str(cause))}", highlight=False)
        raise typer.Exit(1)


def _task_cause(exc: BaseException) -> BaseException:
    """The exception a Ray task raised, for one that Ray re-raised in this process; else exc."""
    ray_exceptions = sys.modules.get("ray.exceptions")  # a command that never started Ray imports none of it
    if ray_exceptions is not None and isinstance(exc, ray_exceptions.RayTaskError) and exc.cause is not None:
        return _task_cause(exc.cause)
    return exc


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.0f} PiB"
