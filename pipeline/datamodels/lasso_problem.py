"""The LASSO problems both solvers solve: standardised features, centred targets, the lambda grid.

Per target, min (1/2m)||yc - X~ theta||^2 + lam ||theta||_1 on features standardised over the m models
(population std), in Gram quantities H = X~' X~ / m and q = X~' yc / m; weights go back to raw
inclusion units with ``_to_raw``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class _Features:
    """Standardised design X~ = (X - mu) / sigma over m models, as ``_times`` and ``_targets`` use it.

    X (m, n) the raw design; scale (n,) = 1 / sigma, 0 for a constant column (its X~ column is 0);
    rows: (n, n + 1) the Gram matrix H = X~' X~ / m; or, when n x n would be too large, (n, m) the
    rows of X~' / m with xs_pad = [X~, 0] (m, n + 1). The last column is the dummy feature that
    padding slots point at: nothing reads its row, and its gradient stays 0.
    """

    m: int
    X: Tensor
    mu: Tensor
    sigma: Tensor
    scale: Tensor
    rows: Tensor
    xs_pad: Tensor | None


@dataclass(frozen=True)
class _Targets:
    """Centred targets: ybar (t,), q = (y - ybar)' X~ / m (t, n), c0 = ||y - ybar||^2 / 2m (t,);
    minus (t, w): rows that, added to feat.rows' combinations, subtract q (see ``_system``)."""

    ybar: Tensor
    q: Tensor
    c0: Tensor
    minus: Tensor


# an n x n Gram matrix up to this n (256 MiB in float32); beyond it products go through X~
GRAM_MAX_FEATURES = 8192


def _moments(X: Tensor) -> tuple[Tensor, Tensor]:
    """X (m, n) -> (column sums (n,), X' X (n, n)), or the column sums of squares (n,) beyond
    GRAM_MAX_FEATURES. Moments of stacked designs add up."""
    return X.sum(0), (X.T @ X if X.shape[1] <= GRAM_MAX_FEATURES else (X * X).sum(0))


def _features(X: Tensor, moments: tuple[Tensor, Tensor] | None = None) -> _Features:
    """X (m, n) float, its ``_moments`` if known -> standardised features (population std).

    The Gram matrix comes from the raw moments, H = (X' X / m - mu mu') / (sigma sigma'), so the
    refit's design (fitting plus validation models) costs one small product more, not a new one.
    A column whose variance is rounding noise is constant: sigma 1, zero row and column in H.
    """
    m, n = X.shape
    sums, second = _moments(X) if moments is None else moments
    mu = sums / m
    mean_sq = (second.diagonal() if second.ndim == 2 else second) / m
    var = mean_sq - mu * mu
    varies = var > 16 * torch.finfo(X.dtype).eps * mean_sq
    sigma = torch.where(varies, var.clamp_min(0).sqrt(), torch.ones_like(var))
    scale = torch.where(varies, 1 / sigma, torch.zeros_like(sigma))
    if second.ndim == 2:
        rows = X.new_zeros(n, n + 1)
        cov = torch.addr(second, mu, mu, beta=1 / m, alpha=-1)  # X' X / m - mu mu'
        rows[:, :n] = cov.mul_(scale[:, None]).mul_(scale)
        xs_pad = None
    else:
        xs_pad = torch.nn.functional.pad((X - mu) * scale, (0, 1))
        rows = (xs_pad[:, :n].T / m).contiguous()
    return _Features(m=m, X=X, mu=mu, sigma=sigma, scale=scale, rows=rows, xs_pad=xs_pad)


def _targets(feat: _Features, Y: Tensor) -> _Targets:
    """Y (m, t) -> centred target statistics against the standardised features. A target whose
    variance is rounding noise is constant: centred to exactly 0 (its model is all zeros)."""
    ybar = Y.mean(0)
    yc = Y - ybar
    # a constant y leaves y - ybar at ybar's rounding error, ~eps |ybar| in every entry
    constant = (yc * yc).mean(0) <= (16 * torch.finfo(Y.dtype).eps) ** 2 * (Y * Y).mean(0)
    yc = yc.masked_fill(constant, 0)
    q = (yc.T @ feat.X) * (feat.scale / feat.m)  # yc sums to 0, so yc' X~ = yc' X / sigma
    minus = -torch.nn.functional.pad(q, (0, 1)) if feat.xs_pad is None else -yc.T / feat.m
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
