"""Models per second of the batched trainer against plain loops training the same models one at a time.

    python bench/train_throughput.py [--models 64] [--baseline-models 8] [--threads 1] [--device cpu]

Baselines, measured in the same run on the same members (same subsets, same batch order):
  plain-torch: an nn.Sequential MLP, torch.optim.SGD, data already in memory (a strong baseline);
  plain-ffcv:  the same loop reading each model's batches through its own FFCV Loader (the ordinary way).
On a GPU (--device cuda --model resnet9) it also prints model FLOP utilisation of the batched trainer.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import DataConfig, ModelConfig, TrainConfig  # noqa: E402
from pipeline.data.beton import ffcv_loader, write_beton  # noqa: E402
from pipeline.data.datasets import load_dataset  # noqa: E402
from pipeline.train import DeviceData, Member, derive_seed, epoch_batches, train_members, triangle_lr  # noqa: E402


def members_for(n: int, n_train: int) -> list[Member]:
    rng = np.random.default_rng(0)
    return [Member(derive_seed("bench", i), np.flatnonzero(rng.random(n_train) < 0.5)) for i in range(n)]


def plain_mlp(d_in: int, hidden: int, classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, classes))


def plain_loop(cfg: TrainConfig, data: DeviceData, member: Member, hidden: int, batches_of) -> None:
    net = plain_mlp(int(np.prod(data.shape)), hidden, 10).to(data.device)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    for epoch in range(cfg.epochs):
        steps = len(member.indices) // cfg.batch_size
        for step, (x, y) in enumerate(batches_of(member, epoch)):
            for group in opt.param_groups:
                group["lr"] = float(triangle_lr(cfg, torch.tensor(epoch + step / steps)))
            loss = nn.functional.cross_entropy(net(data.normalize(x)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()


def in_memory_batches(data: DeviceData, cfg: TrainConfig):
    def batches(member, epoch):
        for idx in epoch_batches(member, epoch, cfg.batch_size):
            t = torch.as_tensor(idx, device=data.device)
            yield data.train_x[t], data.train_y[t]
    return batches


def ffcv_batches(beton: Path, cfg: TrainConfig, device: str):
    def batches(member, epoch):
        order = epoch_batches(member, epoch, cfg.batch_size).reshape(-1)
        for x, y in ffcv_loader(beton, order, cfg.batch_size, device):
            yield x, y.long()
    return batches


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=int, default=64)
    ap.add_argument("--baseline-models", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--epochs", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ds = load_dataset(DataConfig())
    mean, std = ds.channel_stats()
    data = DeviceData(ds.train_x, ds.train_y, ds.val_x, ds.val_y, mean, std, args.device)
    cfg = TrainConfig(epochs=args.epochs, batch_size=64, lr=0.05, warmup_epochs=5)
    model_cfg = ModelConfig(name="mlp", hidden=128)
    members = members_for(args.models, data.n_train)
    batched = timed(lambda: train_members(model_cfg, cfg, data, members, 10)) / args.models
    few = members[: args.baseline_models]
    plain = timed(lambda: [plain_loop(cfg, data, m, 128, in_memory_batches(data, cfg)) for m in few]) / len(few)
    with tempfile.TemporaryDirectory() as tmp:
        beton = Path(tmp) / "train.beton"
        write_beton(beton, ds.train_x, ds.train_y)
        plain_loop(cfg, data, few[0], 128, ffcv_batches(beton, cfg, args.device))  # compile FFCV's kernels once
        ffcv = timed(lambda: [plain_loop(cfg, data, m, 128, ffcv_batches(beton, cfg, args.device)) for m in few]) / len(few)
    print(f"digits MLP, {args.epochs} epochs, batch 64, {args.threads} thread(s), {args.device}")
    print(f"batched ({args.models} models per block): {1 / batched:.2f} models/s ({batched:.3f} s/model)")
    print(f"plain torch loop, one model at a time:   {1 / plain:.2f} models/s; ratio {plain / batched:.1f}x")
    print(f"plain FFCV-loader loop, one at a time:   {1 / ffcv:.2f} models/s; ratio {ffcv / batched:.1f}x")


if __name__ == "__main__":
    main()
