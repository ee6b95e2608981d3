"""Science checks on digits: the pipeline's numbers must say what the science says, for its reasons.

The default suite keeps the checks on one fixture of at most a few minutes (decision 20); the
Figure-1 comparison of the seed methods on the full digits default is marked slow (`make test-all`).
"""

from __future__ import annotations

import os

import pytest

from pipeline.config import load_config
from pipeline.plan import Plan
from pipeline.stages.report import collect_rows
from pipeline.stages.run import run_all
from pipeline.store import Store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "configs", "digits.yaml")


def _rows_by_method(rows, forget_set):
    return {r["method"]: r for r in rows if r["forget_set"] == forget_set}


def _p95(row, group="forget"):
    return row["klom"][group]["p95"]


# Fine-tuning in both checks: continue training on the retain set at twice the training's peak
# learning rate, annealed to zero over 10 epochs (half a retraining). Weaker settings move the
# atypical set's margins the same way, only less (lr 0.003-0.05, 3-10 epochs, constant or cosine).
FINETUNE = "{lr: 0.1, epochs: 10, schedule: cosine}"


@pytest.fixture(scope="module")
def baseline_rows(tmp_path_factory):
    """Digits with the default's sample sizes (100 full models = 100 unlearned, 100 reference and 100 eval
    oracles) for a random forget set of 50 points and for the 50 most atypical training points (10-NN
    label disagreement); no subset models. do-nothing, retrain (reference oracles) and fine-tuning;
    rows by forget set, then method."""
    store = tmp_path_factory.mktemp("science")
    overrides = [
        f"store={store}",
        "train.subset.models=0", "train.subset.heldout=0", "train.oracle.target=0",
        "forget_sets=[{name: random50, kind: random, size: 50, seed: 1}, "
        "{name: atypical50, kind: atypical, size: 50}]", "tuning_forget_sets=[]",
        f"unlearn.methods={{do_nothing: {{}}, finetune: {FINETUNE}}}",
        "evaluate.bootstrap=50",
    ]
    plan = Plan(load_config(DIGITS, overrides), Store(str(store)))
    assert plan.cfg.train.full.models == plan.cfg.train.oracle.reference == plan.cfg.train.oracle.eval == 100
    run_all(plan)
    rows = collect_rows(plan)
    return {fs: _rows_by_method(rows, fs) for fs in ("random50", "atypical50")}


def _low(row, group="forget"):
    return row["klom"][group]["p95_low"]


def _high(row, group="forget"):
    return row["klom"][group]["p95_high"]


def test_floor_resolves_at_the_default_sample_sizes(baseline_rows):
    """Issue 14, item 1: at 100 unlearned models against 100 eval oracles the retrain row's P95 (pure
    finite-sample inflation) is at most 1.0 on every group (0.64-0.75 measured; 3.3-4.3 at 16 vs 32),
    and doing nothing is at least 5x that on a random set, outside each other's bootstrap intervals."""
    for fs, by in baseline_rows.items():
        retrain = by["retrain"]
        for g in ("forget", "retain", "val"):
            assert _p95(retrain, g) <= 1.0, (fs, g, _p95(retrain, g))
        assert retrain["mia"] < 0.6
        # Reference and eval oracles are drawn the same way: no group of points tells them apart.
        assert _p95(retrain) < 1.5 * max(_p95(retrain, "retain"), _p95(retrain, "val"))
        nothing = by["do_nothing"]
        assert _p95(nothing) >= 5 * _p95(retrain), (fs, _p95(nothing), _p95(retrain))
        assert _low(nothing) > _high(retrain), fs


def test_do_nothing_far_above_floor_on_forget_not_on_validation(baseline_rows):
    by = baseline_rows["random50"]
    do_nothing, retrain = by["do_nothing"], by["retrain"]
    # The full models trained on F: their margins on F sit above every oracle's, so forget KLoM is far
    # above the floor (4.31 vs 0.64 measured) ...
    assert do_nothing["accuracy"]["forget"] >= retrain["accuracy"]["forget"]
    # ... while on points neither group trained differently (validation) do-nothing stays near it:
    # 1.05 vs 0.64 measured, above the floor (leaving out 50 points shifts every model a little, which
    # 100 vs 100 resolves) but far below the forget set's 4.31.
    assert _p95(do_nothing, "val") < 2.0 * _p95(retrain, "val")
    assert _p95(do_nothing, "val") < 0.5 * _p95(do_nothing)


def test_finetune_on_a_random_set(baseline_rows):
    """What this strong fine-tune (half a retraining at twice the peak lr) does to a random set of digits
    at 100 vs 100: measured, not assumed. Every point of the digits random sets has near-duplicates in
    the retain set, so nothing about F needs forgetting, and more training shifts every margin: forget
    P95 4.31 -> 6.40 (6.8x -> 10.0x the floor, intervals [5.5, 8.5] and [9.4, 10.5]), retain 1.05 -> 7.63,
    val 1.05 -> 6.81. (A light fine-tune, lr 0.01 for 3 epochs, lowers forget P95 to 5.4x [3.9, 7.2]:
    within do-nothing's interval; issue 14 measured 4.31 -> 2.91 on another run.)"""
    by = baseline_rows["random50"]
    do_nothing, retrain, finetune = by["do_nothing"], by["retrain"], by["finetune"]
    assert _low(finetune) > _high(do_nothing)
    assert finetune["accuracy"]["forget"] >= retrain["accuracy"]["forget"]
    assert _p95(finetune, "val") > 3 * _p95(retrain, "val")


def test_finetune_lowers_forget_klom_on_memorized_points(baseline_rows):
    by = baseline_rows["atypical50"]
    do_nothing, retrain, finetune = by["do_nothing"], by["retrain"], by["finetune"]
    # The atypical points are memorized: only their own presence in training explains the full
    # models' fit (forget accuracy 0.99 vs the oracles' 0.53 at 100 vs 100), so do-nothing is far above
    # the floor (10.66 vs 0.75), and the oracles, never trained on them, are at it.
    assert retrain["accuracy"]["forget"] < do_nothing["accuracy"]["forget"] - 0.3
    assert _p95(do_nothing) > 1.5 * _p95(retrain)
    assert _p95(retrain) < 1.5 * max(_p95(retrain, "retain"), _p95(retrain, "val"))
    # Unlike a random set, leaving out points whose neighbours carry other labels changes the models
    # everywhere, so do-nothing is far above the floor on validation points too (8.75 vs 0.69).
    assert _p95(do_nothing, "val") > 1.5 * _p95(retrain, "val")
    # Fine-tuning on the retain set lets that memorized fit decay toward the oracles' (forget accuracy
    # 0.99 -> 0.83 at 100 vs 100) ...
    assert finetune["accuracy"]["forget"] < do_nothing["accuracy"]["forget"] - 0.1
    # ... so forget P95 KLoM drops: 10.66 -> 9.76 (14.2x [14.15, 14.30] -> 13.0x [12.89, 13.14] the
    # floor, outside each other's intervals). The drop is small beside the distance to the floor: KLoM
    # saturates near ln(1 / evaluate.floor) = 11.5 once the histograms stop overlapping, and fine-tuning
    # closes only part of the margin gap, so the worst 5 % of the points still barely overlap the oracles'.
    assert _high(finetune) < _low(do_nothing)
    assert _p95(finetune) < _p95(do_nothing) - 0.3
    assert _p95(finetune) > 1.5 * _p95(retrain)
    assert finetune["accuracy"]["forget"] > retrain["accuracy"]["forget"]


@pytest.fixture(scope="module")
def default_report(tmp_path_factory):
    """The digits default as `make demo` runs it (every method with its grid), and its report."""
    from pipeline.stages.report import write_report

    store = tmp_path_factory.mktemp("digits-default")
    plan = Plan(load_config(DIGITS, [f"store={store}"]), Store(str(store)))
    run_all(plan)
    rows = collect_rows(plan)
    out = write_report(plan, store / "report")
    return plan, rows, (out / "report.md").read_text()


RANDOM_AND_CLASS = ("random10", "random50", "class3-40")
BASELINES = ("finetune", "gradient_ascent", "neggrad_plus", "scrub", "do_nothing")


@pytest.mark.slow
def test_default_sample_sizes_resolve(default_report):
    """Item 1: the retrain row's P95 <= 1.0 on every group of every set; do-nothing's forget P95 >= 5x
    the floor on every random and class set of 40 points or more."""
    _, rows, _ = default_report
    for fs in ("random10", "random50", "class3-40", "atypical50"):
        by = _rows_by_method(rows, fs)
        for g in ("forget", "retain", "val"):
            assert _p95(by["retrain"], g) <= 1.0, (fs, g)
        if fs in ("random50", "class3-40"):
            assert _p95(by["do_nothing"]) >= 5 * _p95(by["retrain"]), fs


@pytest.mark.slow
def test_selection_rule_and_its_record(default_report):
    """Item 2 (decision 30): per method and tuning set, the grid point with the lowest mean of the tuning
    set's three P95s among those that keep the bar (ties by compute); the record keeps every point's
    P95s, accuracies and bar; the report states rule, grid, choice."""
    from pipeline.evaluate.oracles import GROUPS, SELECTION_RULE
    from pipeline.stages.unlearn import choose, method_grids, selection_records, selection_summary

    plan, rows, md = default_report
    grids = method_grids(plan.cfg)
    records = selection_records(plan, grids)
    assert set(records) == {m for m, g in grids.items() if len(g) > 1}
    assert SELECTION_RULE in md
    for method, by_set in records.items():
        for rec in by_set.values():
            for sc in rec["scores"]:
                assert set(sc["p95"]) == set(sc["accuracy"]) == set(GROUPS)
                assert sc["mean_p95"] == pytest.approx(sum(sc["p95"].values()) / 3)
            assert (rec["chosen"], rec["passed_bar"]) == choose(rec["scores"])
            passing = [sc["mean_p95"] for sc in rec["scores"] if sc["bar"]["passed"]]
            best = min(passing or [sc["mean_p95"] for sc in rec["scores"]])
            assert rec["scores"][rec["chosen"]]["mean_p95"] == pytest.approx(best)
        assert f"- `{method}` on the tuning set" in md
        summary = selection_summary(plan)[method]
        assert all(r["hparams"] == summary[r["forget_set"]]["chosen"] for r in rows if r["method"] == method)


@pytest.mark.slow
def test_selected_settings_meet_the_bar_or_the_report_says_so(default_report):
    """Item 3: each method's selected setting keeps retain/val accuracy within 1 point of do-nothing's and
    retain/val P95 at most max(1.5x floor, 1.2x do-nothing's), or the report names method and set."""
    _, rows, md = default_report
    for r in rows:
        if r.get("bar") is None:
            continue
        if not r["bar"]["ok"]:
            section = md.split(f"## forget set `{r['forget_set']}`")[1].split("## ")[0]
            assert f"- `{r['method']}`" in section, (r["method"], r["forget_set"])


@pytest.mark.slow
def test_matching_methods_beat_the_baselines(default_report):
    """Item 4 (the DMM paper's Figure 1): on every random and class set, DMM and Oracle Matching below
    fine-tuning, gradient ascent, NegGrad+, SCRUB and do-nothing, outside their bootstrap intervals.
    Measured (2026-11-27, 100 vs 100): DMM 1.62x / 2.05x / 3.35x the floor on random10 / random50 /
    class3-40, OM 2.63x / 1.94x / 1.91x, the baselines 4.8-8.7x. "DMM within 2x the floor on the random
    sets", asserted before, is not a claim this run resolves: DMM's interval on random50 is [1.48, 2.73]
    (1.53x-2.06x over five fits that differ only in the LASSO's lambda path). The price is compute: min_steps
    100 (chosen on the tuning set) makes them 19-26 % of a digits retraining, not 2-9 %."""
    _, rows, _ = default_report
    for fs in RANDOM_AND_CLASS:
        by = _rows_by_method(rows, fs)
        for method in ("dmm", "oracle_matching"):
            assert by[method]["compute"] <= 0.30, (fs, method, by[method]["compute"])
            for baseline in BASELINES:
                assert _high(by[method]) < _low(by[baseline]), (fs, method, baseline)
