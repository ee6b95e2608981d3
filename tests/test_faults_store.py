"""A flaky object store: the moto S3 server behind a fault-injecting proxy (tests/flaky_proxy.py) that
answers a seeded share of requests with 503 SlowDown, resets the connection, holds the answer past the
client's read timeout, or applies a PUT and answers 500. Every process (the driver, the Ray workers)
reaches the store through the proxy only (AWS_ENDPOINT_URL); the client's retries and timeouts are
pipeline.store.s3_client_config's, shortened here by ORACLE_FARM_S3_TIMEOUT so a held answer costs
seconds.

Default suite: `oracle-farm train --family full` through the proxy (every kind of fault injected) gives
the rows, markers and weights of the clean local run. Slow: a store that goes down for good mid-train
ends in exit 1 naming the store, every marker left has its rows, and a re-run once it is back
completes with the same arrays; the whole tiny config (`oracle-farm run`) through the proxy, every
stage's arrays equal to the clean run's; a full worker cache.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from faults import (  # noqa: F401 - mounts: a fixture
    assert_bit_identical, assert_marked_rows_whole, family_rows, mounts, no_temporaries, open_gate, reset_gate,
    stage_arrays,
)
from flaky_proxy import FAULTS, FlakyProxy
from helpers import (
    CLI, TINY, cli, full_weights, kill_tree, start_session, tiny_plan, wait_for,
)
from test_s3 import ACCESS_KEY, SECRET_KEY, STRAY, MotoServer

READ_TIMEOUT = 2.0  # seconds (ORACLE_FARM_S3_TIMEOUT); the proxy holds a delayed answer longer
RATE = 0.08  # of requests given a fault


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    server = MotoServer(tmp_path_factory.mktemp("moto-flaky") / "moto.log")
    with pytest.MonkeyPatch.context() as mp:
        for name in STRAY:
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        mp.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        mp.setenv("AWS_ENDPOINT_URL", server.endpoint)  # this process reads the results directly
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        yield server
    server.stop()


@pytest.fixture
def proxy(moto):
    p = FlakyProxy(moto.port, rate=RATE, seed=1234, delay=READ_TIMEOUT + 1.5)
    yield p
    p.stop()


@pytest.fixture
def flaky_env(proxy, tmp_path):
    """What the console script gets: the proxy as its endpoint, a short client timeout, a private cache
    and Ray temp dir."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="offl-", dir="/tmp"))
    yield {"AWS_ENDPOINT_URL": proxy.endpoint, "ORACLE_FARM_S3_TIMEOUT": str(READ_TIMEOUT),
           "ORACLE_FARM_CACHE": str(tmp_path / "cache"), "RAY_TMPDIR": str(ray_tmp), "COLUMNS": "250"}
    shutil.rmtree(ray_tmp, ignore_errors=True)


def s3_markers(moto, bucket: str) -> dict[str, dict]:
    """Every block marker and COMPLETE object in a bucket (read past the proxy)."""
    return {k: json.loads(v) for k, v in moto.objects(bucket).items()
            if "/markers/" in k or k.endswith("/COMPLETE.json")}


def local_markers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in Path(root).glob("*/*/markers/*/*.json"))


# ------------------------------------------------------------------------------------------ fast
def test_train_through_a_flaky_store_gives_the_clean_runs_arrays(moto, proxy, flaky_env, tiny_store):
    bucket = moto.bucket("flaky-train")
    root = f"s3://{bucket}/farm"
    t0 = time.monotonic()
    out = cli("train", str(TINY), "--set", f"store={root}", "--family", "full", env=flaky_env)
    elapsed = time.monotonic() - t0
    assert out.returncode == 0, out.stdout + out.stderr[-4000:]
    assert "train: 4 models trained" in out.stdout
    injected = {k: proxy.counts[k] for k in FAULTS}
    assert all(injected.values()), proxy.counts  # every kind of fault was met (and survived)

    plan = tiny_plan(root)
    assert_bit_identical(family_rows(plan, "full"), family_rows(tiny_store.plan, "full"))
    assert_bit_identical(full_weights(plan), full_weights(tiny_store.plan))
    assert_marked_rows_whole(plan)
    marked = sorted(k.split("/", 1)[1] for k in s3_markers(moto, bucket) if "/markers/" in k)
    assert marked == [m for m in local_markers(tiny_store.root) if m.startswith("full/")]
    print(f"fault-table: flaky store {proxy.counts} | train full | retried | {elapsed:.1f} s whole command")


@pytest.mark.slow
def test_a_store_that_never_recovers_exits_1_naming_it_then_a_rerun_completes(moto, proxy, flaky_env, tiny_store,
                                                                             tmp_path):
    bucket = moto.bucket("flaky-down")
    root = f"s3://{bucket}/farm"
    gate = tmp_path / "gate"
    gate.mkdir()
    reset_gate(gate)
    (gate / "ticket-1").touch()
    env = {**flaky_env, "ORACLE_FARM_TASK_GATE": str(gate), "ORACLE_FARM_S3_ATTEMPTS": "3"}
    proxy.rate = 0.0
    settings = ["--set", f"store={root}", "--set", "execution.num_cpus=1",
                "--set", "execution.lease_ttl=3"]
    log = tmp_path / "down.log"
    proc = start_session([CLI, "train", str(TINY), "--family", "subset", *settings], log, env=env)
    try:
        wait_for(lambda: ([k for k in s3_markers(moto, bucket) if "/markers/" in k] and list(gate.glob("waiting-*")))
                 or proc.poll() is not None, timeout=600, what="one block marked and the next task held")
        assert proc.poll() is None, log.read_text()[-3000:]
        proxy.down = True  # from now on every request is a 503 SlowDown
        open_gate(gate)
        proc.wait(timeout=600)
    finally:
        kill_tree(proc)
    text = " ".join(log.read_text().split())
    assert proc.returncode == 1, text[-3000:]
    assert root in text and "unavailable" in text, text[-3000:]
    assert SECRET_KEY not in text and ACCESS_KEY not in text

    proxy.down = False
    plan = tiny_plan(root)
    assert_marked_rows_whole(plan)  # every marker left has its rows
    t0 = time.monotonic()
    again = cli("train", str(TINY), "--family", "subset", *settings, "--set", "execution.lease_wait=30", env=flaky_env)
    assert again.returncode == 0, again.stdout + again.stderr[-3000:]
    print(f"fault-table: store down | train subset | exit 1, re-run | {time.monotonic() - t0:.1f} s re-run")
    assert_bit_identical(family_rows(plan, "subset"), family_rows(tiny_store.plan, "subset"))


# ------------------------------------------------------------------------------------------ a full cache
@pytest.mark.slow
def test_a_full_worker_cache_exits_1_naming_it_then_a_rerun_after_freeing_space_completes(moto, mounts, tiny_store,
                                                                                           tmp_path):
    """$ORACLE_FARM_CACHE on a tmpfs smaller than the `.beton` a task copies into it (tests/faults.py)."""
    bucket = moto.bucket("full-cache")
    root = f"s3://{bucket}/farm"
    cache = tmp_path / "cache"
    disk = mounts(cache, 4 * 1024)
    env = {"ORACLE_FARM_CACHE": str(cache), "COLUMNS": "250"}
    args = ["train", str(TINY), "--set", f"store={root}", "--family", "full", "--set", "execution.lease_ttl=2"]
    first = cli(*args, env=env)
    message = " ".join(first.stderr.split())
    assert first.returncode == 1, first.stdout + first.stderr[-3000:]
    assert f"{cache}/" in message and "no space left on the device" in message and "bytes needed" in message, message
    assert not no_temporaries(cache)
    disk.grow(128 * 1024)
    t0 = time.monotonic()
    again = cli(*args, env=env)
    print(f"fault-table: full cache | train full | exit 1, re-run | {time.monotonic() - t0:.1f} s re-run")
    assert again.returncode == 0, again.stdout + again.stderr[-3000:]
    plan = tiny_plan(root)
    assert_bit_identical(family_rows(plan, "full"), family_rows(tiny_store.plan, "full"))


# ------------------------------------------------------------------------------------------ a whole run
@pytest.mark.slow
def test_the_whole_tiny_run_through_a_flaky_store_gives_the_clean_runs_arrays(moto, proxy, flaky_env, tiny_finished):
    bucket = moto.bucket("flaky-run")
    root = f"s3://{bucket}/farm"
    t0 = time.monotonic()
    report = Path(flaky_env["ORACLE_FARM_CACHE"]).parent / "out"
    out = cli("run", str(TINY), "--set", f"store={root}", "--out", str(report), env=flaky_env, timeout=1800)
    elapsed = time.monotonic() - t0
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-4000:]
    assert all(proxy.counts[k] for k in FAULTS), proxy.counts
    for kind in ("prepare", "full", "subset", "oracle", "fit", "unlearn"):
        want = stage_arrays(tiny_finished["root"], kind)
        assert want, kind
        assert_bit_identical(stage_arrays(root, kind), want)
    print(f"fault-table: flaky store {proxy.counts} | run | retried | {elapsed:.1f} s whole command")
