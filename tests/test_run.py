"""`oracle-farm run` end to end on the tiny config, and its no-op re-run: a finished run is recognised
from its run record without importing torch or Ray, and anything it read that changed sends it back
through the stages (which skip finished work block by block)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import zarr

from helpers import TINY, copy_store, tiny_plan

from pipeline.config import load_config
from pipeline.store import Store
from pipeline.store.runrecord import RECORD, finished_run

NO_OP_RUN = """
import sys
from pipeline.cli import app
try:
    app(sys.argv[1:])
except SystemExit as exc:
    assert exc.code in (0, None), exc.code
print("IMPORTED", sorted(m for m in ("torch", "ray", "zarr", "numpy") if m in sys.modules))
"""


@pytest.fixture(scope="module")
def finished(tiny_finished):
    return tiny_finished


def _cfg(root, *overrides):
    cfg = load_config(TINY, [f"store={root}", *overrides])
    return cfg, Store(cfg.store)


def test_run_writes_the_report_and_its_record(finished):
    out = finished["out"]
    assert {"report.md", "report.json", RECORD} <= {p.name for p in out.iterdir()}
    record = json.loads((out / RECORD).read_text())
    assert json.loads((out / "report.json").read_text())["key"] == record["report_key"]
    plan = finished["plan"]
    assert {ref.rel for _, ref in plan.all_stage_refs()} <= set(record["stages"])
    assert finished_run(*_cfg(finished["root"])) == out


def test_a_no_op_rerun_imports_neither_torch_nor_ray_nor_numpy(finished):
    before = (finished["out"] / "report.json").read_bytes()
    proc = subprocess.run([sys.executable, "-c", NO_OP_RUN, "run", str(TINY), "--set", f"store={finished['root']}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "IMPORTED []" in proc.stdout, proc.stdout
    assert f"report: {finished['out'] / 'report.md'}" in proc.stdout.replace("\n", "")
    assert (finished["out"] / "report.json").read_bytes() == before


def test_another_config_is_not_finished(finished):
    assert finished_run(*_cfg(finished["root"], "evaluate.bootstrap=21")) is None
    assert finished_run(*_cfg(finished["root"], "train.full.models=5")) is None
    # execution settings change no output: the same run
    assert finished_run(*_cfg(finished["root"], "execution.block_size=4")) == finished["out"]


@pytest.mark.parametrize("what", ["subset block marker", "fit completion", "report"])
def test_a_changed_store_or_a_missing_report_is_not_finished(finished, what):
    cfg, store = _cfg(finished["root"])
    plan, root = finished["plan"], finished["root"]
    path = {"subset block marker": lambda: sorted((root / plan.subset.rel / "markers").rglob("*.json"))[-1],
            "fit completion": lambda: root / plan.fit.rel / "COMPLETE.json",
            "report": lambda: finished["out"] / "report.md"}[what]()
    assert finished_run(cfg, store) == finished["out"]
    saved = path.read_bytes()
    path.unlink()
    try:
        assert finished_run(cfg, store) is None
    finally:
        path.write_bytes(saved)
    assert finished_run(cfg, store) == finished["out"]


def test_a_rerun_after_a_lost_block_redoes_it_and_rewrites_the_record(finished, tmp_path):
    from pipeline.stages.run import run_all

    root = copy_store(finished["root"], tmp_path / "store")  # another store: a new record
    plan = tiny_plan(root)
    run_all(plan)
    assert finished_run(plan.cfg, plan.store) is not None
    marker = sorted((root / plan.full.rel / "markers").rglob("*.json"))[0]
    marker.unlink()
    assert finished_run(plan.cfg, plan.store) is None
    run_all(plan)
    assert marker.exists()
    assert finished_run(plan.cfg, plan.store) is not None


def test_an_unlearn_block_lost_is_redone_identically_and_nothing_else(finished, tmp_path):
    """Unlearn stages resume like train: a block without a marker (rows of garbage) is redone, bit for
    bit; every other block and stage is left alone (their markers are not rewritten)."""
    from pipeline.stages.run import run_all

    root = copy_store(finished["root"], tmp_path / "store")
    plan = tiny_plan(root)
    unlearn = sorted(p for p in (root / "unlearn").iterdir() if (p / "markers").exists())
    stage = unlearn[-1]
    markers = sorted((stage / "markers").rglob("*.json"))
    lost = markers[0]
    want = {p: p.read_bytes() for p in (root / "unlearn").rglob("markers/**/*.json")}
    block = json.loads(lost.read_text())
    lost.unlink()
    margins = zarr.open_group(str(stage / "arrays.zarr"), mode="r+")["models/margins"]
    expected = margins[:]
    margins[block["start"] : block["end"]] = 0  # what a killed block may leave
    run_all(plan)
    got = zarr.open_group(str(stage / "arrays.zarr"), mode="r")["models/margins"][:]
    np.testing.assert_array_equal(got, expected)
    for path, content in want.items():
        if path != lost:
            assert path.read_bytes() == content, path  # finished blocks untouched
    assert json.loads(lost.read_text())["start"] == json.loads(want[lost])["start"]


def test_streaming_tasks_count_chunks_as_they_come_and_reraise_a_failure(capsys):
    # the fit stage's tasks are Ray generators that yield the targets done chunk by chunk
    import ray

    from pipeline.config import ExecutionConfig
    from pipeline.execution import init_ray, run_streaming_tasks

    def _counting(chunks: list[int], fail_after: int | None = None):  # local: pickled by value for the workers
        for i, k in enumerate(chunks):
            if fail_after is not None and i == fail_after:
                raise RuntimeError("chunk failed")
            yield k

    init_ray(ExecutionConfig(num_cpus=2))
    remote = ray.remote(_counting).options(num_returns="streaming", max_retries=0)
    assert run_streaming_tasks("fit", [remote.remote([16, 16, 5]), remote.remote([16, 3])], 56, unit="targets") == 56
    assert "fit: 56/56 targets" in capsys.readouterr().out
    with pytest.raises(Exception, match="chunk failed"):
        run_streaming_tasks("fit", [remote.remote([16, 16], fail_after=1)], 32, unit="targets")


def test_a_local_instances_workers_hash_strings_alike():
    # PYTHONHASHSEED reaches a local instance's workers through this process's environment (no runtime_env)
    import ray

    from pipeline.config import ExecutionConfig
    from pipeline.execution import init_ray

    def _hash_seed():
        import os

        return os.getpid(), os.environ.get("PYTHONHASHSEED"), hash("oracle-farm")

    init_ray(ExecutionConfig(num_cpus=2))
    remote = ray.remote(_hash_seed).options(num_cpus=1)
    got = ray.get([remote.remote() for _ in range(8)])
    assert {seed for _, seed, _ in got} == {"0"}
    assert len({h for _, _, h in got}) == 1
