"""An oracle-farm method plugin: gradient ascent on the forget set, written for one ordinary model with a
torch optimizer, and run on each member of a stack by `per_member` (exactly as if each were alone)."""

import torch
import torch.nn.functional as F
from pydantic import Field

from pipeline.unlearn.adapter import per_member
from pipeline.unlearn.hparams import MethodConfig


class PlainGAConfig(MethodConfig):
    """Every hyperparameter, with its default: validated like a built-in's (unknown fields are errors)
    and part of the stage identity."""

    lr: float = Field(1e-3, gt=0)
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(64, ge=1)
    momentum: float = Field(0.9, ge=0, lt=1)


def plain_ga(model, forget, retain, cfg: PlainGAConfig, member) -> None:
    """Maximize the cross-entropy of the forget set, BatchNorm statistics frozen (eval mode)."""
    model.eval()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    for _ in range(cfg.epochs):
        for x, y in forget.batches(cfg.batch_size, member.rng):
            loss = -F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            member.meter.train_pass(len(y))  # forward + backward of len(y) examples


# What the entry point names: Config, run and NEEDS (this method reads no datamodels nor target oracles).
method = per_member(plain_ga, PlainGAConfig, needs=())
