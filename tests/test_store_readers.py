"""A store other tools read: every group of a finished tiny store opens with `xarray.open_zarr`, its
variables named by their axes and described; Parquet exports in long and wide layouts with named
columns and no local path; a forget set exported by name; `ls` naming the forget set of each oracle."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from helpers import TINY, run_many

from pipeline.store import ARRAY_DOCS, STAGE_SECTIONS


def _array_groups(group, prefix=""):
    """(path, group) of every group holding arrays, the root included."""
    arrays = [k for k, v in group.members() if isinstance(v, zarr.Array)]
    out = [(prefix, group)] if arrays else []
    for key, node in group.members():
        if isinstance(node, zarr.Group):
            out += _array_groups(node, f"{prefix}{key}/")
    return out


def test_every_group_of_a_finished_store_opens_with_xarray(tiny_finished):
    import xarray as xr

    from pipeline.maintenance.lifecycle import walk_stages

    plan = tiny_finished["plan"]
    store = plan.store
    opened = set()
    for kind, sid, rel in walk_stages(store):
        if not store.exists(f"{rel}/arrays.zarr"):
            continue
        for path, group in _array_groups(store.open_group(f"{rel}/arrays.zarr", mode="r")):
            ds = xr.open_zarr(store.path(f"{rel}/arrays.zarr"), group=path.rstrip("/") or None, consolidated=False)
            role = path.rstrip("/").split("/")[-1]
            for name, var in ds.data_vars.items():
                dims, description, units = ARRAY_DOCS.get(f"{role}/{name}") or ARRAY_DOCS[name]
                assert var.dims == dims, (rel, path, name)
                assert var.attrs["description"] == description and var.attrs["units"] == units
                assert var.attrs["stage"] == rel and var.attrs["stage_id"] == sid
                assert var.attrs["config_section"].startswith(STAGE_SECTIONS[kind])
                opened.add(f"{kind}:{path}{name}")
    meta = plan.prepared_meta()
    full = xr.open_zarr(store.path(f"{plan.full.rel}/arrays.zarr"), group="models", consolidated=False)
    assert dict(full.sizes) == {"model": plan.cfg.train.full.models, "point": meta["n_train"] + meta["n_val"],
                                "split": 2, "class": meta["classes"]}
    assert {"prepare:labels/train", "full:models/margins", "subset:fit/masks", "oracle:eval/margins",
            "fit:theta", "fit:lds", "unlearn:models/logits"} <= opened, sorted(opened)


def test_parquet_long_and_wide_have_named_columns_and_no_local_path(tiny_finished, tmp_path):
    import pyarrow.parquet as pq

    from pipeline.maintenance.exchange import export_array, read_parquet_array, resolve_array

    plan, root = tiny_finished["plan"], tiny_finished["root"]
    arr, rows, source = resolve_array(plan, "oracle/random10/eval/logits")
    logits = arr[:rows]
    for layout in ("long", "wide"):
        out = tmp_path / f"{layout}.parquet"
        export_array(arr, out, rows, 3, source=f"{source}:oracle/random10/eval/logits", layout=layout)
        table = pq.read_table(out)
        metadata = table.schema.metadata[b"oracle_farm"].decode()
        assert str(root) not in metadata and str(tmp_path) not in metadata and json.loads(metadata)["dims"] == \
            ["model", "point", "class"]
        back = read_parquet_array(out)
        assert back.dtype == logits.dtype and np.array_equal(back, logits)
        m, p, c = logits.shape
        if layout == "long":
            assert table.column_names == ["model", "point", "class", "logits"] and table.num_rows == m * p * c
            row = table.slice(p * c + 2 * c + 1, 1).to_pylist()[0]  # model 1, point 2, class 1
            assert (row["model"], row["point"], row["class"]) == (1, 2, 1) and row["logits"] == float(logits[1, 2, 1])
        else:
            assert table.column_names[:3] == ["model", "point_0_class_0", "point_0_class_1"]
            assert table.num_rows == m and len(table.column_names) == 1 + p * c
    arr, rows, source = resolve_array(plan, "full/margins")
    out = tmp_path / "wide-margins.parquet"
    export_array(arr, out, rows, source=source, layout="wide")
    frame = pq.read_table(out).to_pandas().set_index("model")
    assert frame.columns[-1] == f"point_{arr.shape[1] - 1}" and np.array_equal(frame.to_numpy(), arr[:rows])
    arr, rows, _ = resolve_array(plan, "fit/lds")
    export_array(arr, tmp_path / "lds.parquet", rows)
    assert pq.read_table(tmp_path / "lds.parquet").column_names == ["target", "lds"]


def test_forget_sets_export_by_name_and_ls_names_them(tiny_finished, tmp_path):
    import pyarrow.parquet as pq

    from pipeline.data.forget_sets import forget_set_id
    from pipeline.maintenance.lifecycle import list_stages

    plan, root = tiny_finished["plan"], tiny_finished["root"]
    common = ["--set", f"store={root}"]
    npy, parquet = tmp_path / "random10.npy", tmp_path / "tune.parquet"
    ok_npy, ok_pq, bad, both = run_many(
        ["export", str(TINY), "--forget-set", "random10", "--out", str(npy), *common],
        ["export", str(TINY), "--forget-set", "tune", "--out", str(parquet), *common],
        ["export", str(TINY), "--forget-set", "nope", "--out", str(tmp_path / "x.npy"), *common],
        ["export", str(TINY), "--forget-set", "tune", "--array", "full/margins", "--out", str(tmp_path / "y.npy"), *common])
    assert ok_npy.returncode == 0 and ok_pq.returncode == 0, ok_npy.stderr + ok_pq.stderr
    assert np.array_equal(np.load(npy), plan.forget_sets["random10"])
    assert pq.read_table(parquet).column("train_point").to_pylist() == plan.forget_sets["tune"].tolist()
    assert bad.returncode == 2 and "'nope'" in bad.stderr and "random10" in bad.stderr
    assert both.returncode == 2 and "one of --array" in both.stderr
    assert not (tmp_path / "x.npy").exists() and not (tmp_path / "y.npy").exists()

    oracles = {r["id"]: r for r in list_stages(plan.store, plan) if r["kind"] == "oracle"}
    for name in ("random10", "tune"):
        row = oracles[plan.oracle(name).id]
        assert row["forget_set"] == [name] and row["detail"] == f"forget set {name}"
    unnamed = [r for r in list_stages(plan.store) if r["kind"] == "oracle"]
    assert {r["detail"] for r in unnamed} == {f"forget set {forget_set_id(v)} (unnamed here)"
                                              for v in plan.forget_sets.values()}


@pytest.mark.parametrize("layout", ["tall"])
def test_an_unknown_layout_is_refused(tiny_finished, tmp_path, layout):
    from pipeline.maintenance.exchange import ExchangeError, export_array, resolve_array

    arr, rows, _ = resolve_array(tiny_finished["plan"], "full/margins")
    with pytest.raises(ExchangeError, match="--layout 'tall'"):
        export_array(arr, tmp_path / "m.parquet", rows, layout=layout)
    assert not list(tmp_path.iterdir())
