"""A real SIGKILL in the default suite: `oracle-farm train` killed with one block of the subset family
marked and the next task held at its start, then re-run: only the unfinished blocks are trained and
the arrays are bit-identical to an uninterrupted run's (the session's tiny store, same block size).

The moment to kill is an event, not a delay: the run passes through `pipeline/execution/gate.py` with one ticket,
so once a marker exists and a task has written its `waiting-*` file, exactly one block is done and the
run can go no further, on a fast machine or a loaded one. One CPU (`execution.num_cpus=1`, not part of
any identity) makes the tasks run one at a time; a short lease ttl keeps the re-run's wait for the dead
driver's lease short."""

from __future__ import annotations

import json
import signal

from helpers import (
    CLI, TINY, assert_same_arrays, cli, copy_store, descendants, kill_tree, marker_files, start_session,
    tiny_plan, wait_for,
)

SETTINGS = ("execution.num_cpus=1", "execution.lease_ttl=2")


def subset_arrays(plan) -> dict:
    from pipeline.plan import family_store, train_families

    meta = plan.prepared_meta()
    out = {}
    for fam in train_families(plan):
        if fam.kind == "subset":
            family = family_store(plan, fam, meta)
            out.update({f"{fam.role}/{spec.name}": family.read(spec.name, fam.n_models) for spec in family.specs})
    return out


def test_sigkill_of_the_driver_with_a_task_held_then_rerun_gives_identical_arrays(tiny_store, tmp_path):
    root = tmp_path / "store"
    copy_store(tiny_store.root / "prepare", root / "prepare")
    plan = tiny_plan(root, *SETTINGS)
    gate = tmp_path / "gate"
    gate.mkdir()
    (gate / "ticket-1").touch()
    settings = [x for s in SETTINGS for x in ("--set", s)]
    args = [CLI, "train", str(TINY), "--family", "subset", "--set", f"store={root}", *settings]
    proc = start_session(args, tmp_path / "first.log", env={"ORACLE_FARM_TASK_GATE": str(gate)})
    tree = []
    try:
        wait_for(lambda: (marker_files(root) and list(gate.glob("waiting-*"))) or proc.poll() is not None,
                 timeout=600, what="one block marked and the next task held")
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        tree = descendants(proc.pid)
        assert tree, "the driver's Ray processes"
    finally:
        kill_tree(proc, tree, sig=signal.SIGKILL)  # the driver's process group, then every descendant seen
    assert proc.returncode == -signal.SIGKILL
    survived = marker_files(root)
    assert len(survived) == 1
    done = sum(json.loads(v)["end"] - json.loads(v)["start"] for v in survived.values())

    result = cli("train", str(TINY), "--family", "subset", "--set", f"store={root}", *settings)
    assert result.returncode == 0, result.stderr[-3000:]
    total = plan.cfg.train.subset.models + plan.cfg.train.subset.heldout
    assert f"train: {total - done} models trained" in result.stdout  # the marked block was not redone
    after = marker_files(root)
    assert {k: after[k] for k in survived} == survived
    assert_same_arrays(subset_arrays(plan), subset_arrays(tiny_store.plan), exact=True)
