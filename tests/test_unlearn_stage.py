"""The unlearn stage on a tiny real store (real fit, real target and eval oracles; issue 14, item 7):

- every method moves the forget set's margins toward the oracles' (gradient ascent included: a flipped
  sign fails here);
- the stage wires dm-direct, DMM and OM to the forget set's datamodel rows and to the target oracles,
  never to the eval oracles;
- hyperparameter selection picks decision 27's point, breaks ties by compute and reuses its record.
"""

from __future__ import annotations

import numpy as np
import pytest

from helpers import copy_store, tiny_plan

# One point per method (no grid), strong enough to move tiny 4-epoch MLPs and gentle enough not to
# overshoot the oracles (gradient ascent at lr 0.01 x 3 epochs, or SFR-on at alpha 5, end 30-60 below them).
METHODS = ("{do_nothing: {}, dm_direct: {}, "
           "dmm: {lr: 0.003, epochs: 3, batch_size: 32, forget_multiplier: 5, retain_multiplier: 10}, "
           "oracle_matching: {lr: 0.003, epochs: 3, batch_size: 32, forget_multiplier: 5, retain_multiplier: 10}, "
           "finetune: {lr: 0.05, epochs: 3}, gradient_ascent: {lr: 0.002, epochs: 1, batch_size: 16}, "
           "neggrad_plus: {lr: 0.01, epochs: 1, batch_size: 64, forget_batch_size: 16}, "
           "scrub: {lr: 0.01, epochs: 2, msteps: 1, batch_size: 64, forget_batch_size: 16}, "
           "del: {lr: 0.05, epochs: 2, batch_size: 64, forget_batch_size: 16}, "
           "sfron: {lr: 0.01, n_iters: 10, forget_freq: 2, forget_alpha: 0.3, batch_size: 32}, "
           "camu: {kl_lr: 0.01, impair_lr: 0.001, epochs: 5, batch_size: 16}}")
# The 20 training points whose neighbours most disagree with their label: the full models fit them
# because they saw them, the oracles do not, so there is a gap to close.
FORGET = "forget_sets=[{name: atypical20, kind: atypical, size: 20}]"


@pytest.fixture(scope="module")
def unlearned(tiny_store, tmp_path_factory):
    from pipeline.stages.fit import run_fit
    from pipeline.stages.train import run_train
    from pipeline.stages.unlearn import run_unlearn

    root = copy_store(tiny_store.root, tmp_path_factory.mktemp("unlearn-stage") / "store")
    plan = tiny_plan(root, FORGET, f"unlearn.methods={METHODS}", "tuning_forget_sets=[]")
    run_train(plan)  # the new forget set's oracles only
    run_fit(plan)
    run_unlearn(plan)
    return root, plan


def _margins(plan, method: str) -> np.ndarray:
    from pipeline.stages.unlearn import method_grids, n_unlearned, unlearn_family, unlearn_ref
    from pipeline.unlearn import get_method

    hp = method_grids(plan.cfg)[method][0]
    assert get_method(method)  # a known method
    family = unlearn_family(plan, unlearn_ref(plan, method, hp, "atypical20"), plan.prepared_meta())
    return family.read("margins", n_unlearned(plan.cfg))


def test_every_method_moves_forget_margins_toward_the_oracles(unlearned):
    from pipeline.evaluate.oracles import oracle_margins

    _, plan = unlearned
    forget = plan.forget_sets["atypical20"]
    oracle = oracle_margins(plan, "atypical20", "eval")[:, forget].mean()
    full = _margins(plan, "do_nothing")[:, forget].mean()
    # the full models fit the atypical points better than the oracles, which never saw them
    assert full - oracle > 0.25, (full, oracle)
    moved = {}
    for method in plan.cfg.unlearn.methods:
        if method != "do_nothing":
            moved[method] = float(_margins(plan, method)[:, forget].mean())
    # every method lowers the mean forget margin, and ends nearer the oracles' than the full models
    assert all(m < full for m in moved.values()), " ".join(f"{k}={v:.3f}" for k, v in moved.items())
    assert all(abs(m - oracle) < full - oracle for m in moved.values()), (full, oracle, moved)


def test_matching_methods_read_forget_rows_and_target_oracles_never_eval_oracles(unlearned, tmp_path):
    """Scramble the eval oracles in one copy of the store and the target oracles in another: dm-direct,
    DMM and OM give the same models with scrambled eval oracles, and OM a different one with scrambled
    targets. The context serves exactly the forget set's datamodel rows and the target oracles' mean."""
    import torch

    from pipeline.plan import FamilySpec, family_store
    from pipeline.stages.fit import forget_rows
    from pipeline.stages.train import load_device_data
    from pipeline.stages.unlearn import build_context, method_grids, run_unlearn_jobs, unlearn_ref
    from pipeline.unlearn import get_method

    root, plan = unlearned
    meta = plan.prepared_meta()
    forget = plan.forget_sets["atypical20"]
    grids = method_grids(plan.cfg)
    jobs = [(m, grids[m][0], "atypical20") for m in ("dm_direct", "dmm", "oracle_matching")]

    def scrambled(role: str):
        copy = copy_store(root, tmp_path / role)
        p = tiny_plan(copy, FORGET, f"unlearn.methods={METHODS}", "tuning_forget_sets=[]")
        n = getattr(p.cfg.train.oracle, role)
        fam = family_store(p, FamilySpec(p.oracle("atypical20"), role, n, "oracle"), meta)
        rng = np.random.default_rng(0)
        for marker in fam.markers():  # rewritten through the family, so their checksums hold
            a, b = marker["start"], marker["end"]
            rows = {spec.name: fam.array(spec.name, mode="a")[a:b] for spec in fam.specs}
            for name in ("logits", "margins"):
                rows[name] = rng.normal(0, 50, size=rows[name].shape).astype(rows[name].dtype)
            fam.write_block(a, rows, marker["info"])
        for m, hp, fs in jobs:  # drop the results computed before the scramble
            p.store.remove(unlearn_ref(p, m, hp, fs).rel)
        run_unlearn_jobs(p, jobs, "unlearn")
        return p

    def outputs(p, method):
        hp = grids[method][0]
        from pipeline.stages.unlearn import n_unlearned, unlearn_family

        return unlearn_family(p, unlearn_ref(p, method, hp, "atypical20"), meta).read("logits", n_unlearned(p.cfg))

    no_eval = scrambled("eval")
    for method in ("dm_direct", "dmm", "oracle_matching"):
        np.testing.assert_array_equal(outputs(no_eval, method), outputs(plan, method), err_msg=method)
    no_target = scrambled("target")
    assert not np.allclose(outputs(no_target, "oracle_matching"), outputs(plan, "oracle_matching"))

    data = load_device_data(str(root), plan.prepare.rel, "cpu")
    om = get_method("oracle_matching")
    ctx = build_context(plan, meta, data, unlearn_ref(plan, "oracle_matching", grids["oracle_matching"][0],
                                                      "atypical20"), "atypical20", forget, [0, 1], om.NEEDS)
    n_t = plan.cfg.train.oracle.target
    target_fam = family_store(plan, FamilySpec(plan.oracle("atypical20"), "target", n_t, "oracle"), meta)
    torch.testing.assert_close(ctx.target_oracle_logits(), torch.as_tensor(target_fam.read("logits", n_t)).float().mean(0))
    dmm = get_method("dmm")
    ctx = build_context(plan, meta, data, unlearn_ref(plan, "dmm", grids["dmm"][0], "atypical20"), "atypical20",
                        forget, [0, 1], dmm.NEEDS)
    sums, diagonal = forget_rows(plan, forget)
    torch.testing.assert_close(ctx.forget_rows().sums, torch.as_tensor(sums).float())
    torch.testing.assert_close(ctx.forget_rows().diagonal, torch.as_tensor(diagonal).float())
    with pytest.raises(RuntimeError):
        ctx.target_oracle_logits()  # DMM is never served oracles at all


def test_choose_lowest_mean_p95_then_lowest_compute():
    from pipeline.stages.unlearn import choose

    def sc(f, r, v, c):
        return {"p95": {"forget": f, "retain": r, "val": v}, "mean_p95": (f + r + v) / 3, "compute": c}

    # forget P95 alone would pick the wrecker (index 0)
    assert choose([sc(0.5, 9.0, 9.0, 10), sc(2.0, 1.0, 1.0, 10), sc(3.0, 1.0, 1.0, 1)]) == 1
    # equal means: the cheaper point
    assert choose([sc(1.0, 2.0, 3.0, 10), sc(3.0, 2.0, 1.0, 5), sc(2.0, 2.0, 2.0, 7)]) == 1


def test_selection_follows_the_rule_records_every_point_and_reuses_its_record(tiny_store, tmp_path, monkeypatch):
    import pipeline.stages.unlearn as us
    from pipeline.evaluate.oracles import GROUPS, all_labels, logit_accuracy, score, selection_score

    root = copy_store(tiny_store.root, tmp_path / "store")
    plan = tiny_plan(root, "unlearn.methods={gradient_ascent: {lr: [0.001, 0.01, 0.1], epochs: 2}}")
    grid = us.method_grids(plan.cfg)["gradient_ascent"]
    chosen = us.select_hyperparameters(plan, {"gradient_ascent": grid})["gradient_ascent"]
    record = plan.store.read_json(us.selection_rel(plan, "gradient_ascent", grid))
    assert record["rule"] and len(record["scores"]) == 3
    labels = all_labels(plan)
    means = []
    for hp, sc in zip(grid, record["scores"]):
        assert set(sc["p95"]) == set(GROUPS) and set(sc["accuracy"]) == set(GROUPS) and sc["compute"] > 0
        fam = us.unlearn_family(plan, us.unlearn_ref(plan, "gradient_ascent", hp, "tune"), plan.prepared_meta())
        n = us.n_unlearned(plan.cfg)
        row = score(plan, "tune", fam.read("margins", n), logit_accuracy(fam.read("logits", n), labels), labels,
                    bootstrap=0)
        assert sc["p95"] == {g: row["klom"][g]["p95"] for g in GROUPS}
        means.append(selection_score(row))
    assert chosen == grid[int(np.argmin(means))] == grid[record["chosen"]]

    # a second selection reads the record: no unlearning, no scoring
    def boom(*a, **k):
        raise AssertionError("selection re-ran instead of reusing its record")

    monkeypatch.setattr(us, "run_unlearn_jobs", boom)
    monkeypatch.setattr(us, "score_grid_point", boom)
    record["chosen"] = (record["chosen"] + 1) % 3  # the record, not a recomputation, decides
    plan.store.write_json(us.selection_rel(plan, "gradient_ascent", grid), record)
    assert us.select_hyperparameters(plan, {"gradient_ascent": grid})["gradient_ascent"] == grid[record["chosen"]]
