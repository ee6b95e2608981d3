"""Method registry: name -> a method, an object with a frozen pydantic `Config`, `run` and `NEEDS`
(see base.py). `retrain` is not run on full models: its row is the reference oracles (decision 17).

A name is resolved the same way in the driver and in every Ray worker (decision 37), first match wins:
  1. a built-in (`METHODS`: a module of this package);
  2. an entry point of the group `oracle_farm.methods` of any installed distribution, by its name;
  3. `module:attr` (a name with a colon), imported as written.
A plugin (2, 3) is any object with `Config` (a pydantic model that forbids unknown fields), `run` and,
optionally, `NEEDS`: a module, a class, or `Method(...)` / `pipeline.unlearn.adapter.per_member(...)`.
Its stage identity includes who provides it (`method_provider`). Docs: docs/write-your-own-method.md.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib
import itertools
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable

METHODS = {
    "do_nothing": "pipeline.unlearn.do_nothing",
    "finetune": "pipeline.unlearn.finetune",
    "gradient_ascent": "pipeline.unlearn.gradient_ascent",
    "neggrad_plus": "pipeline.unlearn.neggrad_plus",
    "scrub": "pipeline.unlearn.scrub",
    "dm_direct": "pipeline.unlearn.dm_direct",
    "oracle_matching": "pipeline.unlearn.oracle_matching",
    "dmm": "pipeline.unlearn.dmm",
    "del": "pipeline.unlearn.del_",
    "sfron": "pipeline.unlearn.sfron",
    "camu": "pipeline.unlearn.camu",
}
# name -> its class in pipeline/unlearn/hparams.py (the method's module re-exports it as `Config`)
CONFIGS = {"do_nothing": "DoNothing", "finetune": "Finetune", "gradient_ascent": "GradientAscent",
           "neggrad_plus": "NeggradPlus", "scrub": "Scrub", "dm_direct": "DmDirect",
           "oracle_matching": "OracleMatching", "dmm": "Dmm", "del": "Del", "sfron": "Sfron", "camu": "Camu"}
REFERENCE_ROW = "retrain"
ENTRY_POINT_GROUP = "oracle_farm.methods"
KNOWN_NEEDS = ("datamodels", "target_oracles")  # what a method's context can serve (base.Context)


class MethodError(KeyError):
    """An unknown method, or a plugin that cannot be imported or is not a method. A KeyError, as an
    unknown name has always been: `args[0]` is the whole message."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class Method:
    """A method built from parts, e.g. by a plugin: `Config` a pydantic model, `run` as in base.py."""

    Config: type
    run: Callable
    NEEDS: tuple[str, ...] = ()


@dataclass(frozen=True)
class Resolved:
    method: Any  # the module or object with Config, run and NEEDS
    provider: dict | None  # None for a built-in; else who provides it (part of the stage identity)


def get_method(name: str):
    """The method (a module or object with `Config`, `run`, and `NEEDS`, what its context must serve)."""
    if name in METHODS:
        return importlib.import_module(METHODS[name])
    return resolve(name).method


def method_config(name: str):
    """The method's hyperparameter model; for a built-in without importing the method (or torch)."""
    if name in METHODS:
        from pipeline.unlearn import hparams

        return getattr(hparams, CONFIGS[name])
    return resolve(name).method.Config


def method_needs(name: str) -> tuple[str, ...]:
    """What the method's context must serve (datamodels, target_oracles); for a built-in without importing it."""
    if name in METHODS:
        from pipeline.unlearn.hparams import NEEDS

        return NEEDS[name]
    return tuple(resolve(name).method.NEEDS)


def method_provider(name: str) -> dict | None:
    """None for a built-in; for a plugin its distribution's name and version (or, for a `module:attr`
    outside any distribution, the module and its source's sha256): part of the unlearn stage identity."""
    return None if name in METHODS else resolve(name).provider


def plugin_methods() -> dict[str, str]:
    """Entry-point name -> `distribution version` of every installed method plugin (not imported)."""
    return {ep.name: _dist_label(ep) for ep in _entry_points()}


@functools.lru_cache(maxsize=None)
def resolve(name: str) -> Resolved:
    """A built-in, an entry point, or `module:attr` (module docstring); MethodError naming what failed."""
    if name in METHODS:
        return Resolved(importlib.import_module(METHODS[name]), None)
    points = [ep for ep in _entry_points() if ep.name == name]
    if len({_dist_label(ep) for ep in points}) > 1:
        raise MethodError(f"method {name!r} is provided by more than one installed distribution: "
                          f"{', '.join(sorted({_dist_label(ep) for ep in points}))}; uninstall all but one")
    if points:
        ep = points[0]
        where = f"entry point {name!r} = {ep.value!r} of {_dist_label(ep)} (group {ENTRY_POINT_GROUP})"
        obj = _load(where, ep.load)
        dist = ep.dist
        provider = {"distribution": dist.metadata["Name"], "version": dist.version} if dist else {"entry_point": ep.value}
        return Resolved(_checked(obj, where), provider)
    if ":" in name:
        module_name, _, attr = name.partition(":")
        where = f"method {name!r} (module:attr)"
        module = _load(where, lambda: importlib.import_module(module_name))
        if not attr or not hasattr(module, attr):
            raise MethodError(f"{where}: module {module_name!r} has no attribute {attr!r}")
        return Resolved(_checked(getattr(module, attr), where), _module_provider(module))
    raise MethodError(_unknown(name))


def _unknown(name: str) -> str:
    plugins = sorted(plugin_methods())
    close = difflib.get_close_matches(name, list(METHODS) + plugins + [REFERENCE_ROW], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    installed = f"; installed plugins: {', '.join(plugins)}" if plugins else ""
    return (f"unknown method {name!r}{hint}; valid: {', '.join(sorted(METHODS))}, {REFERENCE_ROW}{installed}; "
            f"or a plugin's `module:attr`")


def _entry_points() -> list:
    return list(metadata.entry_points(group=ENTRY_POINT_GROUP))


def _dist_label(ep) -> str:
    dist = ep.dist
    return f"{dist.metadata['Name']} {dist.version}" if dist else "an unknown distribution"


def _load(where: str, load: Callable):
    try:
        return load()
    except Exception as exc:  # noqa: BLE001 - whatever a plugin raises on import, name the plugin
        raise MethodError(f"{where} cannot be imported: {type(exc).__name__}: {exc}") from exc


def _checked(obj, where: str):
    """obj if it is a method (Config, run, NEEDS as the built-ins have them), else MethodError saying what lacks."""
    from pydantic import BaseModel

    config = getattr(obj, "Config", None)
    if not (isinstance(config, type) and issubclass(config, BaseModel)):
        raise MethodError(f"{where} is not a method: it needs `Config`, a pydantic model of its hyperparameters "
                          "(derive it from pipeline.unlearn.hparams.MethodConfig)")
    settings = config.model_config
    if settings.get("extra") != "forbid" or not settings.get("frozen"):
        raise MethodError(f"{where}: its Config must forbid unknown fields and be frozen "
                          "(derive it from pipeline.unlearn.hparams.MethodConfig)")
    if not callable(getattr(obj, "run", None)):
        raise MethodError(f"{where} is not a method: it needs `run(ctx, model, forget, retain, cfg, meter)`")
    needs = getattr(obj, "NEEDS", ())
    unknown = [n for n in (needs if isinstance(needs, (tuple, list)) else [needs]) if n not in KNOWN_NEEDS]
    if not isinstance(needs, (tuple, list)) or unknown:
        raise MethodError(f"{where}: NEEDS must be a tuple of {', '.join(KNOWN_NEEDS)}; got {needs!r}")
    return obj


def _module_provider(module) -> dict:
    """Who provides a `module:attr`: the installed distribution holding its top-level package, else the
    module's own source (its sha256: an edit is a new method)."""
    top = module.__name__.split(".")[0]
    dists = metadata.packages_distributions().get(top, [])
    if len(dists) == 1:
        return {"distribution": dists[0], "version": metadata.version(dists[0])}
    source = getattr(module, "__file__", None)
    if source is None:
        raise MethodError(f"method module {module.__name__!r} has neither a distribution nor a source file "
                          "to identify it by")
    with open(source, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return {"module": module.__name__, "sha256": digest}


def expand_grid(name: str, params: dict | list[dict]) -> list:
    """Validated configs for every point of the grid a method's params describe (a list is an axis).
    A list of such dicts is the union of their grids, in order (settings that are no product, e.g.
    SCRUB's two published recipes)."""
    if isinstance(params, list):
        return [point for part in params for point in expand_grid(name, part)]
    config_cls = method_config(name)
    axes = {k: (v if isinstance(v, list) else [v]) for k, v in (params or {}).items()}
    keys = list(axes)
    return [config_cls.model_validate(dict(zip(keys, combo))) for combo in itertools.product(*axes.values())]

