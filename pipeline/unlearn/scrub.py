"""SCRUB: a student (initialized from the model) alternates "max" steps that push it away from the
original model (the teacher) on the forget set and "min" steps that keep it close on the retain set
(algorithms.md section 8, decision 9).

Kurmanji, Triantafillou, Hayes, Triantafillou, "Towards Unbounded Machine Unlearning", NeurIPS 2023.
Loop as in the KLoM benchmark (`RoyRin/data-unlearning-bench`, `unlearning_bench/unlearning.py::scrub`),
with its bug fixed: the optimizer updates the STUDENT's parameters (the benchmark builds it on the
teacher's, so the student never moves). For epoch e = 1..epochs, lr = lr0 * decay^(number of
lr_decay_epochs below e):
  - if e <= msteps: for each forget batch, maximize KL(teacher || student) at temperature T
    (`F.kl_div(log_softmax(s/T), softmax(t/T), 'batchmean') * T^2`);
  - for each retain batch, minimize gamma * CE + alpha * KL(teacher || student).
SGD with momentum 0.9 and weight decay 5e-4 (the paper-era wrapper); student in train mode, teacher a
frozen copy in eval mode. Defaults: the best U-LiRA setting of the DMM code (10 epochs, lr 0.01, forget
batch 32, retain batch 64, 3 max epochs). The official code's SWA smoothing is off (as in the benchmark);
`max_grad_norm` (per member) is optional and off by default (the paper-era wrapper used 0.2).
Compute: one student pass and one teacher forward pass per example.
"""

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.training.optim import StackedSGD, clip_grad_norm_per_model
from pipeline.unlearn.base import MethodOutput, batch_inputs, batch_len, per_model_ce
from pipeline.unlearn.hparams import NEEDS as _NEEDS, Scrub as Config  # torch-free: see hparams.py

NEEDS = _NEEDS["scrub"]


def distill_kl(student_logits, teacher_logits, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) * T^2, mean over the batch, per member: (M,)."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    p = F.softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(log_q, p, reduction="none").sum(-1).mean(1) * temperature**2


def _step(opt, loss, lr, max_grad_norm):
    opt.zero_grad()
    loss.backward()
    if max_grad_norm is not None:
        clip_grad_norm_per_model(opt.params, max_grad_norm)
    opt.step(lr)


def scrub_loop(ctx, student, teacher, forget, retain, cfg: Config, meter) -> None:
    """Update the student in place; the teacher is only read."""
    m, dev = student.n_models, ctx.data.device
    opt = StackedSGD(student.parameters(), cfg.momentum, cfg.weight_decay)
    teacher.eval()
    student.train()
    for epoch in range(1, cfg.epochs + 1):
        decays = int(np.sum(epoch > np.asarray(cfg.lr_decay_epochs)))
        lr = torch.full((m,), cfg.lr * cfg.lr_decay_rate**decays, device=dev)
        if epoch <= cfg.msteps:
            for idx in ctx.member_batches(forget, cfg.forget_batch_size, "scrub", "forget", epoch):
                x, _ = batch_inputs(ctx.data, idx, m)
                with torch.no_grad():
                    t_logits = teacher(x)
                _step(opt, -distill_kl(student(x), t_logits, cfg.temperature).sum(), lr, cfg.max_grad_norm)
                meter.train_pass(batch_len(idx))
                meter.forward_pass(batch_len(idx))
        for idx in ctx.member_batches(retain, cfg.batch_size, "scrub", "retain", epoch):
            x, y = batch_inputs(ctx.data, idx, m)
            with torch.no_grad():
                t_logits = teacher(x)
            s_logits = student(x)
            kl = distill_kl(s_logits, t_logits, cfg.temperature)
            loss = cfg.gamma * per_model_ce(s_logits, y).mean(1) + cfg.alpha * kl
            _step(opt, loss.sum(), lr, cfg.max_grad_norm)
            meter.train_pass(batch_len(idx))
            meter.forward_pass(batch_len(idx))


def run(ctx, model, forget, retain, cfg: Config, meter) -> MethodOutput:
    teacher = model.select(range(model.n_models)).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    scrub_loop(ctx, model, teacher, np.asarray(forget), np.asarray(retain), cfg, meter)
    return MethodOutput(model=model)
