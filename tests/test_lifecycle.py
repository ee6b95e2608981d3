"""Store lifecycle (decision 26) through the real console script: `oracle-farm ls`, `oracle-farm gc`
(dry run, deletion, leased stages kept) on a store holding two configs, and stage leases: the lease
protocol in process, then two `oracle-farm train` drivers started at once on one store that a dead
driver left with a stale lease and a half-written block."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import numpy as np
import pytest

from helpers import CLI, REPO, TINY, assert_same_arrays, copy_store, store_snapshot, tiny_plan, wait_for, run_many

TINY_B = TINY.read_text().replace("name: tiny", "name: tiny-b").replace("epochs: 4", "epochs: 5")


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return run_many(list(args), timeout=timeout)[0]


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------------------------------ a store, two configs
def fake_stages(plan, partial_subset: bool = False) -> None:
    """Stage records and small arrays + markers for every stage a config reaches except prepare (which
    is real): gc and ls see stages exactly as the stage modules would leave them, at no training cost."""
    from pipeline.maintenance.lifecycle import reached_by
    from pipeline.plan import FamilySpec, stage_section
    from pipeline.plan import selection_rels
    from pipeline.stages.unlearn import method_grids, unlearn_ref
    from pipeline.store import ArraySpec, Family, ensure_stage, mark_complete

    store, specs = plan.store, [ArraySpec("margins", (4,), "float32")]

    def family(ref, role, n, done):
        fam = Family(store, ref, role, specs)
        fam.ensure_arrays(n)
        fam.write_block(0, {"margins": np.zeros((done, 4), np.float32)})

    sub = plan.cfg.train.subset
    for kind, ref, roles in [("full", plan.full, ["models"]), ("subset", plan.subset, ["fit", "heldout"])] + \
            [("oracle", plan.oracle(n), ["target", "reference", "eval"]) for n in plan.forget_sets]:
        section, upstream = stage_section(plan, FamilySpec(ref, roles[0], 1, kind, alpha=sub.alpha,
                                                           logits=sub.store_logits))
        ensure_stage(store, ref, section, upstream, plan.cfg.name)
        for role in roles:
            family(ref, role, 3, 2 if partial_subset and kind == "subset" else 3)
    ensure_stage(store, plan.fit, plan.cfg.fit.section(),
                 {"subset": plan.subset.id, "models": sub.models, "heldout": sub.heldout}, plan.cfg.name)
    mark_complete(store, plan.fit, {"fake": True})
    for method, grid in method_grids(plan.cfg).items():
        for hp in grid:
            for fs in plan.forget_sets:
                ref = unlearn_ref(plan, method, hp, fs)
                ensure_stage(store, ref, {"method": method, "hparams": hp.model_dump(mode="json"), "forget_set": fs},
                             {"full": plan.full.id}, plan.cfg.name)
                family(ref, "models", 2, 2)
    for rel in selection_rels(plan, method_grids(plan.cfg)):
        store.write_json(rel, {"chosen": 0})
    store.write_bytes(f"reports/{plan.cfg.name}/report.md", b"# fake report\n")
    stages, _ = reached_by(plan)
    assert all(store.exists(f"{rel}/stage.json") for rel in stages)


@pytest.fixture(scope="module")
def two_configs(tiny_store, tmp_path_factory):
    """A store root holding tiny.yaml (A) and tiny.yaml with train.epochs 5 (B, 'tiny-b'): prepare is real
    (the shared tiny store's) and shared, every other stage is a small fake; B's subset is partial and B's
    full is being written (a live lease held by this test process)."""
    tmp = tmp_path_factory.mktemp("two-configs")
    (tmp / "tiny-b.yaml").write_text(TINY_B)
    root = tmp / "store"
    copy_store(tiny_store.root / "prepare", root / "prepare")
    a = tiny_plan(root)
    b = tiny_plan(root, config=tmp / "tiny-b.yaml")
    fake_stages(a)
    fake_stages(b, partial_subset=True)
    from pipeline.store.lease import Lease

    lease = Lease(b.store, [b.full.rel], ttl=3600).acquire()  # refreshed by its thread while the module runs
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not a stage")
    yield {"root": root, "a": a, "b": b, "a_yaml": TINY, "b_yaml": tmp / "tiny-b.yaml", "lease": lease}
    lease.release()


def test_ls_lists_every_stage_with_state_size_lease_and_config_diff(two_configs):
    root, a, b = two_configs["root"], two_configs["a"], two_configs["b"]
    result, table, missing = run_many(["ls", str(root), "--config", str(TINY), "--json"],
                                      ["ls", "--config", str(TINY), "--set", f"store={root}"],  # ROOT: the config's
                                      ["ls", str(root / "nowhere")])
    assert result.returncode == 0, result.stderr
    rows = {r["rel"]: r for r in json.loads(result.stdout)}
    from pipeline.maintenance.lifecycle import reached_by

    reach_a, _ = reached_by(a)
    reach_b, _ = reached_by(b)
    assert set(rows) == reach_a | reach_b
    assert {rel for rel, r in rows.items() if r["reached"]} == reach_a
    prepare = rows[a.prepare.rel]
    assert prepare["state"] == "complete" and prepare["bytes"] > 0 and prepare["age_s"] >= 0
    assert prepare["config"] == "tiny" and prepare["reached"] and a.prepare == b.prepare
    assert rows[a.subset.rel]["state"] == "complete" and rows[a.subset.rel]["models"] == {"fit": [3, 3], "heldout": [3, 3]}
    sub_b = rows[b.subset.rel]
    assert sub_b["state"] == "partial" and sub_b["models"]["fit"] == [2, 3] and sub_b["config"] == "tiny-b"
    assert sub_b["diff"] == ["train.epochs: 5 -> 4"]  # stored (B) -> the --config (A)
    assert rows[b.oracle("random10").rel]["diff"] == ["train.epochs: 5 -> 4"]
    lease = rows[b.full.rel]["lease"]
    assert lease["live"] and lease["pid"] == os.getpid() and lease["host"] == socket.gethostname()

    assert table.returncode == 0, table.stderr
    assert f"leased by {socket.gethostname()} pid {os.getpid()}" in table.stdout
    assert "train.epochs: 5 -> 4" in table.stdout and "partial (fit 2/3, heldout 2/3" in table.stdout

    assert missing.returncode == 2 and "no store there" in missing.stderr


def test_gc_dry_run_lists_then_yes_removes_exactly_the_other_configs_stages(two_configs):
    root, a, b = two_configs["root"], two_configs["a"], two_configs["b"]
    from pipeline.maintenance.lifecycle import reached_by

    reach_a, others_a = reached_by(a)
    reach_b, others_b = reached_by(b)
    assert reach_a & reach_b == {a.prepare.rel}  # only prepare is shared
    leased = b.full.rel
    expected = (reach_b - reach_a - {leased}) | (others_b - others_a)

    before = store_snapshot(root)
    dry = run_cli("gc", str(root), "--keep", str(TINY), "--json")
    assert dry.returncode == 0, dry.stderr
    report = json.loads(dry.stdout)
    assert report["dry_run"] and {r["rel"] for r in report["remove"]} == expected
    assert [r["rel"] for r in report["leased"]] == [leased] and report["left_alone"] == ["notes"]
    assert report["bytes"] == sum(r["bytes"] for r in report["remove"]) > 0
    assert store_snapshot(root) == before  # a dry run changes nothing

    done = run_cli("gc", str(root), "--keep", str(TINY), "--yes")
    assert done.returncode == 0, done.stderr
    assert f"kept (being written)  {leased}: host {socket.gethostname()}, pid {os.getpid()}" in done.stdout
    after = store_snapshot(root)
    gone = {p for p in before if p not in after}
    assert all(any(p == rel or p.startswith(rel + "/") for rel in expected) for p in gone)
    for rel in expected:
        assert not (root / rel).exists(), rel
    kept = reach_a | others_a | {leased, "notes"}
    for path, (size, mtime) in before.items():  # A's stages and shared prepare: every file as it was
        if size >= 0 and any(path.startswith(rel + "/") for rel in kept):
            assert after.get(path) == (size, mtime), path
    assert f"removed {len(expected)} entries" in done.stdout

    from pipeline.maintenance.lifecycle import plan_gc

    assert plan_gc(a.store, [a, b]).remove == []  # what is left, both configs reach


# ------------------------------------------------------------------------------------------ leases in process
def test_lease_protocol(tmp_path, capfd):
    from pipeline.store import Store
    from pipeline.store.lease import Lease, LeaseHeld, owner_identity, read_lease

    store = Store(str(tmp_path / "store"))
    # ttl 30: a loaded machine's late heartbeat must not make this live lease look stale
    with Lease(store, ["full/full-1", "oracle/oracle-2"], ttl=30.0) as mine:
        rec = read_lease(store, "full/full-1")
        assert rec["token"] == mine.token and rec["pid"] == os.getpid() and rec["ttl"] == 30.0
        with pytest.raises(LeaseHeld, match=rf"oracle/oracle-2 is being written by another driver: host "
                                            rf"{socket.gethostname()}, pid {os.getpid()}, since"):
            Lease(store, ["oracle/oracle-2", "unlearn/unlearn-3"]).acquire()
        assert read_lease(store, "unlearn/unlearn-3") is None  # the loser holds nothing
        beat = rec["heartbeat"]
        mine.refresh()  # what the heartbeat thread does every ttl/3, called here rather than waited for
        assert read_lease(store, "full/full-1")["heartbeat"] > beat
    assert read_lease(store, "full/full-1") is None and read_lease(store, "oracle/oracle-2") is None
    with Lease(store, ["fit/fit-9"], ttl=0.3) as beating:  # the background thread beats every ttl/3
        beat = read_lease(store, "fit/fit-9")["heartbeat"]
        wait_for(lambda: read_lease(store, "fit/fit-9")["heartbeat"] > beat, timeout=120, what="a heartbeat")
        assert read_lease(store, "fit/fit-9")["token"] == beating.token

    # a live holder on another host: wait up to lease_wait, then a message naming it
    other = {"host": "elsewhere", "pid": 4242, "token": "t", "started": time.time() - 60, "heartbeat": time.time(),
             "ttl": 30}
    store.write_json("fit/fit-4/LEASE.json", other)
    t0 = time.monotonic()
    with pytest.raises(LeaseHeld, match=r"host elsewhere, pid 4242.*waited \d+ s"):
        Lease(store, ["fit/fit-4"], wait=1.0, quiet=True).acquire()
    assert time.monotonic() - t0 >= 1.0
    # ... whose heartbeat then expires: taken over
    store.write_json("fit/fit-4/LEASE.json", {**other, "heartbeat": time.time() - 31})
    with Lease(store, ["fit/fit-4"]) as taker:
        assert read_lease(store, "fit/fit-4")["token"] == taker.token
    # a holder provably gone (this machine, its pid no longer running): not a live holder to give up
    # on, but its lease is taken over only once its heartbeat expires (decision 26), whatever wait says
    pid = dead_pid()
    beat = time.time()
    store.write_json("fit/fit-4/LEASE.json", {**owner_identity(), "pid": pid, "pid_start": "1", "token": "t",
                                              "started": beat, "heartbeat": beat, "ttl": 1.5})
    with Lease(store, ["fit/fit-4"], wait=0) as taker:
        assert time.time() >= beat + 1.5
        assert read_lease(store, "fit/fit-4")["token"] == taker.token
    said = capfd.readouterr().err
    assert f"fit/fit-4: the lease of a driver that is gone (host {socket.gethostname()}, pid {pid}" in said
    assert "taking it over then" in said
    # ... but not while that pid runs the process that wrote the lease
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        from pipeline.store.lease import _proc_start

        store.write_json("fit/fit-4/LEASE.json", {**owner_identity(), "pid": sleeper.pid, "token": "t",
                                                  "pid_start": _proc_start(sleeper.pid), "started": time.time(),
                                                  "heartbeat": time.time(), "ttl": 30})
        with pytest.raises(LeaseHeld, match=f"pid {sleeper.pid}"):
            Lease(store, ["fit/fit-4"]).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_two_takeovers_of_a_stale_lease_take_turns_however_long_one_stalls(tmp_path):
    """Two drivers find the same stale lease, and one stalls between reading it and writing its own (a
    loaded machine). On local disk reading, deciding and writing a lease is one critical section (a
    flock of the stage folder): the other driver waits for it, then finds a live lease and gives up.
    No delay decides who wins; the test waits only on events."""
    import fcntl
    import threading

    from pipeline.store import Store
    from pipeline.store.lease import Lease, LeaseHeld, read_lease

    class Stalling(Store):
        """A store whose first read of a lease returns only once the test says so."""

        def __init__(self, root: str):
            super().__init__(root)
            self.read_done, self.go = threading.Event(), threading.Event()

        def read_json(self, rel: str):
            record = super().read_json(rel)
            if rel.endswith("LEASE.json") and not self.read_done.is_set():
                self.read_done.set()
                assert self.go.wait(120)
            return record

    root = tmp_path / "store"
    Store(str(root)).write_json("full/full-1/LEASE.json", {"host": "ghost", "pid": 1, "token": "dead",
                                                           "started": time.time() - 3600,
                                                           "heartbeat": time.time() - 120, "ttl": 30})
    slow_store = Stalling(str(root))
    slow, fast = Lease(slow_store, ["full/full-1"], quiet=True), Lease(Store(str(root)), ["full/full-1"], quiet=True)
    outcome = {}

    def take(name: str, lease: Lease) -> None:
        try:
            lease.acquire()
            outcome[name] = "held"
        except LeaseHeld as exc:
            outcome[name] = exc

    threads = {"slow": threading.Thread(target=take, args=("slow", slow)),
               "fast": threading.Thread(target=take, args=("fast", fast))}
    try:
        threads["slow"].start()
        assert slow_store.read_done.wait(120)  # it has read the stale lease, and stalls
        fd = os.open(root / "full" / "full-1", os.O_RDONLY)
        try:  # ... inside the critical section: nobody else may enter it now
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        threads["fast"].start()
        slow_store.go.set()
        for t in threads.values():
            t.join(120)
        assert outcome["slow"] == "held", outcome
        assert isinstance(outcome["fast"], LeaseHeld) and "is being written by another driver" in str(outcome["fast"])
        assert read_lease(Store(str(root)), "full/full-1")["token"] == slow.token
    finally:
        slow_store.go.set()
        slow.release()
        fast.release()
    assert read_lease(Store(str(root)), "full/full-1") is None


# ------------------------------------------------------------------------------------------ two drivers at once
def test_two_drivers_at_once_one_trains_the_other_exits_2_and_a_stale_lease_is_taken_over(tiny_store, tmp_path):
    """A dead driver (another host, expired heartbeat) left the full stage leased with its block half
    written and unmarked. Two `train` drivers start at once: one takes the stale lease over and redoes
    the block, the other exits 2 naming it; a third, told to wait, waits and finds nothing left to do."""
    from pipeline.plan import FamilySpec, family_store

    ref_plan = tiny_store.plan
    root = tmp_path / "store"
    copy_store(tiny_store.root / "prepare", root / "prepare")
    copy_store(tiny_store.root / ref_plan.full.rel, root / ref_plan.full.rel)
    plan = tiny_plan(root)
    meta = plan.prepared_meta()
    fam = FamilySpec(plan.full, "models", plan.cfg.train.full.models, "full")
    family = family_store(plan, fam, meta)
    for marker in (root / plan.full.rel / "markers" / "models").glob("*.json"):
        marker.unlink()
    garbage = np.full(family.array("margins").shape, 7.0, np.float32)
    family.array("margins", mode="r+")[:] = garbage  # the dead driver's half-written rows
    stale = {"host": "ghost", "pid": dead_pid(), "token": "dead", "started": time.time() - 3600,
             "heartbeat": time.time() - 120, "ttl": 30}
    (root / plan.full.rel / "LEASE.json").write_text(json.dumps(stale))

    args = [CLI, "train", str(TINY), "--family", "full", "--set", f"store={root}"]
    env = {**os.environ, "COLUMNS": "250"}
    drivers = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
               for _ in range(2)]
    lease_path = root / plan.full.rel / "LEASE.json"

    def taken_over():
        try:
            return json.loads(lease_path.read_text())["token"] != "dead"
        except (OSError, ValueError):
            return False

    waiter = None
    try:
        wait_for(lambda: taken_over() or all(d.poll() is not None for d in drivers), timeout=300,
                 what="a driver taking the stale lease over")
        waiter = subprocess.Popen(args + ["--set", "execution.lease_wait=300"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
        outs = [d.communicate(timeout=600) for d in drivers]
        waited = waiter.communicate(timeout=600)
    finally:
        for p in drivers + [waiter]:
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    codes = sorted(d.returncode for d in drivers)
    assert codes == [0, 2], outs
    winner = next(i for i, d in enumerate(drivers) if d.returncode == 0)
    loser_err = outs[1 - winner][1]
    assert "train: 4 models trained" in outs[winner][0]
    assert (f"is being written by another driver: host {socket.gethostname()}, pid {drivers[winner].pid}, since"
            in loser_err), loser_err
    assert "Traceback" not in loser_err and "models trained" not in outs[1 - winner][0]
    assert "Token authentication" not in outs[winner][1]  # Ray's notice is not shown (its warnings would be)
    assert waiter.returncode == 0 and "train: 0 models trained" in waited[0], waited

    markers = list((root / plan.full.rel / "markers" / "models").glob("*.json"))
    assert len(markers) == 1  # one block, done once
    assert not lease_path.exists()  # released
    got = {n: family.read(n, fam.n_models) for n in ("margins", "logits", "accuracy")}
    ref_family = family_store(ref_plan, FamilySpec(ref_plan.full, "models", fam.n_models, "full"), meta)
    want = {n: ref_family.read(n, fam.n_models) for n in got}
    assert_same_arrays(got, want, exact=True)  # as a single uninterrupted driver wrote them
