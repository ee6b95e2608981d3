"""Training recipe for a block of M models as one stacked computation. Knows no paths and no Ray: data
comes from a `pipeline.data.device.DeviceData` (resident) or `pipeline.data.stream.StreamedData` (FFCV
Loader), which give the same batches for the same members (decision 12).

Each member has its own init seed, its own subset of the training set and its own seeded order; a
member trained in a block ends with the same weights (to float tolerance) as trained alone.
Batches are full (the last partial batch of an epoch is dropped, as fast CIFAR trainers do); a member
whose subset is smaller than another's sits out the extra steps of the epoch, untouched. The batch order
itself (members, seeds, epoch batches) is `pipeline.batches`, which the data layer shares.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.batches import Member, derive_seed
from pipeline.config import ModelConfig, TrainConfig
from pipeline.data.device import DeviceData
from pipeline.margins import logits_over_chunks, margins_from_logits
from pipeline.models import StackedModel, build_model
from pipeline.training.optim import FlatStackedSGD, StackedSGD


def triangle_lr(cfg: TrainConfig, progress: torch.Tensor) -> torch.Tensor:
    """Single triangle: 0 -> peak at warmup_epochs -> 0 at the end. progress in epochs, per model."""
    peak_at = min(cfg.warmup_epochs, cfg.epochs)
    up = progress / max(peak_at, 1e-12)
    down = (cfg.epochs - progress) / max(cfg.epochs - peak_at, 1e-12)
    return cfg.lr * torch.clamp(torch.minimum(up, down), min=0.0, max=1.0)


def augment(x: torch.Tensor, seeds: list[int], epoch: int, step: int) -> torch.Tensor:
    """Random crop (pad 2, reflect) and horizontal flip, per sample, seeded per (model, epoch, step).
    x (M, B, C, H, W) float."""
    m, b, c, h, w = x.shape
    flips, dys, dxs = [], [], []
    for s in seeds:
        g = torch.Generator().manual_seed(derive_seed(s, "augment", epoch, step))
        flips.append(torch.rand(b, generator=g) < 0.5)
        dys.append(torch.randint(0, 5, (b,), generator=g))
        dxs.append(torch.randint(0, 5, (b,), generator=g))
    dev = x.device
    flip = torch.stack(flips).to(dev).view(m * b)
    dy, dx = torch.stack(dys).to(dev).view(m * b), torch.stack(dxs).to(dev).view(m * b)
    flat = F.pad(x.reshape(m * b, c, h, w), (2, 2, 2, 2), mode="reflect")
    rows = dy[:, None] + torch.arange(h, device=dev)[None]
    cols = dx[:, None] + torch.arange(w, device=dev)[None]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    n = torch.arange(m * b, device=dev)[:, None, None]
    out = flat.permute(0, 2, 3, 1)[n, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2).reshape(m, b, c, h, w)


def autocast_for(cfg: TrainConfig, device: torch.device):
    """bf16 autocast on any device (CPU autocast too, so the bf16 path runs on every commit)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")


def stacked_loss(logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Sum over members of each member's mean cross-entropy: member k's gradient is its own."""
    m, b, c = logits.shape
    ce = F.cross_entropy(logits.reshape(m * b, c).float(), labels.reshape(m * b), reduction="none",
                         label_smoothing=smoothing)
    return ce.view(m, b).mean(1).sum()


def train_members(model_cfg: ModelConfig, cfg: TrainConfig, data: DeviceData, members: list[Member],
                  classes: int, progress=None, stacking: str = "grouped", fused: bool | None = None,
                  ) -> tuple[StackedModel, dict]:
    """Train a block of members from scratch; returns the stacked model (eval mode) and counters.
    `stacking` (decision 28) changes how the block is computed, not what each member learns; `fused`
    steps the optimizer over one flat buffer (the same arithmetic, fewer kernels; default on a GPU,
    where it was 1.14x and 1.53x on one H100 ResNet-9 in two runs: on a CPU the in-place gradient
    accumulation it needs costs what it saves)."""
    fused = data.device.type == "cuda" if fused is None else fused
    model = build_model(model_cfg, [m.seed for m in members], data.shape, classes, stacking).to(data.device)
    model.train()
    opt = (FlatStackedSGD if fused else StackedSGD)(model.parameters(), cfg.momentum, cfg.weight_decay)
    steps_per_epoch = torch.tensor([len(m.indices) // cfg.batch_size for m in members], dtype=torch.float32)
    if (steps_per_epoch == 0).any():
        raise ValueError(f"train.batch_size {cfg.batch_size} exceeds a member's training-set size")
    passes = 0
    start = time.perf_counter()
    last_step = int(steps_per_epoch.max()) - 1
    for epoch, step, x, labels, active in data.training_steps(members, cfg.epochs, cfg.batch_size):
        if cfg.augment:
            x = augment(x, [m.seed for m in members], epoch, step)
        lr = triangle_lr(cfg, epoch + step / steps_per_epoch).to(data.device)
        saved = None if active.all() else [b.clone() for b in model.buffers()]
        with autocast_for(cfg, data.device):
            loss = stacked_loss(model(x), labels, cfg.label_smoothing)
        opt.zero_grad()
        loss.backward()
        if saved is not None:  # a member sitting out this step keeps its BatchNorm statistics too
            restore_inactive(model, saved, active.to(data.device))
        opt.step(lr, active if fused else active.to(data.device))
        passes += int(active.sum()) * cfg.batch_size
        if progress is not None and step == last_step:
            progress(epoch + 1, cfg.epochs)
    model.eval()
    return model, {"example_passes": passes / len(members), "seconds": time.perf_counter() - start}


@torch.no_grad()
def restore_inactive(model: StackedModel, saved: list[torch.Tensor], active: torch.Tensor) -> None:
    """Put back the buffers (running statistics) of inactive members; every buffer has the model axis first."""
    for buf, old in zip(model.buffers(), saved):
        buf.copy_(torch.where(active.view((-1,) + (1,) * (buf.dim() - 1)), buf, old))


def evaluate_members(model: StackedModel, data: DeviceData) -> dict[str, np.ndarray]:
    """Logits (float16) and margins (float32) of every member on train ++ val, and accuracies."""
    return outputs_from_logits(logits_over_chunks(model, data.image_chunks(1024), data.normalize), data)


def outputs_from_logits(logits: torch.Tensor, data: DeviceData) -> dict[str, np.ndarray]:
    """logits (M, P, C) -> stored outputs: logits, margins (decision 1), top-1 accuracy (train, val)."""
    labels = data.all_labels()
    margins = margins_from_logits(logits, labels)
    correct = (logits.argmax(-1) == labels).float()
    n = data.n_train
    accuracy = torch.stack([correct[:, :n].mean(1), correct[:, n:].mean(1)], dim=1)
    return {"logits": logits.half().cpu().numpy(), "margins": margins.cpu().numpy(),
            "accuracy": accuracy.cpu().numpy()}


def retrain_example_passes(cfg: TrainConfig, n_train: int) -> int:
    """Example-passes of one retraining on the full training set (the compute unit, decision 10)."""
    return cfg.epochs * (n_train // cfg.batch_size) * cfg.batch_size
