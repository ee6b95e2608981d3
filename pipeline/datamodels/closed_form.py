"""Closed-form datamodels: difference in means (the default) and ridge (sklearn ``Ridge`` semantics).

Pure torch, on the device of ``masks`` (specs/README.md decision 4, specs/algorithms.md section 2).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.datamodels.common import Datamodel, _as_float, _chunks


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
