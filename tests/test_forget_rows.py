"""Forget rows as a product of the fit (decision 36): each fit task writes its part of every configured
forget set's sum_{i in F} theta_logit[i] and diagonal; the unlearn driver assembles them without reading
theta_logit, bit for bit what the column-slab pass over theta_logit gave; a set added after the fit reads
only its own rows of the row-major copy; parts count only under their block's marker. Also: the rows
copies by Ray tasks, the 1-D arrays from the blocks' objects, `fit.store_theta_logit`, dm-direct's error
against the target oracles (decision 34), and the markers read concurrently."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from helpers import copy_store, tiny_plan

BLOCK = "execution.fit_block_targets=256"  # 8 target blocks on digits' 1,797 points, the last of 5
LATE = ("forget_sets=[{name: random10, kind: random, size: 10, seed: 0},"
        " {name: late40, kind: random, size: 40, seed: 7}]")


@pytest.fixture(scope="module")
def fitted(tiny_store, tmp_path_factory):
    """A copy of the tiny store with its fit run in blocks of 256 targets (read-only for the tests)."""
    from pipeline.stages.fit import run_fit

    root = copy_store(tiny_store.root, tmp_path_factory.mktemp("forget-rows") / "store")
    plan = tiny_plan(root, BLOCK)
    run_fit(plan)
    return root, plan


def _group(plan):
    return plan.store.open_group(f"{plan.fit.rel}/arrays.zarr", mode="r")


def _blocks(plan):
    return plan.store.read_json(f"{plan.fit.rel}/COMPLETE.json")["blocks"]


@contextlib.contextmanager
def counting_reads(monkeypatch):
    """Every chunk read through the store's Zarr stores while inside: a list of (key, bytes)."""
    from zarr.storage import WrapperStore

    from pipeline.store import Store

    reads: list[tuple[str, int]] = []

    class Counting(WrapperStore):
        async def get(self, key, prototype, byte_range=None):
            got = await self._store.get(key, prototype, byte_range)
            if "/c/" in key or key.startswith("c/"):
                reads.append((key, 0 if got is None else len(got)))
            return got

        def _with_store(self, store):
            return type(self)(store)

    plain = Store.zarr_store
    monkeypatch.setattr(Store, "zarr_store", lambda self, rel: Counting(plain(self, rel)))
    yield reads
    monkeypatch.setattr(Store, "zarr_store", plain)


def _read_of(reads, array: str) -> list[tuple[str, int]]:
    return [(k, n) for k, n in reads if k.startswith(f"{array}/") or f"/{array}/" in k]


def test_forget_rows_from_the_tasks_equal_the_old_pass_bit_for_bit_and_are_reused(fitted, tmp_path, monkeypatch):
    from pipeline.data.forget_sets import forget_set_id
    from pipeline.stages import fit as fit_stage

    root, _ = fitted
    plan = tiny_plan(copy_store(root, tmp_path / "store"), BLOCK)
    group = _group(plan)
    assert len(_blocks(plan)) == 8 and len(plan.forget_sets) == 2  # random10 and the tuning set
    for name, forget in plan.forget_sets.items():
        for a, b in _blocks(plan):  # one object per (set, block): no two tasks write one
            assert plan.store.exists(fit_stage.forget_part_rel(plan, forget_set_id(forget), a, b)), (name, a, b)
        want = fit_stage.sum_forget_rows(group["theta_logit"], forget)  # the old pass, over theta_logit
        with counting_reads(monkeypatch) as reads:
            got = fit_stage.forget_rows(plan, forget)
        assert not _read_of(reads, "theta_logit") and not _read_of(reads, "theta_logit_rows")
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        assert plan.store.exists(fit_stage.forget_rows_rel(plan, forget))

    def recomputed(*args):
        raise AssertionError("assembled again instead of read back")

    monkeypatch.setattr(fit_stage, "_assemble_forget_rows", recomputed)
    for forget in plan.forget_sets.values():
        again = fit_stage.forget_rows(plan, forget)
        np.testing.assert_array_equal(again[0], fit_stage.sum_forget_rows(group["theta_logit"], forget)[0])


def test_a_forget_set_added_after_the_fit_reads_only_its_rows(fitted, tmp_path, monkeypatch):
    from pipeline.stages import fit as fit_stage

    root, first = fitted
    plan = tiny_plan(copy_store(root, tmp_path / "store"), BLOCK, LATE)
    assert plan.fit.id == first.fit.id  # adding a forget set never re-identifies the fit (decision 15)
    forget = plan.forget_sets["late40"]
    group = _group(plan)
    rows = group["theta_logit_rows"]
    want = fit_stage.sum_forget_rows(group["theta_logit"], forget)
    with counting_reads(monkeypatch) as reads:
        got = fit_stage.forget_rows(plan, forget)
    assert not _read_of(reads, "theta_logit")  # the column-major array is never read
    own = len(forget) * rows.shape[1] * rows.shape[2] * rows.dtype.itemsize
    read = sum(n for _, n in _read_of(reads, "theta_logit_rows"))
    # measured: 0.94x (zstd-compressed rows and one 4.1 KB shard index per shard touched)
    assert 0 < read <= 1.5 * own, (read, own)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    with counting_reads(monkeypatch) as reads:  # produced once, on demand, then read back
        fit_stage.forget_rows(plan, forget)
    assert not reads


def test_a_missing_part_is_taken_from_the_rows_and_no_part_counts_without_its_marker(fitted, tmp_path, monkeypatch):
    from pipeline.data.forget_sets import forget_set_id
    from pipeline.plan import StageError
    from pipeline.stages import fit as fit_stage

    root, _ = fitted
    plan = tiny_plan(copy_store(root, tmp_path / "store"), BLOCK)
    forget = plan.forget_sets["random10"]
    fid = forget_set_id(forget)
    want = fit_stage.sum_forget_rows(_group(plan)["theta_logit"], forget)
    (a, b), (c, d) = _blocks(plan)[2], _blocks(plan)[3]
    plan.store.remove(fit_stage.forget_part_rel(plan, fid, a, b))  # one block's part lost
    with counting_reads(monkeypatch) as reads:
        got = fit_stage.forget_rows(plan, forget, keep=False)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    rows = _group(plan)["theta_logit_rows"]
    assert sum(n for _, n in _read_of(reads, "theta_logit_rows")) <= 1.5 * len(forget) * rows.nbytes // rows.shape[0]
    assert not _read_of(reads, "theta_logit")

    # a fit killed after block c..d wrote its part but before its marker: the part is a wrong one here,
    # and must not count; the re-run fits the block again, which writes the part again
    part = fit_stage.forget_part_rel(plan, fid, c, d)
    fit_stage._save_npz(plan.store, part, forget=forget, sums=np.ones((d - c, 10), np.float32),
                        diagonal=np.ones((int(((forget >= c) & (forget < d)).sum()), 10), np.float32))
    plan.store.remove(f"{plan.fit.rel}/markers/targets/{c:07d}-{d:07d}.json")
    plan.store.remove(f"{plan.fit.rel}/COMPLETE.json")
    with pytest.raises(StageError, match="not finished"):
        fit_stage.forget_rows(plan, [1, 2, 3])
    fit_stage.run_fit(plan)
    got = fit_stage.forget_rows(plan, forget, keep=False)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_a_marker_without_its_block_object_is_fitted_again(fitted, tmp_path):
    from pipeline.stages import fit as fit_stage

    root, _ = fitted
    plan = tiny_plan(copy_store(root, tmp_path / "store"), BLOCK)
    a, b = _blocks(plan)[1]
    before = {n: _group(plan)[n][:] for n in ("bias", "lam", "lds", "bias_logit", "theta_rows")}
    marker = plan.store.path(f"{plan.fit.rel}/markers/targets/{a:07d}-{b:07d}.json")
    stamp = __import__("os").stat(marker).st_mtime_ns
    plan.store.remove(fit_stage._block_rel(plan, a, b))
    plan.store.remove(f"{plan.fit.rel}/COMPLETE.json")
    fit_stage.run_fit(plan)
    assert __import__("os").stat(marker).st_mtime_ns != stamp  # block a..b fitted again
    for name, want in before.items():  # same config, same block size: the same bits
        np.testing.assert_array_equal(_group(plan)[name][:], want, err_msg=name)
    assert _group(plan)["bias"].chunks == (min(fit_stage.VECTOR_CHUNK, 1797),)


def test_rows_copies_and_vectors_equal_the_column_arrays(fitted):
    from pipeline.stages import fit as fit_stage

    _, plan = fitted
    group = _group(plan)
    np.testing.assert_array_equal(group["theta_rows"][:], group["theta"][:])
    np.testing.assert_array_equal(group["theta_logit_rows"][:], group["theta_logit"][:])
    assert group["theta_logit_rows"].chunks == (1, 1797, 10) and group["theta_logit_rows"].shards[0] == 256
    n = plan.prepared_meta()["n_train"]
    bands = plan.store.list(f"{plan.fit.rel}/markers/rows")
    assert bands == [f"{a:07d}-{min(a + fit_stage.ROW_BAND, n):07d}.json" for a in range(0, n, fit_stage.ROW_BAND)]
    for a, b in _blocks(plan):  # the consolidated 1-D arrays hold what each block's object holds
        block = fit_stage._load_npz(plan.store.read_bytes(fit_stage._block_rel(plan, a, b)))
        for name in fit_stage.VECTORS:
            np.testing.assert_array_equal(group[name][a:b], block[name], err_msg=name)


def test_store_theta_logit_false_keeps_only_the_row_major_copy(tiny_store, fitted, tmp_path):
    from pipeline.stages import fit as fit_stage
    from pipeline.stages.query import open_attribution

    from helpers import TINY

    _, default = fitted
    assert "store_theta_logit" not in default.cfg.fit.section()  # the default leaves fit ids as they were
    root = copy_store(tiny_store.root, tmp_path / "store")
    plan = tiny_plan(root, BLOCK, "fit.store_theta_logit=false")
    assert plan.fit.id != default.fit.id  # the stored arrays differ: another stage
    fit_stage.run_fit(plan)
    group = _group(plan)
    assert "theta_logit" not in group
    np.testing.assert_array_equal(group["theta_logit_rows"][:], _group(default)["theta_logit"][:])
    forget = plan.forget_sets["random10"]
    want = fit_stage.sum_forget_rows(_group(default)["theta_logit"], forget)
    got = fit_stage.forget_rows(plan, forget)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    am = open_attribution(str(TINY), [f"store={root}", BLOCK, "fit.store_theta_logit=false"])
    full = np.zeros((1797, 10), np.float32)
    np.testing.assert_array_equal(am.predict(forget, full, am.labels)["logits"], -want[0])


def test_dm_direct_error_against_the_target_oracles(fitted, monkeypatch):
    from pipeline.plan import FamilySpec, family_store, n_unlearned
    from pipeline.stages import fit as fit_stage

    _, plan = fitted
    meta = plan.prepared_meta()
    errors = fit_stage.dm_direct_errors(plan, compute=False)  # recorded at the end of the fit
    assert sorted(errors) == sorted(plan.forget_sets)
    n = n_unlearned(plan.cfg)
    full = family_store(plan, FamilySpec(plan.full, "models", plan.cfg.train.full.models, "full"), meta)
    logits = full.read("logits", n).astype(np.float64)
    for name, forget in plan.forget_sets.items():
        oracle = family_store(plan, FamilySpec(plan.oracle(name), "target", 2, "oracle"), meta)
        target = oracle.read("logits", 2).astype(np.float64).mean(0)
        sums = fit_stage.forget_rows(plan, forget)[0].astype(np.float64)
        for group, idx in (("forget", forget), ("val", np.arange(meta["n_train"], 1797))):
            got = errors[name][group]
            diff = logits[:, idx] - sums[idx] - target[idx]
            assert got["points"] == len(idx)
            assert got["rmse"] == pytest.approx(np.sqrt(np.mean(diff**2)), rel=1e-5)
            assert got["mean_abs"] == pytest.approx(np.mean(np.abs(diff)), rel=1e-5)
            shift = np.corrcoef(-sums[idx].ravel(), (target - logits.mean(0))[idx].ravel())[0, 1]
            assert got["shift_correlation"] == pytest.approx(shift, rel=1e-4, abs=1e-6)
            assert got["do_nothing_rmse"] == pytest.approx(np.sqrt(np.mean((logits[:, idx] - target[idx]) ** 2)), rel=1e-5)
        assert errors[name]["retain"]["points"] == meta["n_train"] - len(forget)

    def recomputed(*args, **kwargs):
        raise AssertionError("computed again instead of read back")

    monkeypatch.setattr(fit_stage, "forget_rows", recomputed)
    assert fit_stage.dm_direct_errors(plan) == errors


def test_family_markers_read_concurrently_equal_the_sequential_read(tiny_store):
    from pipeline.plan import family_store, train_families

    plan = tiny_store.plan
    meta = plan.prepared_meta()
    seen = 0
    for fam in train_families(plan):
        family = family_store(plan, fam, meta)
        names = [n for n in plan.store.list(family.marker_rel) if n.endswith(".json")]
        sequential = [plan.store.read_json(f"{family.marker_rel}/{n}") for n in names]
        assert family.markers() == sequential
        seen += len(sequential)
    assert seen > 8
    assert plan.store.read_jsons([f"{family.marker_rel}/missing.json", f"{family.marker_rel}/{names[0]}",
                                  f"{family.marker_rel}/none.json"]) == [None, sequential[0], None]
