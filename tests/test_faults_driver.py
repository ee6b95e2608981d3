"""A driver lost mid-stage and the job submitted again as from another machine, end to end with
`ray job submit` against the three-node cluster of tests/ray_cluster.py (dashboard on 127.0.0.1).

The first job (`jobs/train.py`) runs until one block of its stage is marked and the next tasks are
held at the task gate; then its driver (the pid in the stage's LEASE.json) is SIGKILLed, as when its
machine goes away. The second job runs the same command under `unshare --uts --pid --fork` with
another host name (and no /proc of its own: Ray's driver finds the local raylet by listing processes):
to it the lease is another machine's, so it cannot tell the
holder is gone; it waits until the heartbeat is older than the ttl, takes the lease over, trains only
the blocks without a marker, and the arrays are bit-identical to the session's undisturbed run.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest

from faults import assert_bit_identical, assert_marked_rows_whole, open_gate, reset_gate
from helpers import RAY, REPO, TINY, copy_store, family_arrays, marker_files, tiny_plan, total_models, wait_for
from ray_cluster import LocalCluster

OTHER_HOST = "of-other-host"
TTL = 90  # seconds: execution.lease_ttl of both jobs, longer than a job takes to start here (~50 s under load),
# so that the second driver finds the lease still live and has to wait it out


def job(cluster, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, "job", "submit", "--address", cluster.dashboard, *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO, env={**os.environ, **cluster.env})


@pytest.mark.slow
def test_a_driver_lost_mid_stage_is_taken_over_by_one_from_another_host(tiny_store, tmp_path):
    gate = tmp_path / "gate"
    gate.mkdir()
    cluster = LocalCluster(tmp_path, workers=2, worker_cpus=1, dashboard=True,
                           env={"ORACLE_FARM_TASK_GATE": str(gate)})
    try:
        wait_for(lambda: job(cluster, "--", "true", timeout=120).returncode == 0, timeout=300, every=2.0,
                 what="the job server")
        root = tmp_path / "store"
        copy_store(tiny_store.root / "prepare", root / "prepare")
        train = [sys.executable, str(REPO / "jobs" / "train.py"), str(TINY), "--set", f"store={root}",
                 "--set", f"execution.lease_ttl={TTL}", "--set", "execution.lease_wait=300"]
        reset_gate(gate)
        (gate / "ticket-1").touch()
        first = job(cluster, "--no-wait", "--submission-id", "of-first", "--", *train, timeout=120)
        assert first.returncode == 0, first.stdout + first.stderr
        wait_for(lambda: marker_files(root) and len(list(gate.glob("waiting-*"))) >= 2, timeout=600, every=0.2,
                 what="one block marked, a task held on each node")
        lease = json.loads(next(root.glob("*/*/LEASE.json")).read_text())
        assert lease["host"] == socket.gethostname()
        os.kill(lease["pid"], signal.SIGKILL)  # the driver's machine is gone
        lost_at = time.monotonic()
        marked = marker_files(root)
        assert len(marked) == 1

        open_gate(gate)
        other = (f"hostname {OTHER_HOST} && echo driver host: $(hostname), pid: $$ && exec {shlex.join(train)}")
        second = job(cluster, "--submission-id", "of-second", "--",
                     "unshare", "--uts", "--pid", "--fork", "sh", "-c", other)
        recovered = time.monotonic() - lost_at
        log = second.stdout + second.stderr
        assert second.returncode == 0, log[-4000:]
        assert f"driver host: {OTHER_HOST}, pid: 1" in log  # another host name, another PID namespace
        assert f"held by host {socket.gethostname()}, pid {lease['pid']}" in " ".join(log.split())  # waited it out
        plan = tiny_plan(root)
        done = sum(json.loads(v)["end"] - json.loads(v)["start"] for v in marked.values())
        assert f"train: {total_models(plan) - done} models trained" in log  # only the unmarked blocks
    finally:
        cluster.stop()
    after = marker_files(root)
    assert {k: after[k] for k in marked} == marked  # the first driver's block was not redone
    assert_marked_rows_whole(plan)
    assert_bit_identical(family_arrays(plan), family_arrays(tiny_store.plan))
    print(f"fault-table: driver lost | train | taken over | {recovered:.1f} s from the kill to the second job's end")
