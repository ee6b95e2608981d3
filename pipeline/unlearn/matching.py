"""What Oracle Matching and Datamodel Matching share (algorithms.md 3.1, decision 5), and the dm-direct
prediction that DMM distils (algorithms.md 2.4).

Georgiev, Rinberg, Park, Garg, Ilyas, Madry, Neel, "Attribute-to-Delete: Machine Unlearning via
Datamodel Matching" (ICLR 2025). Reference code: `unlearning/unlearning_algos/oracle_matching.py`
(`finetune`) and `dm_direct.py` of the paper-era `unlearning/` package.

The routine fine-tunes every member on an index set made of the forget set repeated r_f times plus
r_r x |F| retain points, with MSE between the member's logits and its target logits, Adam, lr x 0.95
per epoch, the model in train mode. Shapes: targets are (M or 1, K, classes) over K sorted unique points.

Randomness: the retain points are the reference's fixed draw (`default_rng(42)`, the same for every model,
method and setting); each model's batch order is its own, from (stage, model index) (issue 14).

Small forget sets (issue 14, item 4): the fine-tuning set has (r_f + r_r)|F| points, so the reference's
step count shrinks with |F|: random10 on digits (r_f 5, r_r 10, batch 64, 3 epochs) is 150 points and 9
Adam steps. Adam's early steps move every weight by about lr whatever its gradient (m / sqrt(v) is +-1 at
the first step), so 9 steps is all transient, and the model drifts on the points outside the 150 (digits
MLP, random10, lr 1e-3: retain P95 1.64 against do-nothing's 0.77 at 100 vs 100). The digits MLP has no
BatchNorm, so train-mode statistics on partial batches are not the cause there (they may add to it on
the CNNs). `min_steps` keeps the reference's loss, optimizer, index set and per-epoch decay, and only
repeats each epoch's pass over the index set until the run has at least that many steps.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.margins import stacked_logits
from pipeline.training.optim import StackedAdam
from pipeline.unlearn.base import ForgetRows, batch_inputs, batch_len, index_batches
from pipeline.unlearn.hparams import MatchingConfig  # noqa: F401 - the shared fine-tuning hyperparameters


# The reference draws the retain points with `np.random.default_rng(seed=42)` in every run: one draw for
# every model, method and hyperparameter setting, so OM and DMM fine-tune on the same points.
RETAIN_SEED = 42


def retain_rng() -> np.random.Generator:
    return np.random.default_rng(RETAIN_SEED)


def finetune_index_set(forget: np.ndarray, retain: np.ndarray, forget_multiplier: float,
                       retain_multiplier: float, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """F repeated floor(r_f) times + the first floor(frac(r_f) |F|) points of F, then floor(r_r |F|)
    retain points drawn without replacement (capped at |retain|, decision 21) with rng (OM and DMM pass
    `retain_rng()`, the reference's fixed seed). Returns (indices, notes)."""
    forget, retain = np.asarray(forget, dtype=np.int64), np.asarray(retain, dtype=np.int64)
    whole = int(np.floor(forget_multiplier))
    extra = int(np.floor((forget_multiplier - whole) * len(forget)))
    wanted = int(np.floor(retain_multiplier * len(forget)))
    used = min(wanted, len(retain))
    sampled = rng.choice(retain, size=used, replace=False) if used else np.empty(0, np.int64)
    index_set = np.concatenate([np.tile(forget, whole), forget[:extra], sampled]).astype(np.int64)
    notes = {"retain_points_wanted": wanted, "retain_points_used": used, "retain_capped": used < wanted,
             "finetune_set_size": int(len(index_set))}
    return index_set, notes


def dm_correction(rows: ForgetRows, forget: np.ndarray, points: np.ndarray, multiplier: float = 1.0,
                  diagonal_only: bool = False) -> torch.Tensor:
    """multiplier x sum_{i in F} theta[i, x, :] for x in points: (len(points), classes).

    diagonal_only keeps only the self-influence theta[i, i, :] of forget points (zero elsewhere)."""
    pts = torch.as_tensor(np.asarray(points, dtype=np.int64), device=rows.sums.device)
    if not diagonal_only:
        return multiplier * rows.sums.index_select(0, pts)
    which = np.full(rows.sums.shape[0], -1, dtype=np.int64)
    which[np.asarray(forget, dtype=np.int64)] = np.arange(len(forget))
    row_of = torch.as_tensor(which[np.asarray(points, dtype=np.int64)], device=rows.sums.device)
    hit = row_of >= 0
    out = torch.zeros(len(points), rows.sums.shape[1], device=rows.sums.device, dtype=torch.float32)
    out[hit] = rows.diagonal[row_of[hit]]
    return multiplier * out


def dm_direct_logits(ctx, model, forget: np.ndarray, points: np.ndarray, multiplier: float,
                     diagonal_only: bool, meter) -> torch.Tensor:
    """Each member's eval-mode logits on points (train ++ val indices) minus the datamodel correction:
    (M, len(points), classes). Counts one forward pass per point."""
    pts = torch.as_tensor(np.asarray(points, dtype=np.int64), device=ctx.data.device)
    images = ctx.data.all_images().index_select(0, pts)
    logits = stacked_logits(model, images, ctx.data.normalize)
    meter.forward_pass(len(points))
    return logits - dm_correction(ctx.forget_rows(), forget, points, multiplier, diagonal_only)[None]


def passes_per_epoch(n_points: int, cfg: MatchingConfig) -> int:
    """Passes over the index set per epoch: 1, or enough for cfg.min_steps optimizer steps in all."""
    per_pass = max(1, -(-n_points // cfg.batch_size))
    return max(1, -(-cfg.min_steps // (per_pass * cfg.epochs)))


def match_logits(ctx, model, index_set: np.ndarray, points: np.ndarray, targets: torch.Tensor,
                 cfg: MatchingConfig, meter, tag: str) -> None:
    """Fine-tune every member (in place) so that its logits on index_set match targets.

    points: the sorted unique training indices targets are given for; targets (M or 1, len(points), C).
    Loss: the sum over members of each member's MSE, mean over batch and classes."""
    model.train()  # BatchNorm statistics update, as in the reference
    m = model.n_models
    opt = StackedAdam(model.parameters())
    member = torch.arange(m, device=ctx.data.device)[:, None]
    passes = passes_per_epoch(len(index_set), cfg)
    for epoch in range(cfg.epochs):
        lr = torch.full((m,), cfg.lr * cfg.lr_decay**epoch, device=ctx.data.device)
        batches = []
        for p in range(passes):
            if cfg.shuffle:  # each member its own order (issue 14)
                parts = (tag, "epoch", epoch) if p == 0 else (tag, "epoch", epoch, "pass", p)
                batches += ctx.member_batches(index_set, cfg.batch_size, *parts)
            else:
                batches += [np.broadcast_to(b, (m, len(b))) for b in index_batches(index_set, cfg.batch_size, None)]
        for idx in batches:
            x, _ = batch_inputs(ctx.data, idx, m)
            cols = torch.as_tensor(np.searchsorted(points, idx), device=ctx.data.device)  # (M, B)
            target = targets.expand(m, -1, -1)[member, cols]  # (M, B, C)
            loss = (model(x).float() - target).pow(2).mean(dim=(1, 2)).sum()
            opt.zero_grad()
            loss.backward()
            opt.step(lr)
            meter.train_pass(batch_len(idx))
