"""Evaluation that is instant when nothing changed (issue 30, item 3): report rows are kept in the store
under the ids of what they read and scored again only when an input changed (a row's models rewritten,
the evaluate section); a finished store's `evaluate` answers from its record without importing torch or
Ray; `--method` / `--forget-set` filter the rows; the progress line names the command running."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import REPO, TINY, copy_store, run_many, tiny_plan


@pytest.fixture(scope="module")
def finished(tiny_finished, tmp_path_factory):
    root = copy_store(tiny_finished["root"], tmp_path_factory.mktemp("evalcache") / "store")
    return root, tiny_plan(root)


def _cached(root) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.glob("*/*/derived/scores-*.npz"))}


def _plain(rows: list[dict]) -> list[dict]:
    return json.loads(json.dumps([{k: v for k, v in r.items() if k not in ("per_point", "_groups")} for r in rows],
                                 default=float))


def test_rows_are_read_back_and_rescored_only_where_an_input_changed(finished):
    from pipeline.plan import method_grids, n_unlearned, unlearn_family, unlearn_ref
    from pipeline.stages.report import collect_rows

    root, plan = finished
    first = _cached(root)  # the run's report scored every row once and kept it
    assert len(first) == 1 + len(plan.cfg.unlearn.methods)  # retrain + each method, on random10
    rows = collect_rows(plan)
    assert _cached(root) == first  # every row read back, none written again
    # one row's models rewritten (as a block redone with other values would be): that row alone is rescored
    meta, n = plan.prepared_meta(), n_unlearned(plan.cfg)
    family = unlearn_family(plan, unlearn_ref(plan, "do_nothing", method_grids(plan.cfg)["do_nothing"][0], "random10"), meta)
    saved = {name: family.read(name, n) for name in ("margins", "logits", "accuracy")}
    info = family.markers()[0]["info"]
    changed = {**saved, "margins": saved["margins"] + np.float32(0.5)}
    family.write_block(0, changed, info)
    try:
        again = collect_rows(plan)
        now = _cached(root)
        new = sorted(set(now) - set(first))
        assert len(new) == 1 and new[0].startswith(family.ref.rel)
        assert {k: now[k] for k in first} == first
        by_method = {r["method"]: r for r in _plain(again)}
        assert by_method["do_nothing"]["klom"] != {r["method"]: r for r in _plain(rows)}["do_nothing"]["klom"]
        assert by_method["finetune"]["klom"] == {r["method"]: r for r in _plain(rows)}["finetune"]["klom"]
    finally:
        family.write_block(0, saved, info)
    assert _plain(collect_rows(plan)) == _plain(rows)  # back as it was: the first row's cache again
    # another evaluate section: every row is another row
    rebinned = collect_rows(tiny_plan(root, "evaluate.bins=10"))
    assert len(_cached(root)) == len(first) + 1 + len(first)
    assert _plain(rebinned) != _plain(rows)


FAST = """
import sys, time
t = time.perf_counter()
from pipeline.cli import app
try:
    app(sys.argv[1:], standalone_mode=False)
finally:
    print(f"SECONDS {time.perf_counter() - t:.3f} TORCH {'torch' in sys.modules} RAY {'ray' in sys.modules}",
          file=sys.stderr)
"""


def test_evaluate_is_instant_on_a_finished_store_with_filters_and_its_own_label(finished):
    root, plan = finished
    store = f"store={root}"
    env = {**os.environ, "COLUMNS": "250", "PYTHONPATH": str(REPO)}

    def fast(*args):
        return subprocess.run([sys.executable, "-c", FAST, *args], capture_output=True, text=True, cwd=REPO,
                              env=env, timeout=600)

    slow, filtered, bad = run_many(
        ["evaluate", str(TINY), "--set", store, "--set", "evaluate.bins=12", "--json"],
        ["evaluate", str(TINY), "--set", store, "--method", "finetune", "--json"],
        ["evaluate", str(TINY), "--set", store, "--method", "nope"])
    assert slow.returncode == 0, slow.stderr
    assert "evaluate:" in slow.stderr and "report:" not in slow.stderr  # its rows were new: scored, labelled
    assert filtered.returncode == 0, filtered.stderr
    assert [r["method"] for r in json.loads(filtered.stdout)] == ["retrain", "do_nothing", "finetune"]
    assert bad.returncode == 2 and "--method 'nope': not in the config" in bad.stderr
    t = time.perf_counter()
    again = fast("evaluate", str(TINY), "--set", store, "--set", "evaluate.bins=12", "--json")
    wall = time.perf_counter() - t
    assert again.returncode == 0, again.stderr
    assert "TORCH False RAY False" in again.stderr, again.stderr  # recalled: neither imported
    assert json.loads(again.stdout) == json.loads(slow.stdout)
    print(f"recalled evaluate on the tiny store: {again.stderr.split('SECONDS ')[1].split()[0]} s in the CLI, "
          f"{wall:.2f} s with the interpreter")
    table = fast("evaluate", str(TINY), "--set", store, "--set", "evaluate.bins=12")
    assert table.returncode == 0 and "TORCH False" in table.stderr and "gradient_ascent" in table.stdout


def test_report_is_instant_when_nothing_it_reads_changed(finished, tmp_path):
    from pipeline.evaluate.rowcache import REPORT_RECORD

    root, plan = finished
    out = tmp_path / "report"
    first = run_many(["report", str(TINY), "--set", f"store={root}", "--out", str(out)])[0]
    assert first.returncode == 0, first.stderr
    assert (out / REPORT_RECORD).is_file() and "up to date" not in first.stdout
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    second = subprocess.run([sys.executable, "-c", FAST, "report", str(TINY), "--set", f"store={root}", "--out", str(out)],
                            capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert second.returncode == 0, second.stderr
    assert "up to date" in second.stdout and "TORCH False RAY False" in second.stderr
    (out / "report.md").unlink()  # a report file gone: written again
    third = run_many(["report", str(TINY), "--set", f"store={root}", "--out", str(out)])[0]
    assert third.returncode == 0 and "up to date" not in third.stdout and (out / "report.md").is_file()
