"""A node lost under load: a real three-node Ray cluster on 127.0.0.1 (a head with no CPUs and two
worker nodes of one CPU each, `tests/ray_cluster.py`), the real `oracle-farm` driver joined to it, and
one worker node SIGKILLed (its raylet and every worker under it) while it holds a task of train, of
fit or of unlearn.

The moment to kill is an event, not a delay: every task passes `pipeline/execution/gate.py` with no
ticket, so each worker node ends up holding one task at its start (`waiting-<pid>-<what>`, the pid
mapped to its node through the raylet's process tree); the test kills the node of one of them, then
opens the gate. With `execution.max_retries` (2 by default) Ray runs the lost task again on the node
left and the stage completes; with `max_retries=0` the driver exits 1 naming the lost task, and a
re-run completes. Either way the arrays are bit-identical to the session's undisturbed run and every
marker has its rows (`Family.verify`).

Default suite: train with retries. Slow: train without retries, fit, unlearn.
"""

from __future__ import annotations

import json
import time

import pytest

from faults import assert_bit_identical, assert_marked_rows_whole, copy_store_without, held_tasks, open_gate, reset_gate, stage_arrays
from helpers import (
    CLI, TINY, cli, copy_store, family_arrays, kill_tree, marker_files, start_session,
    tiny_plan, total_models, wait_for,
)
from ray_cluster import LocalCluster

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("cluster")
    gate = log_dir / "gate"
    gate.mkdir()
    c = LocalCluster(log_dir, workers=2, worker_cpus=1, env={"ORACLE_FARM_TASK_GATE": str(gate)})
    c.gate = gate
    yield c
    c.stop()


@pytest.fixture
def two_nodes(cluster):
    """The cluster with two live worker nodes (a node killed by an earlier test is replaced) and a
    closed, empty gate."""
    while len(cluster.live_workers()) < 2:
        cluster.add_node()
    reset_gate(cluster.gate)
    yield cluster
    open_gate(cluster.gate)  # whatever happened, nothing stays held


def run_killing_a_node(cluster, tmp_path, command: list[str], label: str):
    """Start the driver on the cluster, wait until both worker nodes hold a task at the gate, SIGKILL
    the node of one of them, open the gate; returns (the driver's exit code, its log, what was killed,
    seconds from the kill to the driver's exit)."""
    log = tmp_path / f"{label}.log"
    env = {"RAY_ADDRESS": cluster.address, "COLUMNS": "250"}
    proc = start_session([CLI, *command], log, env=env)
    try:
        def both_busy():
            if proc.poll() is not None:
                raise AssertionError(f"the driver exited before the kill: {log.read_text()[-3000:]}")
            held = held_tasks(cluster)
            return held if len({h["node"]["raylet_pid"] for h in held}) >= 2 else None

        held = wait_for(both_busy, timeout=600, every=0.2, what="a task held on each worker node")
        victim = held[0]
        killed_at = cluster.kill_node(victim["node"])
        open_gate(cluster.gate)
        proc.wait(timeout=900)
        recovered = time.monotonic() - killed_at
    finally:
        kill_tree(proc)
    return proc.returncode, log.read_text(), victim, recovered


# ------------------------------------------------------------------------------------------ train
def test_node_lost_during_train_the_task_is_retried_and_the_arrays_are_identical(two_nodes, tiny_store, tmp_path):
    root = tmp_path / "store"
    copy_store(tiny_store.root / "prepare", root / "prepare")
    command = ["train", str(TINY), "--set", f"store={root}"]
    code, log, victim, seconds = run_killing_a_node(two_nodes, tmp_path, command, "train")
    assert victim["what"].startswith("train-"), victim
    assert code == 0, log[-4000:]
    plan = tiny_plan(root)
    assert f"train: {total_models(plan)} models trained" in log
    assert_bit_identical(family_arrays(plan), family_arrays(tiny_store.plan))
    assert sorted(marker_files(root)) == sorted(marker_files(tiny_store.root))
    assert_marked_rows_whole(plan)
    print(f"fault-table: node lost | train | retried | {seconds:.1f} s from the kill to exit 0")


@pytest.mark.slow
def test_node_lost_during_train_without_retries_exits_1_naming_it_then_a_rerun_completes(two_nodes, tiny_store,
                                                                                          tmp_path):
    root = tmp_path / "store"
    copy_store(tiny_store.root / "prepare", root / "prepare")
    command = ["train", str(TINY), "--set", f"store={root}", "--set", "execution.max_retries=0"]
    code, log, victim, _ = run_killing_a_node(two_nodes, tmp_path, command, "train-no-retry")
    assert code == 1, log[-4000:]
    _, kind, *role, start = victim["what"].split("-")  # train-<kind>-<role>-<start>
    assert f"train: the task of {kind}/{'-'.join(role)} {start}.." in log and "was lost with its worker or node" in log, \
        log[-3000:]
    plan = tiny_plan(root)
    assert_marked_rows_whole(plan)  # what the first driver marked is whole
    marked = sum(m["end"] - m["start"] for m in map(json.loads, marker_files(root).values()))
    t0 = time.monotonic()
    again = cli(*command, env={"RAY_ADDRESS": two_nodes.address})
    print(f"fault-table: node lost, no retries | train | exit 1, re-run | {time.monotonic() - t0:.1f} s re-run")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"train: {total_models(plan) - marked} models trained" in again.stdout  # only the unmarked blocks
    assert_bit_identical(family_arrays(plan), family_arrays(tiny_store.plan))


# ------------------------------------------------------------------------------------------ fit, unlearn
@pytest.mark.slow
def test_node_lost_during_fit_the_task_is_retried_and_the_arrays_are_identical(two_nodes, tiny_store,
                                                                               tiny_finished, tmp_path):
    root = copy_store(tiny_store.root, tmp_path / "store")
    code, log, victim, seconds = run_killing_a_node(two_nodes, tmp_path, ["fit", str(TINY), "--set", f"store={root}"],
                                                    "fit")
    assert victim["what"].startswith("fit-"), victim
    assert code == 0, log[-4000:]
    assert_bit_identical(stage_arrays(root, "fit"), stage_arrays(tiny_finished["root"], "fit"))
    print(f"fault-table: node lost | fit | retried | {seconds:.1f} s from the kill to exit 0")


@pytest.mark.slow
def test_node_lost_during_unlearn_the_task_is_retried_and_the_arrays_are_identical(two_nodes, tiny_finished,
                                                                                   tmp_path):
    root = copy_store_without(tiny_finished["root"], tmp_path / "store", "unlearn")
    code, log, victim, seconds = run_killing_a_node(two_nodes, tmp_path,
                                                    ["unlearn", str(TINY), "--set", f"store={root}"], "unlearn")
    assert victim["what"].startswith("unlearn-"), victim
    assert code == 0, log[-4000:]
    got = stage_arrays(root, "unlearn")
    # the stages this command writes: every method on the forget sets (the tuning grid's choice is
    # recorded outside the unlearn stages, so its grid points are not run again)
    stages = {k.split("/", 1)[0] for k in got}
    assert len(stages) == len(plan_methods(tiny_finished["plan"])), sorted(stages)
    want = {k: v for k, v in stage_arrays(tiny_finished["root"], "unlearn").items() if k.split("/", 1)[0] in stages}
    assert_bit_identical(got, want)
    print(f"fault-table: node lost | unlearn | retried | {seconds:.1f} s from the kill to exit 0")


def plan_methods(plan) -> list[tuple[str, str]]:
    """(method, forget set) of every unlearn stage a run writes outside the tuning grid."""
    return [(m, f.name) for m in plan.cfg.unlearn.methods for f in plan.cfg.forget_sets]
