"""finetune (FT; "GD" in the DMM code): continue training on the retain set with SGD
(algorithms.md section 8: momentum 0.9, wd 5e-4, lr 1e-3..1e-4, 3-5 epochs, batch 64, constant lr in
the DMM code; the SFR-on repository anneals it with a cosine over the epochs, `schedule: cosine`)."""

import math

import torch

from pipeline.training.optim import StackedSGD
from pipeline.unlearn.base import MethodOutput, batch_inputs, batch_len, per_model_ce
from pipeline.unlearn.hparams import NEEDS as _NEEDS, Finetune as Config  # torch-free: see hparams.py

NEEDS = _NEEDS["finetune"]


def run(ctx, model, forget, retain, cfg: Config, meter) -> MethodOutput:
    model.train()
    m = model.n_models
    opt = StackedSGD(model.parameters(), cfg.momentum, cfg.weight_decay)
    steps = cfg.epochs * math.ceil(len(retain) / cfg.batch_size)
    step = 0
    for epoch in range(cfg.epochs):
        for idx in ctx.member_batches(retain, cfg.batch_size, "finetune", epoch):
            scale = 0.5 * (1 + math.cos(math.pi * step / steps)) if cfg.schedule == "cosine" else 1.0
            x, y = batch_inputs(ctx.data, idx, m)
            loss = per_model_ce(model(x), y).mean(1).sum()
            opt.zero_grad()
            loss.backward()
            opt.step(torch.full((m,), cfg.lr * scale, device=ctx.data.device))
            meter.train_pass(batch_len(idx))
            step += 1
    return MethodOutput(model=model)
