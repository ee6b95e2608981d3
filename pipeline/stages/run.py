"""`oracle-farm run`: every stage in order, each skipped when complete, then the report."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

from pipeline.maintenance.lifecycle import reached_by
from pipeline.plan import Plan
from pipeline.stages.fit import run_fit
from pipeline.stages.prepare import run_prepare
from pipeline.stages.report import is_current, report_key, write_report
from pipeline.stages.train import run_train
from pipeline.stages.unlearn import check_needs, method_grids, run_unlearn
from pipeline.store.runrecord import report_dir, report_path, write_record
from pipeline.unlearn import get_method


def run_all(plan: Plan, out_dir: str | None = None, timings: dict[str, float] | None = None) -> Path:
    """Every stage in order; timings, when given, receives each step's wall seconds (prepare, train,
    fit, unlearn, report, record)."""
    timings = {} if timings is None else timings

    @contextmanager
    def timed(name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - start

    grids = method_grids(plan.cfg)  # bad method names or hyperparameters stop before any work
    check_needs(plan, grids)
    _ = plan.forget_sets  # so do bad forget sets (a tuning set sharing a reported set's point), before the store
    with timed("prepare"):
        run_prepare(plan)
    with timed("train"):
        run_train(plan)
    if any("datamodels" in get_method(m).NEEDS for m in grids) or plan.cfg.train.subset.models > 1:
        with timed("fit"):
            run_fit(plan)
    with timed("unlearn"):
        chosen = {m: {fs: get_method(m).Config.model_validate(hp) for fs, hp in per_set.items()}
                  for m, per_set in run_unlearn(plan).items()}
    with timed("report"):
        key = report_key(plan, chosen)
        out = report_path(plan.cfg, plan.store, out_dir)
        if not is_current(plan, out, key):  # nothing it scores has changed: a finished run recomputes nothing
            out = write_report(plan, out, key)
    with timed("record"):
        stages, others = reached_by(plan)
        write_record(plan.cfg, plan.store, out_dir, key, sorted(stages), sorted(others - {report_dir(plan.cfg)}))
    return out
