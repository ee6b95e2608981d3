"""DEL, Deletion by Example Localization: reset the parameters most critical to the forget set to a
fresh random init, then fine-tune only them (plus the whole final layer) on the retain set
(algorithms.md 5.2, decision 6).

Torkzadehmahani, Nasirigerdeh, Kaissis, Rueckert, Dziugaite, Triantafillou, "Improved Localized Machine
Unlearning Through the Lens of Memorization", TMLR 2025. Reference code:
`reihaneh-torkzadehmahani/DEL-Unlearning` (`generate_mask.py`, `unlearn.py`).

1. Criticality (eval mode): s = |sum over forget batches of theta * grad(-mean CE)|; the forget batches
   keep their last partial batch (the reference drops it, decision 6).
2. Channel granularity: a parameter with a channel axis (conv (M, C_out, C_in, k, k), linear
   (M, out, in): channel = axis 1) gives each channel the mean of its top-h scores, h =
   max(1, floor(0.1 * C_out)) as in the reference code (clamped to the entries a channel has); 1-D
   parameters (biases, BatchNorm) keep per-entry scores.
3. Mask: the top `budget` (30 %) of ALL entries of the member, ranked jointly; per member (decision 23).
   Ties at the threshold are broken by position (parameter order, then entry), so the mask holds exactly
   floor(budget * entries) entries.
4. Reset masked entries to a freshly initialized model's values: ctx.make_fresh_model(model indices),
   whose member k is initialized from a seed that depends only on (stage, model index k).
5. Fine-tune on retain: SGD momentum 0.9, cosine annealing per epoch to 0.01 lr; gradients masked
   except for the final layer (`model.head_prefix`), which is fine-tuned whole (its reset follows the
   mask, as the reference's `fc`: every tensor is ranked, the head included). BatchNorm running
   statistics update (train mode), as in the reference. Weight decay: our pretraining's (5e-4); the
   reference's is its pretraining's (0), which we take to be the faithful reading.
On the 64-128-10 MLP one head row is 0.49 % of the entries (0.005 % of a ResNet-18), so a budget of
0.03 resets 3-7 of its 10 rows, and a fresh row lifts a wrong logit on every point (issue 29); with
convolutions and BatchNorm (configs/digits-cnn.yaml) the channels are the reference's unit.
Compute: one forward+backward pass over F for the scores, then `epochs` passes over the retain set:
about epochs / train.epochs of a retraining (digits: 20 epochs = one retraining), whatever the budget;
the study's 32-point grid (configs/digits-study.yaml: 10 or 20 epochs) 24 retrainings per set and model.
Weight decay reaches only the entries that train (StackedSGD masks after adding it); the reference's
torch SGD would also decay the masked-out entries, which its weight decay of 0 never does.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.training.optim import StackedSGD
from pipeline.unlearn.base import MethodOutput, batch_inputs, batch_len, index_batches, per_model_ce
from pipeline.unlearn.hparams import NEEDS as _NEEDS, Del as Config  # torch-free: see hparams.py

NEEDS = _NEEDS["del"]


def named_trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def criticality(ctx, model, forget: np.ndarray, batch_size: int, meter) -> dict[str, torch.Tensor]:
    """|sum over forget batches of theta * d(-L_batch)/d theta| per entry, each member its own."""
    model.eval()
    m = model.n_models
    params = named_trainable(model)
    acc = {n: torch.zeros_like(p) for n, p in params}
    for idx in index_batches(forget, batch_size, None):
        x, y = batch_inputs(ctx.data, idx, m)
        loss = -per_model_ce(model(x), y).mean(1).sum()
        grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
        with torch.no_grad():
            for (n, p), g in zip(params, grads):
                if g is not None:
                    acc[n] += p * g
        meter.train_pass(len(idx))
    return {n: s.abs() for n, s in acc.items()}


def channel_scores(scores: dict[str, torch.Tensor], top_fraction: float) -> dict[str, torch.Tensor]:
    """Every entry of an output channel gets the mean of the channel's top-h scores; 1-D parameters
    (member shape (n,)) keep theirs. Shapes are kept: (M, ...)."""
    out = {}
    for n, s in scores.items():
        if s.dim() <= 2:
            out[n] = s
            continue
        m, c_out = s.shape[:2]
        flat = s.reshape(m, c_out, -1)
        h = min(max(1, math.floor(top_fraction * c_out)), flat.shape[2])
        channel = flat.topk(h, dim=2).values.mean(2)  # (M, C_out)
        out[n] = channel.view(m, c_out, *([1] * (s.dim() - 2))).expand_as(s)
    return out


def top_entries(row: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly k entries of a 1-D score row: the k largest, ties taken in index order."""
    mask = torch.zeros_like(row, dtype=torch.bool)
    if k <= 0:
        return mask
    threshold = torch.kthvalue(row, row.numel() - k + 1).values  # the k-th largest score
    above = row > threshold
    tie = row == threshold
    need = k - int(above.sum())
    return above | (tie & (torch.cumsum(tie.long(), 0) <= need))


def budget_mask(scores: dict[str, torch.Tensor], budget: float, exclude: str | None = None) -> dict[str, torch.Tensor]:
    """Per member, the top floor(budget * entries) entries across all parameters: {name: 0/1 (M, ...)}.
    Parameters whose name starts with `exclude` rank last (the budget still counts their entries)."""
    names = list(scores)
    m = scores[names[0]].shape[0]
    ranked = {n: (torch.full_like(s, -1.0) if exclude and n.startswith(exclude) else s) for n, s in scores.items()}
    flat = torch.cat([ranked[n].reshape(m, -1) for n in names], dim=1)  # (M, N); scores are >= 0
    k = int(budget * flat.shape[1])
    chosen = torch.stack([top_entries(flat[i], k) for i in range(m)])
    out, start = {}, 0
    for n in names:
        size = scores[n][0].numel()
        out[n] = chosen[:, start : start + size].reshape(scores[n].shape).to(scores[n].dtype)
        start += size
    return out


@torch.no_grad()
def reset_masked(model, fresh, masks: dict[str, torch.Tensor]) -> None:
    """theta <- theta (1 - mask) + theta_fresh mask, parameter by parameter."""
    fresh_params = dict(fresh.named_parameters())
    for n, p in named_trainable(model):
        p.copy_(torch.where(masks[n].bool(), fresh_params[n].to(p), p))


def cosine_lr(lr: float, eta_min: float, epoch: int, epochs: int) -> float:
    """torch CosineAnnealingLR(T_max=epochs, eta_min) stepped once per epoch, in closed form."""
    return eta_min + (lr - eta_min) * (1 + math.cos(math.pi * epoch / epochs)) / 2


def finetune_masked(ctx, model, retain: np.ndarray, masks: dict[str, torch.Tensor], cfg: Config, meter) -> None:
    model.train()
    m = model.n_models
    params = named_trainable(model)
    grad_mask = [None if n.startswith(model.head_prefix) else masks[n] for n, _ in params]
    opt = StackedSGD([p for _, p in params], cfg.momentum, cfg.weight_decay)
    for epoch in range(cfg.epochs):
        lr_e = cosine_lr(cfg.lr, cfg.eta_min_fraction * cfg.lr, epoch, cfg.epochs)
        lr = torch.full((m,), lr_e, device=ctx.data.device)
        for idx in ctx.member_batches(retain, cfg.batch_size, "del", "epoch", epoch):
            x, y = batch_inputs(ctx.data, idx, m)
            loss = per_model_ce(model(x), y).mean(1).sum()
            opt.zero_grad()
            loss.backward()
            opt.step(lr, grad_mask=grad_mask)
            meter.train_pass(batch_len(idx))


def run(ctx, model, forget, retain, cfg: Config, meter) -> MethodOutput:
    if ctx.make_fresh_model is None:
        raise RuntimeError("del needs ctx.make_fresh_model (a fresh init of the architecture)")
    scores = channel_scores(criticality(ctx, model, np.asarray(forget), cfg.forget_batch_size, meter),
                            cfg.top_fraction)
    masks = budget_mask(scores, cfg.budget, None if cfg.reset_head else model.head_prefix)
    reset_masked(model, ctx.make_fresh_model(list(ctx.model_indices)), masks)
    finetune_masked(ctx, model, np.asarray(retain), masks, cfg, meter)
    n_entries = sum(v[0].numel() for v in masks.values())
    n_masked = sum(v.flatten(1).sum(1) for v in masks.values())
    return MethodOutput(model=model, notes={"masked_entries": n_masked.tolist(), "entries": n_entries})
