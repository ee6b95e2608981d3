"""gradient_ascent (GA): maximize cross-entropy on the forget set with SGD
(algorithms.md section 8; BN in eval mode as in the SFR-on repo; KLoM-bench grid lr 1e-5..5e-2)."""

import torch
from pydantic import Field

from pipeline.optim import StackedSGD
from pipeline.unlearn.base import MethodConfig, MethodOutput, batch_inputs, batch_len, per_model_ce

NEEDS = ()


class Config(MethodConfig):
    lr: float = Field(1e-3, gt=0)
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(64, ge=1)
    momentum: float = Field(0.9, ge=0, lt=1)


def run(ctx, model, forget, retain, cfg: Config, meter) -> MethodOutput:
    model.eval()  # BatchNorm statistics stay those of the trained model
    m = model.n_models
    opt = StackedSGD(model.parameters(), cfg.momentum, 0.0)
    lr = torch.full((m,), cfg.lr, device=ctx.data.device)
    for epoch in range(cfg.epochs):
        for idx in ctx.member_batches(forget, cfg.batch_size, "ga", epoch):
            x, y = batch_inputs(ctx.data, idx, m)
            loss = -per_model_ce(model(x), y).mean(1).sum()
            opt.zero_grad()
            loss.backward()
            opt.step(lr)
            meter.train_pass(batch_len(idx))
    return MethodOutput(model=model)
