"""Bring your own attribution (issue 30, item 2): `oracle-farm import-attribution` refuses bad files (wrong
shape, NaN, a pickled object array) with exit 2 and no change to the store; a matrix exported from our own
fit and imported again is an external stage with the fit's arrays and the same LDS, and dm-direct run on it
(`fit.attribution`) gives the same margins as dm-direct on the fit, under an identity that names the
external stage, while a config without it keeps today's ids."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import TINY, copy_store, run_many, store_snapshot, tiny_plan

DM = "unlearn.methods={dm_direct: {}}"


@pytest.fixture(scope="module")
def finished(tiny_finished, tmp_path_factory):
    """A copy of the finished tiny store (its fit done), and the fit's arrays exported as a user would."""
    root = copy_store(tiny_finished["root"], tmp_path_factory.mktemp("attrib") / "store")
    plan = tiny_plan(root)
    group = plan.store.open_group(f"{plan.fit.rel}/arrays.zarr", mode="r")
    ours = {name: group[name][:] for name in ("theta_logit", "theta", "bias", "bias_logit")}
    return root, plan, ours


def test_bad_attribution_files_exit_2_naming_the_fault_and_touch_nothing(finished, tmp_path):
    root, plan, ours = finished
    n, p, c = ours["theta_logit"].shape
    files = {"shape": tmp_path / "wrong_shape.npy", "nan": tmp_path / "has_nan.npz", "pickle": tmp_path / "objects.npy"}
    np.save(files["shape"], np.zeros((n, p - 1, c), np.float32))
    with_nan = ours["theta_logit"].astype(np.float32)
    with_nan[3, 5, 1] = np.nan
    np.savez(files["nan"], theta_logit=with_nan)
    np.save(files["pickle"], np.array([{"theta": ours["theta"]}, "payload"], dtype=object), allow_pickle=True)
    before = store_snapshot(root)
    results = run_many(*([["import-attribution", str(TINY), str(f), "--name", "bad", "--set", f"store={root}"]
                          for f in files.values()]))
    expected = {"shape": f"shape ({n}, {p - 1}, {c})", "nan": "a non-finite value (nan) at index (3, 5, 1)",
                "pickle": "holds Python objects (a pickled object array); refused"}
    for (key, path), result in zip(files.items(), results):
        assert result.returncode == 2, (key, result.stdout, result.stderr)
        assert str(path) in result.stderr and expected[key] in " ".join(result.stderr.split()), (key, result.stderr)
        assert "Traceback" not in result.stderr
    assert store_snapshot(root) == before


def test_our_own_fit_imported_gives_the_same_dm_direct_and_lds(finished, tmp_path):
    from pipeline.maintenance.exchange import import_attribution
    from pipeline.plan import method_grids, n_unlearned, unlearn_family, unlearn_ref
    from pipeline.stages.unlearn import run_unlearn_jobs

    root, plan, ours = finished
    path = tmp_path / "ours.npz"
    np.savez(path, **ours)
    out = import_attribution(plan, path, "ours")
    again = import_attribution(plan, path, "ours")
    assert out["written"] and not again["written"] and again["ref"] == out["ref"]
    ext = out["ref"]
    group = plan.store.open_group(f"{ext.rel}/arrays.zarr", mode="r")
    for name, values in ours.items():  # the fit's arrays, bit for bit, in the fit's dtypes and chunks
        fit_array = plan.store.open_group(f"{plan.fit.rel}/arrays.zarr", mode="r")[name]
        assert group[name].dtype == fit_array.dtype and group[name].chunks == fit_array.chunks, name
        assert np.array_equal(group[name][:], values), name
    assert np.array_equal(group["theta_rows"][:], ours["theta"])
    fit = plan.store.read_json(f"{plan.fit.rel}/COMPLETE.json")
    # the LDS of the same weights on the same held-out models; only the order of float sums differs
    assert out["heldout"] == plan.cfg.train.subset.heldout
    assert out["lds_mean"] == pytest.approx(fit["lds_mean"], abs=1e-6)
    assert out["lds_logit_mean"] == pytest.approx(fit["lds_logit_mean"], abs=1e-6)  # decision 34's, beside ours
    assert out["lds_logit_per_class"] == pytest.approx(fit["lds_logit_per_class"], abs=1e-6)

    own, imported = tiny_plan(root, DM), tiny_plan(root, DM, "fit.attribution=ours")
    assert own.fit == imported.fit  # naming an attribution does not re-identify the fit
    assert imported.attribution == ext and own.attribution == own.fit
    hp = method_grids(own.cfg)["dm_direct"][0]
    ref_own, ref_imported = unlearn_ref(own, "dm_direct", hp, "random10"), unlearn_ref(imported, "dm_direct", hp, "random10")
    assert ref_own != ref_imported
    run_unlearn_jobs(own, [("dm_direct", hp, "random10")], "unlearn")
    run_unlearn_jobs(imported, [("dm_direct", hp, "random10")], "unlearn")
    meta, n = plan.prepared_meta(), n_unlearned(plan.cfg)
    got = {r: unlearn_family(own, r, meta).read("margins", n) for r in (ref_own, ref_imported)}
    assert np.array_equal(got[ref_own], got[ref_imported])  # the identical matrix: the identical unlearning
    assert plan.store.exists(f"{ext.rel}/derived")  # forget rows read through fit.forget_rows, kept beside it


def test_status_and_ls_show_the_imported_attribution(finished, tmp_path):
    from pipeline.maintenance.exchange import import_attribution
    from pipeline.maintenance.lifecycle import list_stages
    from pipeline.stages.status import stage_status

    import zarr

    from pipeline.maintenance.exchange import ExchangeError

    root, plan, ours = finished
    path = tmp_path / "scores.zarr"  # a Zarr group holding both; only the per-margin matrix taken
    group = zarr.open_group(str(path), mode="w")
    for name in ("theta", "theta_logit"):
        group.create_array(name, shape=ours[name].shape, dtype=ours[name].dtype)[:] = ours[name]
    ref = import_attribution(plan, path, "mine", kind="per_margin")["ref"]
    with pytest.raises(ExchangeError, match="--name 'mine' is taken"):
        import_attribution(plan, path, "mine")  # other arrays under the same name: refused
    rows = {r["stage"]: r for r in stage_status(tiny_plan(root, "fit.attribution=mine"), sizes=False)}
    assert rows["attribution[mine]"]["id"] == ref.id and rows["attribution[mine]"]["state"] == "done"
    assert "LDS" in rows["attribution[mine]"]["detail"]
    listed = {r["rel"]: r for r in list_stages(plan.store)}
    assert listed[ref.rel]["state"] == "complete" and "attribution mine (per-margin)" in listed[ref.rel]["detail"]
    # per-margin only cannot feed dm-direct: said before any work
    from pipeline.plan import StageError, method_grids
    from pipeline.stages.unlearn import check_needs

    mine = tiny_plan(root, DM, "fit.attribution=mine")
    with pytest.raises(StageError, match="per-margin ones only"):
        check_needs(mine, method_grids(mine.cfg))
    with pytest.raises(StageError, match="no attribution of that name"):
        tiny_plan(root, "fit.attribution=nobody").attribution
