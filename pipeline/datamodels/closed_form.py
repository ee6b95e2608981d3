"""Closed-form datamodels: difference in means (the default) and ridge (sklearn ``Ridge`` semantics).

Pure torch, on the device of ``masks`` (specs/README.md decision 4, specs/algorithms.md section 2).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.datamodels.common import MODEL_BATCH, Datamodel, Masks, _add, _check, _chunks, accumulate


def diff_in_means(
    masks: Tensor,
    outputs: Tensor,
    *,
    dtype: torch.dtype = torch.float32,
    target_chunk: int | None = 8192,
    model_batch: int | None = MODEL_BATCH,
) -> Datamodel:
    """weight[i] = mean output of models with i included - mean of models with i excluded.

    masks (m, n) bool, outputs (m, t) -> Datamodel(weight (n, t), bias (t,), lam=None). A point that is
    in every model or in none gets weight 0. The bias centres the predictions on the fitting models:
    bias = mean(y) - mean(mask) @ weight. With i.i.d. Bernoulli masks each weight is an unbiased
    estimate of the effect of including that point in an additive model. The masks are read
    model_batch models at a time (``Masks``): one (model_batch, n) float buffer beside the result.
    """
    Y = _check(masks, outputs, dtype)
    X = Masks(masks, None, model_batch)
    m = X.m
    n_in = X.counts(dtype)
    n_out = m - n_in
    ybar = Y.mean(0)
    # centred outputs sum to zero, so the excluded sum is minus the included sum S and
    # mean_in - mean_out = S / n_in + S / n_out = S * m / (n_in * n_out)
    scale = torch.where((n_in > 0) & (n_out > 0), m / (n_in * n_out).clamp_min(1), torch.zeros_like(n_in))
    parts = []
    for s in _chunks(Y.shape[1], target_chunk):
        yc = Y[:, s] - ybar[s]
        parts.append(accumulate(x.T @ yc[rows] for rows, x in X.batches(dtype)) * scale[:, None])
    weight = torch.cat(parts, dim=1)
    return Datamodel(weight=weight, bias=ybar - (n_in / m) @ weight, lam=None)


def ridge(
    masks: Tensor,
    outputs: Tensor,
    *,
    lam: float = 1.0,
    dtype: torch.dtype = torch.float32,
    model_batch: int | None = MODEL_BATCH,
) -> Datamodel:
    """Ridge regression for all targets from one Cholesky factorisation.

    masks (m, n) bool, outputs (m, t) -> Datamodel(weight (n, t), bias (t,), lam (t,)). Same solution as
    ``sklearn.linear_model.Ridge(alpha=lam)`` on the raw 0/1 features: minimises
    ||y - b - X w||^2 + lam ||w||^2 with an unpenalised intercept (X and y centred). Factorises the
    n x n primal system, or the m x m dual (kernel) system when there are fewer models than points:
    that system, min(m, n)^2 floats, is ridge's own memory; the masks are read model_batch models at a
    time (products of centred float batches, two buffers for the dual's blocks).
    """
    if not lam > 0:
        raise ValueError(f"ridge needs lam > 0, got {lam}")
    Y = _check(masks, outputs, dtype)
    X = Masks(masks, None, model_batch)
    m, n = X.m, X.n
    mu, ybar = X.counts(dtype) / m, Y.mean(0)
    Yc = Y - ybar
    if n <= m:
        A = B = None
        for rows, x in X.batches(dtype):
            xc = x.sub_(mu)
            A, B = _add(A, xc.T @ xc), _add(B, xc.T @ Yc[rows])
        A.diagonal().add_(lam)
        weight = torch.cholesky_solve(B, torch.linalg.cholesky(A))
    else:  # (Xc'Xc + lam I)^-1 Xc' = Xc' (Xc Xc' + lam I)^-1
        K = _centred_kernel(X, mu, dtype)
        K.diagonal().add_(lam)
        alpha = torch.cholesky_solve(Yc, torch.linalg.cholesky(K))
        weight = accumulate(x.sub_(mu).T @ alpha[rows] for rows, x in X.batches(dtype))
    lam_t = torch.full((Y.shape[1],), float(lam), dtype=dtype, device=X.device)
    return Datamodel(weight=weight, bias=ybar - mu @ weight, lam=lam_t)


def _centred_kernel(X: Masks, mu: Tensor, dtype: torch.dtype) -> Tensor:
    """Xc Xc' (m, m) for the centred masks Xc = X - mu, block by block of model batches."""
    if len(X.spans()) == 1:
        _, x = next(X.batches(dtype))
        xc = x.sub_(mu)
        return xc @ xc.T
    K = torch.empty(X.m, X.m, dtype=dtype, device=X.device)
    for rows, x in X.batches(dtype):
        xc = x.sub_(mu)
        for cols, y in X.batches(dtype):
            K[rows, cols] = xc @ y.sub_(mu).T
    return K
