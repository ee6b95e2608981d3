"""A real multi-node Ray cluster on one machine, for the fault tests: a head (no CPUs, so it runs no task)
and worker nodes, each its own raylet with its own resources, every process bound to 127.0.0.1.

Run as a script (`python tests/ray_cluster.py STATE.json ...`) in its own process group, it starts the
nodes with Ray's `cluster_utils.Cluster` (which, unlike `ray start`, adds worker nodes while Ray's
cluster mode stays off, and cluster mode off is what keeps Ray on the loopback interface: see
tests/conftest.py), writes the cluster's address and each worker node's raylet pid to STATE.json, and
adds a node for every line `add` read on stdin; EOF shuts the cluster down. `LocalCluster` is the test
side: it starts the script, reads the state, and kills a worker node (its raylet and every worker
under it, SIGKILL) by pid.

The script's temp dir is private (RAY_TMPDIR), so the address file Ray writes there redirects no other
`ray.init()` on the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

# Node death is noticed within ~1.5 s (Ray's default is 5 missed checks of every 3 s).
FAST_HEALTH_CHECKS = {"RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "3",
                      "RAY_health_check_initial_delay_ms": "0"}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_state(node) -> dict:
    return {"node_id": node.node_id, "raylet_pid": node.all_processes["raylet"][0].process.pid}


def serve(state_path: Path, workers: int, worker_cpus: int, dashboard_port: int | None) -> None:
    from ray.cluster_utils import Cluster

    head_args = {"num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": dashboard_port is not None,
                 "dashboard_agent_listen_port": _free_port()}  # not Ray's fixed default, which others may hold
    if dashboard_port is not None:
        head_args.update(dashboard_host="127.0.0.1", dashboard_port=dashboard_port)
    cluster = Cluster(initialize_head=True, head_node_args=head_args)
    nodes = []

    def add() -> None:
        nodes.append(cluster.add_node(num_cpus=worker_cpus, node_ip_address="127.0.0.1"))  # waits until it is up
        state = {"address": cluster.address, "head_raylet_pid": _node_state(cluster.head_node)["raylet_pid"],
                 "workers": [_node_state(n) for n in nodes], "pid": os.getpid()}
        tmp = state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, state_path)

    for _ in range(workers):
        add()
    try:
        for line in sys.stdin:
            if line.strip() == "add":
                add()
    finally:
        cluster.shutdown()


class LocalCluster:
    """Test side: the cluster script in its own process group; `kill_node` SIGKILLs one worker node."""

    def __init__(self, log_dir: Path, workers: int = 2, worker_cpus: int = 1, dashboard: bool = False,
                 env: dict | None = None):
        import subprocess

        from helpers import REPO, free_port, kill_tree, wait_for

        self.temp = tempfile.mkdtemp(prefix="of-rc-", dir="/tmp")  # short: Ray's unix sockets live under it
        self.state_path = Path(log_dir) / "cluster.json"
        self.dashboard_port = free_port() if dashboard else None
        # with a dashboard (the job server), token authentication, with a token made for this cluster
        auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)} if dashboard else {}
        self.env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_TMPDIR": self.temp,
                    "PYTHONPATH": str(REPO), **FAST_HEALTH_CHECKS, **auth, **(env or {})}
        cmd = [sys.executable, str(Path(__file__)), str(self.state_path), str(workers), str(worker_cpus),
               str(self.dashboard_port or 0)]
        self.log = Path(log_dir) / "cluster.log"
        self.killed: list[int] = []
        for attempt in range(3):  # on a loaded machine Ray's 30 s wait for a starting raylet can run out
            with open(self.log, "wb") as fh:
                self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=fh, stderr=subprocess.STDOUT,
                                             cwd=REPO, start_new_session=True, env=self.env)
            try:
                wait_for(lambda: self._workers_up(workers), timeout=300, every=0.5, what="the Ray cluster's nodes")
                break
            except AssertionError:
                kill_tree(self.proc, sig=signal.SIGKILL, grace=20)
                if attempt == 2 or "timed out during startup" not in self.log.read_text():
                    raise

    def _workers_up(self, n: int) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"the cluster script exited: {self.log.read_text()[-3000:]}")
        return self.state_path.exists() and len(self.state()["workers"]) >= n

    def state(self) -> dict:
        return json.loads(self.state_path.read_text())

    @property
    def address(self) -> str:
        return self.state()["address"]

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def live_workers(self) -> list[dict]:
        return [w for w in self.state()["workers"] if w["raylet_pid"] not in self.killed]

    def node_of(self, pid: int) -> dict | None:
        """The worker node whose raylet `pid` runs under (Ray workers are the raylet's children)."""
        import psutil

        for node in self.live_workers():
            try:
                under = {p.pid for p in psutil.Process(node["raylet_pid"]).children(recursive=True)}
            except psutil.NoSuchProcess:
                continue
            if pid in under:
                return node
        return None

    def kill_node(self, node: dict) -> float:
        """SIGKILL a worker node's raylet and every process under it; returns the time.monotonic() of it."""
        import psutil

        raylet = psutil.Process(node["raylet_pid"])
        procs = [raylet, *raylet.children(recursive=True)]
        when = time.monotonic()
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=20)
        self.killed.append(node["raylet_pid"])
        return when

    def add_node(self) -> None:
        from helpers import wait_for

        n = len(self.state()["workers"]) + 1
        self.proc.stdin.write(b"add\n")
        self.proc.stdin.flush()
        wait_for(lambda: self._workers_up(n), timeout=300, every=0.5, what="a new worker node")

    def stop(self) -> None:
        from helpers import kill_tree

        try:
            self.proc.stdin.close()  # EOF: the script shuts the cluster down
            self.proc.wait(timeout=60)
        except Exception:  # noqa: BLE001 - then by signal
            pass
        kill_tree(self.proc, sig=signal.SIGKILL, grace=20)
        shutil.rmtree(self.temp, ignore_errors=True)


if __name__ == "__main__":
    port = int(sys.argv[4])
    serve(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), port or None)
