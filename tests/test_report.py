"""The report an expert reads at a glance (issue 29, items 6 and 7): saturation and shift on constructed
margins, the headline of constructed rows, and the tiny run's report (its definitions, its figures)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pipeline.evaluate.diagnostics import (
    ceiling, diagnose, is_saturated, median_shift, saturation_threshold, share_at_ceiling, standardized_shift,
)
from pipeline.evaluate.klom import klom
from pipeline.stages.report import BEST_FIRST, HEADLINES, annotate, good_corner


# ---------------------------------------------------------------------------------------- diagnostics
def test_the_ceiling_is_ln_one_over_the_floor_and_saturation_starts_10_percent_below():
    assert ceiling(1e-5) == pytest.approx(11.5129, abs=1e-4)
    assert saturation_threshold(1e-5) == pytest.approx(0.9 * math.log(1e5))
    assert is_saturated(10.4) and not is_saturated(10.3) and is_saturated(None) is None
    assert is_saturated(4.2, floor=1e-2) and not is_saturated(4.1, floor=1e-2)  # 0.9 ln(100) = 4.14


def test_standardized_shift_is_the_mean_difference_over_the_oracles_sd_with_its_sign():
    oracle = np.array([[0.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 1.0], [4.0, 4.0, 4.0, 1.0]])  # mean 2, sd 2 (ddof 1)
    unlearned = np.array([[-4.0, 0.0, 12.0, 7.0], [-4.0, 0.0, 12.0, 9.0]])  # means -4, 0, 12, 8
    shift = standardized_shift(unlearned, oracle)
    np.testing.assert_allclose(shift[:3], [-3.0, -1.0, 5.0])
    assert np.isnan(shift[3])  # the oracles agree exactly: no scale
    assert median_shift(shift, [0, 1, 2, 3]) == pytest.approx(-1.0)  # NaN left out, the sign kept
    assert median_shift(shift, [3]) is None
    with pytest.raises(ValueError, match="equal point counts"):
        standardized_shift(unlearned, oracle[:, :3])


def test_points_at_the_ceiling_on_constructed_margins():
    """Four points, 100 unlearned models against 100 oracles, margins put where KLoM's value is known:
    identical samples (0); every unlearned sample in one bin the oracles leave empty (ln(1/floor), the
    ceiling exactly); spread over 2 such bins (ceiling - ln 2 = 10.82, within the band); over 4 (ceiling -
    ln 4 = 10.13, outside)."""
    n = 100
    oracle = np.full((n, 4), -10.0)
    unlearned = np.empty((n, 4))
    unlearned[:, 0] = -10.0
    unlearned[:, 1] = 10.0
    unlearned[:, 2] = np.repeat([8.5, 10.0], n // 2)  # the last two of 20 bins (1.0 wide) on [-10, 10]
    unlearned[:, 3] = np.repeat([6.5, 7.5, 8.5, 10.0], n // 4)  # the last four
    oracle[:, 0] = -10.0
    values = klom(unlearned, oracle)
    top = ceiling()
    np.testing.assert_allclose(values, [0.0, top, top - math.log(2), top - math.log(4)], rtol=1e-12)
    assert values.max() <= top
    assert share_at_ceiling(values, [0, 1, 2, 3]) == pytest.approx(0.5)
    assert share_at_ceiling(values, [1]) == 1.0 and share_at_ceiling(values, [3]) == 0.0
    d = diagnose(unlearned, oracle + np.arange(n)[:, None] * 1e-3, values, {"a": [0, 1], "b": [2, 3]},
                 {"a": float(np.percentile(values[[0, 1]], 95)), "b": float(np.percentile(values[[2, 3]], 95))})
    assert d["a"]["saturated"] and d["b"]["saturated"]  # P95s 11.5 and 10.8
    assert d["a"]["at_ceiling"] == 0.5 and d["b"]["at_ceiling"] == 0.5
    assert d["a"]["shift"] > 0  # the unlearned margins sit above the oracles'


# ---------------------------------------------------------------------------------------- headlines
def _row(method, forget, retain=(1.0, 0.9, 1.1), val=None, acc=(0.99, 0.97), fs="s"):
    """A constructed row: P95 (point, low, high) per group, retain and val accuracy."""
    val = val or retain

    def k(p):
        return {"p95": p[0], "p95_low": p[1], "p95_high": p[2], "mean": p[0] / 3}

    return {"method": method, "forget_set": fs, "klom": {"forget": k(forget), "retain": k(retain), "val": k(val)},
            "accuracy": {"forget": 1.0, "retain": acc[0], "val": acc[1]}}


def _judged(*rows):
    rows = [_row("retrain", (1.0, 0.8, 1.2)), _row("do_nothing", (8.0, 7.0, 9.0), retain=(1.2, 1.0, 1.4)), *rows]
    annotate(rows)
    return {r["method"]: r for r in rows}


def test_headlines_from_the_bar_and_the_bootstrap_intervals():
    by = _judged(
        _row("twin", (1.1, 0.9, 1.3)),                                # overlaps the floor everywhere
        _row("better", (3.0, 2.5, 3.5)),                              # below do-nothing, above the floor
        _row("same", (7.5, 6.0, 8.5)),                                # reaches do-nothing's interval
        _row("worse", (12.0, 11.0, 13.0)),                            # above it
        _row("dropsacc", (1.1, 0.9, 1.3), acc=(0.97, 0.97)),          # retain accuracy 0.02 below do-nothing's
        _row("drifts", (3.0, 2.5, 3.5), retain=(1.9, 1.7, 2.1)),      # retain P95 > max(1.5 x 1.0, 1.2 x 1.2)
        _row("notknown", (3.0, 2.5, 3.5), acc=(None, None)))
    assert by["twin"]["headline"] == "indistinguishable from retraining"
    assert by["better"]["headline"] == "better than doing nothing" and by["better"]["forgets"] is True
    assert by["same"]["headline"] == "no better than doing nothing" and by["same"]["forgets"] is False
    assert by["worse"]["headline"] == "no better than doing nothing"
    assert by["dropsacc"]["headline"] == "breaks the model"
    assert not by["dropsacc"]["bar"]["accuracy_ok"] and by["dropsacc"]["bar"]["klom_ok"]
    assert by["drifts"]["headline"] == "breaks the model"
    assert by["drifts"]["bar"]["accuracy_ok"] and not by["drifts"]["bar"]["klom_ok"]
    assert "retain P95 1.90x the floor > 1.50x" in by["drifts"]["bar"]["failures"][0]  # multiples of the floor
    assert by["notknown"]["headline"] == "not judged"
    assert (by["retrain"]["headline"], by["do_nothing"]["headline"]) == ("floor", "do-nothing")
    assert set(BEST_FIRST) == set(HEADLINES)


def test_without_intervals_nothing_is_claimed_from_overlaps():
    rows = [_row("retrain", (1.0, None, None)), _row("do_nothing", (8.0, None, None)), _row("m", (1.0, None, None))]
    annotate(rows)
    assert rows[2]["forgets"] is None and rows[2]["headline"] == "not judged"


def test_saturated_rows_are_not_ranked_against_each_other():
    rows = [_row("retrain", (1.0, 0.8, 1.2)), _row("do_nothing", (11.45, 11.4, 11.5), retain=(1.2, 1.0, 1.4)),
            _row("a", (3.0, 2.5, 3.5)), _row("b", (2.0, 1.5, 2.5)), _row("sat1", (10.9, 10.8, 11.0)),
            _row("sat2", (11.3, 11.0, 11.5))]
    annotate(rows)
    by = {r["method"]: r for r in rows}
    assert by["sat1"]["saturated"] and by["sat2"]["saturated"] and not by["a"]["saturated"]
    assert by["sat1"]["forgets"] is False  # below do-nothing's interval, but at the ceiling: nothing to tell
    assert by["sat1"]["rank"] is None and by["sat2"]["rank"] is None and by["retrain"]["rank"] is None
    assert by["do_nothing"]["rank"] is None  # saturated too
    assert (by["b"]["rank"], by["a"]["rank"]) == (1, 2)  # by the mean of the three P95s
    assert by["sat1"]["headline"] == "no better than doing nothing"


def test_the_good_corner_is_below_do_nothings_interval_and_within_the_retain_bar():
    rows = list(_judged().values())
    corner = good_corner(rows)
    assert corner == {"retain": pytest.approx(1.5), "forget": pytest.approx(7.0)}


# ---------------------------------------------------------------------------------------- the tiny report
@pytest.fixture(scope="module")
def tiny_report(tiny_finished):
    out = tiny_finished["out"]
    return out, (out / "report.md").read_text(), json.loads((out / "report.json").read_text())


def test_the_report_defines_every_column_once(tiny_report):
    _, md, _ = tiny_report
    assert md.count("## What the columns mean") == 1
    legend = md.split("## What the columns mean")[1].split("\n## ")[0]
    headers = set()
    for line in md.splitlines():
        if line.startswith("| method |"):
            headers |= {h.strip() for h in line.strip("| ").split("|")[1:] if not h.strip().startswith("`")}
    assert len(headers) > 10, headers  # the at-a-glance table's columns are forget sets
    aliases = {"forget P95 ×floor": "forget / retain / val P95", "retain P95 ×floor": "forget / retain / val P95",
               "val P95 ×floor": "forget / retain / val P95", "retain acc": "retain acc", "val acc": "val acc"}
    for h in headers:
        term = aliases.get(h, h)
        assert f"**{term}**" in legend, h
    for h in HEADLINES:
        assert f"*{h}*" in legend
    assert "ln(1/1e-05) = 11.51" in legend


def test_the_report_shows_diagnostics_headlines_and_the_tuning_set(tiny_report):
    _, md, report = tiny_report
    rows = [r for r in report["rows"] if r["method"] != "retrain"]
    for r in report["rows"]:
        assert set(r["diagnostics"]) == {"forget", "retain", "val"}
        assert 0.0 <= r["diagnostics"]["forget"]["at_ceiling"] <= 1.0
    assert all(r["headline"] in HEADLINES or r["method"] == "do_nothing" for r in rows)
    assert "## At a glance" in md and "**Headline.**" in md
    assert "`tune` (random)" in md  # gradient_ascent's grid was selected there
    assert report["stamp"]["commit"] and report["stamp"]["date"] and report["stamp"]["machine"]


def test_the_report_draws_its_figures_next_to_their_tables(tiny_report):
    import matplotlib.image as mpimg

    out, md, report = tiny_report
    assert report["plots"] == ["pareto_random10.png", "klom_ecdf_random10.png", "forget_vs_retain.png"]
    for name in report["plots"]:
        path = out / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 10_000, name  # measured 30-51 KB on the tiny run
        h, w = mpimg.imread(path).shape[:2]
        assert h >= 300 and w >= 500, (name, h, w)
        at = md.index(f"]({name})")
        assert md[at:].split("\n\n")[1].startswith("*"), name  # a caption right below it
    section = md.split("## forget set `random10`")[1].split("\n## ")[0]
    assert "](pareto_random10.png)" in section and "](klom_ecdf_random10.png)" in section


def test_upper_bound_rows_are_shown_apart_and_far_where_they_beat_the_held_out_choice():
    from pipeline.stages.report import UPPER_BOUND_LABEL, far_from_bound, upper_bound_section

    rows = [_row("retrain", (1.0, 0.8, 1.2)), _row("do_nothing", (8.0, 7.0, 9.0), retain=(1.2, 1.0, 1.4)),
            _row("m", (6.0, 5.0, 7.0), retain=(1.9, 1.7, 2.1)), _row("m", (2.0, 1.5, 2.5)),
            _row("k", (3.0, 2.5, 3.5)), _row("k", (2.8, 2.2, 3.4))]
    for r, hp, optimistic in zip(rows, [{}, {}, {"a": 25}, {"a": 5}, {"a": 1}, {"a": 1}],
                                 [False, False, False, True, False, True]):
        r["hparams"], r["optimistic"] = hp, optimistic
    annotate(rows)
    held_m, bound_m, held_k, bound_k = rows[2:]
    assert held_m["rank"] is not None and bound_m["rank"] is None  # never ranked with the rows it bounds
    assert held_m["headline"] == "breaks the model" and bound_m["headline"] == "better than doing nothing"
    assert far_from_bound(held_m, bound_m)[0] == "the held-out choice fails the bar, the bound keeps it"
    assert "forget P95 6.00x against the bound's 2.00x" in far_from_bound(held_m, bound_m)
    assert far_from_bound(held_k, bound_k) == []
    md = "\n".join(upper_bound_section(rows))
    assert f"## Upper bound: {UPPER_BOUND_LABEL}" in md
    line_m, line_k = (line for line in md.splitlines() if line.startswith("| `s` |"))
    assert "**the held-out choice is far from the bound**" in line_m and '{"a": 5}' in line_m
    assert line_k.endswith("| the same point | no |")
    assert upper_bound_section(rows[:3]) == []


def test_dm_direct_errors_render_per_set_and_group_beside_do_nothings():
    from pipeline.stages.report import _dm_direct_table

    e = {"points": 50, "rmse": 0.81, "do_nothing_rmse": 2.5, "rmse_of_mean": 0.4, "correlation": 0.97,
         "shift_correlation": 0.6}
    lines = _dm_direct_table({"random50": {"inputs": {}, "forget_set": "random50", "forget": e, "retain": e, "val": e}})
    assert "| `random50` forget | 50 | 0.810 (2.500) | 0.400 | 0.970 | 0.600 |" in lines
    assert sum(line.startswith("| `random50`") for line in lines) == 3
    assert _dm_direct_table(None) == [] and _dm_direct_table({}) == []


def test_a_run_with_the_upper_bound_shows_it_apart_and_names_each_rows_tuning_set(tiny_finished, tmp_path):
    """Tiny with `unlearn.upper_bound` (decision 32): the bound's rows are scored, listed in their own
    section under the label, never in a forget set's tables, the headline or the figures' rows."""
    from helpers import copy_store, tiny_plan

    from pipeline.stages.report import UPPER_BOUND_LABEL
    from pipeline.stages.run import run_all

    root = copy_store(tiny_finished["root"], tmp_path / "store")
    out = run_all(tiny_plan(root, "unlearn.upper_bound=true"))
    md = (out / "report.md").read_text()
    rows = json.loads((out / "report.json").read_text())["rows"]
    bounds = [r for r in rows if r["optimistic"]]
    assert [(r["method"], r["forget_set"], r["rank"]) for r in bounds] == [("gradient_ascent", "random10", None)]
    assert md.count(f"## Upper bound: {UPPER_BOUND_LABEL}") == 1
    section = md.split("## forget set `random10`")[1].split("\n## ")[0]
    assert section.count("| gradient_ascent |") == 2  # its row in each of the set's two tables, the bound in neither
    bound_table = md.split(f"## Upper bound: {UPPER_BOUND_LABEL}")[1].split("\n## ")[0]
    assert "| `random10` | gradient_ascent |" in bound_table
    assert "`tune` (random)" in section


def test_the_tuning_cell_names_the_set_its_kind_a_fallback_and_a_failed_bar():
    from pipeline.stages.report import _tuning_cell

    assert _tuning_cell({"tuning": {"tuning_set": "t", "kind": "random", "reported_kind": "random",
                                    "passed_bar": True}}) == "`t` (random)"
    assert _tuning_cell({"tuning": {"tuning_set": "t", "kind": "random", "reported_kind": "class",
                                    "passed_bar": False}}) == "`t` (random: no class tuning set) †"
    assert _tuning_cell({"tuning": {"tuning_set": None}}) == "– (one setting)"
