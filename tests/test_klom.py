"""KLoM: hand-computed cases, the KL direction, edge handling, and bit-exactness against the
reference loops in both modes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.evaluate import klom as klom_module
from pipeline.evaluate.klom import bootstrap_p95_interval, bootstrap_p95_intervals, klom, percentile95, summarize


def _col(*values: float) -> np.ndarray:
    """One point: (models, 1)."""
    return np.asarray(values, dtype=np.float64)[:, None]


# --- per-point reference loops (tests only) --------------------------------------------------


def _ref_compat_point(p_samples, q_samples, bin_count=20, eps=1e-5, lo=-100.0, hi=100.0):
    """EasyDUB's binned KL for one point, written out from its published description."""
    p_arr = np.clip(p_samples, lo, hi)
    q_arr = np.clip(q_samples, lo, hi)
    start = min(p_arr.min(), q_arr.min())
    end = max(p_arr.max(), q_arr.max())
    if start >= end:
        end = start + 1.0
    edges = np.linspace(start, end, bin_count + 1)
    p_idx = np.digitize(p_arr, edges)
    q_idx = np.digitize(q_arr, edges)
    p_counts = np.array([np.sum(p_idx == i) for i in range(1, bin_count + 1)])
    q_counts = np.array([np.sum(q_idx == i) for i in range(1, bin_count + 1)])
    p_total, q_total = p_counts.sum(), q_counts.sum()
    p = p_counts / p_total if p_total > 0 else np.zeros_like(p_counts, dtype=float)
    q = q_counts / q_total if q_total > 0 else np.zeros_like(q_counts, dtype=float)
    q_safe = np.where(p > 0.0, np.maximum(q, eps), q)
    m = p > 0.0
    return float(np.sum(p[m] * np.log(p[m] / q_safe[m])))


def _ref_compat(oracle, unlearned, bins=20):
    """Argument order (oracle, unlearned), as EasyDUB's klom_from_margins."""
    return np.asarray(
        [_ref_compat_point(unlearned[:, i], oracle[:, i], bins) for i in range(oracle.shape[1])]
    )


def _ref_default(unlearned, oracle, bins=20, floor=1e-5, clip=100.0):
    out = []
    for i in range(unlearned.shape[1]):
        u = np.clip(unlearned[:, i].astype(np.float64), -clip, clip)
        o = np.clip(oracle[:, i].astype(np.float64), -clip, clip)
        lo, hi = min(u.min(), o.min()), max(u.max(), o.max())
        edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
        p = np.histogram(u, edges)[0] / u.size
        q = np.histogram(o, edges)[0] / o.size
        m = p > 0
        out.append(np.sum(p[m] * np.log(p[m] / np.maximum(q[m], floor))))
    return np.asarray(out)


def _random_margins(rng, models_u, models_o, points, dtype):
    """Continuous values, ties on a 0.5 grid, values beyond +-100, constant, tiny-span columns."""
    u = rng.normal(0, 8, size=(models_u, points))
    o = rng.normal(1, 8, size=(models_o, points))
    k = points // 6
    u[:, :k] = np.round(u[:, :k] * 2) / 2
    o[:, :k] = np.round(o[:, :k] * 2) / 2
    u[:, k : 2 * k] *= 40
    o[:, k : 2 * k] *= 40
    u[:, 2 * k] = o[:, 2 * k] = 3.25
    u[:, 2 * k + 1], o[:, 2 * k + 1] = 1.0, 2.0
    u[:, 2 * k + 2], o[:, 2 * k + 2] = 2.0, 1.0
    u, o = u.astype(dtype), o.astype(dtype)
    tiny = np.finfo(dtype).smallest_subnormal
    u[:, 2 * k + 3] = 0.0
    o[:, 2 * k + 3] = tiny  # span so small that linspace's step underflows to 0
    u[:, 2 * k + 4] = 100.0
    o[:, 2 * k + 4] = np.nextafter(dtype(100.0), dtype(0.0))
    u[:, 2 * k + 5] = -150.0  # clipped to -100, which several edges of this tiny range round to
    o[:, 2 * k + 5] = np.nextafter(dtype(-100.0), dtype(0.0))
    o[::2, 2 * k + 5] = -100.0
    return u, o


# --- hand-computed cases ---------------------------------------------------------------------


def test_direction_is_unlearned_given_oracle():
    # unlearned all at 0; oracles split between 0 and 10 (the two ends of the range).
    u, o = _col(0, 0), _col(0, 10)
    assert klom(u, o)[0] == pytest.approx(math.log(2), rel=1e-12)
    # Swapped: p = (1/2, 1/2), q = (1, 0 -> 1e-5).
    swapped = 0.5 * math.log(0.5) + 0.5 * math.log(0.5 / 1e-5)
    assert klom(o, u)[0] == pytest.approx(swapped, rel=1e-12)
    assert klom(o, u)[0] > 5 * klom(u, o)[0]


def test_hand_case_unequal_model_counts():
    # Range [0, 4], 20 bins of width 0.2: 0 -> bin 0, 1 -> 5, 2 -> 10, 3 -> 15, 4 -> 19 (closed).
    u, o = _col(0, 1, 2, 3), _col(0, 0, 4)
    expected = 0.25 * math.log(0.25 / (2 / 3)) + 3 * 0.25 * math.log(0.25 / 1e-5)
    assert klom(u, o)[0] == pytest.approx(expected, rel=1e-12)


def test_every_sample_counted_including_the_maximum():
    u, o = _col(0, 1, 2, 4), _col(0, 1, 2, 4)
    assert klom(u, o)[0] == 0.0
    # 4 is the maximum: counted in the last (closed) bin, q has it too -> each p=q=1/4.
    u2, o2 = _col(0, 4), _col(0, 0)
    assert klom(u2, o2)[0] == pytest.approx(0.5 * math.log(0.5) + 0.5 * math.log(0.5 / 1e-5))


def test_floor_applies_where_p_positive():
    u, o = _col(0, 4), _col(0, 0, 4)  # p = (1/2, 1/2), q = (2/3, 1/3) in bins 0 and 19
    assert klom(u, o)[0] == pytest.approx(0.5 * math.log(0.75) + 0.5 * math.log(1.5), rel=1e-12)
    # A floor above 1/3 raises q in bin 19 (where p > 0) to 0.5.
    assert klom(u, o, floor=0.5)[0] == pytest.approx(0.5 * math.log(0.75), rel=1e-12)


def test_floor_not_applied_where_p_zero():
    # q = (1/2, 0, ..., 0, 1/2): flooring the 18 empty bins and renormalizing (scipy's entropy)
    # would give log(2) + log(1 + 18e-5); the spec sums without touching bins where p = 0.
    u, o = _col(0, 0), _col(0, 4)
    assert klom(u, o)[0] == pytest.approx(math.log(2), rel=1e-14)


def test_zero_floor_gives_inf_only_where_q_misses_mass():
    # Point 0: q has mass where p has none -> finite. Point 1: p has mass where q has none -> inf.
    u = np.array([[0.0, 0.0], [0.0, 4.0]])
    o = np.array([[0.0, 0.0], [4.0, 0.0]])
    out = klom(u, o, floor=0)
    assert out[0] == pytest.approx(math.log(2)) and out[1] == np.inf


def test_bins_argument():
    # 2 bins on [0, 4]: 1 -> bin 0, 3 -> bin 1. p = (1, 0), q = (1/2, 1/2).
    assert klom(_col(0, 1), _col(3, 4), bins=2)[0] == pytest.approx(math.log(1 / 1e-5))
    assert klom(_col(0, 1), _col(1, 4), bins=2)[0] == pytest.approx(math.log(2))


def test_constant_columns():
    assert klom(np.full((5, 1), 3.0), np.full((7, 1), 3.0))[0] == 0.0
    assert klom(np.full((5, 1), 3.0), np.full((7, 1), 3.0), compat=True)[0] == 0.0
    # Each side constant but different: disjoint bins, q floored.
    assert klom(_col(1, 1), _col(2, 2))[0] == pytest.approx(math.log(1e5))


def test_clipping():
    # After clipping both are {-100, 100} -> identical histograms.
    assert klom(_col(-500, 100), _col(-100, 1e6))[0] == 0.0
    assert klom(_col(-1e9, 1e9), _col(-100, 100), compat=True)[0] == 0.0
    # Both clip to 100: degenerate range.
    assert klom(_col(200, 300), _col(100, 150))[0] == 0.0
    # Without effective clipping: range [-500, 1e6], 1e6 alone in the last bin.
    # p = (1, 0, ...), q = (1/2, ..., 1/2).
    assert klom(_col(-500, 100), _col(-100, 1e6), clip=1e7)[0] == pytest.approx(math.log(2))


def test_identical_inputs_give_exact_zero():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 30, size=(16, 500))
    np.testing.assert_array_equal(klom(x, x.copy()), np.zeros(500))
    np.testing.assert_array_equal(klom(x, x.copy(), compat=True), np.zeros(500))


def test_shape_and_dtype():
    rng = np.random.default_rng(2)
    out = klom(rng.normal(size=(4, 37)), rng.normal(size=(9, 37)))
    assert out.shape == (37,) and out.dtype == np.float64
    out = klom(rng.normal(size=(4, 37)).astype(np.float32), rng.normal(size=(4, 37)), compat=True)
    assert out.shape == (37,) and out.dtype == np.float64
    assert klom(np.zeros((3, 0)), np.zeros((2, 0))).shape == (0,)


def test_bad_inputs():
    with pytest.raises(ValueError):
        klom(np.zeros((3, 4)), np.zeros((3, 5)))
    with pytest.raises(ValueError):
        klom(np.zeros(4), np.zeros(4))
    with pytest.raises(ValueError):
        klom(np.full((2, 1), np.nan), np.zeros((2, 1)))


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_default_bit_identical_to_histogram_loop(dtype, monkeypatch):
    # Several chunks of points, and several kernel blocks per chunk, the last ones partial.
    monkeypatch.setattr(klom_module, "_CHUNK_SAMPLES", 13 * 110)
    monkeypatch.setattr(klom_module, "_BLOCK_POINTS", 7)
    rng = np.random.default_rng(3)
    u, o = _random_margins(rng, 13, 8, 600, dtype)
    np.testing.assert_array_equal(klom(u, o), _ref_default(u, o))
    # A bound that is no float32 (or float16): samples are clipped after the cast to float64.
    np.testing.assert_array_equal(klom(u, o, clip=7.3), _ref_default(u, o, clip=7.3))


def test_default_float32_samples_next_to_edges():
    # float32 samples nearest each float64 edge and their neighbours: some lie just below an edge.
    near = np.linspace(0.0, 3.0, 21).astype(np.float32)
    below, above = np.nextafter(near, np.float32(-1)), np.nextafter(near, np.float32(4))
    col = np.concatenate([near, below, above])
    u = col[(col >= 0) & (col <= 3)][:, None]
    o = np.array([[0.0], [3.0]], dtype=np.float32)
    np.testing.assert_array_equal(klom(u, o), _ref_default(u, o))
    np.testing.assert_array_equal(klom(o, u), _ref_default(o, u))


def test_default_bit_identical_without_term_table():
    # More (count_u, count_o) pairs than points x bins: the terms are computed from the counts.
    rng = np.random.default_rng(8)
    u = rng.integers(-150, 150, size=(300, 20))
    o = rng.normal(0, 50, size=(200, 20)).astype(np.float32)
    np.testing.assert_array_equal(klom(u, o), _ref_default(u, o))


def test_round_up_to_float32():
    rng = np.random.default_rng(9)
    specials = [0.0, -0.0, 1e-50, -1e-50, 1e-45, -1e-45, 3.5e38, -3.5e38, np.inf, -np.inf, 0.1]
    values = np.concatenate([specials, rng.normal(0, 30, 5000), rng.normal(0, 1e-40, 500)])
    with np.errstate(over="ignore"):
        nearest = values.astype(np.float32)
    expected = np.where(nearest < values, np.nextafter(nearest, np.float32(np.inf)), nearest)
    got = klom_module._round_up(values, np.dtype(np.float32))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)
    assert (got >= values).all()


# --- compat mode -----------------------------------------------------------------------------


def test_compat_drops_the_maximum_sample():
    u, o = _col(0, 0), _col(0, 10)
    assert klom(u, o)[0] == pytest.approx(math.log(2))
    assert klom(u, o, compat=True)[0] == 0.0  # oracle's 10 dropped: q = (1, 0, ...)


def test_compat_degenerate_totals():
    # Every unlearned sample equals the maximum: p is all zeros in the reference -> 0.
    assert klom(_col(2, 2), _col(1, 1), compat=True)[0] == 0.0
    # Every oracle sample equals the maximum: q all zeros, floored where p > 0.
    assert klom(_col(1, 1), _col(2, 2), compat=True)[0] == pytest.approx(math.log(1e5))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compat_bit_identical_to_reference_loop(dtype, monkeypatch):
    monkeypatch.setattr(klom_module, "_CHUNK_SAMPLES", 11 * 400)
    monkeypatch.setattr(klom_module, "_BLOCK_POINTS", 37)
    rng = np.random.default_rng(4)
    u, o = _random_margins(rng, 11, 11, 1500, dtype)
    np.testing.assert_array_equal(klom(u, o, compat=True), _ref_compat(o, u))


@pytest.mark.parametrize("bins", [3, 50, 150])
def test_compat_bit_identical_for_other_bin_counts(bins):
    # Many models, so rows keep from a few to over 128 bins (np.sum's grouping changes with that).
    rng = np.random.default_rng(bins)
    u, o = _random_margins(rng, 300, 200, 60, np.float64)
    u[:, 30:] = rng.uniform(-50, 50, size=(300, 30))
    np.testing.assert_array_equal(klom(u, o, bins=bins, compat=True), _ref_compat(o, u, bins))


def test_compat_unequal_model_counts_match_reference_per_point():
    rng = np.random.default_rng(5)
    u, o = _random_margins(rng, 5, 17, 300, np.float32)
    ref = np.asarray([_ref_compat_point(u[:, i], o[:, i]) for i in range(u.shape[1])])
    np.testing.assert_array_equal(klom(u, o, compat=True), ref)


# --- summaries and bootstrap -----------------------------------------------------------------


def test_summarize():
    values = np.arange(101, dtype=float)
    assert percentile95(values) == pytest.approx(95.0)
    assert summarize(values) == pytest.approx({"p95": 95.0, "mean": 50.0})


def test_bootstrap_interval():
    rng = np.random.default_rng(6)
    u = rng.normal(0, 1, size=(12, 80))
    o = rng.normal(0.5, 1, size=(10, 80))
    mask = np.arange(80) < 50
    low, high = bootstrap_p95_interval(u, o, mask, n_boot=40, seed=3)
    assert 0 <= low <= high
    assert low <= percentile95(klom(u, o)[mask]) <= high  # the basic interval holds the estimate
    assert (low, high) == bootstrap_p95_interval(u, o, mask, n_boot=40, seed=3)
    idx = np.flatnonzero(mask)
    assert (low, high) == bootstrap_p95_interval(u, o, idx, n_boot=40, seed=3)
    assert bootstrap_p95_interval(u, o, mask, n_boot=40, seed=3, compat=True) != (low, high)


def test_bootstrap_of_identical_models_is_a_point():
    rng = np.random.default_rng(7)
    u = np.repeat(rng.normal(size=(1, 40)), 6, axis=0)
    o = np.repeat(rng.normal(size=(1, 40)), 4, axis=0)
    p95 = percentile95(klom(u, o))
    assert bootstrap_p95_interval(u, o, np.ones(40, bool), n_boot=10) == pytest.approx((p95, p95))


def test_bootstrap_of_several_groups_equals_one_group_at_a_time(monkeypatch):
    """The report scores forget, retain and val in one pass of replicates, several replicates to a klom
    call and the calls over threads: each group's interval is bit for bit the single-group one."""
    rng = np.random.default_rng(8)
    u = rng.normal(0, 1, size=(30, 300)).astype(np.float32)
    o = rng.normal(0.4, 1.3, size=(25, 300)).astype(np.float32)
    groups = [np.arange(0, 20), np.arange(20, 250), np.arange(250, 300)]
    alone = [bootstrap_p95_interval(u, o, g, n_boot=50, seed=0) for g in groups]
    monkeypatch.setattr("pipeline.evaluate.klom._BOOTSTRAP_CALL_SAMPLES", 7 * 300 * 30)  # 7 replicates a call
    assert bootstrap_p95_intervals(u, o, groups, n_boot=50, seed=0, threads=2) == alone
    assert bootstrap_p95_intervals(u, o, groups, n_boot=50, seed=0, threads=1, compat=True) == [
        bootstrap_p95_interval(u, o, g, n_boot=50, seed=0, compat=True) for g in groups]
