"""Datamodel estimators: linear maps from subset-inclusion masks to model outputs.

Pure torch, on the device of ``masks`` (CPU or GPU). Throughout:

* ``masks``   (m, n) bool: one row per subset model, one column per training point (True = included);
* ``outputs`` (m, t) float: the models' outputs (e.g. margins) on t targets;
* results are in raw inclusion units: ``prediction = bias + masks.float() @ weight``.

Estimators (specs/README.md decision 4, specs/algorithms.md section 2): difference in means (closed
form), ridge (closed form, sklearn ``Ridge`` semantics) and LASSO with a regularisation path and a
per-target lambda chosen on held-out models (our own solver, batched over targets; fast_l1 semantics
with sklearn ``Lasso``'s objective on standardised features).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)
class Datamodel:
    """Linear datamodels of t targets over n training points, in raw inclusion units.

    weight: (n, t); bias: (t,); lam: (t,) the regularisation used per target, or None.
    """

    weight: Tensor
    bias: Tensor
    lam: Tensor | None = None

    def predict(self, masks: Tensor) -> Tensor:
        """masks (k, n) bool -> predicted outputs (k, t)."""
        return self.bias + masks.to(self.weight) @ self.weight


@dataclass(frozen=True, eq=False)
class LassoPath:
    """LASSO solutions along a regularisation path, in raw inclusion units.

    lambdas: (k, t); weight: (k, n, t); bias: (k, t).
    """

    lambdas: Tensor
    weight: Tensor
    bias: Tensor


# ----------------------------------------------------------------------------------------------
# shared helpers


def _as_float(masks: Tensor, outputs: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Validate shapes; masks (m, n) and outputs (m, t) -> float X (m, n), Y (m, t) on masks' device."""
    if masks.ndim != 2 or outputs.ndim != 2 or masks.shape[0] != outputs.shape[0]:
        raise ValueError(
            f"expected masks (m, n) and outputs (m, t), got {tuple(masks.shape)} and {tuple(outputs.shape)}"
        )
    if masks.shape[0] < 2:
        raise ValueError("need at least 2 models")
    return masks.to(masks.device, dtype), outputs.to(masks.device, dtype)


def _chunks(size: int, chunk: int | None) -> list[slice]:
    chunk = size if not chunk else chunk
    return [slice(i, min(i + chunk, size)) for i in range(0, max(size, 1), chunk)]


# ----------------------------------------------------------------------------------------------
# difference in means and ridge


def diff_in_means(
    masks: Tensor, outputs: Tensor, *, dtype: torch.dtype = torch.float32, target_chunk: int | None = 8192
) -> Datamodel:
    """weight[i] = mean output of models with i included - mean of models with i excluded.

    masks (m, n) bool, outputs (m, t) -> Datamodel(weight (n, t), bias (t,), lam=None). A point that is
    in every model or in none gets weight 0. The bias centres the predictions on the fitting models:
    bias = mean(y) - mean(mask) @ weight. With i.i.d. Bernoulli masks each weight is an unbiased
    estimate of the effect of including that point in an additive model.
    """
    X, Y = _as_float(masks, outputs, dtype)
    m = X.shape[0]
    n_in = X.sum(0)
    n_out = m - n_in
    ybar = Y.mean(0)
    # centred outputs sum to zero, so the excluded sum is minus the included sum S and
    # mean_in - mean_out = S / n_in + S / n_out = S * m / (n_in * n_out)
    scale = torch.where((n_in > 0) & (n_out > 0), m / (n_in * n_out).clamp_min(1), torch.zeros_like(n_in))
    weight = torch.cat(
        [(X.T @ (Y[:, s] - ybar[s])) * scale[:, None] for s in _chunks(Y.shape[1], target_chunk)], dim=1
    )
    return Datamodel(weight=weight, bias=ybar - X.mean(0) @ weight, lam=None)


def ridge(masks: Tensor, outputs: Tensor, *, lam: float = 1.0, dtype: torch.dtype = torch.float32) -> Datamodel:
    """Ridge regression for all targets from one Cholesky factorisation.

    masks (m, n) bool, outputs (m, t) -> Datamodel(weight (n, t), bias (t,), lam (t,)). Same solution as
    ``sklearn.linear_model.Ridge(alpha=lam)`` on the raw 0/1 features: minimises
    ||y - b - X w||^2 + lam ||w||^2 with an unpenalised intercept (X and y centred). Factorises the
    n x n primal system, or the m x m dual (kernel) system when there are fewer models than points.
    """
    if not lam > 0:
        raise ValueError(f"ridge needs lam > 0, got {lam}")
    X, Y = _as_float(masks, outputs, dtype)
    m, n = X.shape
    mu, ybar = X.mean(0), Y.mean(0)
    Xc, Yc = X - mu, Y - ybar
    if n <= m:
        A = Xc.T @ Xc
        A.diagonal().add_(lam)
        weight = torch.cholesky_solve(Xc.T @ Yc, torch.linalg.cholesky(A))
    else:  # (Xc'Xc + lam I)^-1 Xc' = Xc' (Xc Xc' + lam I)^-1
        K = Xc @ Xc.T
        K.diagonal().add_(lam)
        weight = Xc.T @ torch.cholesky_solve(Yc, torch.linalg.cholesky(K))
    lam_t = torch.full((Y.shape[1],), float(lam), dtype=dtype, device=X.device)
    return Datamodel(weight=weight, bias=ybar - mu @ weight, lam=lam_t)


# ----------------------------------------------------------------------------------------------
# LASSO: batched accelerated proximal gradient on standardised features
#
# The solver works target-major: theta, q and gradients are (t, n), so dropping converged targets
# selects rows (contiguous copies) and per-target reductions run along contiguous memory.


@dataclass(frozen=True)
class _Features:
    """Standardised design X~ = (X - mu) / sigma over m models, with its least-squares gradient.

    grad(theta (t, n), q (t, n)) = theta X~' X~ / m - q; lipschitz = largest eigenvalue of X~' X~ / m.
    """

    m: int
    mu: Tensor
    sigma: Tensor
    xs: Tensor
    grad: Callable[[Tensor, Tensor], Tensor]
    lipschitz: float


@dataclass(frozen=True)
class _Targets:
    """Centred targets: ybar (t,), q = (y - ybar)' X~ / m (t, n), c0 = ||y - ybar||^2 / 2m (t,)."""

    ybar: Tensor
    q: Tensor
    c0: Tensor

    def take(self, rows: Tensor) -> _Targets:
        return _Targets(ybar=self.ybar[rows], q=self.q[rows], c0=self.c0[rows])


def _features(X: Tensor) -> _Features:
    """X (m, n) float -> standardised features (population std; a constant column gets sigma 1)."""
    m, n = X.shape
    mu = X.mean(0)
    sigma = X.std(0, correction=0)
    sigma = torch.where(sigma > 0, sigma, torch.ones_like(sigma))  # constant column: X~ = 0, weight 0
    xs = (X - mu) / sigma
    # one iteration costs 2mnt flops through X~ or n^2 t through the Gram matrix: take the cheaper
    if 2 * m < n:
        small = xs @ xs.T / m
        xs_t = xs.T

        def grad(theta: Tensor, q: Tensor) -> Tensor:
            return torch.addmm(q, theta @ xs_t, xs, beta=-1, alpha=1 / m)

    else:
        small = gram = xs.T @ xs / m

        def grad(theta: Tensor, q: Tensor) -> Tensor:
            return torch.addmm(q, theta, gram, beta=-1)

    lipschitz = max(_top_eigenvalue(small), 1e-12)
    return _Features(m=m, mu=mu, sigma=sigma, xs=xs, grad=grad, lipschitz=lipschitz)


def _top_eigenvalue(a: Tensor, iters: int = 200) -> float:
    """Upper estimate of the largest eigenvalue of a PSD matrix a (k, k).

    Power iteration (eigvalsh costs seconds at k ~ 1500); it approaches from below, within 0.5%
    after 200 steps on standardised Bernoulli designs, hence the 5% margin.
    """
    v = torch.randn(a.shape[0], 1, generator=torch.Generator().manual_seed(0), dtype=a.dtype).to(a.device)
    for _ in range(iters):
        v = a @ v
        v = v / v.norm().clamp_min(1e-30)
    return 1.05 * float((v * (a @ v)).sum())


def _targets(feat: _Features, Y: Tensor) -> _Targets:
    """Y (m, t) -> centred target statistics against the standardised features."""
    ybar = Y.mean(0)
    yc = Y - ybar
    return _Targets(ybar=ybar, q=yc.T @ feat.xs / feat.m, c0=(yc * yc).sum(0) / (2 * feat.m))


def _to_raw(feat: _Features, tg: _Targets, theta: Tensor) -> tuple[Tensor, Tensor]:
    """theta (t, n) in standardised units -> (weight (n, t), bias (t,)) in raw inclusion units."""
    weight = (theta / feat.sigma).T
    return weight, tg.ybar - feat.mu @ weight


def _soft(x: Tensor, thr: Tensor) -> Tensor:
    """Soft-thresholding of x (t, n) by thr (t, 1), in two passes: x - clamp(x, -thr, thr)."""
    return x - torch.clamp(x, -thr, thr)


def _duality_gap(theta: Tensor, g: Tensor, q: Tensor, c0: Tensor, lam: Tensor) -> Tensor:
    """Duality gap per target (t,) of (1/2m)||yc - X~ theta||^2 + lam ||theta||_1.

    theta, its gradient g = theta H - q, q: (t, n); c0, lam: (t,). sklearn's gap
    (cd_fast.enet_coordinate_descent) divided by m, written in Gram quantities.
    """
    dual_norm = g.abs().amax(1)  # ||X~' r / m||_inf
    const = torch.where(dual_norm > lam, lam / dual_norm.clamp_min(1e-30), torch.ones_like(lam))
    tq = torch.linalg.vecdot(theta, q)
    r2 = (2 * c0 - tq + torch.linalg.vecdot(theta, g)).clamp_min(0)  # ||r||^2 / m
    rty = 2 * c0 - tq  # r' yc / m
    return 0.5 * r2 * (1 + const * const) + lam * theta.abs().sum(1) - const * rty


def _fista(
    feat: _Features,
    tg: _Targets,
    lam: Tensor,
    theta0: Tensor,
    lip0: Tensor | None = None,
    *,
    max_iter: int,
    tol: float,
    check_every: int = 2,
) -> tuple[Tensor, Tensor]:
    """Solve min (1/2m)||yc - X~ theta||^2 + lam ||theta||_1 for every target at once.

    theta0 (t, n) warm start, lam (t,), lip0 (t,) initial curvature estimates (default 1) ->
    (theta (t, n), curvature estimates (t,) to pass to the next solve). FISTA with adaptive
    (gradient) restart and a step size per target. A target stops when its duality gap
    <= tol * ||yc||^2 / m (sklearn's criterion) and leaves the batch, so later iterations multiply
    only the unconverged targets.
    """
    # below ~10 eps the gap is rounding noise (it sums terms of size ||yc||^2 / m), never met
    tol = max(tol, 10 * torch.finfo(theta0.dtype).eps)
    out = theta0.clone()
    # The global Lipschitz constant is several times the curvature on a sparse support, so each
    # target starts with an optimistic one (>= 1, the curvature along any single standardised
    # feature) and raises it when a step shows more curvature. The check is exact and free for a
    # quadratic: a step d from z descends iff d'Hd <= L d'd, and Hd = g(new) - g(z) is known.
    lip = torch.ones_like(lam) if lip0 is None else lip0.clone()
    out_lip = lip.clone()
    rows = torch.arange(out.shape[0], device=out.device)
    q, c0 = tg.q, tg.c0
    theta = theta_prev = theta0
    g = g_prev = feat.grad(theta, q)
    mom = torch.ones_like(lam)
    for it in range(max_iter + 1):
        if it % check_every == 0 or it == max_iter:
            done = _duality_gap(theta, g, q, c0, lam) <= tol * 2 * c0
            if it == max_iter:
                done = torch.ones_like(done)
            n_done = int(done.sum())
            # dropping targets copies the whole state: wait until an eighth of them are done
            if 8 * n_done >= done.numel():
                out[rows[done]] = theta[done]
                out_lip[rows[done]] = lip[done]
                if n_done == done.numel():
                    break
                keep = ~done
                rows, q, c0, lam, mom, lip = rows[keep], q[keep], c0[keep], lam[keep], mom[keep], lip[keep]
                theta, theta_prev, g, g_prev = theta[keep], theta_prev[keep], g[keep], g_prev[keep]
        mom_next = (1 + torch.sqrt(1 + 4 * mom * mom)) / 2
        w = (1 + (mom - 1) / mom_next)[:, None]  # z = theta + (w - 1)(theta - theta_prev)
        z = torch.lerp(theta_prev, theta, w)
        g_z = torch.lerp(g_prev, g, w)  # the gradient is affine: no matmul for z
        new = _soft(torch.addcmul(z, g_z, -1 / lip[:, None]), (lam / lip)[:, None])
        g_new = feat.grad(new, q)
        d = new - z
        curv = torch.linalg.vecdot(d, g_new - g_z)
        dd = torch.linalg.vecdot(d, d)
        bad = curv > lip * dd
        restart = bad | (torch.linalg.vecdot(d, new - theta) < 0)
        mom = torch.where(restart, torch.ones_like(mom), mom_next)
        if bad.any():  # reject those steps: retry from theta without momentum, with a larger L
            lip = torch.where(bad, (1.2 * curv / dd.clamp_min(1e-30)).clamp_max(feat.lipschitz), lip)
            new[bad] = theta[bad]
            g_new[bad] = g[bad]
        theta_prev, theta, g_prev, g = theta, new, g, g_new
    return out, out_lip


def _default_lambdas(tg: _Targets, n_lambdas: int, eps: float) -> Tensor:
    """(k, t) path lam_max * eps^(j / (k - 1)), lam_max = max_i |X~_i' (y - ybar)| / m per target.

    lam_max is the smallest lambda whose solution is all zeros (on standardised features, so it is
    about twice fast_l1's value computed on raw masks).
    """
    lam_max = tg.q.abs().amax(1).clamp_min(torch.finfo(tg.q.dtype).tiny)
    expo = torch.arange(n_lambdas, dtype=tg.q.dtype, device=tg.q.device) / max(n_lambdas - 1, 1)
    return lam_max[None, :] * eps ** expo[:, None]


def _warm_start(theta: Tensor, theta_old: Tensor, lam_old: Tensor, lam: Tensor, lam_new: Tensor) -> Tensor:
    """Start for lam_new (t,) from the solutions theta_old, theta (t, n) at lam_old, lam (t,).

    On a fixed support and signs the LASSO solution is linear in lambda, so extrapolating the last
    two solutions is exact there; coefficients that are zero or that the line carries across zero
    start at zero, where the path leaves them.
    """
    slope = ((lam_new - lam) / (lam - lam_old).clamp_max(-1e-30))[:, None]
    pred = torch.addcmul(theta, theta - theta_old, slope)
    return torch.where(pred * theta > 0, pred, torch.zeros_like(pred))


def _path(feat: _Features, tg: _Targets, lambdas: Tensor, *, max_iter: int, tol: float) -> Iterator[Tensor]:
    """Yield theta (t, n) in standardised units for each row of lambdas (k, t), warm-started."""
    theta = theta_old = torch.zeros_like(tg.q)
    lip = None
    for j, lam in enumerate(lambdas):
        start = _warm_start(theta, theta_old, lambdas[j - 2], lambdas[j - 1], lam) if j >= 2 else theta
        theta_old = theta
        theta, lip = _fista(feat, tg, lam, start, lip, max_iter=max_iter, tol=tol)
        yield theta


def _lambda_grid(lambdas: Tensor | None, tg: _Targets, n_lambdas: int, eps: float) -> Tensor:
    """The (k, t) grid: the default path, or lambdas given as a scalar, (k,) shared or (k, t)."""
    if lambdas is None:
        return _default_lambdas(tg, n_lambdas, eps)
    lambdas = torch.as_tensor(lambdas, dtype=tg.q.dtype, device=tg.q.device)
    if lambdas.ndim == 0:
        lambdas = lambdas[None]
    if lambdas.ndim == 1:
        lambdas = lambdas[:, None]
    return lambdas.expand(lambdas.shape[0], tg.q.shape[0])


def lasso_path(
    masks: Tensor,
    outputs: Tensor,
    *,
    lambdas: Tensor | None = None,
    n_lambdas: int = 20,
    eps: float = 1e-2,
    max_iter: int = 5000,
    tol: float = 1e-4,
    dtype: torch.dtype = torch.float32,
) -> LassoPath:
    """LASSO along a regularisation path, all targets at once, warm-started from lambda to lambda.

    masks (m, n) bool, outputs (m, t). Features are standardised over the m models; each target solves
    sklearn ``Lasso(alpha=lam)``'s problem (1/2m)||y - b - X~ theta||^2 + lam ||theta||_1 with an
    unpenalised b. lambdas: (k,) shared, (k, t) per target, or None for the default path
    lam_max * eps^(j / (n_lambdas - 1)). tol: duality gap relative to ||y - ybar||^2 / m, as sklearn
    (floored at 10 machine epsilons of dtype, below which the gap is rounding noise).
    Returns LassoPath(lambdas (k, t), weight (k, n, t), bias (k, t)) in raw inclusion units.
    """
    X, Y = _as_float(masks, outputs, dtype)
    feat = _features(X)
    tg = _targets(feat, Y)
    grid = _lambda_grid(lambdas, tg, n_lambdas, eps)
    raw = [_to_raw(feat, tg, th) for th in _path(feat, tg, grid, max_iter=max_iter, tol=tol)]
    return LassoPath(lambdas=grid, weight=torch.stack([w for w, _ in raw]), bias=torch.stack([b for _, b in raw]))


def _select_and_refit(
    fit_feat: _Features,
    all_feat: _Features,
    X_val: Tensor,
    Y_fit: Tensor,
    Y_val: Tensor,
    Y_all: Tensor,
    *,
    n_lambdas: int,
    eps: float,
    min_lambdas: int | None,
    max_iter: int,
    tol: float,
) -> Datamodel:
    """Path on the fitting models, lambda per target by validation MSE, refit on all models."""
    tg = _targets(fit_feat, Y_fit)
    grid = _default_lambdas(tg, n_lambdas, eps)
    theta = theta_old = torch.zeros_like(tg.q)
    best_theta = torch.zeros_like(tg.q)  # in the fitting models' standardisation
    best_lam = grid[0].clone()
    best_mse = torch.full_like(tg.c0, math.inf)
    last_mse = torch.full_like(tg.c0, math.inf)
    lip = torch.ones_like(tg.c0)
    alive = torch.arange(tg.c0.shape[0], device=tg.q.device)
    y_val = Y_val.T
    for j, lam in enumerate(grid):
        sub = tg.take(alive)
        start = theta[alive]
        if j >= 2:
            start = _warm_start(start, theta_old[alive], grid[j - 2, alive], grid[j - 1, alive], lam[alive])
        th, lip[alive] = _fista(fit_feat, sub, lam[alive], start, lip[alive], max_iter=max_iter, tol=tol)
        theta_old = theta.clone()
        theta[alive] = th
        w, b = _to_raw(fit_feat, sub, th)
        mse = ((y_val[alive] - b[:, None] - w.T @ X_val.T) ** 2).mean(1)
        better = mse < best_mse[alive]  # strict: ties keep the larger lambda (sparser model)
        best_mse[alive] = torch.where(better, mse, best_mse[alive])
        best_lam[alive] = torch.where(better, lam[alive], best_lam[alive])
        best_theta[alive] = torch.where(better[:, None], th, best_theta[alive])
        rose = mse > last_mse[alive]
        last_mse[alive] = mse
        if min_lambdas is not None and j + 1 >= min_lambdas:
            alive = alive[~rose]
            if alive.numel() == 0:
                break
    all_tg = _targets(all_feat, Y_all)
    # warm start: the selected path solution, re-expressed in the all-model standardisation
    start = best_theta * (all_feat.sigma / fit_feat.sigma)
    theta, _ = _fista(all_feat, all_tg, best_lam, start, lip, max_iter=max_iter, tol=tol)
    weight, bias = _to_raw(all_feat, all_tg, theta)
    return Datamodel(weight=weight, bias=bias, lam=best_lam)


def lasso(
    masks: Tensor,
    outputs: Tensor,
    *,
    n_lambdas: int = 20,
    eps: float = 1e-2,
    val_fraction: float = 0.1,
    seed: int = 0,
    min_lambdas: int | None = 10,
    max_iter: int = 5000,
    tol: float = 1e-4,
    dtype: torch.dtype = torch.float32,
    target_chunk: int | None = None,
) -> Datamodel:
    """LASSO datamodels with a per-target lambda chosen on held-out models (fast_l1 semantics).

    masks (m, n) bool, outputs (m, t) -> Datamodel(weight (n, t), bias (t,), lam (t,)).
    1. split the models at random (``seed``): ``val_fraction`` held out, the rest fit;
    2. standardise features over the fitting models, run the path lam_max * eps^(j / (n_lambdas - 1))
       for all targets at once (see ``lasso_path``);
    3. per target keep the lambda with the lowest validation MSE; once ``min_lambdas`` lambdas are
       done, a target's path stops at the first rise of its validation MSE (fast_l1's rule; None
       runs the whole path);
    4. refit on all m models (standardised over all of them) at each target's lambda;
    5. return weights in raw inclusion units (theta / sigma, bias - mu @ weight).
    ``lam`` is in standardised units (sklearn ``Lasso`` alpha on standardised features).
    target_chunk bounds memory: targets are solved in chunks sharing one standardised design.
    """
    X, Y = _as_float(masks, outputs, dtype)
    m = X.shape[0]
    n_val = round(val_fraction * m)
    if not 1 <= n_val <= m - 2:
        raise ValueError(f"val_fraction={val_fraction} leaves {n_val} of {m} models for validation")
    perm = torch.randperm(m, generator=torch.Generator().manual_seed(seed)).to(X.device)
    val, fit = perm[:n_val], perm[n_val:]
    fit_feat, all_feat = _features(X[fit]), _features(X)
    parts = [
        _select_and_refit(
            fit_feat, all_feat, X[val], Y[fit][:, s], Y[val][:, s], Y[:, s],
            n_lambdas=n_lambdas, eps=eps, min_lambdas=min_lambdas, max_iter=max_iter, tol=tol,
        )
        for s in _chunks(Y.shape[1], target_chunk)
    ]
    return Datamodel(
        weight=torch.cat([p.weight for p in parts], 1),
        bias=torch.cat([p.bias for p in parts]),
        lam=torch.cat([p.lam for p in parts]),
    )


# ----------------------------------------------------------------------------------------------
# linear datamodeling score


def _average_ranks(a: Tensor) -> Tensor:
    """Ranks 1..m down each column of a (m, t), ties sharing their average rank (scipy.rankdata)."""
    rows = a.T.contiguous()
    srt = rows.sort(dim=1).values
    below = torch.searchsorted(srt, rows, right=False)  # values strictly smaller
    upto = torch.searchsorted(srt, rows, right=True)  # values smaller or equal
    return ((below + upto + 1).to(torch.float64) / 2).T


def lds(weight: Tensor, bias: Tensor, masks_heldout: Tensor, outputs_heldout: Tensor) -> Tensor:
    """Linear datamodeling score per target (t,): Spearman correlation across held-out models.

    weight (n, t), bias (t,), masks_heldout (k, n) bool, outputs_heldout (k, t). Correlates the
    predictions bias + mask @ weight with the actual outputs, ranks averaged over ties.
    Degenerate columns: constant actual outputs give NaN (undefined, skipped by ``nanmean``);
    constant predictions (e.g. LASSO chose the all-zero model) give 0, as a predictor with no
    skill, so that averaging does not silently drop the targets an estimator gave up on.
    """
    pred = bias + masks_heldout.to(weight) @ weight
    rp = _average_ranks(pred)
    ra = _average_ranks(outputs_heldout.to(weight.device, torch.float64))
    rp, ra = rp - rp.mean(0), ra - ra.mean(0)
    vp, va = (rp * rp).sum(0), (ra * ra).sum(0)
    rho = (rp * ra).sum(0) / torch.sqrt(vp * va)
    rho = torch.where(vp > 0, rho, torch.zeros_like(rho))
    rho = torch.where(va > 0, rho, torch.full_like(rho, math.nan))
    return rho.to(weight.dtype)
