"""The LASSO problems both solvers solve: standardised features, centred targets, the lambda grid.

Per target, min (1/2m)||yc - X~ theta||^2 + lam ||theta||_1 on features standardised over the m models
(population std), in Gram quantities H = X~' X~ / m and q = X~' yc / m; weights go back to raw
inclusion units with ``_to_raw``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.datamodels.common import Masks, accumulate, as_masks


@dataclass(frozen=True)
class _Features:
    """Standardised design X~ = (X - mu) / sigma over m models, as ``_times`` and ``_targets`` use it.

    X: the raw design's masks (m, n), read by model batches (``Masks``), in dtype; scale (n,) =
    1 / sigma, 0 for a constant column (its X~ column is 0); rows: (n, n + 1) the Gram matrix
    H = X~' X~ / m, whose last column is the dummy feature that padding slots point at (nothing reads
    its row, and its gradient stays 0); or None when n x n would be too large (beyond
    GRAM_MAX_FEATURES): products then go through X~ itself, batch by batch (``lasso_fista._Design``).
    """

    m: int
    X: Masks
    dtype: torch.dtype
    mu: Tensor
    sigma: Tensor
    scale: Tensor
    rows: Tensor | None


@dataclass(frozen=True)
class _Targets:
    """Centred targets: ybar (t,), q = (y - ybar)' X~ / m (t, n), c0 = ||y - ybar||^2 / 2m (t,);
    minus: (t, n + 1) rows that, added to feat.rows' combinations, subtract q (see ``_system``), or
    without a Gram matrix (t, m) = -yc' / m, the residuals' share of the targets."""

    ybar: Tensor
    q: Tensor
    c0: Tensor
    minus: Tensor


# an n x n Gram matrix up to this n (256 MiB in float32); beyond it products go through X~
GRAM_MAX_FEATURES = 8192


def _moments(X: Tensor | Masks, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """0/1 masks X (m, n) -> (column sums (n,), X' X (n, n)), or the column sums of squares (n,) (= the
    sums) beyond GRAM_MAX_FEATURES, in dtype (default X's float dtype, else float32). Moments of
    stacked designs add up. X' X is a sum of model batches' products: integers, exact below 2^24
    models in float32, so the batching does not change its bits."""
    X, dtype = as_masks(X), _dtype(X, dtype)
    sums = X.counts(dtype)
    if X.n > GRAM_MAX_FEATURES:
        return sums, sums.clone()
    return sums, accumulate(x.T @ x for _, x in X.batches(dtype))


def _dtype(X: Tensor | Masks, dtype: torch.dtype | None) -> torch.dtype:
    stored = X.masks.dtype if isinstance(X, Masks) else X.dtype
    return dtype or (stored if stored.is_floating_point else torch.float32)


def _features(
    X: Tensor | Masks, moments: tuple[Tensor, Tensor] | None = None, dtype: torch.dtype | None = None
) -> _Features:
    """Masks X (m, n) (bool, or a float dtype that is the default dtype), their ``_moments`` if known
    -> standardised features (population std).

    The Gram matrix comes from the raw moments, H = (X' X / m - mu mu') / (sigma sigma'), so the
    refit's design (fitting plus validation models) costs one small product more, not a new one.
    A column whose variance is rounding noise is constant: sigma 1, zero row and column in H.
    """
    dtype = _dtype(X, dtype)
    X = as_masks(X)
    m, n = X.m, X.n
    sums, second = _moments(X, dtype) if moments is None else moments
    mu = sums / m
    mean_sq = (second.diagonal() if second.ndim == 2 else second) / m
    var = mean_sq - mu * mu
    varies = var > 16 * torch.finfo(dtype).eps * mean_sq
    sigma = torch.where(varies, var.clamp_min(0).sqrt(), torch.ones_like(var))
    scale = torch.where(varies, 1 / sigma, torch.zeros_like(sigma))
    rows = None
    if second.ndim == 2:
        rows = second.new_zeros(n, n + 1)
        cov = torch.addr(second, mu, mu, beta=1 / m, alpha=-1)  # X' X / m - mu mu'
        rows[:, :n] = cov.mul_(scale[:, None]).mul_(scale)
    return _Features(m=m, X=X, dtype=dtype, mu=mu, sigma=sigma, scale=scale, rows=rows)


def _targets(feat: _Features, Y: Tensor) -> _Targets:
    """Y (m, t) -> centred target statistics against the standardised features. A target whose
    variance is rounding noise is constant: centred to exactly 0 (its model is all zeros)."""
    ybar = Y.mean(0)
    yc = Y - ybar
    # a constant y leaves y - ybar at ybar's rounding error, ~eps |ybar| in every entry
    constant = (yc * yc).mean(0) <= (16 * torch.finfo(Y.dtype).eps) ** 2 * (Y * Y).mean(0)
    yc = yc.masked_fill(constant, 0)
    # yc sums to 0, so yc' X~ = yc' X / sigma
    q = accumulate(yc[rows].T @ x for rows, x in feat.X.batches(feat.dtype)) * (feat.scale / feat.m)
    minus = -torch.nn.functional.pad(q, (0, 1)) if feat.rows is not None else -yc.T / feat.m
    return _Targets(ybar=ybar, q=q, c0=(yc * yc).sum(0) / (2 * feat.m), minus=minus)


def _to_raw(feat: _Features, tg: _Targets, theta: Tensor) -> tuple[Tensor, Tensor]:
    """theta (t, n) in standardised units -> (weight (n, t), bias (t,)) in raw inclusion units."""
    weight = (theta / feat.sigma).T
    return weight, tg.ybar - feat.mu @ weight


def _default_lambdas(tg: _Targets, n_lambdas: int, eps: float) -> Tensor:
    """(k, t) path lam_max * eps^(j / (k - 1)), lam_max = max_i |X~_i' (y - ybar)| / m per target.

    lam_max is the smallest lambda whose solution is all zeros (on standardised features, so it is
    about twice fast_l1's value computed on raw masks).
    """
    lam_max = tg.q.abs().amax(1).clamp_min(torch.finfo(tg.q.dtype).tiny)
    expo = torch.arange(n_lambdas, dtype=tg.q.dtype, device=tg.q.device) / max(n_lambdas - 1, 1)
    return lam_max[None, :] * eps ** expo[:, None]


def _lambda_grid(lambdas: Tensor | None, tg: _Targets, n_lambdas: int, eps: float) -> Tensor:
    """The (k, t) grid: the default path, or lambdas given as a scalar, (k,) shared or (k, t)."""
    if lambdas is None:
        return _default_lambdas(tg, n_lambdas, eps)
    lambdas = torch.as_tensor(lambdas, dtype=tg.q.dtype, device=tg.q.device)
    if not bool((lambdas > 0).all()):
        raise ValueError("LASSO lambdas must be > 0 (lambda 0 is least squares: use ridge with a small lambda)")
    if lambdas.ndim == 0:
        lambdas = lambdas[None]
    if lambdas.ndim == 1:
        lambdas = lambdas[:, None]
    return lambdas.expand(lambdas.shape[0], tg.q.shape[0])
