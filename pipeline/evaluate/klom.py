"""KLoM: per-point KL divergence between unlearned and oracle margin distributions.

Direction everywhere: ``KL(P_unlearned || P_oracle)`` -- wherever the unlearned models put mass,
the oracles must put mass too (specs decision 2, algorithms.md section 4).

Inputs are margins shaped ``(models, points)``; the two model counts may differ. There is no Python
loop per point: edges and KL terms are vectorized numpy, and the passes over single samples and
terms (counting samples against edges, summing each point's KL terms) are numba kernels. They are
compiled on first use and cached on disk (``cache=True``): the first call in a process takes about
half a second, the first after this file changes several seconds more.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numba
import numpy as np

__all__ = [
    "klom",
    "percentile95",
    "summarize",
    "bootstrap_p95_interval",
    "bootstrap_p95_intervals",
]

# Samples per side in one chunk of points: bounds the per-point temporaries (edges, counts, KL
# terms; about 1 KB a point at 20 bins) to some 40 MB at 100 models.
_CHUNK_SAMPLES = 1 << 22
# Samples per side in one bootstrap call: one replicate of a digits row (100 models x 1,797 points) per
# call, several of a small group's. Larger calls were slower (0.31 against 0.23 s a row on 2 threads):
# their copies leave the cache.
_BOOTSTRAP_CALL_SAMPLES = 1 << 18
# Points per block in the counting kernel: the block's thresholds and counts and one row of its
# samples stay in L1 while every model's row of the block is compared against them.
_BLOCK_POINTS = 128


def klom(
    unlearned: Any,
    oracle: Any,
    *,
    bins: int = 20,
    clip: float = 100.0,
    floor: float = 1e-5,
    compat: bool = False,
) -> np.ndarray:
    """Per-point ``KL(P_unlearned || P_oracle)`` from margin samples.

    Args:
        unlearned: margins, shape ``(models_u, points)``.
        oracle: margins, shape ``(models_o, points)``.
        bins: number of equal-width histogram bins per point.
        clip: both sample sets are clipped to ``[-clip, clip]`` first.
        floor: where ``p > 0``, ``q`` is raised to at least ``floor``.
        compat: reproduce EasyDUB's ``klom_from_margins`` exactly (see below).

    Returns:
        float64 array, shape ``(points,)``.

    Default (``compat=False``, decision 2): inputs are cast to float64 and clipped; per point the
    edges are ``bins`` equal-width bins spanning ``[min, max]`` of the union of both clipped
    sample sets (``np.linspace`` arithmetic); every sample is counted, bins are half-open except
    the last, which is closed (as ``np.histogram``); ``p = counts_u / models_u`` and
    ``q = counts_o / models_o``; ``KL = sum_{p_b > 0} p_b log(p_b / max(q_b, floor))``, evaluated
    with numpy's arithmetic and summed in ``np.sum``'s order, so the result is bit-identical to a
    per-point loop of ``np.histogram`` on those edges followed by that expression.
    If ``min == max`` (every sample of both sets equal) the edges span ``[min, min + 1]``, as the
    reference does; all samples then fall in the first bin of both histograms and KL is 0.

    ``compat=True`` follows EasyDUB's arithmetic: computation stays in the input dtype (float32
    margins give float32 edges), bins come from ``np.digitize`` so samples equal to the maximum
    edge are dropped from both histograms, ``p`` and ``q`` are normalized by the counts actually
    kept (all zeros if none are kept), and the per-point sum runs in the same order as ``np.sum``
    over the kept terms, so results are bit-identical. Inputs of two different float dtypes are
    promoted to the common dtype first (EasyDUB always receives one dtype).

    Samples are compared with the edges in float32 when they are float32 and in float64 otherwise,
    which is exact for every dtype up to float64 (not for ``np.longdouble``).
    """
    u, o = _as_margins(unlearned, oracle)
    work = _work_dtype(u, o, compat)
    u, o = _kernel_input(u), _kernel_input(o)
    n_points = u.shape[1]
    out = np.empty(n_points, dtype=np.float64)
    chunk = max(1, _CHUNK_SAMPLES // max(u.shape[0], o.shape[0]))
    for lo in range(0, n_points, chunk):
        hi = min(lo + chunk, n_points)
        out[lo:hi] = _klom_chunk(u, o, lo, hi, bins, float(clip), float(floor), compat, work)
    return out


def percentile95(values: Any) -> float:
    """95th percentile (``np.percentile``, linear interpolation) of a 1-D set of KLoM values."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), 95))


def summarize(values: Any) -> dict[str, float]:
    """``{"p95": 95th percentile, "mean": mean}`` of per-point KLoM values."""
    arr = np.asarray(values, dtype=np.float64)
    return {"p95": percentile95(arr), "mean": float(arr.mean())}


def bootstrap_p95_interval(
    unlearned: Any,
    oracle: Any,
    points_mask: Any,
    *,
    n_boot: int = 200,
    seed: int = 0,
    alpha: float = 0.05,
    **klom_kwargs: Any,
) -> tuple[float, float]:
    """Bias-corrected bootstrap interval over models for the P95 of KLoM on selected points.

    Resampling models with replacement duplicates samples, which sharpens the histograms and inflates
    KLoM: the replicate P95s sit above the estimate, so a plain percentile interval can miss it. The
    interval is the replicates' percentile interval shifted by the bootstrap's own bias estimate
    (mean of the replicates minus the estimate), floored at 0.

    Each replicate draws ``models_u`` unlearned rows and ``models_o`` oracle rows with replacement,
    recomputes ``klom`` (``KL(P_unlearned || P_oracle)``, ``klom_kwargs`` passed through) on the
    selected points and takes its 95th percentile.

    Args:
        unlearned: margins, shape ``(models_u, points)``.
        oracle: margins, shape ``(models_o, points)``.
        points_mask: boolean mask of shape ``(points,)`` or integer indices of the points to score.

    Returns:
        ``(low, high)``: the ``alpha/2`` and ``1 - alpha/2`` quantiles of the replicates minus the bias.
    """
    mask = np.asarray(points_mask)
    points = np.flatnonzero(mask) if mask.dtype == bool else mask
    (interval,) = bootstrap_p95_intervals(unlearned, oracle, [points], n_boot=n_boot, seed=seed, alpha=alpha,
                                          threads=1, **klom_kwargs)
    return interval


def bootstrap_p95_intervals(
    unlearned: Any,
    oracle: Any,
    groups: list[Any],
    *,
    n_boot: int = 200,
    seed: int = 0,
    alpha: float = 0.05,
    threads: int | None = None,
    **klom_kwargs: Any,
) -> list[tuple[float, float]]:
    """``bootstrap_p95_interval`` of several groups of points (integer indices each) at once: each
    replicate draws its models once and scores every group's points in one ``klom`` call, several
    replicates to a call, the calls spread over ``threads`` threads (default: the CPUs; the kernels
    release the GIL). Per point, KLoM reads only that point's column, so each group's interval is
    the one ``bootstrap_p95_interval`` gives it with the same seed, bit for bit."""
    groups = [np.asarray(g) for g in groups]
    cuts = np.cumsum([0] + [len(g) for g in groups])
    points = np.concatenate(groups) if groups else np.empty(0, np.int64)
    u, o = np.asarray(unlearned)[:, points], np.asarray(oracle)[:, points]  # their dtype: compat computes in it
    rng = np.random.default_rng(seed)
    draws = [(rng.integers(0, u.shape[0], size=u.shape[0]), rng.integers(0, o.shape[0], size=o.shape[0]))
             for _ in range(n_boot)]
    per_call = max(1, min(n_boot, _BOOTSTRAP_CALL_SAMPLES // max(1, points.size * max(u.shape[0], o.shape[0]))))

    def p95s(values: np.ndarray) -> list[float]:
        return [percentile95(values[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]

    def replicates(first: int) -> list[list[float]]:
        batch = draws[first : first + per_call]
        values = klom(np.concatenate([u[iu] for iu, _ in batch], axis=1),
                      np.concatenate([o[io] for _, io in batch], axis=1), **klom_kwargs)
        return [p95s(values[k * points.size : (k + 1) * points.size]) for k in range(len(batch))]

    workers = max(1, min(threads or os.cpu_count() or 1, -(-n_boot // per_call)))
    with ThreadPoolExecutor(workers) as pool:
        parts = list(pool.map(replicates, range(0, n_boot, per_call)))
    stats = np.array([r for part in parts for r in part], dtype=np.float64).reshape(n_boot, len(groups))
    estimate = p95s(klom(u, o, **klom_kwargs))
    out = []
    for g in range(len(groups)):
        q_low, q_high = np.quantile(stats[:, g], [alpha / 2, 1 - alpha / 2])
        bias = stats[:, g].mean() - estimate[g]
        out.append((max(0.0, float(q_low - bias)), max(0.0, float(q_high - bias))))
    return out


def _as_margins(unlearned: Any, oracle: Any) -> tuple[np.ndarray, np.ndarray]:
    u = np.asarray(unlearned)
    o = np.asarray(oracle)
    if u.ndim != 2 or o.ndim != 2:
        raise ValueError(f"margins must be (models, points); got {u.shape} and {o.shape}")
    if u.shape[1] != o.shape[1]:
        raise ValueError(f"point counts differ: {u.shape[1]} vs {o.shape[1]}")
    if u.shape[0] == 0 or o.shape[0] == 0:
        raise ValueError("need at least one model on each side")
    return u, o


def _work_dtype(u: np.ndarray, o: np.ndarray, compat: bool) -> np.dtype:
    dtype = np.result_type(u.dtype, o.dtype) if compat else np.dtype(np.float64)
    return dtype if np.issubdtype(dtype, np.floating) else np.dtype(np.float64)


def _klom_chunk(
    u: np.ndarray,
    o: np.ndarray,
    lo: int,
    hi: int,
    bins: int,
    clip: float,
    floor: float,
    compat: bool,
    work: np.dtype,
) -> np.ndarray:
    """KLoM of points ``lo:hi``."""
    edges = _shared_edges(u[:, lo:hi], o[:, lo:hi], bins, clip, work)
    # compat: a sample reaching edges[bins] is np.digitize's dropped sample; it lands in a slot
    # past the last bin.
    compared = edges[1 : bins + 1] if compat else edges[1:bins]
    thresholds = {dtype: _thresholds(compared, clip, dtype) for dtype in {u.dtype, o.dtype}}
    cu = _count_reached(u, lo, thresholds[u.dtype], _BLOCK_POINTS)[:, :bins]
    co = _count_reached(o, lo, thresholds[o.dtype], _BLOCK_POINTS)[:, :bins]
    if compat:
        return _kl_compat(cu, co, floor)
    return _kl(cu, co, u.shape[0], o.shape[0], floor)


def _shared_edges(
    u: np.ndarray, o: np.ndarray, bins: int, clip: float, work: np.dtype
) -> np.ndarray:
    """Per point ``np.linspace(min, max, bins + 1)`` over both clipped sample sets, ``(bins + 1,
    points)`` in the work dtype; ``[min, min + 1]`` where every sample is equal.

    Clipping is monotone, so clipping each column's min and max equals taking them after clipping.
    """
    low = np.minimum(u.min(axis=0), o.min(axis=0)).astype(work)
    high = np.maximum(u.max(axis=0), o.max(axis=0)).astype(work)
    # Python-float bounds keep float32 in float32 (NEP 50), as the reference's np.clip does.
    start = np.clip(low, -clip, clip)
    stop = np.clip(high, -clip, clip)
    if np.isnan(start).any() or np.isnan(stop).any():  # min/max propagate NaN
        raise ValueError("margins contain NaN")
    stop = np.where(start >= stop, start + 1.0, stop)
    return _linspace_columns(start, stop, bins)


def _linspace_columns(start: np.ndarray, stop: np.ndarray, bins: int) -> np.ndarray:
    """Column i equals ``np.linspace(start[i], stop[i], bins + 1)`` bit for bit, in their dtype.

    Shapes: ``start, stop (points,)`` -> ``(bins + 1, points)``. Not a vectorized ``np.linspace``:
    that switches formula for every point as soon as one point's step underflows to 0.
    """
    dtype = start.dtype
    frac = np.arange(bins + 1, dtype=dtype)[:, None]
    delta = np.subtract(stop, start, dtype=dtype)
    step = delta / bins
    y = frac * step
    tiny = step == 0
    if tiny.any():
        y[:, tiny] = (frac / bins) * delta[tiny]
    y += start
    y[-1] = stop
    return y


def _kernel_input(x: np.ndarray) -> np.ndarray:
    """``x`` as a C-ordered float32 or float64 array; other dtypes become float64 (exact up to
    float64; integers are converted as the reference's casts and clips convert them)."""
    dtype = x.dtype if x.dtype in (np.float32, np.float64) else np.float64
    return np.ascontiguousarray(x, dtype=dtype)


def _thresholds(edges: np.ndarray, clip: float, dtype: np.dtype) -> np.ndarray:
    """``t`` with ``x >= t`` exactly when ``clip(x) >= edge``, for raw samples ``x`` of ``dtype``;
    shaped as ``edges``, in ``dtype``.

    ``clip`` (in the edges' dtype) is monotone, so those ``x`` are all of them where the edge is at
    or below the lower bound, none where it is above the upper bound, and ``x >= edge`` in between.
    """
    t = edges.copy()
    low, high = np.clip(np.array([-np.inf, np.inf], dtype=t.dtype), -clip, clip)
    t[t <= low] = -np.inf
    t[t > high] = np.inf
    return _round_up(t, dtype)


def _round_up(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The least ``dtype`` value at or above each of ``values`` (a wider float dtype), so that
    ``x >= result`` exactly when ``x >= value`` for every ``x`` of ``dtype``."""
    with np.errstate(over="ignore"):  # beyond the dtype's range: inf, then one step if too far
        rounded = values.astype(dtype)
    if rounded.dtype == values.dtype:
        return rounded
    # One step up where rounding went down. Read as signed integers, the bit patterns of floats of
    # one sign are ordered by magnitude, so a step up is +1 for positive floats and -1 for negative
    # ones (what np.nextafter does, one slow call per element; masks are slow too, being random).
    bits = rounded.view(f"i{rounded.itemsize}")
    up = 1 - 2 * (bits < 0).astype(bits.dtype)
    bits += (rounded < values).astype(bits.dtype) * up
    return rounded


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _count_reached(x, first, thresholds, block):
    """``out[j, g]``: how many samples ``x[:, first + j]`` reach exactly ``g`` of the thresholds
    ``thresholds[:, j]``, which are non-decreasing; ``(points, k + 1)`` from ``x (models, ...)``
    and ``thresholds (k, points)`` of one dtype.

    A sample reaching ``g`` thresholds lies in bin ``g``, so these are the histogram counts. Per
    block of points, ``reached[k, j]`` counts the samples at or above threshold ``k``: one
    compare-and-add per sample and threshold, in loops over points that LLVM vectorizes. Rows of
    samples go four at a time, so that each load and store of ``reached`` serves four.
    """
    n_models = x.shape[0]
    n_k, n_points = thresholds.shape
    out = np.empty((n_points, n_k + 1), np.int32)
    reached = np.empty((n_k, block), np.int32)
    local = np.empty((n_k, block), x.dtype)
    fours = n_models - n_models % 4
    for lo in range(0, n_points, block):
        width = min(block, n_points - lo)
        reached[:] = 0
        local[:, :width] = thresholds[:, lo : lo + width]
        cols = slice(first + lo, first + lo + width)
        for r in range(0, fours, 4):
            a, b, c, d = x[r, cols], x[r + 1, cols], x[r + 2, cols], x[r + 3, cols]
            for k in range(n_k):
                n, t = reached[k], local[k]
                for j in range(width):
                    n[j] += (
                        np.int32(a[j] >= t[j])
                        + np.int32(b[j] >= t[j])
                        + np.int32(c[j] >= t[j])
                        + np.int32(d[j] >= t[j])
                    )
        for r in range(fours, n_models):
            a = x[r, cols]
            for k in range(n_k):
                n, t = reached[k], local[k]
                for j in range(width):
                    n[j] += a[j] >= t[j]
        for j in range(width):
            above = n_models
            for k in range(n_k):
                out[lo + j, k] = above - reached[k, j]
                above = reached[k, j]
            out[lo + j, n_k] = above
    return out


def _kl(cu: np.ndarray, co: np.ndarray, n_u: int, n_o: int, floor: float) -> np.ndarray:
    """``sum_{p>0} p log(p / max(q, floor))`` per point with ``p = cu / n_u``, ``q = co / n_o``.

    ``cu, co`` are counts ``(points, bins)``. Counts are integers up to the model counts, so the
    terms come from a table of every ``(count_u, count_o)`` pair when that table is the smaller.
    """
    if (n_u + 1) * (n_o + 1) <= cu.size:
        table = _terms(np.arange(n_u + 1)[:, None] / n_u, np.arange(n_o + 1) / n_o, floor)
        return _table_sums(table, cu, co)
    return _sums_like_np_sum(_terms(cu / n_u, co / n_o, floor), cu > 0)


def _kl_compat(cu: np.ndarray, co: np.ndarray, floor: float) -> np.ndarray:
    """EasyDUB's KL from kept counts ``(points, bins)``: ``p = cu / cu.sum()`` per point (``q``
    likewise, all zeros when nothing was kept), ``q`` floored where ``p > 0``, and ``sum p log(p /
    q)`` over the bins with ``p > 0``."""
    p = cu / np.maximum(cu.sum(axis=1, keepdims=True), 1)  # counts are all 0 where the total is
    q = co / np.maximum(co.sum(axis=1, keepdims=True), 1)
    return _sums_like_np_sum(_terms(p, q, floor), cu > 0)


def _terms(p: np.ndarray, q: np.ndarray, floor: float) -> np.ndarray:
    """``p * log(p / max(q, floor))`` with the reference's numpy operations, element for element,
    where ``p > 0``; the entries with ``p == 0`` are never summed. ``floor <= 0`` gives inf where
    ``p > 0 = q``.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        # p -> 1 where p == 0: log(0) is several times slower than a plain log.
        return p * np.log((p + (p == 0)) / np.maximum(q, floor))


@numba.njit(cache=True, nogil=True)
def _sums_like_np_sum(terms, keep):
    """``np.sum(terms[j][keep[j]])`` for every row ``j``, bit for bit."""
    n_points, n_bins = terms.shape
    out = np.empty(n_points)
    kept = np.empty(n_bins)
    for j in range(n_points):
        n = 0
        for k in range(n_bins):
            if keep[j, k]:
                kept[n] = terms[j, k]
                n += 1
        out[j] = _short_sum(kept, n) if n <= 128 else _pairwise_sum(kept[:n])
    return out


@numba.njit(cache=True, nogil=True)
def _table_sums(table, cu, co):
    """``np.sum(table[cu[j], co[j]][cu[j] > 0])`` for every row ``j``, bit for bit."""
    n_points, n_bins = cu.shape
    out = np.empty(n_points)
    kept = np.empty(n_bins)
    for j in range(n_points):
        n = 0
        for k in range(n_bins):
            if cu[j, k] > 0:
                kept[n] = table[cu[j, k], co[j, k]]
                n += 1
        out[j] = _short_sum(kept, n) if n <= 128 else _pairwise_sum(kept[:n])
    return out


# numpy sums a contiguous float64 array pairwise (``pairwise_sum`` in its umath loops): up to 128
# elements as below, longer ones as the sums of two halves, the first a multiple of 8 long.


@numba.njit(cache=True, nogil=True, inline="always")
def _short_sum(a, n):
    """numpy's sum of ``a[:n]``, ``n <= 128``: one by one below 8 elements; otherwise eight
    interleaved partial sums combined as a tree, then the remainder one by one."""
    if n < 8:
        s = 0.0
        for i in range(n):
            s += a[i]
        return s
    r0, r1, r2, r3, r4, r5, r6, r7 = a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]
    i = 8
    while i < n - n % 8:
        r0, r1, r2, r3 = r0 + a[i], r1 + a[i + 1], r2 + a[i + 2], r3 + a[i + 3]
        r4, r5, r6, r7 = r4 + a[i + 4], r5 + a[i + 5], r6 + a[i + 6], r7 + a[i + 7]
        i += 8
    s = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    for m in range(i, n):
        s += a[m]
    return s


@numba.njit(cache=True, nogil=True)
def _pairwise_sum(a):
    """numpy's sum of a contiguous float64 array of any length."""
    if a.size <= 128:
        return _short_sum(a, a.size)
    half = a.size // 2
    half -= half % 8
    return _pairwise_sum(a[:half]) + _pairwise_sum(a[half:])
