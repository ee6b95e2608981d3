"""Helpers of the fault tests (tests/test_faults_*.py): the task gate seen from the test, and every
stored array of a stage kind, to compare a disturbed run with an undisturbed one."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest


# ------------------------------------------------------------------------------------------ the gate
def reset_gate(gate: Path) -> None:
    """Closed and empty: every task that starts waits at it."""
    for p in gate.iterdir():
        p.unlink()


def open_gate(gate: Path) -> None:
    (gate / "open").touch()


def held_tasks(cluster) -> list[dict]:
    """The tasks waiting at the gate right now and the live worker node each runs on:
    [{"pid", "what", "node"}] (`pipeline/execution/gate.py` names a waiting file after its pid)."""
    out = []
    for p in sorted(cluster.gate.glob("waiting-*")):
        _, pid, what = p.name.split("-", 2)
        node = cluster.node_of(int(pid))
        if node is not None:
            out.append({"pid": int(pid), "what": what, "node": node})
    return out


# ------------------------------------------------------------------------------------------ arrays
def family_rows(plan, kind: str) -> dict[str, np.ndarray]:
    """Every output array of the training families of one kind ('full', 'subset', 'oracle'):
    '<role>/<name>' -> rows 0..N (the families of other kinds may not exist in the store)."""
    from pipeline.plan import family_store, train_families

    meta = plan.prepared_meta()
    out = {}
    for fam in train_families(plan):
        if fam.kind == kind and fam.n_models:
            family = family_store(plan, fam, meta)
            out.update({f"{fam.ref.rel}/{fam.role}/{s.name}": family.read(s.name, fam.n_models) for s in family.specs})
    return out


def assert_marked_rows_whole(plan) -> None:
    """Every marked block's rows match its marker's checksums (no marker without its rows)."""
    from pipeline.plan import family_store, train_families

    meta = plan.prepared_meta()
    for fam in train_families(plan):
        if fam.n_models and plan.store.exists(f"{fam.ref.rel}/arrays.zarr/{fam.role}"):
            assert family_store(plan, fam, meta).verify(fam.n_models) == [], fam.ref.rel


def stage_arrays(root, kind: str) -> dict[str, np.ndarray]:
    """Every array of every stage of a kind under a store root (a path or an s3:// URL):
    '<stage>/<array path>' -> values."""
    from pipeline.store import Store

    store = Store(str(root))
    out = {}
    for stage in store.list(kind):
        if not store.exists(f"{kind}/{stage}/arrays.zarr/zarr.json"):
            continue
        for path, arr in _walk(store.open_group(f"{kind}/{stage}/arrays.zarr", mode="r")):
            out[f"{stage}/{path}"] = arr[...]
    return out


def _walk(group, prefix: str = ""):
    for name, arr in group.arrays():
        yield f"{prefix}{name}", arr
    for name, sub in group.groups():
        yield from _walk(sub, f"{prefix}{name}/")


def stage_markers(root: Path, kind: str) -> list[str]:
    """The marker and COMPLETE files of every stage of a kind (paths relative to the root)."""
    root = Path(root)
    return sorted(str(p.relative_to(root)) for pattern in ("*/markers/*/*.json", "*/COMPLETE.json")
                  for p in root.glob(f"{kind}/{pattern}"))


def copy_store_without(src: Path, dst: Path, *kinds: str) -> Path:
    """A copy of a store root without the stages of some kinds (to run them again)."""
    shutil.copytree(src, dst, ignore=lambda d, names: [n for n in names if Path(d) == Path(src) and n in kinds])
    return dst


def assert_bit_identical(got: dict, want: dict) -> None:
    """The same arrays, byte for byte (NaN where the undisturbed run has NaN: `lam` of a target never fitted)."""
    assert sorted(got) == sorted(want)
    for key in want:
        a, b = got[key], want[key]
        assert a.shape == b.shape and a.dtype == b.dtype, key
        assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes(), key


# ------------------------------------------------------------------------------------------ a full disk
class Tmpfs:
    """A tmpfs of `kib` KiB mounted at `path` for the test; `grow` remounts it larger (files kept)."""

    def __init__(self, path: Path, kib: int):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(self.path)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")

    def grow(self, kib: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={kib}k", str(self.path)], check=True)

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)


@pytest.fixture
def mounts():
    made = []
    yield lambda path, kib: made.append(Tmpfs(path, kib)) or made[-1]
    for m in made:
        m.unmount()


def kib_used(root: Path) -> int:
    """What a tree takes on a tmpfs: whole 4 KiB pages per file and folder."""
    pages = sum(-(-p.stat().st_size // 4096) if p.is_file() else 1 for p in [root, *root.rglob("*")])
    return pages * 4


def no_temporaries(root: Path) -> list[str]:
    return [str(p) for p in Path(root).rglob("*") if p.name.startswith(".tmp-") or ".part" in p.name]
