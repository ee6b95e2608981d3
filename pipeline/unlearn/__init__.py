"""Method registry: name -> module defining a frozen `Config` and `run` (see base.py).
`retrain` is not run on full models: its row is the reference oracles (decision 17)."""

from __future__ import annotations

import difflib
import importlib
import itertools

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


def get_method(name: str):
    """The method's module (with `Config`, `run`, and `NEEDS`, a tuple of what its context must serve)."""
    _check_name(name)
    return importlib.import_module(METHODS[name])


def _check_name(name: str) -> None:
    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS) + [REFERENCE_ROW], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise KeyError(f"unknown method {name!r}{hint}; valid: {', '.join(sorted(METHODS))}, {REFERENCE_ROW}")


def method_config(name: str):
    """The method's hyperparameter model, without importing the method (or torch)."""
    from pipeline.unlearn import hparams

    _check_name(name)
    return getattr(hparams, CONFIGS[name])


def method_needs(name: str) -> tuple[str, ...]:
    """What the method's context must serve (datamodels, target_oracles), without importing it."""
    from pipeline.unlearn.hparams import NEEDS

    _check_name(name)
    return NEEDS[name]


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
