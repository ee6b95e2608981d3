"""Leases: one driver at a time writes a stage (decision 26).

A driver about to write stages holds a lease object per stage, `<stage rel>/LEASE.json` =
`{host, pid, token, started, heartbeat, ttl, command, ...}`. Ray tasks write rows and markers; only the
driver holds (and refreshes) the lease.

Acquire, per batch of stages (all or none, so a waiting driver never holds half of what it needs):
stage by stage in sorted order (two drivers contend first on the first stage they share; the loser
stops there, so neither ends up holding a part of what the other needs):
  1. read the lease; one held by another live owner -> release what we hold, wait (poll) up to `wait`
     seconds and start again, or raise `LeaseHeld` naming the holder (host, pid, since when, heartbeat);
  2. write ours where there is none or where the holder's heartbeat is older than its ttl (stale);
  3. re-read (after a settle delay where the write was a plain PUT): it must carry our token, else we
     lost a race -> release what we hold and go to 1.
On local disk steps 1-3 run under an exclusive `flock(2)` of the stage's folder, as do a heartbeat's
read-and-rewrite and a release: two drivers on one machine (or on a file system whose flock is shared)
take turns, so the one that comes second reads the first one's lease, whatever either process's speed.
A background thread rewrites the heartbeat every ttl/3 while held; release deletes our lease objects.
A stale lease is taken over and the blocks its holder left without markers are redone (markers
define done; a block being written when the holder died has no marker yet).

Atomicity. On local disk the read-decide-write of a lease is one critical section (the flock above):
a free lease is created with `link(2)` of a complete temporary file (create-if-absent, and a reader
never sees half a lease), a stale one replaced, and no delay is needed. Where flock is refused (some
network file systems) a local store falls back to what an object store does. An object store has no
compare-and-swap, so a PUT and a re-read after `settle` seconds (1 s) stand in for it: two drivers that
both saw the lease free (or stale) both write; the later PUT wins and the earlier writer sees the
other's token on its re-read and backs off. Both can believe they won only if one driver's read ->
write gap is longer than the other's write -> re-read gap (the settle delay); a process stalled that
long between two calls is the race window, and what it costs is two drivers writing the same
deterministic rows (decision 14), not lost data. Expiry compares the holder's heartbeat with the reader's clock: clocks of the machines
sharing a store must agree to well within the ttl.

A lease is taken over only once its heartbeat has expired (decision 26), even when its holder is
provably gone: same host name, same boot id and same PID namespace as ours (so its pid is one we can
see), and that pid no longer runs the process that wrote the lease (its start time differs or it is
gone). Such a holder is not waited for as a live one: a driver re-run after a SIGKILL waits for the
dead lease's expiry (at most its ttl, `execution.lease_ttl`), whatever `lease_wait` says, then
takes over, and says so.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import socket
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from pipeline.store import NoSpace, Store, StoreError, store_unavailable

LEASE_NAME = "LEASE.json"
_RETRY = object()
DEFAULT_TTL = 30.0


class LeaseHeld(StoreError):
    """Another live driver holds the lease of a stage this one needs to write (a StoreError, so every
    entrypoint that maps StoreError to exit 2 does so for this too)."""

    def __init__(self, store: Store, rel: str, record: dict, waited: float = 0.0):
        self.record = record
        self.rel = rel
        hint = ("wait for it, or re-run with --set execution.lease_wait=SECONDS to wait for it" if waited <= 0
                else f"waited {waited:.0f} s")
        super().__init__(f"{store.url(_stage_of(rel))} is being written by another driver: "
                         f"{describe_holder(record)}; {hint}")


def lease_rel(stage_rel: str) -> str:
    return f"{stage_rel}/{LEASE_NAME}"


def _stage_of(rel: str) -> str:
    return rel[: -len(LEASE_NAME) - 1] if rel.endswith("/" + LEASE_NAME) else rel


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def describe_holder(record: dict, now: float | None = None) -> str:
    now = time.time() if now is None else now
    beat = now - float(record.get("heartbeat", 0))
    return (f"host {record.get('host', '?')}, pid {record.get('pid', '?')}, since {_iso(float(record.get('started', 0)))}"
            f" (last heartbeat {beat:.0f} s ago, ttl {float(record.get('ttl', DEFAULT_TTL)):g} s)"
            + (f", running `{record['command']}`" if record.get("command") else ""))


# ---------------------------------------------------------------------------------------- identity
def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _proc_start(pid: int) -> str | None:
    """Start time of a process (clock ticks since boot, /proc/<pid>/stat field 22), None if it is gone
    or has exited (a zombie)."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # after the command name: field 3 (state) onwards
    return None if fields[0] in ("Z", "X") else fields[19]  # a zombie has exited


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def owner_identity() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "boot_id": _read("/proc/sys/kernel/random/boot_id"),
            "pid_ns": _pid_namespace(), "pid_start": _proc_start(os.getpid())}


def _same_machine(record: dict) -> bool:
    me = owner_identity()
    return all(me[k] is not None and record.get(k) == me[k] for k in ("host", "boot_id", "pid_ns"))


def _holder_alive(record: dict) -> bool:
    """On this machine (same host, boot and PID namespace): whether the lease's process still runs."""
    start = record.get("pid_start")
    return start is not None and _proc_start(int(record.get("pid", -1))) == start


def is_stale(record: dict | None, now: float | None = None) -> bool:
    """Whether a lease may be taken over: none, unreadable, or heartbeat older than its ttl."""
    return expires_in(record, now) < 0


def expires_in(record: dict | None, now: float | None = None) -> float:
    """Seconds until the lease's heartbeat expires (negative once it has; -inf for none or unreadable)."""
    if not record:
        return -math.inf
    now = time.time() if now is None else now
    try:
        return float(record["heartbeat"]) + float(record["ttl"]) - now
    except (KeyError, TypeError, ValueError):
        return -math.inf


def holder_gone(record: dict) -> bool:
    """Whether the lease's holder provably no longer runs (see the module docstring)."""
    return _same_machine(record) and not _holder_alive(record)


def read_lease(store: Store, stage_rel: str) -> dict | None:
    return store.read_json(lease_rel(stage_rel))


# ---------------------------------------------------------------------------------------- the lease
class Lease:
    """The leases of one or more stages, held by this driver, refreshed by one background thread."""

    def __init__(self, store: Store, stage_rels, ttl: float = DEFAULT_TTL, wait: float = 0.0,
                 poll: float | None = None, settle: float | None = None, quiet: bool = False):
        self.store = store
        self.rels = sorted({lease_rel(r) for r in stage_rels})
        self.ttl, self.wait = float(ttl), float(wait)
        self.poll = poll if poll is not None else min(2.0, max(0.1, self.ttl / 10))
        self.settle = settle if settle is not None else 1.0  # object stores (and local ones without flock)
        self.quiet = quiet
        self.token = uuid.uuid4().hex
        self.held: list[str] = []
        self.lost: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._started = time.time()
        self._identity = owner_identity()

    def record(self) -> dict:
        return {**self._identity, "token": self.token, "started": self._started, "heartbeat": time.time(),
                "ttl": self.ttl, "command": " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv))[:300]}

    # -------------------------------------------------------------- acquire / release
    def acquire(self) -> "Lease":
        """Take every lease (waiting up to `wait` seconds for live holders), or raise LeaseHeld."""
        self._start_heartbeat()  # beats for the leases already taken while later ones are being taken
        try:
            return self._acquire()
        except BaseException:
            self.release()
            raise

    def _acquire(self) -> "Lease":
        t0 = time.monotonic()
        deadline = t0 + self.wait
        announced, retries = False, 0
        while True:
            holder = self._try_all()
            if holder is None:
                return self
            if holder is _RETRY:
                retries += 1
                if retries > 50:
                    raise StoreError(f"{self.store.url(_stage_of(self.rels[0]))}: could not take the stage's lease "
                                     "(it keeps changing under this driver)")
                continue
            rel, record = holder
            gone = holder_gone(record)
            if gone:  # a dead driver's lease: wait for its expiry, whatever self.wait says
                deadline = max(deadline, time.monotonic() + expires_in(record) + self.poll)
            if time.monotonic() >= deadline:
                raise LeaseHeld(self.store, rel, record, waited=time.monotonic() - t0 if self.wait else 0.0)
            if not announced and not self.quiet:
                what = (f"the lease of a driver that is gone ({describe_holder(record)}) expires in "
                        f"{max(expires_in(record), 0):.0f} s; taking it over then" if gone else
                        f"waiting up to {self.wait:.0f} s: held by {describe_holder(record)}")
                print(f"{self.store.url(_stage_of(rel))}: {what}", file=sys.stderr, flush=True)
                announced = True
            time.sleep(min(self.poll, max(0.0, deadline - time.monotonic())))

    def _try_all(self):
        """Take the leases one by one in sorted order (two drivers contend first on the first stage they
        share, and the loser stops there, so they never each hold a part). None when all are ours;
        (rel, holder record) when another live driver holds one (ours are released); _RETRY when a lease
        changed under us with no live holder left."""
        for rel in self.rels:
            with self._exclusive(rel) as locked:
                outcome = self._try_one(rel, locked)
            if outcome is not None:
                self._release_all()
                return outcome
            with self._lock:
                self.held.append(rel)
        return None

    def _try_one(self, rel: str, locked: bool):
        """None when the lease is ours (taken now or before); else what `_try_all` returns."""
        rec = self.store.read_json(rel)
        if rec is not None and rec.get("token") == self.token:
            return None
        if rec is not None and not is_stale(rec):
            return rel, rec
        if rec is None and self.store.is_local and not self.store.exists(rel):
            self._create_local(rel)  # exclusive create; if another driver won, the re-read shows it
        else:  # free on an object store, or stale: write ours
            self.store.write_json(rel, self.record())
            if not locked:  # no critical section: let a concurrent PUT land before the re-read
                time.sleep(self.settle)
        rec = self.store.read_json(rel)
        if rec is None or rec.get("token") != self.token:
            return (rel, rec) if rec is not None and not is_stale(rec) else _RETRY
        return None

    @contextmanager
    def _exclusive(self, rel: str):
        """An exclusive flock of the stage's folder on a local store (yields True), else nothing (False)."""
        if not self.store.is_local:
            yield False
            return
        folder = Path(self.store.path(rel)).parent
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                locked = True
            except OSError:  # a file system without flock: the settle delay stands in
                locked = False
            yield locked
        finally:
            os.close(fd)  # releases the flock

    def _create_local(self, rel: str) -> bool:  # local stores only (store.is_local)
        """Create-if-absent on local disk: link(2) a complete temporary file to the lease's name."""
        target = Path(self.store.path(rel))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{LEASE_NAME}.{self.token}.tmp")
        tmp.write_text(json.dumps(self.record(), indent=1, sort_keys=True))
        try:
            os.link(tmp, target)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _release_all(self) -> None:
        """Delete the leases we hold (each only if it still carries our token)."""
        with self._lock:
            for rel in self.held:
                with self._exclusive(rel):
                    rec = self.store.read_json(rel)
                    if rec is not None and rec.get("token") == self.token:
                        try:
                            self.store.remove(rel)
                        except FileNotFoundError:
                            pass
            self.held = []

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, self.ttl))
            self._thread = None
        self._release_all()

    # -------------------------------------------------------------- heartbeat
    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="oracle-farm-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            with self._lock:
                self.refresh()

    def refresh(self) -> None:
        """Rewrite the heartbeat of each lease still ours; one found taken over is dropped (and said)."""
        for rel in list(self.held):
            try:
                with self._exclusive(rel):
                    rec = self.store.read_json(rel)
                    if rec is not None and rec.get("token") == self.token:
                        self.store.write_json(rel, {**rec, "heartbeat": time.time()})
                        continue
            except Exception as exc:  # noqa: BLE001 - a failed refresh is retried at the next beat
                if not self.quiet:
                    print(f"lease heartbeat of {self.store.url(rel)} failed: {exc}", file=sys.stderr, flush=True)
                continue
            self.held.remove(rel)
            self.lost.append(rel)
            if not self.quiet and rec is not None:
                print(f"warning: the lease of {self.store.url(_stage_of(rel))} was taken over by "
                      f"{describe_holder(rec)}", file=sys.stderr, flush=True)

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.release()
            return
        try:  # best effort: a store that failed the stage may fail this too, and the lease then expires
            self.release()
        except Exception as failed:  # noqa: BLE001 - the stage's own error is the one to report
            if not self.quiet:
                print(f"warning: could not release the lease ({type(failed).__name__}: {failed}); it expires "
                      f"{self.ttl:g} s after its last heartbeat", file=sys.stderr, flush=True)
        cause = getattr(exc, "cause", None)  # a Ray task's own error, as ray.get re-raises it
        if isinstance(cause, NoSpace):  # its message says it all; Ray's traceback around it would bury it
            raise cause from None
        lost = store_unavailable(self.store, exc)
        if lost is not None:  # an object store that stayed down: say which, exit 1
            raise lost from exc


def hold(store: Store, stage_rels, execution=None, **kwargs) -> Lease:
    """A Lease on these stages with the config's `execution.lease_ttl` / `execution.lease_wait`."""
    ttl = getattr(execution, "lease_ttl", DEFAULT_TTL)
    wait = getattr(execution, "lease_wait", 0.0)
    return Lease(store, stage_rels, ttl=ttl, wait=wait, **kwargs)
