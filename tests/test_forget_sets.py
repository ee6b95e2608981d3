"""Forget sets: every kind resolves to sorted, unique, in-range training indices, and every malformed
entry is refused with a message naming the entry (or file) and the offending index."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import ClassForget, IndicesForget, PublishedForget, RandomForget
from pipeline.data.forget_sets import ForgetSetError, forget_set_id, resolve_forget_set

N = 1437  # digits' training split
LABELS = np.arange(N) % 10
CIFAR_LABELS = np.zeros(50_000, dtype=np.int64)


def check_valid(indices: np.ndarray, n: int = N) -> None:
    assert indices.dtype == np.int64 and indices.ndim == 1
    assert np.all(np.diff(indices) > 0)  # sorted and unique
    assert indices.min() >= 0 and indices.max() < n


def refused(spec, labels=LABELS) -> str:
    with pytest.raises(ForgetSetError) as info:
        resolve_forget_set(spec, labels)
    return str(info.value)


# ------------------------------------------------------------------------------------------ kinds
def test_random_is_seeded():
    a = resolve_forget_set(RandomForget(kind="random", name="r", size=25, seed=3), LABELS)
    check_valid(a)
    assert len(a) == 25
    assert np.array_equal(a, resolve_forget_set(RandomForget(kind="random", name="other", size=25, seed=3), LABELS))
    assert not np.array_equal(a, resolve_forget_set(RandomForget(kind="random", name="r", size=25, seed=4), LABELS))


def test_class_takes_points_of_that_class_only():
    every = resolve_forget_set(ClassForget(kind="class", name="c", class_id=3), LABELS)
    assert np.array_equal(every, np.flatnonzero(LABELS == 3))
    half = resolve_forget_set(ClassForget(kind="class", name="c", class_id=3, fraction=0.5, seed=1), LABELS)
    check_valid(half)
    assert len(half) == round(0.5 * (LABELS == 3).sum()) and np.all(LABELS[half] == 3)
    forty = resolve_forget_set(ClassForget(kind="class", name="c", class_id=7, size=40, seed=2), LABELS)
    assert len(forty) == 40 and np.all(LABELS[forty] == 7)


def test_inline_indices_are_sorted():
    got = resolve_forget_set(IndicesForget(kind="indices", name="i", indices=[9, 2, 400]), LABELS)
    assert got.tolist() == [2, 9, 400] and got.dtype == np.int64


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint16])
def test_indices_from_a_npy_file(tmp_path, dtype):
    path = tmp_path / "f.npy"
    np.save(path, np.array([17, 5, 1000], dtype=dtype))
    got = resolve_forget_set(IndicesForget(kind="indices", name="f", file=str(path)), LABELS)
    assert got.tolist() == [5, 17, 1000] and got.dtype == np.int64


@pytest.mark.parametrize("number, seed, size", [(1, 0, 10), (2, 1, 100), (3, 2, 1000)])
def test_published_random_sets_equal_the_legacy_numpy_rng(number, seed, size):
    np.random.seed(seed)
    legacy = np.sort(np.random.choice(50_000, size, replace=False))
    got = resolve_forget_set(PublishedForget(kind="published", name="p", number=number), CIFAR_LABELS)
    assert np.array_equal(got, legacy)


@pytest.mark.parametrize("number, size", [(1, 10), (2, 100), (3, 1000), (4, 10), (5, 100), (6, 500), (7, 10),
                                          (8, 100), (9, 500), (10, 100)])
def test_every_published_set_is_shipped_and_valid(number, size):
    got = resolve_forget_set(PublishedForget(kind="published", name="p", number=number), CIFAR_LABELS)
    check_valid(got, 50_000)
    assert len(got) == size


def test_forget_set_id_is_the_content():
    a = resolve_forget_set(IndicesForget(kind="indices", name="a", indices=[3, 1, 2]), LABELS)
    b = resolve_forget_set(IndicesForget(kind="indices", name="b", indices=[1, 2, 3]), LABELS)
    c = resolve_forget_set(IndicesForget(kind="indices", name="a", indices=[1, 2, 4]), LABELS)
    assert forget_set_id(a) == forget_set_id(b) != forget_set_id(c)


# ------------------------------------------------------------------------------------------ errors
def inline(*indices) -> IndicesForget:
    return IndicesForget(kind="indices", name="bad", indices=list(indices))


def test_out_of_range():
    msg = refused(inline(1, 5000, 7))
    assert "forget set 'bad' (inline indices)" in msg
    assert "index 5000 at position 1 is out of range (training set has 1437 points)" in msg


def test_index_equal_to_the_size_is_out_of_range():
    assert "index 1437 at position 0 is out of range" in refused(inline(N))


def test_negative():
    msg = refused(inline(3, -1, 4))
    assert "forget set 'bad'" in msg and "negative index -1 at position 1" in msg


def test_duplicate():
    msg = refused(inline(4, 2, 4))
    assert "forget set 'bad'" in msg and "duplicate index 4" in msg


def test_empty_inline():
    assert "forget set 'bad' (inline indices): the forget set is empty" in refused(inline())


def npy_spec(tmp_path, array, name="filed") -> IndicesForget:
    path = tmp_path / f"{name}.npy"
    np.save(path, array)
    return IndicesForget(kind="indices", name=name, file=str(path))


def test_npy_errors_name_the_entry_and_the_file(tmp_path):
    spec = npy_spec(tmp_path, np.array([3, 2000], dtype=np.int64))
    msg = refused(spec)
    assert "forget set 'filed'" in msg and str(tmp_path / "filed.npy") in msg
    assert "index 2000 at position 1 is out of range" in msg


@pytest.mark.parametrize("array", [np.array([1.0, 2.0]), np.array([0.5]), np.array([True, False])])
def test_npy_non_integer_dtype(tmp_path, array):
    msg = refused(npy_spec(tmp_path, array))
    assert "forget set 'filed'" in msg and f"indices must be integers, got dtype {array.dtype}" in msg


def test_npy_empty(tmp_path):
    assert "the forget set is empty" in refused(npy_spec(tmp_path, np.array([], dtype=np.int64)))


def test_npy_not_one_dimensional(tmp_path):
    msg = refused(npy_spec(tmp_path, np.arange(6).reshape(2, 3)))
    assert "forget set 'filed'" in msg and "must hold a 1-D array of indices, got shape (2, 3)" in msg
    assert "got shape ()" in refused(npy_spec(tmp_path, np.array(5), name="scalar"))


def test_npy_negative_and_duplicate(tmp_path):
    assert "negative index -3 at position 2" in refused(npy_spec(tmp_path, np.array([1, 2, -3])))
    assert "duplicate index 2" in refused(npy_spec(tmp_path, np.array([2, 9, 2]), name="dup"))


def test_npy_missing_or_unreadable(tmp_path):
    msg = refused(IndicesForget(kind="indices", name="gone", file=str(tmp_path / "gone.npy")))
    assert "forget set 'gone'" in msg and "forget-set file not found" in msg and "gone.npy" in msg
    garbage = tmp_path / "garbage.npy"
    garbage.write_bytes(b"not a numpy file")
    msg = refused(IndicesForget(kind="indices", name="garbage", file=str(garbage)))
    assert "forget set 'garbage'" in msg and "not a readable .npy array" in msg


def test_npy_with_pickled_objects_is_not_unpickled(tmp_path):
    path = tmp_path / "objects.npy"
    np.save(path, np.array([1, "two", None], dtype=object), allow_pickle=True)
    msg = refused(IndicesForget(kind="indices", name="objects", file=str(path)))
    assert "not a readable .npy array" in msg


def test_random_and_class_sizes_are_checked():
    assert "size 1437 must be below the 1437 training points" in refused(
        RandomForget(kind="random", name="big", size=N))
    assert "class_id 12 has no training points" in refused(ClassForget(kind="class", name="c", class_id=12))
    msg = refused(ClassForget(kind="class", name="c", class_id=3, size=1000))
    assert "forget set 'c'" in msg and "size 1000 exceeds the 144 points of class 3" in msg


def test_a_published_cifar_set_does_not_fit_digits():
    msg = refused(PublishedForget(kind="published", name="pub", number=1))
    assert "forget set 'pub' (published CIFAR-10 set 1)" in msg
    assert "index 11841 at position 0 is out of range (training set has 1437 points)" in msg
