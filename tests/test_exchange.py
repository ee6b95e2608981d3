"""Exchange through the real console script: `oracle-farm import-margins` refuses crafted bad files
(wrong shape, NaN, a pickled object array) with a clear message and no change to the store, imports
good margins as an external family that `evaluate` scores as `M (imported)`, and `oracle-farm export`
round-trips stored arrays through .npy and Parquet."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import TINY, copy_store, run_many, store_snapshot

SOLO = ("--set", "unlearn.methods={}")  # evaluate scores the retrain row and imported rows only: no unlearning


@pytest.fixture(scope="module")
def store(tiny_store, tmp_path_factory):
    """A copy of the trained tiny store (prepare + every family), and its plan."""
    from helpers import tiny_plan

    root = copy_store(tiny_store.root, tmp_path_factory.mktemp("exchange") / "store")
    return root, tiny_plan(root)


def reference_margins(plan) -> np.ndarray:
    from pipeline.stages.report import _oracle_margins

    return _oracle_margins(plan, "random10", "reference")


def test_bad_files_are_refused_with_a_clear_message_and_leave_the_store_unchanged(store, tmp_path):
    root, plan = store
    meta = plan.prepared_meta()
    points = meta["n_train"] + meta["n_val"]
    good = np.zeros((3, points), np.float32)
    files = {"shape": tmp_path / "wrong_shape.npy", "nan": tmp_path / "has_nan.npy", "pickle": tmp_path / "objects.npy"}
    np.save(files["shape"], np.zeros((3, points - 1), np.float32))
    with_nan = good.copy()
    with_nan[2, 17] = np.nan
    np.save(files["nan"], with_nan)
    np.save(files["pickle"], np.array([{"margins": good}, "payload"], dtype=object), allow_pickle=True)
    before = store_snapshot(root)
    results = run_many(*([["import-margins", str(TINY), str(f), "--kind", "unlearned", "--forget-set", "random10",
                           "--method", "ext", "--set", f"store={root}"] for f in files.values()]))
    expected = {"shape": f"shape (3, {points - 1}) has {points - 1} points per model; the config's prepared dataset "
                         f"has n_train + n_val = {points}",
                "nan": "a non-finite value (nan) at model 2, point 17",
                "pickle": "holds Python objects (a pickled object array); refused"}
    for (key, path), result in zip(files.items(), results):
        assert result.returncode == 2, (key, result.stdout, result.stderr)
        assert str(path) in result.stderr and expected[key] in result.stderr, (key, result.stderr)
        assert "Traceback" not in result.stderr
    assert store_snapshot(root) == before


def test_validation_of_dtypes_and_npz(tmp_path):
    from pipeline.maintenance.exchange import ExchangeError, load_margins_file

    np.save(tmp_path / "ints.npy", np.zeros((2, 5), np.int32))
    with pytest.raises(ExchangeError, match=r"ints.npy: dtype int32; margins must be float32"):
        load_margins_file(tmp_path / "ints.npy", 5)
    np.save(tmp_path / "huge.npy", np.full((2, 5), 1e300))
    with pytest.raises(ExchangeError, match=r"a value too large for float32"):
        load_margins_file(tmp_path / "huge.npy", 5)
    np.save(tmp_path / "flat.npy", np.zeros(5, np.float32))
    with pytest.raises(ExchangeError, match=r"shape \(5,\); expected \(models, points\)"):
        load_margins_file(tmp_path / "flat.npy", 5)
    np.savez(tmp_path / "two.npz", a=np.zeros((2, 5), np.float32), b=np.zeros((2, 5), np.float32))
    with pytest.raises(ExchangeError, match=r"holds arrays \['a', 'b'\]; name the margins `margins`"):
        load_margins_file(tmp_path / "two.npz", 5)
    np.savez(tmp_path / "objs.npz", margins=np.array([1, "x"], dtype=object))
    with pytest.raises(ExchangeError, match="Python objects"):
        load_margins_file(tmp_path / "objs.npz", 5)
    (tmp_path / "junk.npy").write_bytes(b"not numpy at all")
    with pytest.raises(ExchangeError, match="junk.npy: not a readable NumPy file"):
        load_margins_file(tmp_path / "junk.npy", 5)
    np.savez(tmp_path / "ok.npz", margins=np.ones((2, 5)))
    arr, warnings = load_margins_file(tmp_path / "ok.npz", 5)
    assert arr.shape == (2, 5) and warnings == [f"{tmp_path / 'ok.npz'}: float64 margins cast to float32"]


def test_imported_unlearned_margins_are_scored_as_an_imported_row(store, tmp_path):
    """The reference oracles' margins imported as method `ext`: its row equals the retrain row."""
    root, plan = store
    ref = reference_margins(plan)
    path = tmp_path / "ext.npy"
    np.save(path, ref.astype(np.float64))  # float64: accepted, cast to float32 (exactly, here)
    imp = ["import-margins", str(TINY), str(path), "--kind", "unlearned", "--forget-set", "random10",
           "--method", "ext", "--set", f"store={root}"]
    first = run_many(imp)[0]
    assert first.returncode == 0, first.stderr
    assert f"{len(ref)} models written" in first.stdout and "float64 margins cast to float32" in first.stderr
    evaluate = run_many(["evaluate", str(TINY), "--json", "--set", f"store={root}", *SOLO])[0]
    snapshot = store_snapshot(root)  # after evaluate, which keeps its rows in the store (score cache)

    from pipeline.maintenance.exchange import import_margins
    from pipeline.maintenance.lifecycle import list_stages

    again = import_margins(plan, path, "unlearned", "random10", "ext")  # the same file: nothing written
    assert again["written"] == 0 and store_snapshot(root) == snapshot
    external = [r for r in list_stages(plan.store) if r["kind"] == "external"]
    assert len(external) == 1 and external[0]["state"] == "complete" and external[0]["models"] == {"models": [4, 4]}
    stored = np.asarray(plan.store.open_group(f"{external[0]['rel']}/arrays.zarr", mode="r")["models/margins"][:])
    assert stored.dtype == np.float32 and np.array_equal(stored, ref)

    assert evaluate.returncode == 0, evaluate.stderr
    rows = {r["method"]: r for r in json.loads(evaluate.stdout)}
    assert set(rows) == {"retrain", "ext (imported)"}
    imported, retrain = rows["ext (imported)"], rows["retrain"]
    assert imported["forget_set"] == "random10" and imported["klom"] == retrain["klom"]
    assert imported["mia"] == retrain["mia"]
    assert imported["accuracy"] == {"forget": None, "retain": None, "val": None} and imported["compute"] is None
    assert imported["hparams"]["imported"] == external[0]["id"]


def test_export_round_trips_through_npy_and_parquet(store, tmp_path):
    import pyarrow.parquet as pq

    from pipeline.maintenance.exchange import read_parquet_array

    root, plan = store
    group = plan.store.open_group(f"{plan.full.rel}/arrays.zarr", mode="r")
    margins = group["models/margins"][:]
    logits = plan.store.open_group(f"{plan.oracle('random10').rel}/arrays.zarr", mode="r")["eval/logits"][:]
    masks = plan.store.open_group(f"{plan.subset.rel}/arrays.zarr", mode="r")["heldout/masks"][:]
    out = {k: tmp_path / k for k in ("m.npy", "m.parquet", "l.parquet", "mask.npy")}
    common = ["--set", f"store={root}", "--chunk-rows", "3"]
    results = run_many(["export", str(TINY), "--array", "full/margins", "--out", str(out["m.npy"]), *common],
                       ["export", str(TINY), "--array", "full/margins", "--out", str(out["m.parquet"]), *common],
                       ["export", str(TINY), "--array", "fit/theta", "--out", str(tmp_path / "t.npy"), *common])
    for r in results[:2]:
        assert r.returncode == 0, r.stderr
    assert "(2 chunks of 3 rows" in results[0].stdout
    assert results[2].returncode == 2 and "the fit stage" in results[2].stderr and "not complete" in results[2].stderr
    assert not (tmp_path / "t.npy").exists()

    from pipeline.maintenance.exchange import export_array, resolve_array

    for spec, path in (("oracle/random10/eval/logits", out["l.parquet"]), ("subset/heldout/masks", out["mask.npy"])):
        arr, rows, _ = resolve_array(plan, spec)
        export_array(arr, path, rows, 3)

    got = np.load(out["m.npy"])
    assert got.dtype == margins.dtype and np.array_equal(got, margins)
    assert np.array_equal(np.load(out["mask.npy"]), masks)
    assert pq.ParquetFile(out["m.parquet"]).metadata.num_row_groups == -(-len(margins) // 3)
    back = read_parquet_array(out["m.parquet"])
    assert back.dtype == margins.dtype and np.array_equal(back, margins)
    back = read_parquet_array(out["l.parquet"])
    assert back.dtype == np.float16 and back.shape == logits.shape and np.array_equal(back, logits)
    table = pq.read_table(out["m.parquet"])
    assert table.column_names == ["model", "point", "margins"]  # long layout: a row per model x point
    assert table.column("model").to_pylist() == np.repeat(np.arange(len(margins)), margins.shape[1]).tolist()
