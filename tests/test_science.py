"""Science checks on digits: the pipeline's numbers must say what the science says, for its reasons.

The default suite keeps one check of at most a few minutes (decision 20); the Figure-1 comparison of
the seed methods on the full digits default is marked slow (`make test-all`).
"""

from __future__ import annotations

import os

import pytest

from pipeline.config import load_config
from pipeline.report import collect_rows
from pipeline.run import run_all
from pipeline.stages import Plan
from pipeline.store import Store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "configs", "digits.yaml")


def _rows_by_method(rows, forget_set):
    return {r["method"]: r for r in rows if r["forget_set"] == forget_set}


def _p95(row, group="forget"):
    return row["klom"][group]["p95"]


@pytest.fixture(scope="module")
def baseline_rows(tmp_path_factory):
    """Digits with 16 full models, 16 reference and 32 eval oracles for one random forget set of 50
    points; no subset models. do-nothing, retrain (reference oracles) and fine-tuning."""
    overrides = [
        f"store={tmp_path_factory.mktemp('science')}",
        "train.subset.models=0", "train.subset.heldout=0", "train.oracle.target=0",
        "forget_sets=[{name: random50, kind: random, size: 50, seed: 1}]", "tuning_forget_set=null",
        "unlearn.methods={do_nothing: {}, finetune: {lr: 0.003, epochs: 3}}",
        "evaluate.bootstrap=50",
    ]
    plan = Plan(load_config(DIGITS, overrides), Store(overrides[0].split("=", 1)[1]))
    run_all(plan)
    return _rows_by_method(collect_rows(plan), "random50")


def test_do_nothing_far_above_floor_retrain_at_floor_finetune_stays_above(baseline_rows):
    do_nothing, retrain, finetune = baseline_rows["do_nothing"], baseline_rows["retrain"], baseline_rows["finetune"]
    # The full models trained on F: their margins on F sit above every oracle's, so their histograms
    # barely overlap the oracles' and forget KLoM is far above the oracle-vs-oracle floor ...
    assert _p95(do_nothing) > 1.5 * _p95(retrain)
    assert do_nothing["accuracy"]["forget"] >= retrain["accuracy"]["forget"]
    # ... while on points neither group trained differently (validation), both sit at the same level.
    assert _p95(do_nothing, "val") < 1.5 * _p95(retrain, "val")
    # Retrain = reference oracles, a group disjoint from the eval oracles and drawn the same way:
    # no group of points tells them apart, so forget is no worse than the others.
    assert _p95(retrain) < 1.5 * max(_p95(retrain, "retain"), _p95(retrain, "val"))
    assert retrain["mia"] < 0.6
    # Fine-tuning on the retain set does not unlearn on digits: every forget point has near-duplicates
    # in the retain set, so more training raises margins everywhere, F included (mean forget margin
    # full 7.42 -> fine-tuned 7.51 vs oracles 7.09 on this set), and forget KLoM stays far above the
    # floor at any learning rate tried (issue 6's "FT lowers forget KLoM" does not hold here; see notes).
    assert _p95(finetune) > 1.5 * _p95(retrain)
    assert finetune["accuracy"]["forget"] >= retrain["accuracy"]["forget"]


@pytest.mark.slow
def test_figure1_ordering_on_the_digits_default(tmp_path):
    """The DMM paper's Figure 1 on the digits default, every method with its configured grid."""
    plan = Plan(load_config(DIGITS, [f"store={tmp_path}"]), Store(str(tmp_path)))
    run_all(plan)
    rows = collect_rows(plan)
    for fs in ("random10", "random50", "class3-40"):
        by = _rows_by_method(rows, fs)
        floor, nothing = _p95(by["retrain"]), _p95(by["do_nothing"])
        for method in ("dmm", "oracle_matching"):
            assert _p95(by[method]) < 2.0 * floor, (fs, method, _p95(by[method]), floor)
            assert _p95(by[method]) < nothing, (fs, method)
            assert by[method]["compute"] <= 0.10, (fs, method, by[method]["compute"])
        best_matching = min(_p95(by["dmm"]), _p95(by["oracle_matching"]))
        for baseline in ("gradient_ascent", "finetune", "scrub"):
            assert best_matching < _p95(by[baseline]), (fs, baseline)
    # Where the oracles do not fit the forget set as the full models do, the localisation and
    # saliency methods move forget accuracy toward the oracles'.
    by = _rows_by_method(rows, "random10")
    target = by["retrain"]["oracle_accuracy"]["forget"]
    gap_nothing = abs(by["do_nothing"]["accuracy"]["forget"] - target)
    for method in ("del", "sfron", "camu"):
        assert abs(by[method]["accuracy"]["forget"] - target) < gap_nothing, method
