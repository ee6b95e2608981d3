"""Helpers shared by the tests: the tiny config, stores, stored arrays, markers, subprocesses."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
BIN = Path(sys.executable).parent
CLI = str(BIN / "oracle-farm")
RAY = str(BIN / "ray")


@dataclass
class TinyStore:
    root: Path
    plan: object  # pipeline.plan.Plan


def tiny_plan(root, *overrides: str, config: Path = TINY):
    from pipeline.config import load_config
    from pipeline.plan import Plan
    from pipeline.store import Store

    cfg = load_config(config, [f"store={root}", *overrides])
    return Plan(cfg, Store(cfg.store))


def copy_store(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------------------ arrays
def family_arrays(plan, n_models: dict | None = None) -> dict[str, np.ndarray]:
    """Every stored output array of every training family: '<stage rel>/<role>/<name>' -> rows 0..N."""
    from pipeline.plan import family_store, train_families

    meta = plan.prepared_meta()
    out = {}
    for fam in train_families(plan):
        if fam.n_models == 0:
            continue
        family = family_store(plan, fam, meta)
        for spec in family.specs:
            out[f"{fam.ref.rel}/{fam.role}/{spec.name}"] = family.read(spec.name, fam.n_models)
    return out


def full_weights(plan) -> dict[str, np.ndarray]:
    """The full models' stored weights (safetensors), '<file>/<tensor>' -> array."""
    from safetensors.numpy import load

    rel = f"{plan.full.rel}/weights/models"
    out = {}
    for name in plan.store.list(rel):
        for key, value in load(plan.store.read_bytes(f"{rel}/{name}")).items():
            out[f"{name}/{key}"] = value
    return out


def assert_same_arrays(got: dict, want: dict, exact: bool = True, rtol=1e-4, atol=1e-4) -> None:
    assert sorted(got) == sorted(want)
    for key in want:
        a, b = got[key], want[key]
        assert a.shape == b.shape and a.dtype == b.dtype, key
        if exact:
            assert np.array_equal(a, b), f"{key}: max |diff| {np.abs(a.astype(float) - b.astype(float)).max()}"
        else:
            np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64), rtol=rtol, atol=atol,
                                       err_msg=key)


def total_models(plan) -> int:
    from pipeline.plan import train_families

    return sum(f.n_models for f in train_families(plan))


def n_blocks(plan) -> int:
    from pipeline.plan import train_families

    block = plan.cfg.execution.block_size
    return sum(-(-f.n_models // block) for f in train_families(plan))


def marker_files(root: Path) -> dict[str, bytes]:
    """Every block marker under a store root: relative path -> bytes."""
    root = Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob("*/*/markers/*/*.json"))}


def store_snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under a root: relative path -> (size, mtime_ns); {} when it does not exist."""
    root = Path(root)
    if not root.exists():
        return {}
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.stat()
        out[str(p.relative_to(root))] = (st.st_size if p.is_file() else -1, st.st_mtime_ns)
    return out


# ------------------------------------------------------------------------------------------ processes
def cli(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the installed console script (wide terminal so tables are never cut)."""
    full_env = {**os.environ, "COLUMNS": "250", **(env or {})}
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=full_env)


def start_session(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """Start a command in its own session (process group), output to a log file."""
    with open(log, "wb") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                                env={**os.environ, **(env or {})})


def descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def kill_tree(proc: subprocess.Popen, known: list = (), sig=signal.SIGKILL, grace: float = 20.0) -> None:
    """Stop a process we started, its process group and every descendant we saw, by pid, and wait."""
    import psutil

    tree = {p.pid: p for p in [*known, *descendants(proc.pid)]}
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=grace)
    _, alive = psutil.wait_procs(list(tree.values()), timeout=grace)
    for p in alive:  # children that left the group (Ray daemons): ours, stopped by pid
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace)


def wait_for(predicate, timeout: float, every: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_many(*commands: list[str], timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """Run console-script commands at once (when they only read the store, or write different things)."""
    env = {**os.environ, "COLUMNS": "250"}
    procs = [subprocess.Popen([CLI, *c], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
             for c in commands]
    out = []
    for cmd, p in zip(commands, procs):
        stdout, stderr = p.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess([CLI, *cmd], p.returncode, stdout, stderr))
    return out
