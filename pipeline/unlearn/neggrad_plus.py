"""NegGrad+: descend on the retain set while ascending on the forget set, in one loss per step
(algorithms.md section 8, decision 9).

As in the DEL repository (`reihaneh-torkzadehmahani/DEL-Unlearning`, `unlearn.py::fine_tune_epoch`,
grad_mode 'negrad+'; introduced by Kurmanji et al., "Towards Unbounded Machine Unlearning", NeurIPS 2023):
each step pairs a retain batch with the next forget batch (the forget batches cycle within an epoch,
reshuffled each epoch, as `zip(retain_dl, cycle(forget_dl))`) and minimizes
    retain_weight * CE(retain batch) - forget_weight * CE(forget batch)
with SGD (momentum 0.9, weight decay 0, constant lr), model in train mode. The spec gives no lr or
epoch count for it; the defaults are a starting point for the grid (decision 9).
"""

import itertools

import numpy as np
import torch

from pipeline.training.optim import StackedSGD
from pipeline.unlearn.base import MethodOutput, batch_inputs, batch_len, per_model_ce
from pipeline.unlearn.hparams import NEEDS as _NEEDS, NeggradPlus as Config  # torch-free: see hparams.py

NEEDS = _NEEDS["neggrad_plus"]


def run(ctx, model, forget, retain, cfg: Config, meter) -> MethodOutput:
    forget, retain = np.asarray(forget), np.asarray(retain)
    model.train()
    m = model.n_models
    opt = StackedSGD(model.parameters(), cfg.momentum, cfg.weight_decay)
    lr = torch.full((m,), cfg.lr, device=ctx.data.device)
    for epoch in range(cfg.epochs):
        retain_batches = ctx.member_batches(retain, cfg.batch_size, "neggrad_plus", "retain", epoch)
        forget_batches = ctx.member_batches(forget, cfg.forget_batch_size, "neggrad_plus", "forget", epoch)
        for r_idx, f_idx in zip(retain_batches, itertools.cycle(forget_batches)):
            x_r, y_r = batch_inputs(ctx.data, r_idx, m)
            x_f, y_f = batch_inputs(ctx.data, f_idx, m)
            ce_r = per_model_ce(model(x_r), y_r).mean(1)
            ce_f = per_model_ce(model(x_f), y_f).mean(1)
            loss = (cfg.retain_weight * ce_r - cfg.forget_weight * ce_f).sum()
            opt.zero_grad()
            loss.backward()
            opt.step(lr)
            meter.train_pass(batch_len(r_idx) + batch_len(f_idx))
    return MethodOutput(model=model)
