"""The unlearn stage on a tiny real store (real fit, real target and eval oracles; issue 14, item 7):

- every method moves the forget set's margins toward the oracles' (gradient ascent included: a flipped
  sign fails here);
- the stage wires dm-direct, DMM and OM to the forget set's datamodel rows and to the target oracles,
  never to the eval oracles;
- hyperparameter selection follows decision 30 (never a failing point while one passes; ties by compute)
  and reuses its record; each reported kind is tuned on its own tuning set (decision 31), and the upper
  bound is scored on the reported set's own eval oracles (decision 32).
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


def _point(f, r, v, compute, passed):
    return {"p95": {"forget": f, "retain": r, "val": v}, "mean_p95": (f + r + v) / 3, "compute": compute,
            "bar": {"passed": passed}}


def test_the_rule_never_picks_a_failing_point_while_one_passes():
    from pipeline.stages.unlearn import choose

    # forget P95 alone picks the wrecker (0); the lowest mean (1) fails the bar: the best passing point wins
    points = [_point(0.5, 9.0, 9.0, 10, False), _point(1.0, 1.0, 1.0, 10, False), _point(3.0, 1.0, 1.0, 1, True),
              _point(1.5, 1.5, 1.5, 1, True)]
    assert choose(points) == (3, True)
    for k in range(len(points)):  # whatever point is the only one passing, it is chosen
        assert choose([{**p, "bar": {"passed": i == k}} for i, p in enumerate(points)]) == (k, True)


def test_when_no_point_passes_the_lowest_mean_is_chosen_and_marked():
    from pipeline.stages.unlearn import choose

    assert choose([_point(3.0, 3.0, 3.0, 1, False), _point(1.0, 2.0, 2.0, 9, False)]) == (1, False)


def test_ties_go_to_the_lower_compute_then_the_earlier_point():
    from pipeline.stages.unlearn import choose

    assert choose([_point(1.0, 2.0, 3.0, 10, True), _point(3.0, 2.0, 1.0, 5, True), _point(2.0, 2.0, 2.0, 7, True)]) == (1, True)
    assert choose([_point(1.0, 1.0, 1.0, 5, True), _point(1.0, 1.0, 1.0, 5, True)]) == (0, True)
    # a cheaper failing point with the same mean does not take a passing one's place
    assert choose([_point(1.0, 1.0, 1.0, 9, True), _point(1.0, 1.0, 1.0, 1, False)]) == (0, True)


def test_the_bar_checks_accuracy_and_retain_val_p95_against_the_floor_and_do_nothing():
    from pipeline.evaluate.oracles import bar_checks

    floor = {"p95": {"forget": 0.7, "retain": 0.6, "val": 0.6}, "accuracy": {"forget": 0.9, "retain": 0.99, "val": 0.95}}
    nothing = {"p95": {"forget": 6.0, "retain": 2.0, "val": 0.3}, "accuracy": {"forget": 1.0, "retain": 1.0, "val": 0.96}}
    # limits: retain P95 max(0.9, 2.4) = 2.4, val P95 max(0.9, 0.36) = 0.9; accuracies >= 0.99 and 0.95
    ok = {"p95": {"forget": 9.0, "retain": 2.4, "val": 0.9}, "accuracy": {"forget": 0.0, "retain": 0.99, "val": 0.951}}
    assert bar_checks(ok, floor, nothing)["passed"]  # the forget group is not part of the bar
    bad = bar_checks({**ok, "p95": {**ok["p95"], "val": 0.91}}, floor, nothing)
    assert (bad["passed"], bad["keeps_utility"], bad["keeps_klom"]) == (False, True, False)
    assert bad["checks"]["val_p95"] == {"value": 0.91, "limit": pytest.approx(0.9), "ok": False}
    bad = bar_checks({**ok, "accuracy": {**ok["accuracy"], "retain": 0.985}}, floor, nothing)
    assert (bad["passed"], bad["keeps_utility"], bad["keeps_klom"]) == (False, False, True)


def test_selection_follows_the_rule_records_every_point_and_reuses_its_record(tiny_store, tmp_path, monkeypatch):
    import pipeline.stages.unlearn as us
    from pipeline.evaluate.oracles import (
        GROUPS, SELECTION_RULE, all_labels, bar_checks, logit_accuracy, oracle_margins, score, selection_score,
    )

    root = copy_store(tiny_store.root, tmp_path / "store")
    plan = tiny_plan(root, "unlearn.methods={gradient_ascent: {lr: [0.001, 0.01, 0.1], epochs: 2}}")
    grid = us.method_grids(plan.cfg)["gradient_ascent"]
    chosen = us.select_hyperparameters(plan, {"gradient_ascent": grid})["gradient_ascent"]
    record = plan.store.read_json(us.selection_rel(plan, "gradient_ascent", grid, "tune"))
    assert record["rule"] == SELECTION_RULE and record["set"] == "tune" and record["role"] == "tuning"
    assert not record["optimistic"] and len(record["scores"]) == 3
    labels = all_labels(plan)
    n = us.n_unlearned(plan.cfg)

    def scored(margins, logits):
        row = score(plan, "tune", margins, logit_accuracy(logits, labels), labels, bootstrap=0)
        return {"p95": {g: row["klom"][g]["p95"] for g in GROUPS}, "accuracy": row["accuracy"]}, selection_score(row)

    # the floor (reference oracles) and do-nothing (the full models) on the tuning set, scored here again
    floor, _ = scored(oracle_margins(plan, "tune", "reference"), oracle_margins(plan, "tune", "reference", "logits"))
    full = us.family_store(plan, us.FamilySpec(plan.full, "models", plan.cfg.train.full.models, "full"), plan.prepared_meta())
    nothing, _ = scored(full.read("margins", n), full.read("logits", n))
    assert (record["floor"], record["do_nothing"]) == (floor, nothing)
    means, passed = [], []
    for hp, sc in zip(grid, record["scores"]):
        assert sc["compute"] > 0
        fam = us.unlearn_family(plan, us.unlearn_ref(plan, "gradient_ascent", hp, "tune"), plan.prepared_meta())
        mine, mean = scored(fam.read("margins", n), fam.read("logits", n))
        assert sc["p95"] == mine["p95"] and sc["accuracy"] == mine["accuracy"]
        assert sc["bar"] == bar_checks(sc, floor, nothing)
        means.append(mean)
        passed.append(sc["bar"]["passed"])
    pool = [i for i in range(3) if passed[i]] or range(3)
    want = min(pool, key=lambda i: means[i])
    assert chosen == {"random10": grid[want]} and record["chosen"] == want and record["passed_bar"] == any(passed)
    if any(passed):
        assert passed[record["chosen"]]  # never a failing point while one passes

    # a second selection reads the record: no unlearning, no scoring
    def boom(*a, **k):
        raise AssertionError("selection re-ran instead of reusing its record")

    monkeypatch.setattr(us, "run_unlearn_jobs", boom)
    monkeypatch.setattr(us, "score_grid_point", boom)
    record["chosen"] = (record["chosen"] + 1) % 3  # the record, not a recomputation, decides
    plan.store.write_json(us.selection_rel(plan, "gradient_ascent", grid, "tune"), record)
    assert us.select_hyperparameters(plan, {"gradient_ascent": grid})["gradient_ascent"]["random10"] == grid[record["chosen"]]


# A class reported set beside tiny's random one, a tuning set of each kind, and the upper bound.
BY_KIND = ("forget_sets=[{name: random10, kind: random, size: 10, seed: 0}, "
           "{name: class3-8, kind: class, class_id: 3, size: 8, seed: 2}]",
           "tuning_forget_sets=[{name: tune, kind: random, size: 10, seed: 100}, "
           "{name: tune-class5, kind: class, class_id: 5, size: 8, seed: 101}]",
           "unlearn.upper_bound=true", "unlearn.methods={do_nothing: {}, gradient_ascent: {lr: [0.001, 0.01], epochs: 1}}")


def test_each_kind_is_tuned_on_its_own_tuning_set_and_the_upper_bound_on_the_scored_oracles(tiny_store, tmp_path):
    import pipeline.stages.unlearn as us
    from pipeline.evaluate.oracles import GROUPS, all_labels, logit_accuracy, score
    from pipeline.stages.status import stage_status
    from pipeline.stages.train import run_train

    root = copy_store(tiny_store.root, tmp_path / "store")
    plan = tiny_plan(root, *BY_KIND)
    assert (plan.tuning_set("random10"), plan.tuning_set("class3-8")) == ("tune", "tune-class5")
    assert set(plan.train_labels[plan.forget_sets["tune-class5"]]) == {5}
    run_train(plan)  # the oracles of class3-8 and tune-class5 (three roles each)
    chosen = us.run_unlearn(plan)
    grid = us.method_grids(plan.cfg)["gradient_ascent"]
    records = us.selection_records(plan, {"gradient_ascent": grid})["gradient_ascent"]
    assert list(records) == ["tune", "tune-class5", "random10", "class3-8"]
    for name, fs in (("tune", "random10"), ("tune-class5", "class3-8")):
        assert records[name]["role"] == "tuning"
        assert chosen["gradient_ascent"][fs] == grid[records[name]["chosen"]].model_dump(mode="json")

    summary = us.selection_summary(plan)
    assert summary["do_nothing"]["class3-8"]["tuning_set"] is None and summary["do_nothing"]["class3-8"]["upper_bound"] is None
    labels = all_labels(plan)
    n = us.n_unlearned(plan.cfg)
    for fs, tuning, kind in (("random10", "tune", "random"), ("class3-8", "tune-class5", "class")):
        entry = summary["gradient_ascent"][fs]
        assert (entry["tuning_set"], entry["kind"], entry["reported_kind"]) == (tuning, kind, kind)
        assert entry["record"] == us.selection_rel(plan, "gradient_ascent", grid, tuning)
        bound, rec = entry["upper_bound"], records[fs]
        assert rec["optimistic"] and rec["role"] == "upper_bound" and bound["label"] == us.UPPER_BOUND_LABEL
        hp = grid[rec["chosen"]]
        assert bound["hparams"] == hp.model_dump(mode="json") and bound["passed_bar"] == rec["passed_bar"]
        assert bound["unlearn_id"] == us.unlearn_ref(plan, "gradient_ascent", hp, fs).id
        # the upper bound's points are scored on the reported set's own eval oracles
        for point, sc in zip(grid, rec["scores"]):
            fam = us.unlearn_family(plan, us.unlearn_ref(plan, "gradient_ascent", point, fs), plan.prepared_meta())
            row = score(plan, fs, fam.read("margins", n), logit_accuracy(fam.read("logits", n), labels), labels, bootstrap=0)
            assert sc["p95"] == {g: row["klom"][g]["p95"] for g in GROUPS}
    assert us.upper_bound_jobs(plan) == [("gradient_ascent", summary["gradient_ascent"][fs]["upper_bound"]["hparams"], fs)
                                         for fs in ("random10", "class3-8")]
    tune_rows = [r for r in stage_status(plan, sizes=False) if r["section"] == "tune"]
    assert [(r["forget_set"], r["upper_bound"]) for r in tune_rows] == [
        (s, s in ("random10", "class3-8")) for s in records for _ in grid]
    assert all(r["state"] == "done" for r in tune_rows) and sum(r["chosen"] for r in tune_rows) == len(records)


def test_a_reported_kind_without_a_tuning_set_stops_before_any_work(tiny_store, tmp_path):
    from pipeline.plan import StageError
    from pipeline.stages.unlearn import check_needs, method_grids

    plan = tiny_plan(tmp_path / "none", *BY_KIND[:1], "unlearn.methods={gradient_ascent: {lr: [0.001, 0.01]}}")
    with pytest.raises(StageError, match="'class3-8' \\(kind class\\) has no tuning set of its kind"):
        check_needs(plan, method_grids(plan.cfg))
    fallback = tiny_plan(tmp_path / "none", *BY_KIND[:1], "tuning_fallback={class: random}")
    assert fallback.tuning_set("class3-8") == "tune"
    nowhere = tiny_plan(tmp_path / "none", *BY_KIND[:1], "tuning_fallback={class: atypical}")
    with pytest.raises(StageError, match="'class3-8' \\(kind class\\) has no tuning set"):
        nowhere.tuning_set("class3-8")  # a fallback to a kind no tuning set has
    assert not (tmp_path / "none").exists()


def test_a_tuning_set_sharing_a_reported_point_exits_2_touching_nothing(tmp_path, capsys):
    """Through the CLI's own guard (`oracle-farm run` in process: a subprocess costs 15 s of imports here)."""
    import typer

    from pipeline.cli.common import _guard
    from pipeline.stages.run import run_all

    probe = tiny_plan(tmp_path / "probe")
    shared = int(probe.forget_sets["random10"][3])
    root = tmp_path / "store"
    plan = tiny_plan(root, f"tuning_forget_sets=[{{name: tune-idx, kind: indices, indices: [{shared}, 1400]}}]",
                     "tuning_fallback={random: indices}")
    with pytest.raises(typer.Exit) as exit_:
        _guard(lambda: run_all(plan))
    assert exit_.value.exit_code == 2
    message = " ".join(capsys.readouterr().err.split())
    assert f"tuning forget set 'tune-idx' shares training point {shared}" in message
    assert "reported forget set 'random10'" in message and not root.exists()
