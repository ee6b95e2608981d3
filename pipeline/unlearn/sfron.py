"""SFR-on: Saliency Forgetting in the Remain-preserving manifold, online (algorithms.md 6.2, decision 7).

Huang, Cheng, Zheng, Wang, He, Li, Huang, "Unified Gradient-Based Machine Unlearning with Remain
Geometry Enhancement", NeurIPS 2024. The paper's equations were not available; this follows the
official code `K1nght/Unified-Unlearning-w-Remain-Geometry`, `Classification/unlearn/sfron.py`:

1. Saliency mask, once, eval mode: diagonal empirical Fishers F_f, F_r = mean over forget (resp. all
   retain) batches of the squared gradient of the batch-mean CE; M = [(F_f + 1e-15)/(F_r + 1e-15) >= gamma].
   Both from batches of b = min(fisher_batch_size, |F|) points, as the reference's (128 and 128 there,
   with |F| = 5,000): the squared batch-mean gradient shrinks as the batch grows, so a forget Fisher
   from one batch of |F| points against a retain Fisher from batches of 256 marked 49-86 % of the
   entries salient on digits (issue 29); with equal batches 27 % on class3-40 and 80 % on the atypical
   set, whose points the models fit only by memorizing them (bench/RESULTS.md, "Method study").
2. One SGD (lr 0.01, momentum 0.9, wd 5e-4) for ascent and descent steps, lr cosine-annealed over
   n_iters iterations (to 0).
3. Iteration t: every forget_freq-th iteration a masked ascent step on a forget batch with the loss
   -alpha_t mean_i(w_i l_i), w_i = B l_i^-lambda / sum_j l_j^-lambda (detached; the reference's
   `AdaptiveLoss`, with its 1e-15 guard), alpha_t = alpha0 (1 + cos(pi t / T)) / 2, the gradient
   multiplied by M and clipped to a global norm of max_norm (per member, decision 23); then, every
   iteration, a plain descent step on a retain batch. Both in train mode. The reference's slow-weight
   merge has beta = 1 and is a no-op; it is left out.
   The ascent step is the shared SGD's step (`reference_step: true`, the default): the entries outside
   the mask have no gradient but still move by their momentum left over from descent steps and by weight
   decay. `reference_step: false` leaves them (value and momentum buffer) exactly as they are.
Batches cycle through reshuffled passes of each set (the reference's `cycle(DataLoader(shuffle=True))`).

max_norm 7 was set for ResNet-18's 11.2 M parameters; a global gradient norm grows about as the square
root of the parameter count, so the digits grids add 7 sqrt(P / 11.2 M) (0.34 for the 64-128-10 MLP's
26 k, see configs/digits.yaml); the notes record each member's median ascent norm before clipping.
Compute: the Fisher passes over F and the retain set (one pass each, whatever b), then one pass per
ascent and descent example; forget_alpha and max_norm do not change it: on digits (batch 64) a point
costs 0.15 of a retraining at 40 iterations, 0.36 at 120, the retain Fisher a third of the former; the
study's 20-point grid (configs/digits-study.yaml) 5.1 retrainings per set and model.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.training.optim import StackedSGD, clip_grad_norm_per_model
from pipeline.unlearn.base import (
    MethodOutput, batch_inputs, batch_len, member_params, per_model_ce,
)
from pipeline.unlearn.hparams import NEEDS as _NEEDS, Sfron as Config  # torch-free: see hparams.py

NEEDS = _NEEDS["sfron"]


def cycle_batches(ctx, indices: np.ndarray, batch_size: int, tag: str):
    """Endless batches: one reshuffled pass after another."""
    epoch = 0
    while True:
        yield from ctx.member_batches(indices, batch_size, "sfron", tag, epoch)
        epoch += 1


def fisher_diagonal(ctx, model, indices: np.ndarray, batch_size: int, meter, tag: str) -> list[torch.Tensor]:
    """Mean over batches of the squared gradient of the batch-mean CE, per member: [(M, ...)]."""
    model.eval()
    m = model.n_models
    params = member_params(model)
    acc = [torch.zeros_like(p) for p in params]
    batches = ctx.member_batches(indices, batch_size, "sfron", "fisher", tag)
    for idx in batches:
        x, y = batch_inputs(ctx.data, idx, m)
        grads = torch.autograd.grad(per_model_ce(model(x), y).mean(1).sum(), params, allow_unused=True)
        for a, g in zip(acc, grads):
            if g is not None:
                a.add_(g.detach().pow(2) / len(batches))
        meter.train_pass(batch_len(idx))
    return acc


def fisher_batch(cfg: Config, forget) -> int:
    """The batch size of both Fishers: fisher_batch_size, at most |F| (equal batches, see 1.)."""
    return max(1, min(cfg.fisher_batch_size, len(forget)))


def saliency_mask(ctx, model, forget, retain, cfg: Config, meter) -> list[torch.Tensor]:
    """0/1 tensors aligned with member_params(model): [(F_f + eps)/(F_r + eps) >= gamma]."""
    b = fisher_batch(cfg, forget)
    f_forget = fisher_diagonal(ctx, model, forget, b, meter, "forget")
    f_retain = fisher_diagonal(ctx, model, retain, b, meter, "retain")
    return [((ff + 1e-15) / (fr + 1e-15) >= cfg.gamma).to(ff.dtype) for ff, fr in zip(f_forget, f_retain)]


@torch.no_grad()
def masked_sgd_step(opt: StackedSGD, lr: torch.Tensor, masks: list[torch.Tensor]) -> None:
    """SGD step (momentum, weight decay) on the masked entries only; the others keep value and buffer."""
    for p, buf, mask in zip(opt.params, opt.buffers, masks):
        if p.grad is None:
            continue
        shape = (-1,) + (1,) * (p.dim() - 1)
        new_buf = opt.momentum * buf + p.grad + opt.weight_decay * p
        new_p = p - lr.view(shape) * new_buf
        keep = mask.bool()
        buf.copy_(torch.where(keep, new_buf, buf))
        p.copy_(torch.where(keep, new_p, p))


def adaptive_weights(losses: torch.Tensor, lambd: float) -> torch.Tensor:
    """w_i = B l_i^-lambda / sum_j l_j^-lambda per member, detached: (M, B)."""
    coef = 1.0 / (losses.detach().pow(lambd) + 1e-15)
    return coef / coef.sum(1, keepdim=True) * losses.shape[1]


def ascent_step(model, opt: StackedSGD, masks, x, y, alpha: float, lr: torch.Tensor, cfg: Config) -> torch.Tensor:
    """One masked, loss-weighted ascent step; returns each member's gradient norm before clipping."""
    losses = per_model_ce(model(x), y)  # (M, B)
    loss = -(alpha * (adaptive_weights(losses, cfg.lambd) * losses).mean(1)).sum()
    opt.zero_grad()
    loss.backward()
    with torch.no_grad():
        for p, mask in zip(opt.params, masks):
            if p.grad is not None:
                p.grad.mul_(mask)
    norms = clip_grad_norm_per_model(opt.params, cfg.max_norm)
    if cfg.reference_step:
        opt.step(lr)
    else:
        masked_sgd_step(opt, lr, masks)
    return norms


def descent_step(model, opt: StackedSGD, x, y, lr: torch.Tensor) -> None:
    loss = per_model_ce(model(x), y).mean(1).sum()
    opt.zero_grad()
    loss.backward()
    opt.step(lr)


def run(ctx, model, forget, retain, cfg: Config, meter) -> MethodOutput:
    forget, retain = np.asarray(forget), np.asarray(retain)
    masks = saliency_mask(ctx, model, forget, retain, cfg, meter)
    m, dev, T = model.n_models, ctx.data.device, cfg.n_iters
    opt = StackedSGD(member_params(model), cfg.momentum, cfg.weight_decay)
    forget_batches = cycle_batches(ctx, forget, cfg.batch_size, "forget")
    retain_batches = cycle_batches(ctx, retain, cfg.batch_size, "retain")
    model.train()
    norms = []
    for t in range(T):
        decay = (1 + math.cos(math.pi * t / T)) / 2  # CosineAnnealingLR(T_max=T), closed form
        lr = torch.full((m,), cfg.lr * decay, device=dev)
        if t % cfg.forget_freq == 0:
            idx = next(forget_batches)
            x, y = batch_inputs(ctx.data, idx, m)
            norms.append(ascent_step(model, opt, masks, x, y, cfg.forget_alpha * decay, lr, cfg))
            meter.train_pass(batch_len(idx))
        idx = next(retain_batches)
        x, y = batch_inputs(ctx.data, idx, m)
        descent_step(model, opt, x, y, lr)
        meter.train_pass(batch_len(idx))
    saliency = sum(mk.flatten(1).sum(1) for mk in masks) / sum(mk[0].numel() for mk in masks)
    notes = {"mask_fraction": saliency.tolist(), "fisher_batch": fisher_batch(cfg, forget),
             "ascent_norm_median": torch.stack(norms).median(0).values.tolist() if norms else None}
    return MethodOutput(model=model, notes=notes)
