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
from pipeline.data.device import DeviceData, to_device
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
    flip = to_device(torch.stack(flips), dev).view(m * b)
    dy, dx = to_device(torch.stack(dys), dev).view(m * b), to_device(torch.stack(dxs), dev).view(m * b)
    flat = F.pad(x.reshape(m * b, c, h, w), (2, 2, 2, 2), mode="reflect")
    rows = dy[:, None] + torch.arange(h, device=dev)[None]
    cols = dx[:, None] + torch.arange(w, device=dev)[None]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    n = torch.arange(m * b, device=dev)[:, None, None]
    out = flat.permute(0, 2, 3, 1)[n, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2).reshape(m, b, c, h, w)


def lr_table(cfg: TrainConfig, steps_per_epoch: torch.Tensor) -> torch.Tensor:
    """Every step's learning rate at once, (epochs, max steps, M): triangle_lr at epoch + step / steps,
    in the float32 arithmetic of `epoch + step / steps_per_epoch` with Python numbers (which torch
    computes as step * (1 / steps))."""
    steps = torch.arange(int(steps_per_epoch.max()), dtype=torch.float32)
    epochs = torch.arange(cfg.epochs, dtype=torch.float32)
    return triangle_lr(cfg, epochs[:, None, None] + steps[None, :, None] * steps_per_epoch.reciprocal())


def autocast_for(cfg: TrainConfig, device: torch.device, cache_enabled: bool | None = None):
    """bf16 autocast on any device (CPU autocast too, so the bf16 path runs on every commit). A CUDA graph
    is captured with the cast cache off (its casts must be recorded in the graph)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16",
                          cache_enabled=cache_enabled)


def stacked_loss(logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Sum over members of each member's mean cross-entropy: member k's gradient is its own."""
    m, b, c = logits.shape
    ce = F.cross_entropy(logits.reshape(m * b, c).float(), labels.reshape(m * b), reduction="none",
                         label_smoothing=smoothing)
    return ce.view(m, b).mean(1).sum()


def deterministic_compile(fn):
    """``torch.compile`` with inductor in its deterministic mode (decision 38): no on-device benchmarking
    or autotuning that picks kernels by timing, cuDNN deterministic and not benchmarking, static shapes.
    The same program then gives the same bits in every fresh process (tests/test_compile.py), though
    not eager's bits: its fusions sum in other orders."""
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    return torch.compile(fn, backend="inductor", dynamic=False,
                         options={"deterministic": True, "max_autotune": False, "coordinate_descent_tuning": False})


def loss_function(model: StackedModel, cfg: TrainConfig, graphed: bool = False):
    """(x, labels) -> the block's loss under the recipe's precision: eager, or compiled when
    ``train.compile`` says so (one compile per block; the eager and graphed steps call the same function).
    A CUDA graph is captured with autocast's cast cache off (its casts must be recorded in the graph)."""

    def forward_loss(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with autocast_for(cfg, x.device, cache_enabled=False if graphed else None):
            return stacked_loss(model(x), labels, cfg.label_smoothing)

    return deterministic_compile(forward_loss) if cfg.compile == "inductor" else forward_loss


def train_members(model_cfg: ModelConfig, cfg: TrainConfig, data: DeviceData, members: list[Member],
                  classes: int, progress=None, stacking: str = "grouped", fused: bool | None = None,
                  cuda_graphs: bool = False) -> tuple[StackedModel, dict]:
    """Train a block of members from scratch; returns the stacked model (eval mode) and counters.
    `stacking` (decision 28) changes how the block is computed, not what each member learns; `fused`
    steps the optimizer over one flat buffer (the same arithmetic, fewer kernels; default on a GPU,
    where it was 1.14x and 1.53x on one H100 ResNet-9 in two runs: on a CPU the in-place gradient
    accumulation it needs costs what it saves). `cuda_graphs` replays the steps in which every member
    trains as one captured CUDA graph (`GraphedStep`; GPU only, with the flat optimizer, not `streams`)."""
    fused = data.device.type == "cuda" if fused is None else fused
    model = build_model(model_cfg, [m.seed for m in members], data.shape, classes, stacking).to(data.device)
    model.train()
    opt = (FlatStackedSGD if fused else StackedSGD)(model.parameters(), cfg.momentum, cfg.weight_decay)
    steps_per_epoch = torch.tensor([len(m.indices) // cfg.batch_size for m in members], dtype=torch.float32)
    if (steps_per_epoch == 0).any():
        raise ValueError(f"train.batch_size {cfg.batch_size} exceeds a member's training-set size")
    lrs = lr_table(cfg, steps_per_epoch).to(data.device)  # one copy, not one a step
    graphed = cuda_graphs and fused and data.device.type == "cuda" and stacking != "streams"
    loss_fn = loss_function(model, cfg, graphed)
    graph, passes = None, 0
    start = time.perf_counter()
    last_step = int(steps_per_epoch.max()) - 1
    for epoch, step, x, labels, active in data.training_steps(members, cfg.epochs, cfg.batch_size):
        if cfg.augment:
            x = augment(x, [m.seed for m in members], epoch, step)
        lr = lrs[epoch, step]
        if graphed and active.all():
            graph = graph or GraphedStep(model, opt, loss_fn, x, labels)
            graph(x, labels, lr)
        else:
            eager_step(model, opt, loss_fn, x, labels, lr, active)
        passes += int(active.sum()) * cfg.batch_size
        if progress is not None and step == last_step:
            progress(epoch + 1, cfg.epochs)
    if data.device.type == "cuda":
        torch.cuda.synchronize(data.device)  # the host runs ahead of the device: count its work here
    model.eval()
    return model, {"example_passes": passes / len(members), "seconds": time.perf_counter() - start}


def eager_step(model: StackedModel, opt, loss_fn, x, labels, lr, active: torch.Tensor) -> None:
    """One step of every active member; an inactive one keeps its weights and BatchNorm statistics.
    ``loss_fn`` is ``loss_function(model, cfg)``."""
    device = x.device
    saved = None if active.all() else [b.clone() for b in model.buffers()]
    loss = loss_fn(x, labels)
    opt.zero_grad()
    loss.backward()
    if saved is not None:
        restore_inactive(model, saved, active.to(device))
    opt.step(lr, active)  # each optimizer moves the switch to the device itself, when it needs it


class GraphedStep:
    """The all-members step captured once as a CUDA graph and replayed: one launch a step instead of a
    few hundred, for a step bound by the host (a ResNet-9 at batch 512 on an H100: bench/RESULTS.md).
    The same kernels on the same memory as `eager_step`; the model's parameters, gradients and momentum
    live in the flat optimizer's buffers, so the graph updates the model in place. The warm-up steps
    that capture needs (on a side stream, as PyTorch prescribes) are undone before capture. Memory: the
    graph keeps one step's activations in its own pool, and a block whose members sit out some steps
    (eager) allocates them again outside it, up to twice eager's peak (`memory_plan` in the GPU check)."""

    def __init__(self, model: StackedModel, opt: FlatStackedSGD, loss_fn, x, labels):
        self.model, self.opt, self.loss_fn = model, opt, loss_fn
        self.x, self.labels = x.clone(), labels.clone()
        self.lr = torch.zeros(x.shape[0], device=x.device)
        state = self._state()
        saved = [t.clone() for t in state]
        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self._step()
        torch.cuda.current_stream(x.device).wait_stream(side)
        with torch.no_grad():
            for t, old in zip(state, saved):
                t.copy_(old)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: a loader's own thread (FFCV's prefetching, the streamed path) may use CUDA meanwhile
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self._step()

    def _state(self) -> list[torch.Tensor]:
        return [self.opt.flat, self.opt.flat_buf, *self.model.buffers()]

    def _step(self) -> None:
        loss = self.loss_fn(self.x, self.labels)  # built with the cast cache off (loss_function)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step(self.lr)

    def __call__(self, x, labels, lr) -> None:
        self.x.copy_(x)
        self.labels.copy_(labels)
        self.lr.copy_(lr)
        self.graph.replay()


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
