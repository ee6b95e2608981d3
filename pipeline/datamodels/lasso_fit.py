"""LASSO datamodels: the entry points (``lasso``, ``lasso_path``, ``lasso_design``) and the CPU
solver's glue (compiled coordinate descent with covariance updates, target by target: ``lasso_cd``).

fast_l1 semantics with sklearn ``Lasso``'s objective on standardised features (``lasso_problem``); on
GPUs and for designs too large for a Gram matrix the batched FISTA solver (``lasso_fista``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pipeline.datamodels import lasso_cd, lasso_problem
from pipeline.datamodels.common import MODEL_BATCH, Datamodel, Masks, _check, _chunks
from pipeline.datamodels.lasso_fista import _path, _select_and_refit
from pipeline.datamodels.lasso_problem import (
    _default_lambdas, _features, _Features, _lambda_grid, _moments, _targets, _Targets, _to_raw,
)


@dataclass(frozen=True, eq=False)
class LassoPath:
    """LASSO solutions along a regularisation path, in raw inclusion units.

    lambdas: (k, t); weight: (k, n, t); bias: (k, t).
    """

    lambdas: Tensor
    weight: Tensor
    bias: Tensor


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
    solver: str = "auto",
    model_batch: int | None = MODEL_BATCH,
) -> LassoPath:
    """LASSO along a regularisation path, all targets at once, warm-started from lambda to lambda.

    masks (m, n) bool, outputs (m, t). Features are standardised over the m models; each target solves
    sklearn ``Lasso(alpha=lam)``'s problem (1/2m)||y - b - X~ theta||^2 + lam ||theta||_1 with an
    unpenalised b. lambdas: (k,) shared, (k, t) per target, or None for the default path
    lam_max * eps^(j / (n_lambdas - 1)). tol: duality gap relative to ||y - ybar||^2 / m, as sklearn
    (floored at 10 machine epsilons of dtype, below which the gap is rounding noise). solver: see
    ``lasso``. Returns LassoPath(lambdas (k, t), weight (k, n, t), bias (k, t)) in raw inclusion units.
    model_batch: models per float batch of the masks (``Masks``).
    """
    Y = _check(masks, outputs, dtype)
    feat = _features(Masks(masks, None, model_batch), dtype=dtype)
    tg = _targets(feat, Y)
    grid = _lambda_grid(lambdas, tg, n_lambdas, eps)
    path = _path_cd if _solver(solver, feat) == "cd" else _path
    raw = [_to_raw(feat, tg, th) for th in path(feat, tg, grid, max_iter=max_iter, tol=tol)]
    return LassoPath(lambdas=grid, weight=torch.stack([w for w, _ in raw]), bias=torch.stack([b for _, b in raw]))


def _solver(solver: str, feat: _Features) -> str:
    """The solver that runs: "auto" is "cd" on the CPU with a Gram matrix, else "fista"."""
    fits_cd = feat.X.device.type == "cpu" and feat.rows is not None
    if solver == "auto":
        return "cd" if fits_cd else "fista"
    if solver == "cd" and not fits_cd:
        raise ValueError(f"solver 'cd' runs on the CPU with at most {lasso_problem.GRAM_MAX_FEATURES} training points; "
                         f"got device {feat.X.device.type} and {feat.X.n} points (use 'fista' or 'auto')")
    if solver not in ("cd", "fista"):
        raise ValueError(f"unknown LASSO solver {solver!r}; valid: auto, cd, fista")
    return solver


def _gram(feat: _Features) -> np.ndarray:
    """H (n, n) as a contiguous NumPy array."""
    return np.ascontiguousarray(feat.rows[:, :-1].numpy())


def _cd_tol(tol: float, dtype: torch.dtype) -> float:
    return max(tol, 10 * torch.finfo(dtype).eps)


def _path_cd(feat: _Features, tg: _Targets, grid: Tensor, *, max_iter: int, tol: float) -> Tensor:
    """``_path`` by coordinate descent: theta (k, t, n) at every lambda of grid (k, t)."""
    k, t = grid.shape
    H, Q, C0 = _gram(feat), tg.q.contiguous().numpy(), tg.c0.numpy()
    out = np.zeros((k, t, H.shape[0]), H.dtype)
    grid_np, tol = grid.contiguous().numpy(), _cd_tol(tol, grid.dtype)
    lasso_cd.over_targets(
        lambda lo, hi: lasso_cd.path_targets(H, Q, C0, grid_np, tol, max_iter, lo, hi, out), t, torch.get_num_threads()
    )
    return torch.from_numpy(out)


def _select_and_refit_cd(
    design: "LassoDesign",
    Y_fit: Tensor,
    Y_val: Tensor,
    Y_all: Tensor,
    *,
    n_lambdas: int,
    eps: float,
    min_lambdas: int | None,
    max_iter: int,
    tol: float,
    path_tol: float | None = None,
    patience: int = 1,
    threads: int | None = None,
) -> Datamodel:
    """``_select_and_refit`` by coordinate descent, target by target, over threads threads."""
    fit_feat, all_feat = design.fit_feat, design.all_feat
    tg, all_tg = _targets(fit_feat, Y_fit), _targets(all_feat, Y_all)
    grid = _default_lambdas(tg, n_lambdas, eps).contiguous()
    t, n = tg.q.shape
    H_fit, H_all, xv_t, ratio = design.cd_arrays()
    yv = (Y_val - tg.ybar).contiguous().numpy()
    q_fit, q_all = tg.q.contiguous().numpy(), all_tg.q.contiguous().numpy()
    c0_fit, c0_all, grid_np = tg.c0.numpy(), all_tg.c0.numpy(), grid.numpy()
    theta, lam = np.zeros((t, n), H_fit.dtype), np.zeros(t, H_fit.dtype)
    tol, path_tol = _cd_tol(tol, grid.dtype), _cd_tol(tol if path_tol is None else path_tol, grid.dtype)

    def run(lo: int, hi: int) -> np.ndarray:
        return lasso_cd.select_refit_targets(
            H_fit, q_fit, c0_fit, grid_np, xv_t, yv, -1 if min_lambdas is None else min_lambdas, patience, H_all,
            q_all, c0_all, ratio, tol, path_tol, max_iter, lo, hi, theta, lam,
        )

    lasso_cd.over_targets(run, t, threads or torch.get_num_threads())
    weight, bias = _to_raw(all_feat, all_tg, torch.from_numpy(theta))
    return Datamodel(weight=weight, bias=bias, lam=torch.from_numpy(lam))


@dataclass(eq=False)
class LassoDesign:
    """What ``lasso`` derives from the masks alone, to share between calls on the same masks (the
    margins and every class's logits of a fit task): the split of the models into fitting and
    validation models, the standardised features of the fitting models and of all models (their
    Gram matrices, the costly part: O(m n^2)), and for the CPU solver their NumPy copies. Build it
    with ``lasso_design``; ``lasso(..., design=d)`` gives the same bits as ``lasso`` without it."""

    shape: tuple[int, int]
    val_fraction: float
    seed: int
    dtype: torch.dtype
    fit: Tensor
    val: Tensor
    X_val: Masks
    fit_feat: _Features
    all_feat: _Features
    _cd: tuple | None = None

    def cd_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(H_fit, H_all, the validation models' standardised design transposed (n, v), sigma_all /
        sigma_fit) as NumPy arrays for ``lasso_cd``, made once."""
        if self._cd is None:
            fit_feat, all_feat = self.fit_feat, self.all_feat
            xv_t = fit_feat.mu.new_empty(self.X_val.n, self.X_val.m)
            for rows, x in self.X_val.batches(self.dtype):
                xv_t[:, rows] = ((x - fit_feat.mu) / fit_feat.sigma).T
            xv_t = xv_t.numpy()
            self._cd = (_gram(fit_feat), _gram(all_feat), xv_t, (all_feat.sigma / fit_feat.sigma).numpy())
        return self._cd


def lasso_design(
    masks: Tensor,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    model_batch: int | None = MODEL_BATCH,
) -> LassoDesign:
    """The masks' share of ``lasso`` (see ``LassoDesign``), for several calls on the same masks. The
    masks stay as they are (bool): the Gram matrices are sums of model batches' products, exact
    integers, so model_batch does not change their bits (see ``_moments``)."""
    if masks.ndim != 2 or masks.shape[0] < 2:
        raise ValueError(f"expected masks (m, n) with m >= 2, got {tuple(masks.shape)}")
    X = Masks(masks, None, model_batch)
    m = X.m
    n_val = round(val_fraction * m)
    if not 1 <= n_val <= m - 2:
        raise ValueError(f"val_fraction={val_fraction} leaves {n_val} of {m} models for validation")
    perm = torch.randperm(m, generator=torch.Generator().manual_seed(seed)).to(X.device)
    val, fit = perm[:n_val], perm[n_val:]
    X_fit, X_val = X.take(fit), X.take(val)
    fit_moments, val_moments = _moments(X_fit, dtype), _moments(X_val, dtype)
    fit_feat = _features(X_fit, fit_moments, dtype)
    all_feat = _features(X, (fit_moments[0] + val_moments[0], fit_moments[1] + val_moments[1]), dtype)
    return LassoDesign(shape=tuple(masks.shape), val_fraction=val_fraction, seed=seed, dtype=dtype, fit=fit, val=val,
                       X_val=X_val, fit_feat=fit_feat, all_feat=all_feat)


def lasso(
    masks: Tensor,
    outputs: Tensor,
    *,
    n_lambdas: int = 20,
    eps: float = 1e-2,
    val_fraction: float = 0.1,
    seed: int = 0,
    min_lambdas: int | None = 10,
    patience: int = 1,
    max_iter: int = 5000,
    tol: float = 1e-4,
    path_tol: float | None = None,
    dtype: torch.dtype = torch.float32,
    target_chunk: int | None = None,
    solver: str = "auto",
    threads: int | None = None,
    design: LassoDesign | None = None,
    model_batch: int | None = MODEL_BATCH,
) -> Datamodel:
    """LASSO datamodels with a per-target lambda chosen on held-out models (fast_l1 semantics).

    masks (m, n) bool, outputs (m, t) -> Datamodel(weight (n, t), bias (t,), lam (t,)).
    1. split the models at random (``seed``): ``val_fraction`` held out, the rest fit;
    2. standardise features over the fitting models, run the path lam_max * eps^(j / (n_lambdas - 1))
       for all targets at once (see ``lasso_path``);
    3. per target keep the lambda with the lowest validation MSE; once ``min_lambdas`` lambdas are
       done, a target's path stops at the ``patience``-th rise in a row of its validation MSE
       (patience 1: the first rise, fast_l1's rule; None runs the whole path);
    4. refit on all m models (standardised over all of them) at each target's lambda;
    5. return weights in raw inclusion units (theta / sigma, bias - mu @ weight).
    path_tol: the relative duality gap of the path's solutions (None: tol). They only score lambdas on
    the validation models and warm-start what follows; the refit, which is the model returned, is
    solved to tol whatever path_tol is. On the digits default's real targets 1e-2 against tol 1e-3 ran
    2.5x faster with the same LDS (0.4376 vs 0.4368) and the same lambda for 93 % of the datamodels.
    ``lam`` is in standardised units (sklearn ``Lasso`` alpha on standardised features).
    solver: "cd", compiled coordinate descent (covariance updates), one target at a time over
    ``torch.get_num_threads()`` threads (``lasso_cd``; CPU, up to GRAM_MAX_FEATURES points);
    "fista", the batched torch solver above (any device, any size); "auto": cd where it applies.
    Both stop on the same duality gap; max_iter counts sweeps (cd, as sklearn) or steps (fista).
    threads: cd's threads (default ``torch.get_num_threads()``); they do not change its results.
    Memory (``pipeline.datamodels.memory`` counts it): the masks as given (bool) and one (model_batch, n)
    float buffer at a time; up to GRAM_MAX_FEATURES points two n x n Gram matrices (fitting and all
    models; the cd solver adds their NumPy copies and the validation models' standardised design,
    n x val_fraction m), beyond them no Gram matrix: products go through the masks, batch by batch; and
    a few (t, n) arrays, which target_chunk bounds (chunks share the designs).
    design: ``lasso_design(masks, val_fraction=..., seed=..., dtype=..., model_batch=...)`` made once
    for several calls on the same masks (the split, both Gram matrices); the same results as without it.
    model_batch: models per float batch of the masks (``Masks``), when no design is given.
    """
    Y = _check(masks, outputs, dtype)
    shape = tuple(masks.shape)
    if design is None:
        design = lasso_design(masks, val_fraction=val_fraction, seed=seed, dtype=dtype, model_batch=model_batch)
    elif (design.shape, design.val_fraction, design.seed, design.dtype) != (shape, val_fraction, seed, dtype):
        raise ValueError(f"the design was made for masks {design.shape}, val_fraction {design.val_fraction}, seed "
                         f"{design.seed}, {design.dtype}; this call has {shape}, {val_fraction}, {seed}, {dtype}")
    fit, val = design.fit, design.val
    if _solver(solver, design.fit_feat) == "cd":
        select_and_refit = functools.partial(_select_and_refit_cd, design, threads=threads)
    else:
        select_and_refit = functools.partial(_select_and_refit, design.fit_feat, design.all_feat, design.X_val)
    parts = [
        select_and_refit(
            Y[fit][:, s], Y[val][:, s], Y[:, s],
            n_lambdas=n_lambdas, eps=eps, min_lambdas=min_lambdas, patience=patience, max_iter=max_iter, tol=tol,
            path_tol=path_tol,
        )
        for s in _chunks(Y.shape[1], target_chunk)
    ]
    return Datamodel(
        weight=torch.cat([p.weight for p in parts], 1),
        bias=torch.cat([p.bias for p in parts]),
        lam=torch.cat([p.lam for p in parts]),
    )
