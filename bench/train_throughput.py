"""Models per second of the batched trainer against plain loops training the same models one at a time.

    python bench/train_throughput.py [--model mlp|cnn|resnet9] [--models 64] [--baseline-models 8]
                                     [--threads 1] [--device cpu|cuda] [--epochs N] [--synthetic N]

Baselines, measured in the same run on the same members (same subsets, same batch order), each after an
untimed warm-up (the first CPU matmuls and the first FFCV Loader pay a one-off start-up of a second or more):
  plain-torch: one ordinary model (nn.Sequential for the MLP; for conv nets our net with one member, whose
               grouped convolutions have groups=1), torch.optim.SGD, data already in memory;
  plain-ffcv:  the same loop reading the model's batches through its own FFCV Loader, built once per model
               as a one-model-per-process trainer does.
It also prints model FLOPs (torch's FlopCounterMode) and, on a known GPU or with --peak-tflops, the
batched trainer's model FLOP utilisation. ResNet-9 runs on CIFAR-shape synthetic data with the DMM-line
recipe (batch 512, bf16 autocast on a GPU): `--device cuda --model resnet9 --models 16`.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.batches import Member, derive_seed, epoch_batches  # noqa: E402
from pipeline.config import DataConfig, ModelConfig, SyntheticSpec, TrainConfig  # noqa: E402
from pipeline.data.beton import ffcv_loader, write_beton  # noqa: E402
from pipeline.data.datasets import load_dataset  # noqa: E402
from pipeline.data.device import DeviceData  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.training.recipe import autocast_for, train_members, triangle_lr  # noqa: E402


def members_for(n: int, n_train: int, alpha: float = 0.5) -> list[Member]:
    """n members, each on an i.i.d. Bernoulli(alpha) subset (alpha 1: every point)."""
    rng = np.random.default_rng(0)
    return [Member(derive_seed("bench", i), np.flatnonzero(rng.random(n_train) < alpha)) for i in range(n)]


def plain_net(model_cfg: ModelConfig, member: Member, shape, classes: int = 10) -> nn.Module:
    """One ordinary model: nn.Sequential for the MLP; for conv nets our model with one member (groups=1
    convolutions, i.e. plain ones) behind the usual (B, ...) interface."""
    if model_cfg.name == "mlp":
        h = model_cfg.hidden
        return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(shape)), h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
                             nn.Linear(h, classes))
    stacked = build_model(model_cfg, [member.seed], shape, classes)

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.stacked = stacked

        def forward(self, x):
            return self.stacked(x.unsqueeze(0))[0]

    return One()


def plain_loop(model_cfg: ModelConfig, cfg: TrainConfig, data: DeviceData, member: Member, batches_of) -> None:
    """The ordinary training loop of one model: torch.optim.SGD, the same recipe and schedule."""
    net = plain_net(model_cfg, member, data.shape).to(data.device)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps = len(member.indices) // cfg.batch_size
    for i, (x, y) in enumerate(batches_of(member)):
        for group in opt.param_groups:
            group["lr"] = float(triangle_lr(cfg, torch.tensor(i / steps)))
        with autocast_for(cfg, data.device):
            loss = nn.functional.cross_entropy(net(data.normalize(x)).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    if data.device.type == "cuda":
        torch.cuda.synchronize()


def training_order(member: Member, cfg: TrainConfig) -> np.ndarray:
    """Every epoch's batches of the member, in order: (epochs * steps, batch_size)."""
    return np.concatenate([epoch_batches(member, epoch, cfg.batch_size) for epoch in range(cfg.epochs)])


def in_memory_batches(data: DeviceData, cfg: TrainConfig):
    def batches(member):
        for idx in training_order(member, cfg):
            t = torch.as_tensor(idx, device=data.device)
            yield data.train_x[t], data.train_y[t]
    return batches


def ffcv_batches(beton: Path, cfg: TrainConfig, device: str):
    """One Loader per model (as a one-model-per-process trainer builds), its order every epoch's batches."""
    def batches(member):
        for x, y in ffcv_loader(beton, training_order(member, cfg).reshape(-1), cfg.batch_size, device):
            yield x, y.long()
    return batches


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def flops_per_model(model_cfg: ModelConfig, cfg: TrainConfig, data: DeviceData, member: Member) -> float:
    """Model FLOPs of one model's whole training: one step's forward + backward, counted by torch's
    FlopCounterMode on a single-model network, times its number of steps."""
    from torch.utils.flop_counter import FlopCounterMode

    net = plain_net(model_cfg, member, data.shape).to(data.device)
    x = data.normalize(data.train_x[: cfg.batch_size])
    with FlopCounterMode(display=False) as counter:
        nn.functional.cross_entropy(net(x), data.train_y[: cfg.batch_size]).backward()
    return counter.get_total_flops() * cfg.epochs * (len(member.indices) // cfg.batch_size)


PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}  # dense bf16 tensor-core peaks


def peak_tflops(device: str, given: float | None) -> float | None:
    if given or device != "cuda":
        return given
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def dataset(args) -> tuple[DeviceData, object]:
    if args.model == "resnet9" or args.synthetic:  # CIFAR-shape synthetic data
        spec = SyntheticSpec(n_train=args.synthetic or 50000, n_val=1000, shape=(3, 32, 32))
        ds = load_dataset(DataConfig(dataset="synthetic", synthetic=spec))
    else:
        ds = load_dataset(DataConfig())
    mean, std = ds.channel_stats()
    return DeviceData(ds.train_x, ds.train_y, ds.val_x, ds.val_y, mean, std, args.device), ds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["mlp", "cnn", "resnet9"], default="mlp")
    ap.add_argument("--models", type=int, default=64, help="models per block of the batched trainer")
    ap.add_argument("--baseline-models", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--epochs", type=int, default=None, help="default: 20 (mlp, cnn), 24 (resnet9)")
    ap.add_argument("--synthetic", type=int, default=None, help="CIFAR-shape synthetic training points")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (known GPUs: automatic)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data, ds = dataset(args)
    if args.model == "resnet9":  # the DMM-line recipe (bf16 autocast applies on a GPU only)
        cfg = TrainConfig(epochs=args.epochs or 24, batch_size=512, lr=0.4, warmup_epochs=5, precision="bf16")
        model_cfg = ModelConfig(name="resnet9")
    else:
        cfg = TrainConfig(epochs=args.epochs or 20, batch_size=64, lr=0.05, warmup_epochs=5)
        model_cfg = ModelConfig(name=args.model, hidden=128 if args.model == "mlp" else 16)
    members = members_for(args.models, data.n_train, 1.0 if args.model == "resnet9" else 0.5)
    few = members[: args.baseline_models]
    warm = cfg.model_copy(update={"epochs": 1, "warmup_epochs": 1})  # one-off kernel/library start-up,
    # the pipeline's trainer: CUDA graphs on a GPU (execution.cuda_graphs' default), ignored on a CPU
    train = functools.partial(train_members, model_cfg, data=data, classes=ds.classes, cuda_graphs=True)
    train(cfg=warm, members=members[:2])  # untimed for every contender
    plain_loop(model_cfg, warm, data, few[0], in_memory_batches(data, warm))
    batched = timed(lambda: train(cfg=cfg, members=members)) / args.models
    plain = timed(lambda: [plain_loop(model_cfg, cfg, data, m, in_memory_batches(data, cfg)) for m in few]) / len(few)
    with tempfile.TemporaryDirectory() as tmp:
        beton = Path(tmp) / "train.beton"
        write_beton(beton, ds.train_x, ds.train_y)
        plain_loop(model_cfg, warm, data, few[0], ffcv_batches(beton, warm, args.device))  # FFCV's first start-up
        ffcv = timed(lambda: [plain_loop(model_cfg, cfg, data, m, ffcv_batches(beton, cfg, args.device))
                              for m in few]) / len(few)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{args.device}, {args.threads} thread(s)"
    print(f"{args.model}, {cfg.epochs} epochs, batch {cfg.batch_size}, {cfg.precision}, {data.n_train} points, {where}")
    print(f"batched ({args.models} models per block): {1 / batched:.3f} models/s = {3600 / batched:.0f} models/hour")
    print(f"plain torch loop, one model at a time:   {1 / plain:.3f} models/s; ratio {plain / batched:.1f}x")
    print(f"plain FFCV-loader loop, one at a time:   {1 / ffcv:.3f} models/s; ratio {ffcv / batched:.1f}x")
    flops = flops_per_model(model_cfg, cfg, data, members[0])
    peak = peak_tflops(args.device, args.peak_tflops)
    achieved = flops / batched / 1e12
    mfu = f"; MFU {100 * achieved / peak:.1f}% of {peak:.0f} TFLOP/s" if peak else " (no peak known: --peak-tflops)"
    print(f"model FLOPs: {flops / 1e12:.3f} TFLOP per model; batched {achieved:.3f} TFLOP/s{mfu}")
    if args.model == "mlp":
        matmul_ceiling(model_cfg, cfg, data, args.models, achieved * 1e12)


def matmul_ceiling(model_cfg: ModelConfig, cfg: TrainConfig, data: DeviceData, m: int, achieved: float) -> None:
    """The MLP step's matmuls alone, each timed as the batched trainer calls it (forward, input gradient
    but for the first layer, weight gradient as g^T x): the rate a step would reach were everything else
    free, i.e. this machine's ceiling for the batched trainer."""
    dims = [int(np.prod(data.shape)), model_cfg.hidden, model_cfg.hidden, 10]
    b, total_s, total_flop = cfg.batch_size, 0.0, 0.0
    for layer, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        x, w, g = torch.randn(m, b, d_in), torch.randn(m, d_out, d_in), torch.randn(m, b, d_out)
        calls = [lambda: torch.bmm(x, w.transpose(1, 2)), lambda: torch.bmm(g.transpose(1, 2), x)]
        if layer:
            calls.append(lambda: torch.bmm(g, w))
        for call in calls:
            for _ in range(5):
                call()
            total_s += timed(lambda: [call() for _ in range(50)]) / 50
            total_flop += 2 * m * b * d_in * d_out
    rate = total_flop / total_s
    print(f"the step's matmuls alone: {rate / 1e9:.0f} GFLOP/s; the batched trainer runs at "
          f"{100 * achieved / rate:.0f}% of that ceiling")


if __name__ == "__main__":
    main()
