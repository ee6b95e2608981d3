"""Forget sets: resolve a config entry to a sorted array of training indices, validating it first."""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

import numpy as np

from pipeline.config import ClassForget, IndicesForget, PublishedForget, RandomForget


class ForgetSetError(ValueError):
    """A forget set is malformed; the message names the entry or file and the offending index."""


def resolve_forget_set(spec, train_labels: np.ndarray) -> np.ndarray:
    """Return the forget set's training indices (int64, sorted, unique) or raise ForgetSetError."""
    n_train = len(train_labels)
    where = f"forget set {spec.name!r}"
    if isinstance(spec, RandomForget):
        if spec.size >= n_train:
            raise ForgetSetError(f"{where}: size {spec.size} must be below the {n_train} training points")
        rng = np.random.default_rng(spec.seed)
        return np.sort(rng.choice(n_train, size=spec.size, replace=False)).astype(np.int64)
    if isinstance(spec, ClassForget):
        members = np.flatnonzero(train_labels == spec.class_id)
        if members.size == 0:
            raise ForgetSetError(f"{where}: class_id {spec.class_id} has no training points")
        count = spec.size if spec.size is not None else max(1, int(round(spec.fraction * members.size)))
        if count > members.size:
            raise ForgetSetError(f"{where}: size {count} exceeds the {members.size} points of class {spec.class_id}")
        rng = np.random.default_rng(spec.seed)
        return np.sort(rng.choice(members, size=count, replace=False)).astype(np.int64)
    if isinstance(spec, IndicesForget):
        if spec.file is not None:
            named = f"{where} (file {spec.file})"
            return validate_indices(load_index_file(Path(spec.file), named), n_train, named)
        return validate_indices(np.asarray(spec.indices), n_train, f"{where} (inline indices)")
    if isinstance(spec, PublishedForget):
        path = resources.files("pipeline.data") / "forget_sets" / "cifar10" / f"forget_set_{spec.number}.npy"
        with resources.as_file(path) as local:
            indices = load_index_file(local, where)
        return validate_indices(indices, n_train, f"{where} (published CIFAR-10 set {spec.number})")
    raise ForgetSetError(f"{where}: unknown kind")


def load_index_file(path: Path, where: str | None = None) -> np.ndarray:
    """A 1-D array from a .npy file (never unpickled); `where` names the config entry in errors."""
    where = where or str(path)
    if not path.is_file():
        raise ForgetSetError(f"{where}: forget-set file not found: {path}")
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise ForgetSetError(f"{where}: {path} is not a readable .npy array ({exc})") from None
    if not isinstance(array, np.ndarray) or array.ndim != 1:
        shape = getattr(array, "shape", type(array).__name__)
        raise ForgetSetError(f"{where}: {path} must hold a 1-D array of indices, got shape {shape}")
    return array


def validate_indices(indices: np.ndarray, n_train: int, where: str) -> np.ndarray:
    if indices.size == 0:
        raise ForgetSetError(f"{where}: the forget set is empty")
    if not np.issubdtype(indices.dtype, np.integer):
        raise ForgetSetError(f"{where}: indices must be integers, got dtype {indices.dtype}")
    bad = np.flatnonzero(indices < 0)
    if bad.size:
        raise ForgetSetError(f"{where}: negative index {indices[bad[0]]} at position {bad[0]}")
    bad = np.flatnonzero(indices >= n_train)
    if bad.size:
        raise ForgetSetError(
            f"{where}: index {indices[bad[0]]} at position {bad[0]} is out of range (training set has {n_train} points)"
        )
    uniq, counts = np.unique(indices, return_counts=True)
    if (counts > 1).any():
        raise ForgetSetError(f"{where}: duplicate index {uniq[counts > 1][0]}")
    return np.sort(indices).astype(np.int64)


def forget_set_id(indices: np.ndarray) -> str:
    """Content id: two configs naming the same points share oracles."""
    return hashlib.sha256(np.ascontiguousarray(indices, dtype=np.int64).tobytes()).hexdigest()[:16]
