"""CaMU, Causal Machine Unlearning (algorithms.md 7.2, decision 8).

Shen, Zhang, Bialkowski, Chen, Xu, "CaMU: Disentangling Causal Effects in Deep Model Unlearning",
SDM 2024. The paper's estimator equations were not available; this follows the official code
`ShaofeiShen768/CaMU` (`prepare.py`, `remove.py`, `main.py`), with z = the penultimate features of our
models (`model.features`; the reference uses ResNet-18's 512-d embedding):

1. Sample set D_s: |F| random retain points (capped at the retain size).
2. Counterfactuals, once: forget and sample points each in a random order, paired by position;
   x_cf = x_s + U[0, 1) per element in raw pixel units (`noise_space: raw`, the default): the
   reference's MNIST/Fashion images are ToTensor's [0, 1], so the noise spans the whole pixel range;
   in our normalized inputs that is U[0, range_c / std_c) per channel c, with range_c the training
   images' pixel range (digits 0..16, 8-bit images 0..255); U[0, 1) in normalized units is about 35 %
   of digits' range. Its CIFAR recipe adds U[0, 1) after ImageNet normalization (`noise_space:
   normalized`, configs/cifar10.yaml). y_cf = y_s, or, where
   y_s = y_f, a class drawn uniformly from the others. Each member draws its own (sample set, pairing,
   noise, labels), from (stage, model index): the reference runs every model as its own seeded run.
3. Each epoch, zip(counterfactual batches, sample batches), both reshuffled, batch 32:
   Step A (Adam, lr kl_lr, wd 1e-4):
     0.5 KL_sum(softmax z0(x_s) || softmax z(x_s)) + 0.5 KL_sum(softmax z0(x_cf) || softmax z(x_f)),
     softmax over the feature dimension, summed over the batch (`KLDivLoss(reduction='sum')`);
   Step B (a second Adam on the same parameters, lr impair_lr, wd 1e-4):
     0.9 CE(f(x_s), y_s) + 0.01 CE(f(x_f), y_cf).
   z0 comes from a frozen copy of the original model in eval mode; the student is in train mode.
Defaults: the reference's CIFAR-10/100 random-removal block (10 epochs, impair lr 1e-4, KL lr 1e-5).
The reference ties kl_lr to impair_lr per setting (4e-4 with 5e-4 or 1e-3 on MNIST, 1e-5 with 1e-4 or
5e-5 on CIFAR), so grids search the two together. Its step counts: 10 epochs x 188 batches of 32 (random
10 % of MNIST) or 2 x 188 (class removal); on digits' forget sets of 10-50 points an epoch is 1-2 steps.
Compute: per pair, 4 student passes (2 per step) and 2 forward passes of the frozen original, so a grid
point costs epochs x |F| x 4.67 example-passes: 0.0016 x epochs of a digits retraining on a 10-point set,
0.008 x epochs on 50 points, whatever the learning rates; the study's 48-point grid (4 kl_lr x 4
impair_lr x 2/10/30 epochs, configs/digits-study.yaml) 4.5 retrainings per model on a 40-point set.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.training.optim import StackedAdam
from pipeline.unlearn.base import MethodOutput, batch_inputs, batch_len, per_model_ce
from pipeline.unlearn.hparams import NEEDS as _NEEDS, Camu as Config  # torch-free: see hparams.py

NEEDS = _NEEDS["camu"]


def kl_sum(teacher_z: torch.Tensor, student_z: torch.Tensor) -> torch.Tensor:
    """KL(softmax teacher || softmax student) over the last axis, summed over the batch: (M,)."""
    log_q = F.log_softmax(student_z.float(), dim=-1)
    p = F.softmax(teacher_z.float(), dim=-1)
    return F.kl_div(log_q, p, reduction="none").sum(dim=(1, 2))


def step_a_loss(student, original, x_s, x_f, x_cf, cfg: Config) -> torch.Tensor:
    """Representation loss of step A, per member: (M,)."""
    with torch.no_grad():
        z0_s, z0_cf = original.features(x_s), original.features(x_cf)
    return cfg.kl_retain_weight * kl_sum(z0_s, student.features(x_s)) + \
        cfg.kl_forget_weight * kl_sum(z0_cf, student.features(x_f))


def step_b_loss(student, x_s, y_s, x_f, y_cf, cfg: Config) -> torch.Tensor:
    """Classification loss of step B, per member: (M,)."""
    ce_forget = per_model_ce(student(x_f), y_cf).mean(1)
    ce_retain = per_model_ce(student(x_s), y_s).mean(1)
    return cfg.ce_retain_weight * ce_retain + cfg.ce_forget_weight * ce_forget


def noise_scale(data, space: str) -> torch.Tensor:
    """Per channel, normalized units per noise unit: (C, 1, 1); range_c / std_c for raw pixels."""
    if space == "normalized":
        return torch.ones_like(data.std)
    x = data.train_x.transpose(0, 1).reshape(data.train_x.shape[1], -1)  # (C, N*H*W) uint8
    pixel_range = (x.amax(1) - x.amin(1)).float().view(-1, 1, 1)
    return pixel_range / data.std


def counterfactuals(rng: np.random.Generator, data, forget: np.ndarray, sample: np.ndarray, classes: int,
                    noise: float, space: str = "raw"):
    """One member's positional pairs (forget point, sample point) after independent shuffles; returns
    forget indices (n,), sample indices (n,), x_cf (n, C, H, W) normalized + noise (U[0, noise) in
    `space` units), y_cf (n,) on the device."""
    pf, ps = rng.permutation(forget), rng.permutation(sample)
    n = min(len(pf), len(ps))
    pf, ps = pf[:n], ps[:n]
    labels = data.train_y.cpu().numpy()
    y_f, y_s = labels[pf], labels[ps]
    y_cf = y_s.copy()
    for i in np.flatnonzero(y_s == y_f):
        others = [c for c in range(classes) if c != y_f[i]]
        y_cf[i] = others[rng.integers(len(others))]
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    x_s, _ = data.train_inputs(torch.as_tensor(ps, device=data.device))
    u = torch.rand(x_s.shape, generator=gen).to(data.device)
    return pf, ps, x_s + noise * noise_scale(data, space) * u, torch.as_tensor(y_cf, device=data.device, dtype=torch.long)


def run(ctx, model, forget, retain, cfg: Config, meter) -> MethodOutput:
    forget, retain = np.asarray(forget), np.asarray(retain)
    m, dev = model.n_models, ctx.data.device
    n_sample = min(len(forget), len(retain))
    # every member its own sample set, pairing, noise and labels (each reference run draws its own)
    drawn = []
    for rng in ctx.member_rngs("camu", "counterfactual"):
        sample = rng.choice(retain, size=n_sample, replace=False)
        drawn.append((sample, *counterfactuals(rng, ctx.data, forget, sample, ctx.classes, cfg.noise,
                                                     cfg.noise_space)))
    samples = np.stack([d[0] for d in drawn])  # (M, n_sample)
    pf = np.stack([d[1] for d in drawn])  # (M, n)
    x_cf_all = torch.stack([d[3] for d in drawn])  # (M, n, C, H, W)
    y_cf_all = torch.stack([d[4] for d in drawn])  # (M, n)
    member = torch.arange(m, device=dev)[:, None]
    original = model.select(range(m)).eval()
    for p in original.parameters():
        p.requires_grad_(False)
    opt_kl = StackedAdam(model.parameters(), weight_decay=cfg.weight_decay)
    opt_ce = StackedAdam(model.parameters(), weight_decay=cfg.weight_decay)
    lr_kl = torch.full((m,), cfg.kl_lr, device=dev)
    lr_ce = torch.full((m,), cfg.impair_lr, device=dev)
    model.train()
    for epoch in range(cfg.epochs):
        pair_batches = ctx.member_batches(np.arange(pf.shape[1]), cfg.batch_size, "camu", "pairs", epoch)
        sample_batches = ctx.member_batches(np.arange(n_sample), cfg.batch_size, "camu", "sample", epoch)
        for pairs, s_pos in zip(pair_batches, sample_batches):  # (M, B) positions
            x_f, _ = batch_inputs(ctx.data, np.take_along_axis(pf, pairs, 1), m)
            x_s, y_s = batch_inputs(ctx.data, np.take_along_axis(samples, s_pos, 1), m)
            t = torch.as_tensor(pairs, device=dev)
            x_cf = x_cf_all[member, t]
            y_cf = y_cf_all[member, t]

            loss_a = step_a_loss(model, original, x_s, x_f, x_cf, cfg).sum()
            opt_kl.zero_grad()
            loss_a.backward()
            opt_kl.step(lr_kl)
            meter.train_pass(batch_len(s_pos) + batch_len(pairs))
            meter.forward_pass(batch_len(s_pos) + batch_len(pairs))

            loss_b = step_b_loss(model, x_s, y_s, x_f, y_cf, cfg).sum()
            opt_ce.zero_grad()
            loss_b.backward()
            opt_ce.step(lr_ce)
            meter.train_pass(batch_len(s_pos) + batch_len(pairs))
    notes = {"sample_size": int(n_sample), "pairs": int(pf.shape[1]), "sample_capped": n_sample < len(forget)}
    return MethodOutput(model=model, notes=notes)
