"""KLoM: per-point KL divergence between unlearned and oracle margin distributions.

Direction everywhere: ``KL(P_unlearned || P_oracle)`` -- wherever the unlearned models put mass,
the oracles must put mass too (specs decision 2, algorithms.md section 4).

Inputs are margins shaped ``(models, points)``; the two model counts may differ. Everything is
vectorized over points (work proceeds in blocks of points to bound memory); there is no Python loop
per point.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "klom",
    "percentile95",
    "summarize",
    "bootstrap_p95_interval",
]

# Samples per side (models x points) handled per block: small enough for the temporaries to stay
# in cache, large enough to amortize the per-call overhead of numpy.
_BLOCK_SAMPLES = 1 << 16


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
    ``q = counts_o / models_o``; ``KL = sum_{p_b > 0} p_b log(p_b / max(q_b, floor))``.
    If ``min == max`` (every sample of both sets equal) the edges span ``[min, min + 1]``, as the
    reference does; all samples then fall in the first bin of both histograms and KL is 0.

    ``compat=True`` follows EasyDUB's arithmetic: computation stays in the input dtype (float32
    margins give float32 edges), bins come from ``np.digitize`` so samples equal to the maximum
    edge are dropped from both histograms, ``p`` and ``q`` are normalized by the counts actually
    kept (all zeros if none are kept), and the per-point sum runs in the same order as ``np.sum``
    over the kept terms, so results are bit-identical. Inputs of two different float dtypes are
    promoted to the common dtype first (EasyDUB always receives one dtype).
    """
    u, o = _as_margins(unlearned, oracle)
    n_points = u.shape[1]
    out = np.empty(n_points, dtype=np.float64)
    block = max(1, _BLOCK_SAMPLES // max(u.shape[0], o.shape[0]))
    for lo in range(0, n_points, block):
        hi = min(lo + block, n_points)
        out[lo:hi] = _klom_block(u[:, lo:hi], o[:, lo:hi], bins, float(clip), float(floor), compat)
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
    u = np.asarray(unlearned)[:, mask]
    o = np.asarray(oracle)[:, mask]
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot, dtype=np.float64)
    for b in range(n_boot):
        iu = rng.integers(0, u.shape[0], size=u.shape[0])
        io = rng.integers(0, o.shape[0], size=o.shape[0])
        stats[b] = percentile95(klom(u[iu], o[io], **klom_kwargs))
    estimate = percentile95(klom(u, o, **klom_kwargs))
    q_low, q_high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    bias = stats.mean() - estimate
    return max(0.0, float(q_low - bias)), max(0.0, float(q_high - bias))


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


def _klom_block(
    u: np.ndarray, o: np.ndarray, bins: int, clip: float, floor: float, compat: bool
) -> np.ndarray:
    n_u, n_o = u.shape[0], o.shape[0]
    x = np.empty((n_u + n_o, u.shape[1]), _work_dtype(u, o, compat))
    # Python-float bounds keep float32 in float32 (NEP 50), as the reference's np.clip does.
    np.clip(u, -clip, clip, out=x[:n_u])
    np.clip(o, -clip, clip, out=x[n_u:])
    start = x.min(axis=0)
    stop = x.max(axis=0)
    if np.isnan(start).any() or np.isnan(stop).any():  # min/max propagate NaN
        raise ValueError("margins contain NaN")
    stop = np.where(start >= stop, start + 1.0, stop)
    edges = _linspace_rows(start, stop, bins)
    # compat: index `bins` means "at or beyond the last edge", np.digitize's dropped sample.
    top = bins if compat else bins - 1
    counts = _bin_counts(x, n_u, edges, top)
    if compat:
        return _kl_compat(counts[0], counts[1], floor)
    return _kl(counts[0], counts[1], n_u, n_o, floor)


def _linspace_rows(start: np.ndarray, stop: np.ndarray, bins: int) -> np.ndarray:
    """Row i equals ``np.linspace(start[i], stop[i], bins + 1)`` bit for bit, in their dtype.

    Shapes: ``start, stop (points,)`` -> ``(points, bins + 1)``. Not a vectorized ``np.linspace``:
    that switches formula for every row as soon as one row's step underflows to 0.
    """
    dtype = start.dtype
    frac = np.arange(bins + 1, dtype=dtype)
    delta = np.subtract(stop, start, dtype=dtype)
    step = delta / bins
    y = frac[None, :] * step[:, None]
    tiny = step == 0
    if tiny.any():
        y[tiny] = (frac / bins)[None, :] * delta[tiny, None]
    y += start[:, None]
    y[:, -1] = stop
    return y


def _bin_counts(x: np.ndarray, n_first: int, edges: np.ndarray, top: int) -> np.ndarray:
    """Histogram counts, shape ``(2, points, bins)``: rows ``x[:n_first]`` and ``x[n_first:]``.

    ``x`` is ``(models, points)`` with every sample in ``[edges[:, 0], edges[:, -1]]``. A sample
    goes to the largest ``g <= top`` with ``edges[g] <= x``, i.e. ``np.searchsorted(edges, x,
    "right") - 1`` capped at ``top``; with ``top == bins`` (compat) those at ``g == bins`` are
    left out. Exact: an arithmetic guess that provably never exceeds the true bin is walked up
    against the actual edges (see ``_guess_offsets``).
    """
    n_points, n_edges = edges.shape
    bins = n_edges - 1
    width = bins + 2  # per point: a slot below bin 0, bins 0..bins-1, and the slot `bins`
    # upper[slot] is the edge a sample must reach to move up from that slot.
    upper = np.empty((n_points, width), edges.dtype)
    upper[:, : bins + 1] = edges
    upper[:, bins + 1] = np.inf
    upper[:, top + 1] = np.inf
    upper = np.concatenate([upper.ravel(), upper.ravel()])
    scale, offset = _guess_offsets(edges, width)
    idx = x * scale
    idx[:n_first] += offset
    idx[n_first:] += offset + n_points * width
    idx = idx.astype(np.intp).ravel()  # values > 0, so truncation is floor
    xs = x.ravel()
    moved = np.flatnonzero(xs >= upper[idx])
    while moved.size:  # a few samples per point at most, unless the range is tiny
        idx[moved] += 1
        moved = moved[xs[moved] >= upper[idx[moved]]]
    counts = np.bincount(idx, minlength=2 * n_points * width)
    return counts.reshape(2, n_points, width)[:, :, 1 : bins + 1]


def _guess_offsets(edges: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Per point ``scale, offset`` with ``floor(x * scale + offset) = point * width + 1 + guess``.

    ``guess = (x - start) * bins / span - margin`` in float64, where ``margin`` bounds the rounding
    of the edges (``np.linspace`` arithmetic in the edges' dtype: under ``8 u M + (bins + 4) t``
    with ``u`` the unit roundoff, ``t`` the smallest subnormal, ``M = max(|start|, |stop|)``)
    plus that of the guess itself. So a guess of ``j`` implies ``edges[j] <= x``: the guess never
    exceeds the true bin. Where the margin reaches 1/2 bin (ranges a few ulps wide) the guess is
    the slot below bin 0 and the walk does the rest.
    """
    n_points, n_edges = edges.shape
    bins = n_edges - 1
    info = np.finfo(edges.dtype)
    start = edges[:, 0].astype(np.float64)
    stop = edges[:, -1].astype(np.float64)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        scale = bins / (stop - start)
        big = np.maximum(np.abs(start), np.abs(stop))
        edge_err = 8 * (info.eps / 2) * big + (bins + 4) * float(info.smallest_subnormal)
        base = np.arange(n_points, dtype=np.float64) * width
        guess_err = 1e-14 * (scale * 3 * big + 2 * n_points * width + 2)
        margin = edge_err * scale + guess_err
        ok = margin < 0.5  # False for NaN or inf
    scale = np.where(ok, scale, 0.0)
    offset = np.where(ok, base + 1 - start * scale - margin, base + 0.5)
    return scale, offset


def _kl(cu: np.ndarray, co: np.ndarray, n_u: int, n_o: int, floor: float) -> np.ndarray:
    """``sum_{p>0} p log(p / max(q, floor))`` per row with ``p = cu / n_u``, ``q = co / n_o``.

    ``cu, co`` are counts ``(points, bins)``; the logs come from tables indexed by count.
    """
    log_p = np.log(np.maximum(np.arange(n_u + 1), 1) / n_u)  # entry 0 is never used
    # floor <= 0 leaves log(0) = -inf: KL is inf where p > 0 = q, and 0 * inf is masked out.
    with np.errstate(divide="ignore", invalid="ignore"):
        log_q = np.log(np.maximum(np.arange(n_o + 1) / n_o, floor))
        terms = np.where(cu > 0, cu * (log_p[cu] - log_q[co]), 0.0)
    return np.sum(terms, axis=1) / n_u


def _kl_compat(cu: np.ndarray, co: np.ndarray, floor: float) -> np.ndarray:
    """EasyDUB's KL from kept counts ``(points, bins)``, bit-identical to its per-point code.

    ``p = cu / cu.sum()`` per point (``q`` likewise, all zeros when nothing was kept), ``q``
    floored where ``p > 0``, and ``sum p log(p / q)`` over the bins with ``p > 0``.
    """
    n_points, bins = cu.shape
    kept = np.flatnonzero(cu > 0)  # p > 0 exactly where the count is
    row = kept // bins
    total_u = cu.sum(axis=1)
    total_o = co.sum(axis=1)
    p = cu.ravel()[kept] / total_u[row]
    q = co.ravel()[kept] / np.maximum(total_o, 1)[row]  # counts are all 0 where the total is
    terms = p * np.log(p / np.maximum(q, floor))
    return _segment_sums_like_np_sum(terms, row, n_points, bins)


def _segment_sums_like_np_sum(
    values: np.ndarray, row: np.ndarray, n_rows: int, max_len: int
) -> np.ndarray:
    """``np.sum(values[row == r])`` for every ``r``, bit for bit; ``row`` is sorted.

    ``np.sum`` of a short 1-D array is a pairwise sum over blocks of 8 with the remainder added
    one by one, so its grouping depends on the length. Segments are packed into zero-padded rows
    and summed with ``np.add.reduce`` in groups whose padded length gives the same grouping
    (trailing zeros only join the one-by-one part). Beyond 128 elements np.sum splits
    recursively, so long segments are grouped by exact length instead.
    """
    n_kept = np.bincount(row, minlength=n_rows)
    first = np.cumsum(n_kept) - n_kept
    width = max_len + 7
    padded = np.zeros(n_rows * width, dtype=np.float64)
    padded[row * width + (np.arange(row.size) - first[row])] = values
    padded = padded.reshape(n_rows, width)
    exact = max_len > 128
    key = n_kept if exact else n_kept // 8
    out = np.zeros(n_rows, dtype=np.float64)
    for k in np.unique(key):
        length = int(k) if exact else 8 * int(k) + 7
        if length == 0:
            continue
        rows = key == k
        out[rows] = np.add.reduce(padded[rows, :length], axis=1)
    return out
