"""gradient_ascent (GA): maximize cross-entropy on the forget set with SGD
(algorithms.md section 8; BN in eval mode as in the SFR-on repo; KLoM-bench grid lr 1e-5..5e-2)."""

import torch

from pipeline.training.optim import StackedSGD
from pipeline.unlearn.base import MethodOutput, batch_inputs, batch_len, per_model_ce
from pipeline.unlearn.hparams import NEEDS as _NEEDS, GradientAscent as Config  # torch-free: see hparams.py

NEEDS = _NEEDS["gradient_ascent"]


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
