"""Forget sets: every kind resolves to sorted, unique, in-range training indices, and every malformed
entry is refused with a message naming the entry (or file) and the offending index."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import config as config_module
from pipeline.config import AtypicalForget, ClassForget, ConfigError, IndicesForget, PublishedForget, RandomForget
from pipeline.data import forget_sets
from pipeline.data.forget_sets import ForgetSetError, forget_set_id, neighbour_disagreement, resolve_forget_set

N = 1437  # digits' training split
LABELS = np.arange(N) % 10
CIFAR_LABELS = np.zeros(50_000, dtype=np.int64)


def check_valid(indices: np.ndarray, n: int = N) -> None:
    assert indices.dtype == np.int64 and indices.ndim == 1
    assert np.all(np.diff(indices) > 0)  # sorted and unique
    assert indices.min() >= 0 and indices.max() < n


def refused(spec, labels=LABELS, images=None) -> str:
    with pytest.raises(ForgetSetError) as info:
        resolve_forget_set(spec, labels, images)
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


# ------------------------------------------------------------------------------------------ atypical
# Eight one-pixel images on a line, two clusters; the last of each cluster carries the other label:
#   value  0  1  2  3 | 20 21 22 23
#   label  0  0  0  1 |  1  1  1  0
# With k = 3, point 3's neighbours are 2, 1, 0 (all label 0: 3 disagree) and point 7's are 22, 21, 20
# (all label 1: 3 disagree); every other point has exactly one odd one among its three neighbours.
LINE = np.array([0, 1, 2, 3, 20, 21, 22, 23], dtype=np.uint8).reshape(8, 1, 1, 1)
LINE_LABELS = np.array([0, 0, 0, 1, 1, 1, 1, 0])


def atypical(size, neighbours=3, class_id=None, name="a") -> AtypicalForget:
    return AtypicalForget(kind="atypical", name=name, size=size, neighbours=neighbours, class_id=class_id)


def test_atypical_by_hand():
    assert neighbour_disagreement(LINE, LINE_LABELS, 3).tolist() == [1, 1, 1, 3, 1, 1, 1, 3]
    assert resolve_forget_set(atypical(2), LINE_LABELS, LINE).tolist() == [3, 7]
    # ties in the score go to the lower index; the result is sorted
    assert resolve_forget_set(atypical(3), LINE_LABELS, LINE).tolist() == [0, 3, 7]
    # restricted to a class: among the label-1 points (3, 4, 5, 6), point 3 disagrees most, then 4
    assert resolve_forget_set(atypical(2, class_id=1), LINE_LABELS, LINE).tolist() == [3, 4]


def test_a_tie_at_the_kth_distance_goes_to_the_lower_index():
    # point 1 (value 5) is 5 away from both 0 and 2; with k = 1 it takes point 0 (label 0, not its own)
    images = np.array([0, 5, 10], dtype=np.uint8).reshape(3, 1, 1, 1)
    assert neighbour_disagreement(images, np.array([0, 1, 1]), 1).tolist() == [1, 1, 0]
    assert neighbour_disagreement(images, np.array([1, 1, 0]), 1).tolist() == [0, 0, 1]


def brute_force(images, labels, k):
    x = images.astype(np.float64)
    x = (x / (x.std(axis=(0, 2, 3), keepdims=True) + 1e-8)).reshape(len(x), -1)
    dist = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(dist, np.inf)
    neighbours = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return (labels[neighbours] != labels[:, None]).sum(1)


def test_matches_a_brute_force_on_normalised_channels_in_any_block_size(monkeypatch):
    rng = np.random.default_rng(0)
    # channels of very different spread: the per-channel normalisation changes who is nearest
    images = np.stack([rng.integers(0, 256, (60, 2, 2)), rng.integers(0, 8, (60, 2, 2))], axis=1).astype(np.uint8)
    labels = rng.integers(0, 3, 60)
    want = brute_force(images, labels, 5)
    assert np.array_equal(neighbour_disagreement(images, labels, 5), want)
    monkeypatch.setattr(forget_sets, "_BLOCK_ELEMENTS", 7 * 60)  # blocks of 7 rows, the last one short
    assert np.array_equal(neighbour_disagreement(images, labels, 5), want)


def test_atypical_is_deterministic_and_its_id_is_its_content():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 17, (200, 1, 8, 8)).astype(np.uint8)
    labels = rng.integers(0, 10, 200)
    a = resolve_forget_set(atypical(20, neighbours=10), labels, images)
    check_valid(a, 200)
    assert len(a) == 20
    b = resolve_forget_set(atypical(20, neighbours=10, name="other"), labels, lambda: images.copy())
    assert np.array_equal(a, b) and forget_set_id(a) == forget_set_id(b)
    scores = neighbour_disagreement(images, labels, 10)
    assert scores[a].min() >= np.delete(scores, a).max()  # no point left out disagrees more
    only7 = resolve_forget_set(atypical(5, neighbours=10, class_id=7), labels, images)
    assert len(only7) == 5 and np.all(labels[only7] == 7)


def test_atypical_sizes_and_inputs_are_checked():
    msg = refused(atypical(8), LINE_LABELS, LINE)
    assert "forget set 'a'" in msg and "size 8 must be below the 8 training points" in msg
    assert "neighbours 8 must be below the 8 training points" in refused(atypical(2, neighbours=8), LINE_LABELS, LINE)
    assert "size 5 exceeds the 4 points of class 0" in refused(atypical(5, class_id=0), LINE_LABELS, LINE)
    assert "class_id 4 has no training points" in refused(atypical(1, class_id=4), LINE_LABELS, LINE)
    assert "kind 'atypical' needs the training images" in refused(atypical(2), LINE_LABELS)
    msg = refused(atypical(2), LINE_LABELS, LINE[:5])
    assert "training images of shape (5, 1, 1, 1) do not match 8 labels" in msg


@pytest.mark.parametrize("entry, expected", [
    ({"size": 0}, "forget_sets[0].size: must be > 0, got 0"),
    ({"size": 5, "neighbours": 0}, "forget_sets[0].neighbours: must be > 0, got 0"),
    ({"size": 5, "class_id": -1}, "forget_sets[0].class_id: must be >= 0, got -1"),
    ({"size": 5, "neighbors": 3}, "forget_sets[0].neighbors: unknown key (did you mean 'neighbours'?)"),
    ({}, "forget_sets[0].size: Field required"),
])
def test_atypical_config_errors_name_the_field(entry, expected):
    with pytest.raises(ConfigError) as info:
        config_module.parse_config({"forget_sets": [{"name": "a", "kind": "atypical", **entry}]})
    assert expected in str(info.value)


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


def test_a_plan_resolves_atypical_sets_and_caches_their_scores_beside_the_prepared_data(tmp_path):
    """Before prepare the plan reads the dataset; after, the .beton, and keeps the k-NN scores under
    the prepare stage so that no later plan (each Ray task builds one) searches again."""
    from helpers import tiny_plan

    from pipeline.data.datasets import load_dataset
    from pipeline.data.forget_sets import neighbour_disagreement
    from pipeline.stages.prepare import run_prepare

    sets = "forget_sets=[{name: odd, kind: atypical, size: 12, neighbours: 5}]"
    before = tiny_plan(tmp_path, sets).forget_sets["odd"]
    data = load_dataset(tiny_plan(tmp_path, sets).cfg.data)
    want = neighbour_disagreement(data.train_x, data.train_y, 5)
    assert want[before].min() >= np.delete(want, before).max()
    plan = tiny_plan(tmp_path, sets)
    run_prepare(plan)
    cache = tmp_path / plan.prepare.rel / "derived" / "neighbour-disagreement-k5.npy"
    assert cache.exists()  # written by the driver right after prepare, from the scores it validated with
    again = tiny_plan(tmp_path, sets)
    np.testing.assert_array_equal(again.forget_sets["odd"], before)
    np.testing.assert_array_equal(np.load(cache), want)
    np.save(cache, np.where(np.arange(len(want)) < 12, 99, 0))  # a later plan reads the cache, not the images
    np.testing.assert_array_equal(tiny_plan(tmp_path, sets).forget_sets["odd"], np.arange(12))


# ------------------------------------------------------------------------------------------ tuning sets (decision 31)
def test_tuning_sets_are_drawn_outside_the_reported_points_and_move_only_where_a_new_one_was():
    outside = np.arange(0, N, 3)  # a third of the points reported
    rand = RandomForget(kind="random", name="t", size=40, seed=5)
    cls = ClassForget(kind="class", name="c", class_id=4, size=30, seed=6)
    for spec in (rand, cls):
        got = resolve_forget_set(spec, LABELS, outside=outside)
        check_valid(got)
        assert len(got) == spec.size and not np.isin(got, outside).any()
        # a newly reported point the set did not hold leaves it as it was; one it held is replaced alone
        other = np.setdiff1d(np.arange(N), np.concatenate([got, outside]))[:5]
        assert np.array_equal(resolve_forget_set(spec, LABELS, outside=np.concatenate([outside, other])), got)
        moved = resolve_forget_set(spec, LABELS, outside=np.concatenate([outside, got[:1]]))
        assert len(np.intersect1d(moved, got)) == spec.size - 1
    assert set(LABELS[resolve_forget_set(cls, LABELS, outside=outside)]) == {4}
    with pytest.raises(ForgetSetError, match="size 40 exceeds the 0 training points outside the reported forget sets"):
        resolve_forget_set(rand, LABELS, outside=np.arange(N))


def test_an_atypical_tuning_set_takes_the_most_atypical_points_no_reported_set_holds():
    scores = np.arange(N) % 97  # disagreement: any fixed score will do
    spec = AtypicalForget(kind="atypical", name="a", size=20)
    reported = resolve_forget_set(spec, LABELS, disagreement=lambda k: scores)
    tuning = resolve_forget_set(spec, LABELS, disagreement=lambda k: scores, outside=reported)
    assert not np.isin(tuning, reported).any()
    rest = np.setdiff1d(np.arange(N), reported)
    want = np.sort(rest[np.lexsort((rest, -scores[rest]))][:20])
    assert np.array_equal(tuning, want)


def test_a_tuning_set_changes_no_identity_upstream_of_the_oracles(tmp_path):
    """Decision 15: adding a tuning set (of another kind) re-identifies neither the full, subset nor fit
    stages, nor any reported set's oracles, nor the other tuning set."""
    from helpers import tiny_plan

    one = tiny_plan(tmp_path)
    two = tiny_plan(tmp_path, "tuning_forget_sets=[{name: tune, kind: random, size: 10, seed: 100}, "
                              "{name: tune-c, kind: class, class_id: 5, size: 6}]")
    assert [one.full, one.subset, one.fit] == [two.full, two.subset, two.fit]
    assert one.oracle("random10") == two.oracle("random10") and one.oracle("tune") == two.oracle("tune")
    assert "tune-c" in two.forget_sets and not np.isin(two.forget_sets["tune-c"], two.forget_sets["random10"]).any()
