"""Forget sets: resolve a config entry to a sorted array of training indices, validating it first."""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path
from typing import Callable, Union

import numpy as np

from pipeline.config import AtypicalForget, ClassForget, IndicesForget, PublishedForget, RandomForget

Images = Union[np.ndarray, Callable[[], np.ndarray]]
_BLOCK_ELEMENTS = 1 << 24  # distances held at once by `neighbour_disagreement` (128 MiB of float64)


class ForgetSetError(ValueError):
    """A forget set is malformed; the message names the entry or file and the offending index."""


def resolve_forget_set(spec, train_labels: np.ndarray, train_images: Images | None = None,
                       disagreement: Callable[[int], np.ndarray] | None = None,
                       outside: np.ndarray | None = None) -> np.ndarray:
    """Return the forget set's training indices (int64, sorted, unique) or raise ForgetSetError.

    `train_images` (the training images, N x C x H x W, or a function returning them, called only when
    needed) is read by the `atypical` kind alone; `disagreement(k)`, when given, serves that kind's
    `neighbour_disagreement` scores instead (a cache of them). `outside` (a tuning set's, decision 31:
    every reported set's points): the random, class and atypical kinds draw only other points."""
    n_train = len(train_labels)
    where = f"forget set {spec.name!r}"
    if outside is not None and isinstance(spec, (RandomForget, ClassForget)):
        return _draw_outside(spec, train_labels, np.asarray(outside), where)
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
    if isinstance(spec, AtypicalForget):
        return _resolve_atypical(spec, train_labels, train_images, where, disagreement, outside)
    raise ForgetSetError(f"{where}: unknown kind")


def _draw_outside(spec, labels: np.ndarray, outside: np.ndarray, where: str) -> np.ndarray:
    """A random or class set drawn from the points not in `outside`: the first `size` of a seeded
    permutation of the candidates that are not excluded, so the set changes only where a newly excluded
    point was in it."""
    if isinstance(spec, ClassForget):
        candidates = np.flatnonzero(labels == spec.class_id)
        if candidates.size == 0:
            raise ForgetSetError(f"{where}: class_id {spec.class_id} has no training points")
        count = spec.size if spec.size is not None else max(1, int(round(spec.fraction * candidates.size)))
        pool = f"points of class {spec.class_id}"
    else:
        candidates, count, pool = np.arange(len(labels)), spec.size, "training points"
    order = np.random.default_rng(spec.seed).permutation(candidates)
    free = order[~np.isin(order, outside)]
    if count > free.size:
        raise ForgetSetError(f"{where}: size {count} exceeds the {free.size} {pool} outside the reported forget sets")
    return np.sort(free[:count]).astype(np.int64)


# ------------------------------------------------------------------------------------ atypical points
def _resolve_atypical(spec: AtypicalForget, labels: np.ndarray, images: Images | None, where: str,
                      disagreement: Callable[[int], np.ndarray] | None = None,
                      outside: np.ndarray | None = None) -> np.ndarray:
    n_train = len(labels)
    if spec.neighbours >= n_train:
        raise ForgetSetError(f"{where}: neighbours {spec.neighbours} must be below the {n_train} training points")
    if spec.class_id is None:
        candidates = np.arange(n_train)
        if spec.size >= n_train:
            raise ForgetSetError(f"{where}: size {spec.size} must be below the {n_train} training points")
    else:
        candidates = np.flatnonzero(labels == spec.class_id)
        if candidates.size == 0:
            raise ForgetSetError(f"{where}: class_id {spec.class_id} has no training points")
        if spec.size > candidates.size:
            raise ForgetSetError(
                f"{where}: size {spec.size} exceeds the {candidates.size} points of class {spec.class_id}")
    if disagreement is not None:
        disagree = disagreement(spec.neighbours)[candidates]
    else:
        if images is None:
            raise ForgetSetError(f"{where}: kind 'atypical' needs the training images, and none were given")
        images = np.asarray(images() if callable(images) else images)
        if images.ndim != 4 or len(images) != n_train:
            raise ForgetSetError(f"{where}: training images of shape {images.shape} do not match "
                                 f"{n_train} labels (expected N x C x H x W)")
        disagree = neighbour_disagreement(images, labels, spec.neighbours)[candidates]
    if outside is not None:  # a tuning set: the most atypical points no reported set holds
        free = ~np.isin(candidates, outside)
        candidates, disagree = candidates[free], disagree[free]
        if spec.size > candidates.size:
            raise ForgetSetError(f"{where}: size {spec.size} exceeds the {candidates.size} candidates outside the "
                                 "reported forget sets")
    order = np.lexsort((candidates, -disagree))  # most disagreeing first, then the lower index
    return np.sort(candidates[order[: spec.size]]).astype(np.int64)


def neighbour_disagreement(images: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """For each training point, how many of its k nearest other training points carry another label.

    Distances are Euclidean in pixel space after per-channel normalisation by the training split's
    std (as models see the images; the mean shift changes no distance). Deterministic: on integer
    pixels every per-channel squared distance is an exact integer in float64, whatever the BLAS, and
    a tie at the k-th distance goes to the lower index. Rows are done in blocks, so memory is the
    images in float64 (1.2 GB for CIFAR-10's 50,000 training images) plus a few blocks of distances.
    """
    n, channels = images.shape[0], images.shape[1]
    per_channel = [np.ascontiguousarray(images[:, c].reshape(n, -1), dtype=np.float64) for c in range(channels)]
    weights = [1.0 / (x.std() + 1e-8) ** 2 for x in per_channel]  # the std of Dataset.channel_stats
    squares = [np.einsum("ij,ij->i", x, x) for x in per_channel]
    labels = np.asarray(labels)
    out = np.empty(n, dtype=np.int64)
    block = max(1, min(n, _BLOCK_ELEMENTS // n))
    for start in range(0, n, block):
        rows = np.arange(start, min(n, start + block))
        dist = np.zeros((rows.size, n))
        for x, sq, w in zip(per_channel, squares, weights):
            part = x[rows] @ x.T  # exact integers on integer pixels: the order of the sums cannot matter
            part *= -2.0
            part += sq[rows][:, None]
            part += sq[None, :]
            part *= w
            dist += part
        dist[np.arange(rows.size), rows] = np.inf  # never one's own neighbour
        kth = np.partition(dist, k - 1, axis=1)[:, k - 1 : k]
        closer = dist < kth
        at_kth = dist == kth
        room = k - closer.sum(axis=1, keepdims=True)  # >= 1: the k-th distance itself is taken
        chosen = closer | (at_kth & (np.cumsum(at_kth, axis=1) <= room))
        out[rows] = (chosen & (labels[None, :] != labels[rows][:, None])).sum(axis=1)
    return out


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
