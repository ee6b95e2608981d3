"""The store on object storage: a real S3-compatible server (moto in server mode) on 127.0.0.1.

Default suite (fast): `oracle-farm train --family full` (prepare + 4 models) through the real console
script on s3://, equal bit for bit to the same models in a local store; the .beton files reach the
workers through a verified local cache; no credential in any object, output or Ray log; a bad URL, a
missing bucket, refused credentials and an unreachable endpoint exit 2 naming the store, before any work,
from every stage entry and the query API.
Slow: prepare + train (SIGKILLed mid-way and resumed) + fit + query + the rest of `run` on s3://,
against the local store.

Endpoint and credentials reach every process through AWS_* variables only (never the config).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from helpers import (
    CLI, TINY, assert_same_arrays, cli, descendants, family_arrays, free_port, full_weights, kill_tree, n_blocks,
    start_session, tiny_plan, total_models, wait_for,
)

ACCESS_KEY = "OFTESTKEY" + secrets.token_hex(6).upper()
SECRET_KEY = "of-test-secret-" + secrets.token_hex(16)
STRAY = ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE")


# ------------------------------------------------------------------------------------------ servers
class MotoServer:
    def __init__(self, log: Path, auth: bool = False):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = log  # werkzeug's access log: one line per request (`requests`)
        env = {"INITIAL_NO_AUTH_ACTION_COUNT": "0"} if auth else {}  # auth: every request is checked (IAM)
        self.proc = start_session([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                  log, env=env)
        wait_for(self._up, timeout=60, every=0.2, what=f"moto server on {self.endpoint}")

    def _up(self) -> bool:
        import socket

        if self.proc.poll() is not None:
            raise AssertionError(f"moto server exited with {self.proc.returncode}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1")

    def bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def objects(self, bucket: str) -> dict[str, bytes]:
        s3 = self.client()
        out = {}
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for obj in page.get("Contents", []):
                out[obj["Key"]] = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
        return out

    def requests(self, bucket: str, since: int = 0) -> list[tuple[str, str]]:
        """(method, key) of every request on a bucket's objects logged after line `since`."""
        import re

        lines = self.log.read_text(errors="replace").splitlines()[since:]
        found = (re.search(r'"(?:\x1b\[[0-9;]*m)*(GET|PUT|HEAD|POST|DELETE) /([^ ?]+)', line) for line in lines)
        return [(m[1], m[2][len(bucket) + 1 :]) for m in found if m and m[2].startswith(f"{bucket}/")]

    def log_lines(self) -> int:
        return len(self.log.read_text(errors="replace").splitlines())

    def stop(self) -> None:
        kill_tree(self.proc, sig=15, grace=10)


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    """One moto S3 server for the module, and the AWS_* variables naming it in this process (so in
    every `oracle-farm` subprocess and the Ray workers those start); restored afterwards."""
    log_dir = tmp_path_factory.mktemp("moto")
    server = MotoServer(log_dir / "moto.log")
    with pytest.MonkeyPatch.context() as mp:
        for name in STRAY:
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        mp.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        mp.setenv("AWS_ENDPOINT_URL", server.endpoint)
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        yield server
    server.stop()


@pytest.fixture
def run_env(tmp_path):
    """Per-test local cache and a short Ray temp dir (its session logs are searched for secrets)."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="ofs3-", dir="/tmp"))
    env = {"ORACLE_FARM_CACHE": str(tmp_path / "cache"), "RAY_TMPDIR": str(ray_tmp)}
    yield env
    shutil.rmtree(ray_tmp, ignore_errors=True)


def _assert_no_secret(where: str, blobs: dict) -> None:
    for name, data in blobs.items():
        data = data if isinstance(data, bytes) else str(data).encode()
        for secret in (SECRET_KEY, ACCESS_KEY):
            assert secret.encode() not in data, f"{where}: {name} holds a credential"
            assert secret not in name, f"{where}: the name {name} holds a credential"


def _files_under(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in Path(root).rglob("*") if p.is_file()}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------ fast
def test_console_script_trains_on_s3(moto, tiny_store, run_env, tmp_path):
    """prepare + the full family through the real `oracle-farm`, store on s3://: same bits as the local
    store, .beton files verified into the local cache, no credential anywhere."""
    from pipeline.plan import FamilySpec, family_store
    from pipeline.stages.status import stage_status

    bucket = moto.bucket("fast")
    root = f"s3://{bucket}/farm"
    out = cli("train", str(TINY), "--set", f"store={root}", "--family", "full", env=run_env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "train: 4 models trained" in out.stdout, out.stdout

    plan = tiny_plan(root)
    meta = plan.prepared_meta()
    local = tiny_store.plan
    fam = FamilySpec(plan.full, "models", 4, "full")
    got = {s.name: family_store(plan, fam, meta).read(s.name, 4) for s in family_store(plan, fam, meta).specs}
    want = {s.name: family_store(local, fam, meta).read(s.name, 4) for s in family_store(local, fam, meta).specs}
    assert_same_arrays(got, want)
    assert_same_arrays(full_weights(plan), full_weights(local))
    assert family_store(plan, fam, meta).verify(4) == []

    rows = {r["stage"]: r for r in stage_status(plan)}
    assert rows["prepare"]["state"] == "done" and rows["full"]["state"] == "done"
    assert rows["subset"]["state"] == "missing"

    # the .beton files: recorded size and sha256 match the objects, and the workers' cached copies
    objects = moto.objects(bucket)
    prep = f"farm/{plan.prepare.rel}"
    for name in ("train.beton", "val.beton"):
        rec = meta["files"][name]
        assert rec == {"size": len(objects[f"{prep}/{name}"]), "sha256": _sha(objects[f"{prep}/{name}"])}
        cached = list(Path(run_env["ORACLE_FARM_CACHE"]).rglob(name))
        assert len(cached) == 1 and _sha(cached[0].read_bytes()) == rec["sha256"]
    assert not [p for p in Path(run_env["ORACLE_FARM_CACHE"]).rglob("*") if ".part-" in p.name]

    # credentials: never in the store, the output, the Ray logs or the local cache
    _assert_no_secret("store", objects)
    _assert_no_secret("output", {"stdout": out.stdout, "stderr": out.stderr})
    _assert_no_secret("ray logs", _files_under(run_env["RAY_TMPDIR"]))
    _assert_no_secret("cache", _files_under(run_env["ORACLE_FARM_CACHE"]))
    assert json.loads(objects[f"farm/{plan.full.rel}/stage.json"])["id"] == plan.full.id


@pytest.fixture(scope="module")
def refusing(tmp_path_factory):
    """A second moto server that checks credentials (IAM): ours are unknown to it, so refused."""
    server = MotoServer(tmp_path_factory.mktemp("moto-auth") / "moto.log", auth=True)
    yield server
    server.stop()


def test_bad_stores_exit_2_before_any_work(moto, refusing, run_env):
    """Through the console script, side by side: a missing bucket and refused credentials; exit 2, a
    message naming the store, no Ray started, nothing written."""
    moto.bucket("untouched")
    cases = [
        (["train", "s3://no-such-bucket/farm"], {}, "bucket 'no-such-bucket' does not exist"),
        (["fit", "s3://untouched/farm"], {"AWS_ENDPOINT_URL": refusing.endpoint}, "access denied"),
    ]
    procs = []
    for (command, root), extra, _ in cases:
        env = {**os.environ, "COLUMNS": "250", **run_env, **extra}
        procs.append(subprocess.Popen([CLI, command, str(TINY), "--set", f"store={root}"], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env))
    for proc, ((command, root), extra, expected) in zip(procs, cases):
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 2, (root, stdout, stderr)
        message = " ".join(stderr.split())
        assert root in message and expected in message, message
        assert "train:" not in stdout and "fit:" not in stdout, stdout
        _assert_no_secret("error output", {"stdout": stdout, "stderr": stderr})
    assert moto.objects("untouched") == {}
    assert not Path(run_env["RAY_TMPDIR"], "ray").exists()  # Ray never started


@pytest.mark.parametrize("root, endpoint, expected", [
    ("s3://", None, "no bucket in the store URL"),
    ("s3://untouched/farm", "dead", "not reachable"),
    ("nosuchprotocol://bucket/p", None, "not a usable store URL"),
])
def test_bad_urls_and_endpoints(moto, monkeypatch, root, endpoint, expected):
    from typer.testing import CliRunner

    from pipeline.cli import app

    if endpoint == "dead":
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    for args in (["prepare", str(TINY)], ["query", "top-k", str(TINY), "--target", "0"]):
        result = CliRunner().invoke(app, [*args, "--set", f"store={root}"])
        assert result.exit_code == 2, result.output
        message = " ".join(result.output.split())
        assert root in message and expected in message, message
        _assert_no_secret("error output", {"output": result.output})


@pytest.mark.parametrize("command", [
    ["prepare"], ["train"], ["fit"], ["unlearn"], ["evaluate"], ["report"], ["status"], ["run"],
    ["query", "top-k", "--target", "0"], ["query", "row", "--index", "0"],
])
def test_every_entry_checks_the_store_first(moto, command):
    """Each stage entry and the query API: a missing bucket is bad input (exit 2) naming the store."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    root = "s3://missing-bucket-everywhere/p"
    head = command[:2] if command[0] == "query" else command[:1]
    rest = command[len(head):]
    result = CliRunner().invoke(app, [*head, str(TINY), *rest, "--set", f"store={root}"])
    assert result.exit_code == 2, result.output
    assert root in " ".join(result.output.split()) and "does not exist" in result.output


def test_local_file_copies_once_and_verifies_size_and_hash(moto, tmp_path):
    """Store.local_file: a verified copy made once; a corrupt cached copy (same size) is replaced; a
    stored object that no longer matches its recorded hash is refused, leaving nothing in the cache."""
    from pipeline.store import Store, StoreError

    moto.bucket("cache")
    store = Store("s3://cache/p")
    data = np.random.default_rng(0).bytes(100_000)
    src = tmp_path / "train.beton"
    src.write_bytes(data)
    store.put_file(src, "prepare/x/train.beton")
    cache = tmp_path / "cache"
    first = store.local_file("prepare/x/train.beton", cache_dir=str(cache), sha256=_sha(data))
    assert first.read_bytes() == data
    stamp = first.stat().st_mtime_ns
    assert store.local_file("prepare/x/train.beton", cache_dir=str(cache), sha256=_sha(data)) == first
    assert first.stat().st_mtime_ns == stamp  # reused, not copied again

    corrupt = bytearray(data)
    corrupt[5] ^= 0xFF
    first.write_bytes(bytes(corrupt))  # same size, other content
    again = store.local_file("prepare/x/train.beton", cache_dir=str(cache), sha256=_sha(data))
    assert again.read_bytes() == data

    moto.client().put_object(Bucket="cache", Key="p/prepare/x/train.beton", Body=bytes(corrupt))
    with pytest.raises(StoreError, match="sha256"):
        store.local_file("prepare/x/train.beton", cache_dir=str(tmp_path / "cache2"), sha256=_sha(data))
    assert [p for p in (tmp_path / "cache2").rglob("*") if p.is_file()] == []
    with pytest.raises(StoreError, match="not found"):
        store.local_file("prepare/x/none.beton", cache_dir=str(cache))


def test_config_store_holds_only_a_location():
    """Credentials or parameters in the store URL are refused, and the message does not repeat them."""
    from pipeline.config import ConfigError, load_config

    for url in (f"s3://{ACCESS_KEY}:{SECRET_KEY}@bucket/p", f"s3://bucket/p?secret={SECRET_KEY}"):
        with pytest.raises(ConfigError, match="store: must be only a location") as err:
            load_config(TINY, [f"store={url}"])
        assert SECRET_KEY not in str(err.value)
    assert load_config(TINY, ["store=s3://bucket/prefix"]).store == "s3://bucket/prefix"


def test_joined_cluster_gets_the_endpoint_never_the_keys(monkeypatch):
    from pipeline.execution import worker_env

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_SESSION_TOKEN", SECRET_KEY)
    joined = worker_env()
    assert joined["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} & set(joined)
    assert joined["PYTHONHASHSEED"] == "0"  # a local instance gets it from this process's environment instead


# ------------------------------------------------------------------------------------------ slow
def _markers(moto, bucket: str) -> int:
    import boto3  # noqa: F401

    keys = []
    for page in moto.client().get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return sum("/markers/" in k and k.endswith(".json") for k in keys)  # train markers: fit has not run


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_s3_prepare_train_killed_resumed_fit_query(moto, tiny_store, run_env, tmp_path):
    """The whole path on s3:// through the console script: prepare, train SIGKILLed (the driver's
    process group) after some blocks and resumed, fit, query top-k --json, status, then `run` (unlearn
    and the report); arrays equal to the local store's bit for bit; no credential in any object, output,
    report or log."""
    from pipeline.stages.status import stage_status

    bucket = moto.bucket("slow")
    root = f"s3://{bucket}/farm"
    store_opt = ["--set", f"store={root}"]
    outputs = {}
    out = cli("prepare", str(TINY), *store_opt, env=run_env)
    assert out.returncode == 0, out.stdout + out.stderr
    outputs["prepare"] = out.stdout + out.stderr

    plan = tiny_plan(root)
    blocks = n_blocks(plan)
    log = tmp_path / "train-killed.log"
    # a short lease ttl: the resumed run waits for the killed driver's lease to expire
    proc = start_session([CLI, "train", str(TINY), *store_opt, "--set", "execution.lease_ttl=5"], log, env=run_env)
    seen = []
    try:
        wait_for(lambda: (seen.extend(descendants(proc.pid)) or _markers(moto, bucket) >= 2
                          or proc.poll() is not None), timeout=900, every=0.3, what="two finished blocks")
    finally:
        kill_tree(proc, seen)
    outputs["killed"] = log.read_text(errors="replace")
    done_before = sum(r["done"] for r in stage_status(plan) if r["stage"] in ("full", "subset")
                      or r["stage"].startswith("oracle["))
    assert proc.returncode == -9 and 0 < _markers(moto, bucket) < blocks, (proc.returncode, outputs["killed"])

    out = cli("train", str(TINY), *store_opt, env=run_env)
    assert out.returncode == 0, out.stdout + out.stderr
    outputs["resumed"] = out.stdout + out.stderr
    assert f"train: {total_models(plan) - done_before} models trained" in out.stdout, (done_before, out.stdout)
    assert _markers(moto, bucket) >= blocks
    assert_same_arrays(family_arrays(plan), family_arrays(tiny_store.plan))
    assert_same_arrays(full_weights(plan), full_weights(tiny_store.plan))

    out = cli("fit", str(TINY), *store_opt, env=run_env)
    assert out.returncode == 0, out.stdout + out.stderr
    outputs["fit"] = out.stdout + out.stderr

    out = cli("query", "top-k", str(TINY), "--target", "1500", "--k", "5", "--json", *store_opt, env=run_env)
    assert out.returncode == 0, out.stdout + out.stderr
    outputs["query"] = out.stdout + out.stderr
    result = json.loads(out.stdout)
    column = plan.store.open_group(f"{plan.fit.rel}/arrays.zarr", mode="r")["theta"][:, 1500]
    assert [p["index"] for p in result["positive"]] == np.argsort(-column, kind="stable")[:5].tolist()
    assert [p["index"] for p in result["negative"]] == np.argsort(column, kind="stable")[:5].tolist()
    np.testing.assert_allclose([p["value"] for p in result["positive"]], np.sort(column)[::-1][:5], rtol=1e-6)

    out = cli("status", str(TINY), "--json", *store_opt, env=run_env)
    assert out.returncode == 0, out.stdout + out.stderr
    states = {r["stage"]: r["state"] for r in json.loads(out.stdout)}
    assert all(states[s] == "done" for s in states if not s.startswith(("unlearn", "tune"))), states

    # the rest of the run (unlearn, report): the report is written locally and copied into the store
    out = cli("run", str(TINY), *store_opt, "--out", str(tmp_path / "report"), env=run_env)
    assert out.returncode == 0, out.stdout + out.stderr
    outputs["run"] = out.stdout + out.stderr
    objects = moto.objects(bucket)
    report = _files_under(tmp_path / "report")
    assert objects["farm/reports/tiny/report.md"] == (tmp_path / "report" / "report.md").read_bytes()

    _assert_no_secret("store", objects)
    _assert_no_secret("report", report)
    _assert_no_secret("output", outputs)
    _assert_no_secret("ray logs", _files_under(run_env["RAY_TMPDIR"]))


def _upload(moto, local: Path, bucket: str, prefix: str) -> None:
    s3 = moto.client()
    for path in sorted(p for p in Path(local).rglob("*") if p.is_file()):
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(local)}", Body=path.read_bytes())


@pytest.mark.timeout(900)
def test_fit_requests_grow_with_its_tasks_not_its_targets(moto, tiny_store, run_env):
    """The fit on s3:// at two block sizes (2 and 8 target tasks, the same 1,797 targets): besides the
    rows copy's reads of theta and theta_logit (each chunk once: a transposition reads the array), GETs
    are per task (the subset markers, read concurrently, and the chunks of the task's band) and per
    block (its marker, its 1-D slices, its forget parts), never per target: no 1-D chunk is read."""
    bucket = moto.bucket("counts")
    meta = tiny_store.plan.prepared_meta()
    n, p = meta["n_train"], meta["n_train"] + meta["n_val"]
    counts = {}
    for block in (1024, 256):
        prefix = f"farm{block}"
        _upload(moto, tiny_store.root, bucket, prefix)
        since = moto.log_lines()
        out = cli("fit", str(TINY), "--set", f"store=s3://{bucket}/{prefix}", "--set",
                  f"execution.fit_block_targets={block}", env=run_env)
        assert out.returncode == 0, out.stdout + out.stderr
        gets = [key for method, key in moto.requests(bucket, since) if method == "GET"]
        fit = [k for k in gets if "/fit/" in k or k.startswith(f"{prefix}/fit/")]
        bulk = [k for k in fit if "/arrays.zarr/theta/c/" in k or "/arrays.zarr/theta_logit/c/" in k]
        vectors = [k for k in fit if any(f"/arrays.zarr/{v}/c/" in k for v in ("bias", "lam", "lds", "bias_logit"))]
        counts[block] = {"tasks": -(-p // block), "gets": len(gets), "other": len(gets) - len(bulk),
                         "bulk": len(bulk), "distinct_bulk": len(set(bulk)), "vectors": len(vectors)}
    for block, c in counts.items():
        # each column chunk read once, by the rows task of its band: ceil(n/4096) x ceil(p/16) theta
        # chunks, ceil(n/256) x as many theta_logit chunks
        assert c["bulk"] == c["distinct_bulk"] == -(-p // 16) * (-(-n // 4096) + -(-n // 256)), (block, c)
        assert c["vectors"] == 0, (block, c)
    # measured: 182 other GETs with 2 tasks, 320 with 8: 23 per task (subset markers and chunks, the
    # block's marker; its object at COMPLETE), 136 fixed (the driver's checks, dm-direct's error from the
    # full models and target oracles); bounds with margin
    few, many = counts[1024], counts[256]
    per_task = (many["other"] - few["other"]) / (many["tasks"] - few["tasks"])
    assert 0 < per_task <= 40, counts
    assert few["other"] - per_task * few["tasks"] <= 250, counts  # the driver's and the rows task's fixed reads


def test_markers_are_read_in_one_batch_on_s3_equal_to_one_by_one(moto):
    """`Family.markers()` on s3://: one listing, then one GET per marker (no HEAD first), concurrently;
    the same markers as reading them one at a time; a half-written (unreadable) one is not done."""
    from pipeline.store import Family, StageRef, Store

    bucket = moto.bucket("markers")
    store = Store(f"s3://{bucket}/farm")
    family = Family(store, StageRef("full", "abc"), "models", [])
    for start in range(0, 40, 4):
        store.write_json(f"{family.marker_rel}/{start:07d}-{start + 4:07d}.json", {"start": start, "end": start + 4})
    store.write_bytes(f"{family.marker_rel}/0000040-0000044.json", b'{"start": 40, "en')  # cut short
    since = moto.log_lines()
    got = family.markers()
    requests = moto.requests(bucket, since)
    names = [n for n in store.list(family.marker_rel) if n.endswith(".json")]
    assert got == [m for m in (store.read_json(f"{family.marker_rel}/{n}") for n in names) if m is not None]
    assert [m["start"] for m in got] == list(range(0, 40, 4))
    objects = [key for method, key in requests if "/markers/" in key]
    assert sorted(objects) == sorted(f"farm/{family.marker_rel}/{n}" for n in names)  # each GET once
    # and nothing else on the objects (the listing is a request on the bucket): no HEAD before a GET
    assert {method for method, _ in requests} == {"GET"} and len(requests) == len(names)
