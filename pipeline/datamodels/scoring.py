"""The linear datamodeling score (LDS): Spearman correlation across held-out models, per target."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pipeline.datamodels.common import MODEL_BATCH, predict


def _average_ranks(a: Tensor) -> Tensor:
    """Ranks 1..m down each column of a (m, t), ties sharing their average rank (scipy.rankdata)."""
    rows = a.T.contiguous()
    srt = rows.sort(dim=1).values
    below = torch.searchsorted(srt, rows, right=False)  # values strictly smaller
    upto = torch.searchsorted(srt, rows, right=True)  # values smaller or equal
    return ((below + upto + 1).to(torch.float64) / 2).T


def lds(
    weight: Tensor, bias: Tensor, masks_heldout: Tensor, outputs_heldout: Tensor, model_batch: int | None = MODEL_BATCH
) -> Tensor:
    """Linear datamodeling score per target (t,): Spearman correlation across held-out models.

    weight (n, t), bias (t,), masks_heldout (k, n) bool, outputs_heldout (k, t). Correlates the
    predictions bias + mask @ weight with the actual outputs, ranks averaged over ties.
    Degenerate columns: constant actual outputs give NaN (undefined, skipped by ``nanmean``);
    constant predictions (e.g. LASSO chose the all-zero model) give 0, as a predictor with no
    skill, so that averaging does not silently drop the targets an estimator gave up on.
    The predictions are made model_batch held-out models at a time (``predict``).
    """
    pred = predict(weight, bias, masks_heldout, model_batch)
    rp = _average_ranks(pred)
    ra = _average_ranks(outputs_heldout.to(weight.device, torch.float64))
    rp, ra = rp - rp.mean(0), ra - ra.mean(0)
    vp, va = (rp * rp).sum(0), (ra * ra).sum(0)
    rho = (rp * ra).sum(0) / torch.sqrt(vp * va)
    rho = torch.where(vp > 0, rho, torch.zeros_like(rho))
    rho = torch.where(va > 0, rho, torch.full_like(rho, math.nan))
    return rho.to(weight.dtype)
