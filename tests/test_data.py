"""Datasets through `prepare` and the FFCV round trip (decision 12), and the CIFAR-10 folder reader's
refusals (decision 11): every image and label read back equals the dataset's."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from helpers import tiny_plan
from pipeline.config import DataConfig
from pipeline.data.beton import ffcv_loader, read_beton, write_beton
from pipeline.data.datasets import (
    CIFAR_DIR, CIFAR_FILES, DataError, load_dataset, restricted_load, verify_cifar_md5, write_cifar_folder,
)
from pipeline.stages.prepare import run_prepare
from pipeline.store import is_complete

CIFAR_PER_BATCH, CIFAR_TEST = 20, 12


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    return write_cifar_folder(tmp_path_factory.mktemp("cifar"), n_per_batch=CIFAR_PER_BATCH, n_test=CIFAR_TEST)


DATASETS = {
    "digits": lambda root: [],
    "synthetic": lambda root: ["data.dataset=synthetic", "data.synthetic.n_train=64", "data.synthetic.n_val=16"],
    "cifar10": lambda root: ["data.dataset=cifar10", f"data.root={root}"],
}


@pytest.fixture(scope="module", params=sorted(DATASETS))
def prepared(request, tmp_path_factory, cifar_root):
    """(dataset as loaded in memory, plan, prepare metadata) for each dataset, prepared into a fresh store."""
    plan = tiny_plan(tmp_path_factory.mktemp(f"store-{request.param}"), *DATASETS[request.param](cifar_root))
    meta = run_prepare(plan)
    return load_dataset(plan.cfg.data), plan, meta


def beton(plan, split: str) -> Path:
    return plan.store.local_file(f"{plan.prepare.rel}/{split}.beton")


# ------------------------------------------------------------------------------------------ round trips
def test_prepare_metadata(prepared):
    ds, plan, meta = prepared
    assert is_complete(plan.store, plan.prepare)
    assert meta["n_train"] == len(ds.train_y) and meta["n_val"] == len(ds.val_y)
    assert tuple(meta["shape"]) == ds.shape and meta["classes"] == ds.classes
    mean, std = ds.channel_stats()
    np.testing.assert_allclose(meta["mean"], mean)
    np.testing.assert_allclose(meta["std"], std)
    labels = plan.store.open_group(f"{plan.prepare.rel}/arrays.zarr", mode="r")["labels"]
    assert np.array_equal(labels["train"][:], ds.train_y) and np.array_equal(labels["val"][:], ds.val_y)
    assert not list(Path(plan.store.root).rglob("*.partial"))


def test_expected_shapes(prepared):
    ds, _, _ = prepared
    want = {"digits": ((1, 8, 8), 1437, 360), "synthetic": ((3, 32, 32), 64, 16),
            "cifar10": ((3, 32, 32), 5 * CIFAR_PER_BATCH, CIFAR_TEST)}[ds.name]
    assert (ds.shape, len(ds.train_y), len(ds.val_y)) == want
    assert ds.train_x.dtype == np.uint8 and ds.train_y.dtype == np.int64


@pytest.mark.parametrize("split", ["train", "val"])
def test_read_beton_gives_back_every_image_and_label(prepared, split):
    ds, plan, _ = prepared
    x, y = read_beton(beton(plan, split))
    want_x, want_y = (ds.train_x, ds.train_y) if split == "train" else (ds.val_x, ds.val_y)
    assert x.dtype == np.uint8 and y.dtype == np.int64
    assert np.array_equal(x, want_x) and np.array_equal(y, want_y)


def test_ffcv_loader_follows_a_given_subset_and_order(prepared):
    ds, plan, _ = prepared
    n = len(ds.train_y)
    order = np.random.default_rng(7).permutation(n)[: max(3, n // 3)]  # a subset, shuffled
    xs, ys = [], []
    for x, y in ffcv_loader(beton(plan, "train"), order, batch_size=5):
        assert x.shape[0] <= 5
        xs.append(x.numpy().copy())
        ys.append(y.numpy().reshape(-1).copy())
    assert np.array_equal(np.concatenate(xs), ds.train_x[order])
    assert np.array_equal(np.concatenate(ys).astype(np.int64), ds.train_y[order])


@pytest.mark.parametrize("split", ["train", "val"])
def test_read_beton_equals_ffcvs_own_loader_on_every_sample(prepared, split):
    """read_beton reads the samples' bytes through FFCV's Reader, not a Loader: the same arrays."""
    _, plan, _ = prepared
    x, y = read_beton(beton(plan, split))
    got = [(a.numpy().copy(), b.numpy().reshape(-1).astype(np.int64)) for a, b in
           ffcv_loader(beton(plan, split), np.arange(len(y)), batch_size=512)]
    assert np.array_equal(np.concatenate([a for a, _ in got]), x)
    assert np.array_equal(np.concatenate([b for _, b in got]), y)


def test_prepare_is_idempotent(prepared):
    _, plan, meta = prepared
    before = {p: p.stat().st_mtime_ns for p in Path(plan.store.root).rglob("*") if p.is_file()}
    again = run_prepare(plan)
    assert {k: v for k, v in again.items() if k != "finished"} == meta
    after = {p: p.stat().st_mtime_ns for p in Path(plan.store.root).rglob("*") if p.is_file()}
    assert after == before


def test_ffcv_imported_without_compiling_its_image_modes_and_numba_left_as_it_was():
    """A fresh process: `import_ffcv` loads FFCV with a plain dict for rgb_image's mode table (its values
    unchanged), puts numba's typed Dict back, and FFCV's compiled code still runs (written, read by a Loader)."""
    script = (
        "import numba.typed; typed = numba.typed.Dict\n"
        "from pipeline.data.beton import ffcv_loader, import_ffcv, write_beton\n"
        "import_ffcv()\n"
        "import ffcv.fields.rgb_image as rgb, numpy as np, sys, tempfile, pathlib\n"
        "assert numba.typed.Dict is typed and dict(rgb.IMAGE_MODES) == {'jpg': 0, 'raw': 1}\n"
        "d = pathlib.Path(tempfile.mkdtemp()); x = np.arange(24, dtype=np.uint8).reshape(4, 1, 2, 3)\n"
        "write_beton(d / 'a.beton', x, np.arange(4))\n"
        "(back, y), = [(a.numpy(), b.numpy().reshape(-1)) for a, b in ffcv_loader(d / 'a.beton', np.arange(4), 4)]\n"
        "assert np.array_equal(back, x) and list(y) == [0, 1, 2, 3]\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).parents[1], timeout=300)


def test_write_beton_round_trip_odd_shapes(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 2, 5, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, size=7)
    write_beton(tmp_path / "odd.beton", images, labels)
    x, y = read_beton(tmp_path / "odd.beton")
    assert np.array_equal(x, images) and np.array_equal(y, labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd.beton"]  # no .partial left behind


def test_cifar_data_root_argument_overrides_the_config(tmp_path, cifar_root):
    from pipeline.plan import Plan
    from pipeline.store import Store

    plan = tiny_plan(tmp_path / "s", "data.dataset=cifar10")  # no data.root in the config
    plan = Plan(plan.cfg, Store(plan.cfg.store), data_root=str(cifar_root))
    meta = run_prepare(plan)
    assert meta["n_train"] == 5 * CIFAR_PER_BATCH


def test_generated_cifar_folder_holds_what_the_reader_returns(cifar_root):
    """Decode the generated pickles independently (trusted: we wrote them) and compare."""
    folder = cifar_root / CIFAR_DIR
    assert sorted(os.listdir(folder)) == sorted(CIFAR_FILES)

    def plain(name):
        with open(folder / name, "rb") as fh:
            batch = pickle.load(fh, encoding="latin1")
        return batch["data"].reshape(-1, 3, 32, 32), np.asarray(batch["labels"])

    parts = [plain(f"data_batch_{i}") for i in range(1, 6)]
    ds = load_dataset(DataConfig(dataset="cifar10", root=str(cifar_root)))
    assert np.array_equal(ds.train_x, np.concatenate([p[0] for p in parts]))
    assert np.array_equal(ds.train_y, np.concatenate([p[1] for p in parts]))
    val_x, val_y = plain("test_batch")
    assert np.array_equal(ds.val_x, val_x) and np.array_equal(ds.val_y, val_y)
    assert restricted_load(folder / "batches.meta")["label_names"][0] == "airplane"


# ------------------------------------------------------------------------------------------ CIFAR refusals
@pytest.fixture
def folder(tmp_path) -> Path:
    """A fresh, writable generated CIFAR-10 folder (the root; pickles under root/cifar-10-batches-py)."""
    return write_cifar_folder(tmp_path / "c", n_per_batch=4, n_test=4, seed=1)


def load_error(root) -> str:
    with pytest.raises(DataError) as info:
        load_dataset(DataConfig(dataset="cifar10", root=None if root is None else str(root)))
    return str(info.value)


def put(root: Path, name: str, obj) -> Path:
    path = root / CIFAR_DIR / name
    path.write_bytes(pickle.dumps(obj, protocol=2))
    return path


def good_batch(n=4, **changes) -> dict:
    batch = {"batch_label": "x", "labels": [1] * n, "data": np.zeros((n, 3072), dtype=np.uint8),
             "filenames": [f"{i}.png" for i in range(n)]}
    batch.update(changes)
    return batch


def test_no_root_given():
    assert "data.root: the cifar10 dataset needs a local folder" in load_error(None)


def test_missing_folder(tmp_path):
    msg = load_error(tmp_path / "nowhere")
    assert f"{tmp_path / 'nowhere' / CIFAR_DIR}: folder not found" in msg
    assert "data_batch_1" in msg  # the expected layout is spelled out


@pytest.mark.parametrize("name", ["data_batch_3", "test_batch", "batches.meta"])
def test_missing_file_is_named(folder, name):
    (folder / CIFAR_DIR / name).unlink()
    assert f"{folder / CIFAR_DIR / name}: file missing" in load_error(folder)


def test_malformed_pickle(folder):
    (folder / CIFAR_DIR / "data_batch_2").write_bytes(b"this is not a pickle at all")
    msg = load_error(folder)
    assert str(folder / CIFAR_DIR / "data_batch_2") in msg and "not a readable CIFAR-10 pickle" in msg


def test_truncated_pickle(folder):
    path = folder / CIFAR_DIR / "data_batch_4"
    path.write_bytes(path.read_bytes()[:500])
    msg = load_error(folder)
    assert str(path) in msg and "not a readable CIFAR-10 pickle" in msg


class RunsShell:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class RunsEval:
    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return eval, (self.code,)


@pytest.mark.parametrize("payload", ["shell", "eval", "shell-nested"])
def test_code_executing_pickle_is_refused_without_running_it(folder, tmp_path, payload):
    witness = tmp_path / "pwned"
    if payload == "shell":
        obj = RunsShell(f"touch {witness}")
    elif payload == "eval":
        obj = RunsEval(f"open({str(witness)!r}, 'w').close()")
    else:  # hidden inside an otherwise valid batch
        obj = good_batch(labels=[1, 2, RunsShell(f"touch {witness}"), 3])
    path = put(folder, "data_batch_1", obj)
    msg = load_error(folder)
    assert not witness.exists(), "the payload ran"
    assert str(path) in msg and "refused to load" in msg
    assert ("system" in msg) if payload != "eval" else ("eval" in msg)


def test_restricted_unpickler_refuses_other_globals(tmp_path):
    import collections

    path = tmp_path / "p"
    path.write_bytes(pickle.dumps({"a": collections.OrderedDict(x=1)}, protocol=2))
    with pytest.raises(DataError, match="refused to load collections.OrderedDict"):
        restricted_load(path)


def test_restricted_unpickler_reads_python2_era_numpy_paths(tmp_path):
    """The real archive was pickled by an old numpy (module `numpy.core.multiarray`): still admitted."""
    data = np.arange(3072 * 2, dtype=np.uint8).reshape(2, 3072)
    raw = pickle.dumps({"data": data, "labels": [0, 9]}, protocol=2)
    raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in raw
    path = tmp_path / "old"
    path.write_bytes(raw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # numpy 2 may warn about numpy.core
        got = restricted_load(path)
    assert np.array_equal(got["data"], data) and got["labels"] == [0, 9]


@pytest.mark.parametrize("label, index", [(10, 2), (-1, 0), (255, 3)])
def test_labels_out_of_range(folder, label, index):
    labels = [1, 2, 3, 4]
    labels[index] = label
    path = put(folder, "data_batch_5", good_batch(labels=labels))
    msg = load_error(folder)
    assert str(path) in msg and f"label {label} at index {index} is outside 0..9" in msg


def test_test_batch_labels_are_checked_too(folder):
    path = put(folder, "test_batch", good_batch(labels=[0, 1, 2, 10]))
    assert f"{path}: label 10 at index 3 is outside 0..9" in load_error(folder)


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"data": np.zeros((4, 3000), dtype=np.uint8)}, "'data' must be uint8 of shape (N, 3072)"),
        ({"data": np.zeros((4, 3072), dtype=np.float32)}, "'data' must be uint8 of shape (N, 3072)"),
        ({"labels": [1, 2, 3]}, "3 labels for 4 images"),
    ],
)
def test_malformed_batches(folder, changes, expected):
    path = put(folder, "data_batch_1", good_batch(**changes))
    msg = load_error(folder)
    assert str(path) in msg and expected in msg


def test_missing_key_and_wrong_top_level(folder):
    batch = good_batch()
    del batch["labels"]
    path = put(folder, "data_batch_1", batch)
    assert f"{path}: missing key 'labels'" in load_error(folder)
    put(folder, "data_batch_1", [1, 2, 3])
    assert "expected a dict, got list" in load_error(folder)


def test_meta_needs_ten_label_names(folder):
    path = put(folder, "batches.meta", {"label_names": ["a", "b"]})
    assert f"{path}: expected 10 label_names" in load_error(folder)


def test_md5_check_is_optional_and_fails_on_a_generated_folder(folder):
    load_dataset(DataConfig(dataset="cifar10", root=str(folder), verify_md5=False))  # off by default: reads
    with pytest.raises(DataError, match="MD5 [0-9a-f]{32} differs from the published"):
        load_dataset(DataConfig(dataset="cifar10", root=str(folder), verify_md5=True))
    with pytest.raises(DataError, match="data_batch_1: MD5"):
        verify_cifar_md5(folder / CIFAR_DIR)


def test_prepare_refuses_a_bad_folder_and_writes_nothing(tmp_path, folder):
    put(folder, "data_batch_1", RunsShell(f"touch {tmp_path / 'pwned'}"))
    plan = tiny_plan(tmp_path / "store", "data.dataset=cifar10", f"data.root={folder}")
    with pytest.raises(DataError, match="refused to load"):
        run_prepare(plan)
    assert not (tmp_path / "pwned").exists()
    assert not [p for p in (tmp_path / "store").rglob("*") if p.is_file()]
