"""The fit stage on the shared tiny store, its resume, and the attribution queries against NumPy on the
whole matrix (Python API and console script)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import TINY, cli, copy_store, tiny_plan


@pytest.fixture(scope="module")
def fitted(tiny_store, tmp_path_factory):
    """A copy of the tiny store with its fit stage run (per-margin and per-logit diff-in-means)."""
    from pipeline.stages.fit import run_fit

    root = copy_store(tiny_store.root, tmp_path_factory.mktemp("fitted") / "store")
    plan = tiny_plan(root)
    summary = run_fit(plan)
    return root, plan, summary


def _matrix(plan, name="theta"):
    return plan.store.open_group(f"{plan.fit.rel}/arrays.zarr", mode="r")[name][:]


def test_fit_equals_the_estimator_on_all_subset_models(fitted):
    import torch

    from pipeline.datamodels import diff_in_means
    from pipeline.plan import family_store
    from pipeline.stages.fit import _subset_family

    _, plan, summary = fitted
    meta = plan.prepared_meta()
    fam = family_store(plan, _subset_family(plan, "fit"), meta)
    n = plan.cfg.train.subset.models
    dm = diff_in_means(torch.as_tensor(fam.read("masks", n)), torch.as_tensor(fam.read("margins", n)))
    np.testing.assert_allclose(_matrix(plan), dm.weight.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(_matrix(plan, "theta_rows"), _matrix(plan))
    assert summary["lds_mean"] > 0  # subset models trained on half the data are predictable from masks


def test_a_killed_fit_redoes_only_its_unmarked_blocks(fitted, tmp_path):
    from pipeline.stages.fit import run_fit

    root, _, _ = fitted
    copy = copy_store(root, tmp_path / "store")
    plan = tiny_plan(copy, "execution.fit_block_targets=512")
    want = _matrix(plan)
    markers = sorted(plan.store.list(f"{plan.fit.rel}/markers/targets"))
    # as a fit killed after its first block: later markers and the completion record never written
    for name in markers[1:]:
        plan.store.remove(f"{plan.fit.rel}/markers/targets/{name}")
    plan.store.remove(f"{plan.fit.rel}/COMPLETE.json")
    group = plan.store.open_group(f"{plan.fit.rel}/arrays.zarr", mode="r+")
    group["theta"][:, 512:] = 0
    first = plan.store.read_bytes(f"{plan.fit.rel}/markers/targets/{markers[0]}")
    run_fit(plan)
    np.testing.assert_array_equal(_matrix(plan), want)
    assert plan.store.read_bytes(f"{plan.fit.rel}/markers/targets/{markers[0]}") == first  # not redone


def test_a_fit_task_reads_only_the_subset_chunks_of_its_targets(fitted, tmp_path, monkeypatch):
    # the subset family's outputs are chunked by points, so a fit task reads every model's chunk of
    # its own target band and nothing else: with every other chunk unreadable it gives the same fit
    from pipeline import plan as plan_module
    from pipeline.stages import prepare, train
    from pipeline.stages.fit import _create_arrays, _subset_family, fit_block_task

    _, plan, _ = fitted
    monkeypatch.setattr(plan_module, "SUBSET_POINT_CHUNK", 256)  # the arrays are created in this process
    mine = tiny_plan(tmp_path / "store")
    prepare.run_prepare(mine)
    train.run_train(mine, ("subset",))
    meta = mine.prepared_meta()
    for role in ("fit", "heldout"):
        ours = plan_module.family_store(mine, _subset_family(mine, role), meta)
        theirs = plan_module.family_store(plan, _subset_family(plan, role), meta)
        block = mine.cfg.execution.block_size  # a family's chunks are blocks of models
        assert ours.array("margins").chunks == (block, 256) and ours.array("logits").chunks == (block, 256, 10)
        for name in ("margins", "logits", "masks"):  # the same training, another layout
            np.testing.assert_array_equal(ours.array(name)[:], theirs.array(name)[:])
    spoiled = 0
    for name in ("margins", "logits"):
        for role in ("fit", "heldout"):
            chunks = tmp_path / "store" / mine.subset.rel / "arrays.zarr" / role / name / "c"
            for path in (p for p in chunks.rglob("*") if p.is_file()):
                if path.relative_to(chunks).parts[1] != "1":  # chunk column 1 holds points 256..511
                    path.write_bytes(b"not a chunk")
                    spoiled += 1
    assert spoiled >= 2 * (32 + 8) // 8 * 6  # margins and logits, model chunks of 8, 6 point chunks each
    _create_arrays(mine, meta)
    # a generator: the targets done, chunk by chunk (progress within a block)
    assert list(fit_block_task(str(tmp_path / "store"), mine.cfg, 256, 512)) == [16] * 16
    for name, atol in (("theta", 1e-6), ("theta_logit", 1e-3)):  # theta_logit is float16
        np.testing.assert_allclose(_matrix(mine, name)[:, 256:512].astype(np.float32),
                                   _matrix(plan, name)[:, 256:512].astype(np.float32), rtol=1e-5, atol=atol)
    with pytest.raises(Exception):  # the spoiled chunks were real: reading them fails
        plan_module.family_store(mine, _subset_family(mine, "fit"), meta).array("margins")[:, :256]


def test_queries_equal_numpy_on_the_whole_matrix(fitted):
    from pipeline.stages.query import open_attribution

    root, plan, _ = fitted
    am = open_attribution(str(TINY), [f"store={root}"])
    theta = _matrix(plan)
    target = 1500
    top = am.top_k(target, k=5)
    assert [p.index for p in top["positive"]] == list(np.argsort(-theta[:, target], kind="stable")[:5])
    assert [p.index for p in top["negative"]] == list(np.argsort(theta[:, target], kind="stable")[:5])
    assert top["positive"][0].label == int(plan.train_labels[top["positive"][0].index])
    np.testing.assert_array_equal(am.row(3), theta[3])
    np.testing.assert_array_equal(am.self_influence(), np.diagonal(theta[:, : theta.shape[0]]))
    full_logits = np.random.default_rng(0).normal(size=(theta.shape[1], 10)).astype(np.float32)
    labels = am.labels
    forget = plan.forget_sets["random10"]
    out = am.predict(forget, full_logits, labels)
    rows = _matrix(plan, "theta_logit").astype(np.float32)[forget].sum(0)
    np.testing.assert_allclose(out["logits"], full_logits - rows, rtol=1e-5, atol=1e-5)


def test_forget_rows_of_a_set_in_another_order_come_from_its_rows_and_are_kept(fitted, tmp_path, monkeypatch):
    # what dm-direct and DMM read: sum_{i in F} theta_logit[i] and theta_logit[i, i]; a set in an order
    # the config does not name has no parts from the fit tasks (tests/test_forget_rows.py): its rows of
    # theta_logit_rows are read once, the result kept under the fit stage and read back
    from pipeline.stages import fit as fit_stage

    root, _, _ = fitted
    plan = tiny_plan(copy_store(root, tmp_path / "store"))
    forget = plan.forget_sets["random10"][::-1].copy()  # any order: the diagonal follows it
    theta_logit = _matrix(plan, "theta_logit").astype(np.float32)
    monkeypatch.setattr(fit_stage, "LATE_ROWS", 3)  # several reads of rows, the last one partial
    sums, diagonal = fit_stage.forget_rows(plan, forget)
    np.testing.assert_array_equal(sums, fit_stage.sum_forget_rows(_group(plan)["theta_logit"], forget)[0])
    np.testing.assert_allclose(sums, theta_logit[forget].sum(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(diagonal, theta_logit[forget, forget])
    assert plan.store.exists(fit_stage.forget_rows_rel(plan, forget))

    def unread(*args):
        raise AssertionError("recomputed instead of read back")

    monkeypatch.setattr(fit_stage, "sum_forget_rows", unread)
    monkeypatch.setattr(fit_stage, "read_forget_rows", unread)
    again = fit_stage.forget_rows(plan, forget)
    np.testing.assert_array_equal(again[0], sums)
    np.testing.assert_array_equal(again[1], diagonal)


def _group(plan):
    return plan.store.open_group(f"{plan.fit.rel}/arrays.zarr", mode="r")


def test_cli_query_json_and_errors(fitted):
    root, plan, _ = fitted
    store = f"store={root}"
    res = cli("query", "top-k", str(TINY), "--target", "7", "--k", "3", "--json", "--set", store)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    theta = _matrix(plan)
    assert [p["index"] for p in got["positive"]] == list(np.argsort(-theta[:, 7], kind="stable")[:3])
    res = cli("query", "predict", str(TINY), "--forget-set", "random10", "--json", "--set", store)
    assert res.returncode == 0 and len(json.loads(res.stdout)["points"]) == 10
    for args, words in [
        (("query", "top-k", str(TINY), "--target", "99999"), "out of range"),
        (("query", "row", str(TINY), "--index", "-1"), "out of range"),
        (("query", "predict", str(TINY), "--forget-set", "nope"), "unknown forget set"),
    ]:
        res = cli(*args, "--set", store)
        assert res.returncode == 2 and words in res.stderr, (args, res.stderr)


def test_query_without_a_finished_fit_is_exit_2(tiny_store):
    res = cli("query", "top-k", str(TINY), "--target", "1", "--set", f"store={tiny_store.root}")
    assert res.returncode == 2 and "not finished" in res.stderr


def test_a_worker_decodes_a_subset_band_once_and_again_after_a_block_is_rewritten(fitted, tmp_path):
    # fit tasks in one worker share the decoded chunks of their band (digits: one chunk of every point
    # per model); the copy is reused while the family's markers are unchanged and renewed when one is
    from pipeline.plan import family_store
    from pipeline.stages import fit as fit_stage

    root, _, _ = fitted
    plan = tiny_plan(copy_store(root, tmp_path / "store"))
    meta = plan.prepared_meta()
    family = family_store(plan, fit_stage._subset_family(plan, "fit"), meta)
    n = plan.cfg.train.subset.models
    want = family.array("margins")[:n]
    np.testing.assert_array_equal(fit_stage._subset_reader(plan, meta, "fit", n)("margins", 32, 48), want[:, 32:48])
    chunks = tmp_path / "store" / plan.subset.rel / "arrays.zarr" / "fit" / "margins" / "c"
    saved = {path: path.read_bytes() for path in chunks.rglob("*") if path.is_file()}
    for path in saved:
        path.write_bytes(b"not a chunk")
    got = fit_stage._subset_reader(plan, meta, "fit", n)("margins", 0, 16)  # from the decoded band
    np.testing.assert_array_equal(got, want[:, :16])
    got[:] = 0  # a copy: the kept band is not the caller's to change
    np.testing.assert_array_equal(fit_stage._subset_reader(plan, meta, "fit", n)("margins", 0, 16), want[:, :16])
    for path, data in saved.items():
        path.write_bytes(data)
    marker = min(family.markers(), key=lambda m: m["start"])
    rows = {name: family.array(name)[marker["start"] : marker["end"]] for name in ("masks", "accuracy")}
    logits = family.array("logits")
    rows["logits"] = logits[marker["start"] : marker["end"]] if logits.shape[0] else None
    fresh = want[marker["start"] : marker["end"]] + 1.0
    family.write_block(marker["start"], {**{k: v for k, v in rows.items() if v is not None}, "margins": fresh},
                       marker["info"])
    renewed = fit_stage._subset_reader(plan, meta, "fit", n)("margins", 0, 16)
    np.testing.assert_array_equal(renewed[: len(fresh)], fresh[:, :16])
