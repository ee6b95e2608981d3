"""The GPU check (decision 29): one call on a GPU machine, everything written as JSON.

    python bench/gpu_check.py [--device cuda|cpu] [--quick] [--out DIR] [--budget SECONDS]

Needs PyTorch, numpy, scikit-learn, numba, safetensors, pyyaml and pydantic (carried as a wheel where
missing; `make gpu-check` fetches it): no Ray, Zarr or FFCV. Sections, each timed and each recorded
even when another fails:
  env          device, versions, peak bf16 TFLOP/s assumed for MFU;
  equivalence  a block of small ResNet-9s per stacking strategy against each member trained alone
               (fp32 and bf16): max |logit| and parameter differences, prediction agreement;
  bf16_digits  a CNN block on digits trained in bf16 on the device against the same members in fp32
               on the CPU: validation accuracy;
  unlearning   every registered method on a digits CNN block on the device, and the same on the CPU:
               finite outputs, forget-set margin shift on both devices;
  lasso        the batched LASSO (FISTA) on the device against the CPU's on planted targets: weights, LDS;
  throughput   ResNet-9 (width 64, batch 512, bf16, channels_last, CIFAR shape) through the real trainer,
               per strategy and block size: models per GPU-hour for 24 epochs, MFU, peak memory, and
               the ratio against one model at a time (a block of one);
  memory_plan  per member at batch 512 in bf16: activation bytes saved for backward and optimizer
               bytes, from the model; the largest block that fits 80 GB;
  profile      torch.profiler over a few steps of one ResNet-9: top operators by device time, host
               wall time against device-busy time per step (is the step bound by the host?);
  cuda_graphs  the trainer's steps replayed as a captured CUDA graph against eager: the same models, and
               seconds per step of ResNet-9 (as throughput) eager and graphed;
  compile      the same ResNet-9 step eager, under torch.compile and under its CUDA graphs
               (reduce-overhead): seconds per step, compile time, logits against eager's (findings);
  compile_identity  `train.compile: inductor` (decision 38) in two fresh processes with empty caches:
               the same bits (the gate), and its models per GPU-hour and MFU against eager's;
  unlearning_throughput  every training method on a block of ResNet-9s: example-passes per second per
               model and MFU against the trainer's;
  streamed_fit diff-in-means and LASSO on boolean masks at 50,000 points, m up to 20,000: seconds, peak
               device memory, seconds extrapolated to a CIFAR-10 fit.
`ok` is true when every section passed its check. bench/RESULTS.md says how to read the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.batches import Member, derive_seed  # noqa: E402
from pipeline.config import DataConfig, ModelConfig, TrainConfig  # noqa: E402
from pipeline.data.datasets import load_dataset  # noqa: E402
from pipeline.data.device import DeviceData  # noqa: E402
from pipeline.margins import stacked_logits  # noqa: E402
from pipeline.models import STACKINGS, build_model  # noqa: E402
from pipeline.training.recipe import autocast_for, stacked_loss, train_members  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0}
CIFAR_STEPS_PER_EPOCH = 50000 // 512
GB = 1e9


# ------------------------------------------------------------------------------------------- data
def digits(device) -> DeviceData:
    ds = load_dataset(DataConfig())
    mean, std = ds.channel_stats()
    return DeviceData(ds.train_x, ds.train_y, ds.val_x, ds.val_y, mean, std, device)


def cifar_shaped(n_train: int, n_val: int, device, seed: int = 0) -> DeviceData:
    """Random CIFAR-shape uint8 images whose labels a fixed random linear map of a pooled image decides
    (learnable, so accuracies and margins mean something)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n_train + n_val, 3, 32, 32), generator=g, dtype=torch.uint8)
    pooled = F.avg_pool2d(x.float(), 8).flatten(1)
    y = (pooled @ torch.randn(pooled.shape[1], 10, generator=g)).argmax(1)
    return DeviceData(x[:n_train], y[:n_train], x[n_train:], y[n_train:], [127.5] * 3, [73.9] * 3, device)


def members(n: int, n_train: int, tag: str = "check") -> list[Member]:
    return [Member(derive_seed(tag, i), np.arange(n_train)) for i in range(n)]


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------ equivalence
def block_against_alone(model_cfg, train_cfg, data, block, stacking) -> dict:
    """Train `block` with `stacking` and each member alone; differences of each member to itself."""
    stacked, _ = train_members(model_cfg, train_cfg, data, block, 10, stacking=stacking)
    logits = stacked_logits(stacked, data.all_images(), data.normalize)
    worst_logit, worst_param, agree = 0.0, 0.0, 1.0
    for k, member in enumerate(block):
        alone, _ = train_members(model_cfg, train_cfg, data, [member], 10)
        ref = stacked_logits(alone, data.all_images(), data.normalize)[0]
        worst_logit = max(worst_logit, (logits[k] - ref).abs().max().item())
        agree = min(agree, (logits[k].argmax(-1) == ref.argmax(-1)).float().mean().item())
        for (name, p), q in zip(stacked.named_parameters(), alone.parameters()):
            rel = ((p[k] - q[0]).norm() / q[0].norm().clamp_min(1e-12)).item()
            worst_param = max(worst_param, rel)
    return {"max_abs_logit_diff": worst_logit, "max_rel_param_diff": worst_param, "min_agreement": agree}


def section_equivalence(device, quick: bool) -> dict:
    data = cifar_shaped(128 if quick else 1024, 128, device)
    model_cfg = ModelConfig(name="resnet9", width=4 if quick else 16)
    block = members(3, data.n_train, "equivalence")
    strategies = [s for s in STACKINGS if s != "streams" or torch.device(device).type == "cuda"]
    out, ok = {}, True
    for precision in ("fp32", "bf16"):
        cfg = TrainConfig(epochs=1 if quick else 2, batch_size=64, lr=0.2, warmup_epochs=0.5, precision=precision)
        for s in strategies:
            r = block_against_alone(model_cfg, cfg, data, block, s)
            exact = s == "loop" and torch.device(device).type == "cpu"
            # loop on the CPU runs the member's own kernels: exact. Elsewhere the summation order may
            # differ (grouped kernels, cuDNN's algorithm choice); SGD amplifies it, so ask that the
            # members still make the same predictions.
            r["pass"] = r["max_abs_logit_diff"] == 0.0 if exact else r["min_agreement"] >= 0.95
            ok &= r["pass"]
            out[f"{s}/{precision}"] = r
    out.update(one_step_drift(model_cfg, data, block))
    return {"ok": ok, "cases": out}


def one_step_drift(model_cfg, data, block) -> dict:
    """Grouped against alone after a single SGD step in fp32, with cuDNN's TF32 off and on: whether a
    difference after training is rounding amplified by SGD or a real discrepancy."""
    one = [Member(m.seed, m.indices[:64]) for m in block]
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.2, warmup_epochs=0.5)
    out, tf32 = {}, torch.backends.cudnn.allow_tf32
    for allow in (False, True):
        torch.backends.cudnn.allow_tf32 = allow
        try:
            r = block_against_alone(model_cfg, cfg, data, one, "grouped")
        finally:
            torch.backends.cudnn.allow_tf32 = tf32
        out[f"grouped/fp32/one-step/tf32-{'on' if allow else 'off'}"] = r
    return out


# ------------------------------------------------------------------------------------ bf16 digits
def section_bf16_digits(device, quick: bool) -> dict:
    model_cfg = ModelConfig(name="cnn", hidden=16 if quick else 32)
    cpu_data, dev_data = digits("cpu"), digits(device)
    block = members(2 if quick else 4, cpu_data.n_train, "bf16")
    base = dict(epochs=4 if quick else 12, batch_size=64, lr=0.05, warmup_epochs=2)
    accs = {}
    for name, data, precision in (("cpu_fp32", cpu_data, "fp32"), ("device_bf16", dev_data, "bf16")):
        model, _ = train_members(model_cfg, TrainConfig(**base, precision=precision), data, block, 10,
                                 stacking="grouped")
        logits = stacked_logits(model, data.val_x, data.normalize)
        accs[name] = (logits.argmax(-1) == data.val_y).float().mean(1).tolist()
    gap = float(np.mean(accs["cpu_fp32"]) - np.mean(accs["device_bf16"]))
    return {"ok": gap <= 0.02, "val_accuracy": accs, "fp32_minus_bf16": gap}


# ------------------------------------------------------------------------------------- unlearning
METHOD_SETTINGS = {  # small, fast settings of each method (digits scale); defaults otherwise
    "do_nothing": {}, "dm_direct": {},
    "dmm": {"lr": 1e-3, "epochs": 2, "batch_size": 64}, "oracle_matching": {"lr": 1e-3, "epochs": 2, "batch_size": 64},
    "finetune": {"lr": 0.01, "epochs": 1}, "gradient_ascent": {"lr": 1e-3, "epochs": 1, "batch_size": 32},
    "neggrad_plus": {"lr": 0.01, "epochs": 1}, "scrub": {"lr": 0.01, "epochs": 1, "msteps": 1},
    "del": {"lr": 0.01, "epochs": 1}, "sfron": {"lr": 0.01, "n_iters": 10, "forget_freq": 5},
    "camu": {"impair_lr": 5e-4, "epochs": 1, "batch_size": 32},
}


def unlearning_setup(device, stacking):
    from pipeline.unlearn.base import Context, ForgetRows

    data = digits(device)
    model_cfg = ModelConfig(name="cnn", hidden=16)
    model, _ = train_members(model_cfg, TrainConfig(epochs=3, batch_size=64, lr=0.05, warmup_epochs=1),
                             data, members(2, data.n_train, "unlearn"), 10, stacking=stacking)
    n_points = data.n_train + data.val_y.shape[0]
    forget = np.arange(3, 3 + 20 * 7, 7)
    g = torch.Generator().manual_seed(1)
    rows = (torch.randn(10, generator=g) / len(forget) + 0.02 * torch.randn(len(forget), n_points, 10, generator=g))
    oracle = torch.randn(n_points, 10, generator=g)

    def ctx():
        return Context(data=data, classes=10, seed=5, model_indices=[0, 1],
                       make_fresh_model=lambda idx: build_model(model_cfg, [100 + i for i in idx], data.shape, 10,
                                                                stacking).to(device),
                       _forget_rows=lambda: ForgetRows.from_rows(rows.to(device), forget),
                       _target_oracle_logits=lambda: oracle.to(device))

    return data, model, forget, np.setdiff1d(np.arange(data.n_train), forget), ctx


def forget_margin(logits: torch.Tensor, data: DeviceData, forget) -> float:
    from pipeline.margins import margins_from_logits

    idx = torch.as_tensor(forget, device=logits.device)
    return margins_from_logits(logits[:, idx], data.train_y[idx]).mean().item()


def run_methods(device, stacking) -> dict:
    from pipeline.unlearn import METHODS, get_method
    from pipeline.unlearn.base import ComputeMeter

    data, model, forget, retain, ctx = unlearning_setup(device, stacking)
    before = forget_margin(stacked_logits(model, data.all_images(), data.normalize), data, forget)
    out = {"_before": before}
    for name in METHODS:
        method, start = get_method(name), time.perf_counter()
        torch.manual_seed(0)
        res = method.run(ctx(), model.select([0, 1]), forget, retain, method.Config(**METHOD_SETTINGS[name]),
                         ComputeMeter())
        logits = res.logits if res.logits is not None else stacked_logits(res.model, data.all_images(), data.normalize)
        out[name] = {"forget_margin": forget_margin(logits.float(), data, forget),
                     "finite": bool(torch.isfinite(logits).all()), "seconds": time.perf_counter() - start}
    return out


def section_unlearning(device, quick: bool) -> dict:
    """Every method under each strategy on the device, against the CPU's loop (the exact reference)."""
    cpu = run_methods("cpu", "loop")
    strategies = ["grouped", "loop"] + (["streams"] if torch.device(device).type == "cuda" else [])
    runs, shifts, ok = {"cpu/loop": cpu}, {}, True
    for s in strategies:
        on_device = cpu if (s == "loop" and torch.device(device).type == "cpu") else run_methods(device, s)
        runs[f"device/{s}"] = on_device
        for name, v in on_device.items():
            if name == "_before":
                continue
            d, c = v["forget_margin"] - on_device["_before"], cpu[name]["forget_margin"] - cpu["_before"]
            shifts.setdefault(name, {"cpu_loop": c})[s] = d
            # finite, and the same method moves forget margins the same way as on the CPU
            ok &= v["finite"] and not (abs(c) > 0.1 and np.sign(d) != np.sign(c))
    return {"ok": bool(ok), "runs": runs, "forget_margin_shift": shifts}


# ------------------------------------------------------------------------------------------ lasso
def section_lasso(device, quick: bool) -> dict:
    from pipeline.datamodels import lasso, lds

    g = torch.Generator().manual_seed(0)
    m, n, t = (300, 60, 8) if quick else (2000, 500, 64)
    masks = torch.rand(m, n, generator=g) < 0.5
    truth = torch.zeros(n, t)
    truth[torch.randint(0, n, (t * 4,), generator=g), torch.arange(t).repeat(4)] = torch.randn(t * 4, generator=g)
    outputs = masks.float() @ truth + 0.1 * torch.randn(m, t, generator=g)
    start = time.perf_counter()
    cpu = lasso(masks, outputs, solver="fista")
    cpu_s = time.perf_counter() - start
    masks_d, outputs_d = masks.to(device), outputs.to(device)
    lasso(masks_d[:, :8], outputs_d[:, :2], solver="fista")  # warm-up (kernels, allocator)
    sync(device)
    start = time.perf_counter()
    dev = lasso(masks_d, outputs_d, solver="fista")
    sync(device)
    dev_s = time.perf_counter() - start
    diff = (dev.weight.cpu() - cpu.weight).abs().max().item()
    lds_cpu = lds(cpu.weight, cpu.bias, masks, outputs).nanmean().item()
    lds_dev = lds(dev.weight, dev.bias, masks_d, outputs_d).nanmean().item()
    return {"ok": diff <= 1e-3 and abs(lds_cpu - lds_dev) <= 1e-3, "shape": [m, n, t], "max_abs_weight_diff": diff,
            "lds_cpu": lds_cpu, "lds_device": lds_dev, "cpu_seconds": cpu_s, "device_seconds": dev_s}


# ------------------------------------------------------------------------------------- throughput
def resnet9_step_flops(width: int, batch: int, device) -> float:
    """Model FLOPs of one training step of one ResNet-9 (forward + backward), torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    data = cifar_shaped(batch, 1, device)
    model = build_model(ModelConfig(name="resnet9", width=width), [0], data.shape, 10).to(device)
    x = data.normalize(data.train_x).unsqueeze(0)
    with FlopCounterMode(display=False) as counter:
        stacked_loss(model(x), data.train_y.unsqueeze(0)).backward()
    return float(counter.get_total_flops())


def peak_tflops(device) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def time_block(stacking: str, m: int, width: int, batch: int, steps: int, data: DeviceData,
               fused: bool = True) -> dict:
    """Seconds per training step of a block of m ResNet-9s through the real trainer (one epoch of
    `steps` steps after a warm-up epoch of 3), and the peak memory. bf16 on a GPU; fp32 on a CPU,
    whose bf16 convolutions are an emulated slow path on most CPUs."""
    precision = "bf16" if data.device.type == "cuda" else "fp32"
    cfg = TrainConfig(epochs=1, batch_size=batch, lr=0.4, warmup_epochs=0.5, precision=precision)
    model_cfg = ModelConfig(name="resnet9", width=width)
    warm = [Member(derive_seed("warm", i), np.arange(3 * batch)) for i in range(m)]
    train_members(model_cfg, cfg, data, warm, 10, stacking=stacking, fused=fused)
    block = [Member(derive_seed("tp", i), np.arange(steps * batch)) for i in range(m)]
    if data.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(data.device)
    sync(data.device)
    start = time.perf_counter()
    train_members(model_cfg, cfg, data, block, 10, stacking=stacking, fused=fused)
    sync(data.device)
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated(data.device) if data.device.type == "cuda" else None
    return {"seconds_per_step": seconds, "peak_memory_gb": None if peak is None else peak / GB}


def section_throughput(device, quick: bool, budget: float) -> dict:
    width, batch = (8, 32) if quick else (64, 512)
    steps = 3 if quick else 20
    blocks = [1, 2, 4] if quick else [1, 4, 8, 16]
    torch.backends.cudnn.benchmark = True  # cuDNN picks its fastest algorithm per shape (recorded)
    data = cifar_shaped(steps * batch, 16, device)
    flops = resnet9_step_flops(width, batch, device)
    peak = peak_tflops(device)
    steps_24 = 24 * (CIFAR_STEPS_PER_EPOCH if not quick else steps)
    strategies = [s for s in STACKINGS if s != "streams" or torch.device(device).type == "cuda"]
    rows, deadline = [], time.perf_counter() + budget
    for m in (1, blocks[-2]):  # the optimizer over one flat buffer against one step per tensor
        r = time_block("loop", m, width, batch, steps, data, fused=False)
        rows.append({"stacking": "loop", "models": m, "optimizer": "per-tensor", **r})
    for s in strategies:
        for m in blocks:
            if m == 1 and s != "loop":
                continue  # a block of one is the same computation under every strategy
            if time.perf_counter() > deadline:
                rows.append({"stacking": s, "models": m, "skipped": "time budget"})
                continue
            r = time_block(s, m, width, batch, steps, data)
            per_model_step = r["seconds_per_step"] / m
            rows.append({"stacking": s, "models": m, "optimizer": "flat", **r,
                         "models_per_gpu_hour": 3600.0 / (per_model_step * steps_24),
                         "tflops": flops * m / r["seconds_per_step"] / 1e12,
                         "mfu": None if peak is None else flops * m / r["seconds_per_step"] / 1e12 / peak})
    for r in rows:
        if "models_per_gpu_hour" not in r and "seconds_per_step" in r:
            r["models_per_gpu_hour"] = 3600.0 / (r["seconds_per_step"] / r["models"] * steps_24)
    alone = next(r for r in rows if r["models"] == 1 and r["optimizer"] == "flat")
    for r in rows:
        if "models_per_gpu_hour" in r:
            r["ratio_vs_one_at_a_time"] = r["models_per_gpu_hour"] / alone["models_per_gpu_hour"]
    timed = [r for r in rows if "models_per_gpu_hour" in r and r["optimizer"] == "flat"]
    best = max(timed, key=lambda r: r["models_per_gpu_hour"])
    best_by_strategy = {s: max((r for r in timed if r["stacking"] == s), key=lambda r: r["models_per_gpu_hour"],
                               default=None) for s in strategies}
    return {"ok": True, "width": width, "batch": batch, "steps_timed": steps, "flops_per_model_step": flops,
            "precision": "bf16" if data.device.type == "cuda" else "fp32", "cudnn_benchmark": True,
            "peak_bf16_tflops": peak, "epochs_for_models_per_hour": 24, "rows": rows, "best": best,
            "best_by_strategy": {s: r and {"models": r["models"], "models_per_gpu_hour": r["models_per_gpu_hour"]}
                                 for s, r in best_by_strategy.items()},
            "calibration": {"strategy": best["stacking"], "models": best["models"]}}


# ---------------------------------------------------------------------------------------- profile
def section_profile(device, quick: bool) -> dict:
    """Where a training step of one ResNet-9 spends its time: torch.profiler over a few steps of the real
    trainer; the top operators by device time, and host time against device-busy time per step."""
    from torch.profiler import ProfilerActivity, profile

    width, batch, steps = (8, 32, 3) if quick else (64, 512, 8)
    data = cifar_shaped(steps * batch, 16, device)
    cuda = torch.device(device).type == "cuda"
    cfg = TrainConfig(epochs=1, batch_size=batch, lr=0.4, warmup_epochs=0.5, precision="bf16" if cuda else "fp32")
    model_cfg = ModelConfig(name="resnet9", width=width)
    block = [Member(derive_seed("prof", 0), np.arange(steps * batch))]
    train_members(model_cfg, cfg, data, block, 10, stacking="loop")  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        train_members(model_cfg, cfg, data, block, 10, stacking="loop")
        sync(device)
    wall = (time.perf_counter() - start) / steps
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    top = sorted(events, key=lambda e: getattr(e, key, 0.0), reverse=True)[:20]
    device_us = sum(getattr(e, key, 0.0) for e in events) / steps
    return {"ok": True, "width": width, "batch": batch, "steps": steps, "wall_ms_per_step": wall * 1e3,
            "device_busy_ms_per_step": device_us / 1e3 if cuda else None,
            "kernels_per_step": sum(e.count for e in events if cuda and getattr(e, key, 0.0) > 0) / steps,
            "top": [{"name": e.key, "count": e.count / steps, "self_device_ms_per_step": getattr(e, key, 0.0) / 1e3 / steps,
                     "cpu_ms_per_step": e.cpu_time_total / 1e3 / steps} for e in top]}


# ----------------------------------------------------------------------------------- cuda graphs
def graphs_against_eager(model_cfg, cfg, data, block, stacking) -> dict:
    """The same block trained with its steps replayed as a CUDA graph and eagerly: logit differences."""
    eager, _ = train_members(model_cfg, cfg, data, block, 10, stacking=stacking)
    graphed, _ = train_members(model_cfg, cfg, data, block, 10, stacking=stacking, cuda_graphs=True)
    a = stacked_logits(eager, data.all_images(), data.normalize)
    b = stacked_logits(graphed, data.all_images(), data.normalize)
    return {"max_abs_logit_diff": (a - b).abs().max().item(),
            "min_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean(-1).min().item()}


def time_second_epoch(stacking: str, m: int, width: int, batch: int, steps: int, data: DeviceData,
                      graphs: bool) -> float:
    """Seconds per step of a block's second epoch (the first pays the warm-up and the graph's capture)."""
    cfg = TrainConfig(epochs=2, batch_size=batch, lr=0.4, warmup_epochs=0.5, precision="bf16")
    marks = []

    def mark(done, total):
        sync(data.device)
        marks.append(time.perf_counter())

    block = [Member(derive_seed("graphs", i), np.arange(steps * batch)) for i in range(m)]
    train_members(ModelConfig(name="resnet9", width=width), cfg, data, block, 10, progress=mark,
                  stacking=stacking, cuda_graphs=graphs)
    return (marks[1] - marks[0]) / steps


def section_cuda_graphs(device, quick: bool) -> dict:
    """The trainer with `cuda_graphs` against eager: the same models (blocks whose members all train at
    every step, blocks whose members sit out the last steps of each epoch: eager steps between replays,
    augmentation with fp32 and label smoothing, the digits MLP), then seconds per step of ResNet-9 w64
    at batch 512 in bf16, eager and graphed."""
    if torch.device(device).type != "cuda":
        return {"ok": True, "skipped": "CUDA graphs need a GPU"}
    data = cifar_shaped(1024, 128, device)
    model_cfg = ModelConfig(name="resnet9", width=16)
    cfg = TrainConfig(epochs=2, batch_size=64, lr=0.2, warmup_epochs=0.5, precision="bf16")
    uneven = [Member(derive_seed("uneven", i), np.arange(1024 - 256 * i)) for i in range(3)]
    cases = {f"{s}/{len(b)}{'/uneven' if b is uneven else ''}": graphs_against_eager(model_cfg, cfg, data, b, s)
             for s, b in (("loop", members(1, 1024, "graphs")), ("loop", members(3, 1024, "graphs")),
                          ("grouped", members(3, 1024, "graphs")), ("loop", uneven))}
    # augmentation (its per-step copies), fp32 and label smoothing; the MLP's own autograd function
    recipe = cfg.model_copy(update={"augment": True, "precision": "fp32", "label_smoothing": 0.1})
    cases["loop/3/augment/fp32/smoothing"] = graphs_against_eager(model_cfg, recipe, data, members(3, 1024, "graphs"),
                                                                  "loop")
    small = digits(device)
    cases["mlp/grouped/4/uneven"] = graphs_against_eager(
        ModelConfig(name="mlp", hidden=64), TrainConfig(epochs=3, batch_size=64, lr=0.05, warmup_epochs=1), small,
        [Member(derive_seed("mlp", i), np.arange(small.n_train - 100 * i)) for i in range(4)], "grouped")
    ok = all(c["max_abs_logit_diff"] == 0.0 for c in cases.values())  # the same kernels: bit for bit
    torch.backends.cudnn.benchmark = True
    width, batch, steps = 64, 512, 20
    timing_data = cifar_shaped(steps * batch, 16, device)
    flops = resnet9_step_flops(width, batch, device)
    peak = peak_tflops(device)
    rows = []
    for stacking, m, graphs in (("loop", 1, False), ("loop", 1, True), ("grouped", 8, False), ("grouped", 4, True),
                                ("grouped", 8, True), ("grouped", 16, True), ("loop", 8, True)):
        try:
            sec = time_second_epoch(stacking, m, width, batch, steps, timing_data, graphs)
        except Exception as exc:
            rows.append({"stacking": stacking, "models": m, "graphs": graphs, "error": f"{type(exc).__name__}: {exc}"})
            continue
        rows.append({"stacking": stacking, "models": m, "graphs": graphs, "seconds_per_step": sec,
                     "models_per_gpu_hour": 3600.0 / (sec / m * 24 * CIFAR_STEPS_PER_EPOCH),
                     "mfu": None if peak is None else flops * m / sec / 1e12 / peak})
    alone = rows[0].get("models_per_gpu_hour")
    for r in rows:
        if alone and "models_per_gpu_hour" in r:
            r["ratio_vs_eager_one_at_a_time"] = r["models_per_gpu_hour"] / alone
    return {"ok": ok, "equivalence": cases, "rows": rows}


# ---------------------------------------------------------------------------------------- compile
def one_step_fn(model, opt, x, labels, lr, precision: str):
    """One training step as the trainer takes it (autocast, stacked loss, flat SGD), over fixed tensors."""
    cfg = TrainConfig(precision=precision)

    def step():
        with autocast_for(cfg, x.device):
            loss = stacked_loss(model(x), labels)
        opt.zero_grad()
        loss.backward()
        opt.step(lr)
    return step


def compile_variant(mode: str | None, m: int, stacking: str, width: int, batch: int, steps: int,
                    data: DeviceData) -> dict:
    """Seconds per step of a block of m ResNet-9s eager (mode None) or with torch.compile(mode), the
    first call's seconds (the compile), and the logits after `steps` steps against eager's from the same
    init: whether the compiled step computes the same training."""
    from pipeline.training.optim import FlatStackedSGD

    torch._dynamo.reset()
    precision = "bf16" if data.device.type == "cuda" else "fp32"
    model = build_model(ModelConfig(name="resnet9", width=width), list(range(m)), data.shape, 10,
                        stacking).to(data.device)
    model.train()
    opt = FlatStackedSGD(model.parameters(), 0.9, 5e-4)
    run = model if mode is None else torch.compile(model, mode=None if mode == "default" else mode)
    x = data.normalize(data.train_x[:batch]).unsqueeze(0).expand(m, -1, -1, -1, -1).contiguous()
    labels = data.train_y[:batch].unsqueeze(0).expand(m, -1).contiguous()
    step = one_step_fn(run, opt, x, labels, torch.full((m,), 0.05, device=data.device), precision)
    sync(data.device)
    start = time.perf_counter()
    step()
    sync(data.device)
    first = time.perf_counter() - start
    for _ in range(2):
        step()
    sync(data.device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(data.device)
    seconds = (time.perf_counter() - start) / steps
    model.eval()
    with torch.no_grad():
        logits = model(x[:, :256]).float()
    return {"mode": mode or "eager", "models": m, "stacking": stacking, "seconds_per_step": seconds,
            "first_step_seconds": first, "logits": logits}


def section_compile(device, quick: bool, budget: float) -> dict:
    """Is the step bound by the host (the profile's reading)? The same steps eager, under torch.compile
    (inductor: fused BatchNorm + ReLU, fewer kernels) and under torch.compile's CUDA graphs
    (reduce-overhead: one launch a step), for one model and a grouped block. Findings, not a gate: a
    variant that fails records its error."""
    width, batch, steps = (8, 32, 3) if quick else (64, 512, 30)
    data = cifar_shaped(batch, 16, device)
    torch.backends.cudnn.benchmark = True
    flops = resnet9_step_flops(width, batch, device)
    peak = peak_tflops(device)
    modes = ["default"] + (["reduce-overhead"] if torch.device(device).type == "cuda" else [])
    plan = [(None, 1, "loop")] + [(mo, 1, "loop") for mo in modes] + [(None, 8, "grouped"), ("default", 8, "grouped")]
    rows, eager, deadline = [], {}, time.perf_counter() + budget
    for mode, m, stacking in plan:
        if time.perf_counter() > deadline:
            rows.append({"mode": mode or "eager", "models": m, "stacking": stacking, "skipped": "time budget"})
            continue
        try:
            r = compile_variant(mode, m, stacking, width, batch, steps, data)
        except Exception as exc:  # a compile failure is a finding
            rows.append({"mode": mode or "eager", "models": m, "stacking": stacking,
                         "error": f"{type(exc).__name__}: {str(exc)[:500]}"})
            continue
        logits = r.pop("logits")
        if mode is None:
            eager[m] = (logits, r["seconds_per_step"])
        else:
            ref, eager_s = eager[m]
            r["speedup_vs_eager"] = eager_s / r["seconds_per_step"]
            r["max_abs_logit_diff_vs_eager"] = (logits - ref).abs().max().item()
            r["agreement_vs_eager"] = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
        r["models_per_gpu_hour"] = 3600.0 / (r["seconds_per_step"] / m * 24 * CIFAR_STEPS_PER_EPOCH)
        r["mfu"] = None if peak is None else flops * m / r["seconds_per_step"] / 1e12 / peak
        rows.append(r)
    torch._dynamo.reset()
    return {"ok": True, "width": width, "batch": batch, "steps_timed": steps, "rows": rows}


# ------------------------------------------------------------------------------- compile identity
def compiled_block(mode: str, width: int, batch: int, steps: int, m: int, device) -> dict:
    """A block of m ResNet-9s trained 2 epochs of `steps` steps through the real trainer with
    `train.compile` = mode (CUDA graphs on a GPU): sha256 of the members' weights and logits, seconds
    per step of the second epoch (the first pays the compile and the graph's capture)."""
    import hashlib

    data = cifar_shaped(steps * batch, 64, device)
    precision = "bf16" if data.device.type == "cuda" else "fp32"
    cfg = TrainConfig(epochs=2, batch_size=batch, lr=0.4, warmup_epochs=0.5, precision=precision, compile=mode)
    marks = []

    def mark(done, total):
        sync(data.device)
        marks.append(time.perf_counter())

    block = [Member(derive_seed("compiled", i), np.arange(steps * batch)) for i in range(m)]
    start = time.perf_counter()
    model, _ = train_members(ModelConfig(name="resnet9", width=width), cfg, data, block, 10, progress=mark,
                             stacking="loop", cuda_graphs=True)
    digest = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    digest.update(stacked_logits(model, data.all_images(), data.normalize).float().cpu().numpy().tobytes())
    return {"digest": digest.hexdigest(), "seconds_per_step": (marks[1] - marks[0]) / steps,
            "first_epoch_seconds": marks[0] - start}


def compiled_block_in_fresh_process(args: list[str], cache: Path) -> dict:
    """`compiled_block` in a new interpreter with empty inductor and Triton caches."""
    import os
    import subprocess

    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "TRITON_CACHE_DIR": str(cache / "triton"),
           "PYTHONHASHSEED": "0"}
    proc = subprocess.run([sys.executable, __file__, "--compiled-child", *args], env=env, capture_output=True,
                          text=True, timeout=400)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def section_compile_identity(device, quick: bool) -> dict:
    """Decision 38: `train.compile: inductor` (deterministic mode) in two fresh processes with empty
    caches gives the same bits; its throughput (models per GPU-hour for 24 epochs, MFU) against the
    eager trainer's, in the same call. Models differ from eager's (the choice is in the recipe's id)."""
    import tempfile

    width, batch, steps, m = (8, 32, 3, 2) if quick else (64, 512, 20, 8)
    args = [str(width), str(batch), str(steps), str(m), str(device)]
    with tempfile.TemporaryDirectory() as tmp:
        runs = [compiled_block_in_fresh_process(args, Path(tmp) / f"cache-{k}") for k in range(2)]
    eager = compiled_block("off", width, batch, steps, m, device)
    flops = resnet9_step_flops(width, batch, device)
    peak = peak_tflops(device)
    steps_24 = 24 * (CIFAR_STEPS_PER_EPOCH if not quick else steps)

    def rates(r):
        return {"seconds_per_step": r["seconds_per_step"],
                "models_per_gpu_hour": 3600.0 / (r["seconds_per_step"] / m * steps_24),
                "mfu": None if peak is None else flops * m / r["seconds_per_step"] / 1e12 / peak}

    identical = runs[0]["digest"] == runs[1]["digest"]
    return {"ok": identical, "width": width, "batch": batch, "models": m, "identical_across_processes": identical,
            "same_bits_as_eager": runs[0]["digest"] == eager["digest"],
            "compile_seconds": [r["first_epoch_seconds"] for r in runs],
            "compiled": rates(runs[0]), "eager": rates(eager),
            "speedup_vs_eager": eager["seconds_per_step"] / runs[0]["seconds_per_step"]}


# ------------------------------------------------------------------------- unlearning throughput
THROUGHPUT_SETTINGS = {  # one epoch or a few iterations each, at the CIFAR config's batch sizes
    "finetune": {"lr": 1e-3, "epochs": 1, "batch_size": 64},
    "gradient_ascent": {"lr": 1e-4, "epochs": 1, "batch_size": 64},
    "neggrad_plus": {"lr": 1e-3, "epochs": 1, "batch_size": 128, "forget_batch_size": 64},
    "scrub": {"lr": 5e-3, "epochs": 1, "msteps": 1, "batch_size": 64, "forget_batch_size": 32},
    "dmm": {"lr": 1e-4, "epochs": 1, "batch_size": 512},
    "oracle_matching": {"lr": 1e-4, "epochs": 1, "batch_size": 512},
    "del": {"lr": 5e-3, "epochs": 1, "batch_size": 128, "forget_batch_size": 128},
    "sfron": {"lr": 1e-2, "n_iters": 30, "forget_freq": 5, "batch_size": 128},
    "camu": {"impair_lr": 1e-4, "kl_lr": 1e-5, "epochs": 1, "batch_size": 32},
}


def section_unlearning_throughput(device, quick: bool) -> dict:
    """Every training method on a block of ResNet-9s (CIFAR shape) on the device as the unlearn stage runs
    it: example-passes per second per model (the meter's count, decision 22) and MFU at the trainer's
    FLOPs per example-pass, against the trainer's own MFU measured here (loop block, CUDA graphs)."""
    from pipeline.unlearn import get_method
    from pipeline.unlearn.base import ComputeMeter, Context, ForgetRows

    width, n_train, m = (8, 256, 2) if quick else (64, 4096, 8)
    data = cifar_shaped(n_train, 256, device)
    model_cfg = ModelConfig(name="resnet9", width=width)
    stacking = "loop"
    model = build_model(model_cfg, list(range(m)), data.shape, 10, stacking).to(device)
    n_points = n_train + data.val_y.shape[0]
    forget = np.arange(0, n_train, n_train // 64)
    retain = np.setdiff1d(np.arange(n_train), forget)
    g = torch.Generator().manual_seed(1)
    rows = 0.01 * torch.randn(len(forget), n_points, 10, generator=g)
    oracle = torch.randn(n_points, 10, generator=g)
    ctx = lambda: Context(data=data, classes=10, seed=5, model_indices=list(range(m)),  # noqa: E731
                          make_fresh_model=lambda idx: build_model(model_cfg, [100 + i for i in idx], data.shape,
                                                                   10, stacking).to(device),
                          _forget_rows=lambda: ForgetRows.from_rows(rows.to(device), forget),
                          _target_oracle_logits=lambda: oracle.to(device))
    batch = 32 if quick else 512
    flops_per_example = resnet9_step_flops(width, batch, device) / batch
    peak = peak_tflops(device)
    trainer_sec = time_second_epoch("loop", m, width, batch, 2 if quick else 8, cifar_shaped(
        (2 if quick else 8) * batch, 16, device), graphs=True) if torch.device(device).type == "cuda" else None
    trainer_mfu = None if peak is None or trainer_sec is None else flops_per_example * batch * m / trainer_sec / 1e12 / peak
    out = {}
    for name, settings in THROUGHPUT_SETTINGS.items():
        method, meter = get_method(name), ComputeMeter()
        try:
            sync(device)
            start = time.perf_counter()
            method.run(ctx(), model.select(list(range(m))), forget, retain, method.Config(**settings), meter)
            sync(device)
            seconds = time.perf_counter() - start
        except Exception as exc:  # a failure is a finding
            out[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            continue
        passes = meter.equivalent_passes()  # per member
        rate = None if not passes else float(passes) / seconds
        mfu = None if peak is None or rate is None else rate * m * flops_per_example / 1e12 / peak
        out[name] = {"seconds": seconds, "example_passes_per_model": passes, "passes_per_second_per_model": rate,
                     "mfu": mfu, "mfu_vs_trainer": None if mfu is None or not trainer_mfu else mfu / trainer_mfu}
    ok = all("error" not in v for v in out.values())
    return {"ok": ok, "models": m, "width": width, "trainer_mfu": trainer_mfu, "methods": out}


# ------------------------------------------------------------------------------- streamed fit
def section_streamed_fit(device, quick: bool) -> dict:
    """The fit at paper width (50,000 training points; quick: 2,000): diff-in-means and LASSO (FISTA) on
    boolean masks of m models for a block of targets, on the device: seconds and peak device memory,
    and the seconds extrapolated to the 60,000 x 11 outputs of a CIFAR-10 fit (margins + 10 logits)."""
    from pipeline.datamodels import get_estimator

    n, targets = (2000, 16) if quick else (50_000, 128)
    sizes = [500, 1000] if quick else [5000, 10_000, 20_000]
    g = torch.Generator().manual_seed(0)
    rows = []
    for m in sizes:
        masks = (torch.rand(m, n, generator=g) < 0.5).to(device)
        truth = torch.zeros(n, targets)
        truth[torch.randint(0, n, (targets * 8,), generator=g), torch.arange(targets).repeat(8)] = 0.05
        outputs = (masks.float().cpu() @ truth + torch.randn(m, targets, generator=g)).to(device)
        for est in ("diff_in_means", "lasso"):
            if est == "lasso" and m > sizes[-2]:
                continue  # one LASSO size less: the path is the slow part
            if torch.device(device).type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            start = time.perf_counter()
            kwargs = {"solver": "fista"} if est == "lasso" else {}
            get_estimator(est)(masks, outputs, **kwargs)
            sync(device)
            sec = time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated(device) / GB if torch.device(device).type == "cuda" else None
            rows.append({"estimator": est, "models": m, "points": n, "targets": targets, "seconds": sec,
                         "peak_device_gb": peak, "seconds_for_cifar_fit": sec * 60_000 * 11 / targets})
        del masks, outputs
    return {"ok": True, "rows": rows}


# ------------------------------------------------------------------------------------ memory plan
def memory_plan(device, width: int = 64, batch: int = 512, budget_gb: float = 80.0) -> dict:
    """Bytes per ResNet-9 member in a block at `batch` in bf16 autocast: tensors autograd saves for
    backward (read off one training step of the model), and parameters + gradients + momentum in fp32."""
    data = cifar_shaped(batch, 1, device)
    model = build_model(ModelConfig(name="resnet9", width=width), [0], data.shape, 10).to(device)
    seen, saved = set(), 0

    def pack(t):
        nonlocal saved
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in seen:
            seen.add(key)
            saved += t.untyped_storage().nbytes()
        return t

    x = data.normalize(data.train_x).unsqueeze(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            autocast_for(TrainConfig(precision="bf16"), torch.device(device)):
        loss = stacked_loss(model(x), data.train_y.unsqueeze(0))
    loss.backward()
    params = sum(p.numel() for p in model.parameters())
    optimizer = 3 * 4 * params  # fp32 weights, gradients, SGD momentum
    per_member = saved + optimizer
    data_bytes = 60000 * 3 * 32 * 32  # CIFAR-10 resident as uint8 (decision 12)
    reserve = 0.1 * budget_gb * GB  # allocator fragmentation, cuDNN workspaces, the CUDA context
    fits = int((budget_gb * GB - reserve - data_bytes) // per_member)
    # with CUDA graphs, a block whose members sit out some steps holds a step's activations twice
    fits_graphs = int((budget_gb * GB - reserve - data_bytes) // (per_member + saved))
    return {"width": width, "batch": batch, "parameters": params, "activation_bytes_per_member": saved,
            "optimizer_bytes_per_member": optimizer, "bytes_per_member": per_member,
            "budget_gb": budget_gb, "reserve_gb": reserve / GB, "largest_block": fits,
            "largest_uneven_block_cuda_graphs": fits_graphs}


# ------------------------------------------------------------------------------------------- main
def environment(device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "cpu": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d")}
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(name=props.name, capability=list(torch.cuda.get_device_capability(device)),
                   multiprocessors=props.multi_processor_count, memory_gb=props.total_memory / GB,
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   peak_bf16_tflops=peak_tflops(device))
    return env


def run_section(name, fn, report, out_path) -> None:
    start = time.perf_counter()
    try:
        result = fn()
    except Exception as exc:  # a failed section is a finding, not the end of the check
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    result["seconds"] = time.perf_counter() - start
    report["sections"][name] = result
    report["ok"] = all(s.get("ok", False) for s in report["sections"].values())
    out_path.write_text(json.dumps(report, indent=1, default=float))
    print(f"[{name}] ok={result.get('ok')} {result['seconds']:.1f} s", flush=True)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small shapes: the CPU-sized run of every section")
    ap.add_argument("--out", default="bench/out", help="folder for gpu_check.json")
    ap.add_argument("--budget", type=float, default=240.0, help="seconds the throughput section may take")
    ap.add_argument("--sections", default="env,memory_plan,equivalence,bf16_digits,unlearning,lasso,throughput,"
                                          "profile,cuda_graphs,compile_identity,unlearning_throughput,streamed_fit,compile")
    ap.add_argument("--compiled-child", nargs=5, metavar=("WIDTH", "BATCH", "STEPS", "MODELS", "DEVICE"),
                    help=argparse.SUPPRESS)  # compile_identity's fresh process
    args = ap.parse_args(argv)
    if args.compiled_child:
        w, b, st, m, dev = args.compiled_child
        torch.set_num_threads(1) if dev == "cpu" else None
        print(json.dumps(compiled_block("inductor", int(w), int(b), int(st), int(m), torch.device(dev))))
        return {"ok": True}
    device = torch.device(args.device)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / "gpu_check.json"
    torch.manual_seed(0)
    if args.quick and device.type == "cpu":
        torch.set_num_threads(1)  # toy sizes: threads only contend (and a loaded CPU makes them spin)
    report = {"ok": True, "quick": args.quick, "sections": {}}
    sections = {
        "env": lambda: {"ok": True, **environment(device)},
        "memory_plan": lambda: {"ok": True, **memory_plan(device, *((8, 32) if args.quick else (64, 512)))},
        "equivalence": lambda: section_equivalence(device, args.quick),
        "bf16_digits": lambda: section_bf16_digits(device, args.quick),
        "unlearning": lambda: section_unlearning(device, args.quick),
        "lasso": lambda: section_lasso(device, args.quick),
        "throughput": lambda: section_throughput(device, args.quick, args.budget),
        "profile": lambda: section_profile(device, args.quick),
        "cuda_graphs": lambda: section_cuda_graphs(device, args.quick),
        "compile": lambda: section_compile(device, args.quick, args.budget),
        "compile_identity": lambda: section_compile_identity(device, args.quick),
        "unlearning_throughput": lambda: section_unlearning_throughput(device, args.quick),
        "streamed_fit": lambda: section_streamed_fit(device, args.quick),
    }
    for name in args.sections.split(","):
        run_section(name, sections[name], report, out_path)
    print(json.dumps({k: v.get("ok") for k, v in report["sections"].items()}), "written to", out_path)
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
