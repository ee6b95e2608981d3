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



def _conventional_help() -> None:
    """This typer writes a required argument as `{config}` in the usage line and each value's type as
    `<str>`, `<list[str]>`, `<bool>` (for a flag): help says CONFIG, and a value's metavar (or click's
    TEXT / INTEGER), as click and most command lines do. Guarded: another typer keeps its own."""
    from typer import core

    argument, option = getattr(core, "TyperArgument", None), getattr(core, "TyperOption", None)
    if argument is not None and hasattr(argument, "_usage_display_name"):
        def usage_name(self) -> str:
            name = self.display_name_raw.upper() + ("..." if self.nargs != 1 else "")
            return name if self.required else f"[{name}]"

        argument._usage_display_name = usage_name
        argument._rich_display_name = lambda self: self.display_name_raw.upper()
        argument.display_type_rich = lambda self, ctx: None
    if option is not None and hasattr(option, "display_type_rich"):
        names = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "list[str]": "TEXT"}

        def value_name(self, ctx) -> str | None:
            if self.is_flag:
                return None
            return self.metavar or names.get(self.bare_type(), self.bare_type().upper())

        option.display_type_rich = value_name


_conventional_help()
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="oracle-farm: model farms, datamodels, unlearning, KLoM.")


def _console(stderr: bool = False) -> Console:
    """A terminal gets rich's layout at its width; a pipe or a file (logs, `| tee`) gets every line and
    table whole, never cut or wrapped (COLUMNS, when set, still decides)."""
    stream = sys.stderr if stderr else sys.stdout
    whole = not (hasattr(stream, "isatty") and stream.isatty()) and not os.environ.get("COLUMNS")
    return Console(stderr=stderr, width=UNLIMITED_WIDTH if whole else None, soft_wrap=whole)


UNLIMITED_WIDTH = 100_000
console = _console()
err = _console(stderr=True)


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("oracle-farm")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def _print_version(value: bool) -> None:
    if value:
        print(f"oracle-farm {_version()}")
        raise typer.Exit(0)


@app.callback()
def _main(version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                       help="print the version and exit")):
    """oracle-farm: model farms, datamodels, unlearning, KLoM."""

ConfigArg = typer.Argument(..., metavar="CONFIG", help="the config file (YAML; a relative `store:` in it is "
                                                       "resolved against its folder)")
SetOpt = typer.Option(None, "--set", metavar="KEY=VALUE",
                      help="override a config field, e.g. --set train.epochs=3 (repeatable)")
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
    except BrokenPipeError:  # stdout closed early (`| head`): end quietly, exit 1 as rich's console does
        _silence_stdout()
        raise typer.Exit(1)
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        cause = _task_cause(exc)
        if isinstance(cause, _bad_input_errors()):
            err.print(f"[red]error:[/red] {escape(str(cause))}", highlight=False)
            raise typer.Exit(2)
        err.print(f"[red]failed:[/red] {type(cause).__name__}: {escape(str(cause))}", highlight=False)
        raise typer.Exit(1)


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that Python's flush at exit does not fail on the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


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
