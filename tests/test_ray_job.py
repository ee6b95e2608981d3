"""`ray job submit` against a real head on 127.0.0.1: jobs/train.py joins the cluster through RAY_ADDRESS
and trains every family of the tiny config; the arrays equal an in-process run's.

The head runs with `ray start --block` in its own process group and is stopped by signalling that
group (and any descendant left), never with `ray stop`, which would stop every Ray instance on the
machine. Its temp dir is private, so its address file does not redirect other `ray.init()` calls;
token authentication is on, with a token made for this test.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from helpers import (
    RAY, REPO, TINY, assert_same_arrays, family_arrays, free_port, kill_tree, marker_files, n_blocks,
    start_session, tiny_plan, total_models, wait_for,
)


def dashboard_up(url: str, token: str) -> bool:
    request = urllib.request.Request(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@pytest.mark.slow
def test_ray_job_submit_trains_the_tiny_config(tmp_path, tiny_store):
    token = secrets.token_hex(32)
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    ports = {name: free_port() for name in ("port", "dashboard-port", "ray-client-server-port",
                                            "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                            "metrics-export-port", "runtime-env-agent-port",
                                            "node-manager-port", "object-manager-port")}
    temp = tempfile.mkdtemp(prefix="of-ray-", dir="/tmp")  # short: Ray's unix sockets live under it
    head_cmd = [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                "--dashboard-host", "127.0.0.1", "--num-cpus", "2", "--temp-dir", temp, "--disable-usage-stats",
                *(x for name, port in ports.items() for x in (f"--{name}", str(port)))]
    url = f"http://127.0.0.1:{ports['dashboard-port']}"
    head = start_session(head_cmd, tmp_path / "head.log", env)
    try:
        wait_for(lambda: dashboard_up(url, token) or head.poll() is not None, timeout=300, every=1.0,
                 what="the Ray dashboard")
        assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]

        store = tmp_path / "store"
        job_id = f"oracle-farm-test-{secrets.token_hex(4)}"
        submit = subprocess.run(
            [RAY, "job", "submit", "--address", url, "--submission-id", job_id, "--",
             sys.executable, str(REPO / "jobs" / "train.py"), str(TINY), "--set", f"store={store}"],
            capture_output=True, text=True, timeout=900, cwd=REPO, env={**os.environ, **env})
        log = submit.stdout + submit.stderr
        assert submit.returncode == 0, log[-4000:]
        assert f"Job '{job_id}' succeeded" in log
        assert "Connecting to existing Ray cluster at address: 127.0.0.1" in log  # joined via RAY_ADDRESS
        status = subprocess.run([RAY, "job", "status", "--address", url, job_id], capture_output=True,
                                text=True, timeout=120, env={**os.environ, **env})
        assert f"Job '{job_id}' succeeded" in status.stdout + status.stderr
    finally:
        kill_tree(head, sig=signal.SIGTERM, grace=15)
        shutil.rmtree(temp, ignore_errors=True)

    plan = tiny_plan(store)
    assert f"train: {total_models(plan)} models trained" in log
    assert len(marker_files(store)) == n_blocks(plan)
    assert_same_arrays(family_arrays(plan), family_arrays(tiny_store.plan), exact=True)
    assert not Path(temp).exists()
