"""Oracle Matching (OM): fine-tune the full model to match the mean logits of target oracles trained
without F (algorithms.md 3.1, decision 5).

Georgiev et al., "Attribute-to-Delete: Machine Unlearning via Datamodel Matching" (ICLR 2025),
Appendix C.1; reference code `unlearning/unlearning_algos/oracle_matching.py::oracle_matching`.
The targets are the stored mean logits of the target oracles (decision 3: never the eval oracles),
the same for every member. Defaults follow decision 5 (the U-LiRA DMM configuration: MSE on all
logits, Adam lr 1e-4, 4 epochs, batch 512, lr x 0.95 per epoch, r_f 5, r_r 20); the reference samples
its retain points with `default_rng(42)` and so do we (`matching.retain_rng`): the same points for every
model and hyperparameter setting, and the same points DMM uses. The batch order is each model's own.
Compute: the fine-tuning passes only. The reference computes the oracles' logits on the fly; here they
are read from the oracle stage, whose training and evaluation are OM's amortized cost (decision 22).
"""

import numpy as np
import torch

from pipeline.unlearn.base import MethodOutput
from pipeline.unlearn.matching import finetune_index_set, match_logits, retain_rng
from pipeline.unlearn.hparams import NEEDS as _NEEDS, OracleMatching as Config  # torch-free: see hparams.py

NEEDS = _NEEDS["oracle_matching"]


def run(ctx, model, forget, retain, cfg: Config, meter) -> MethodOutput:
    index_set, notes = finetune_index_set(forget, retain, cfg.forget_multiplier, cfg.retain_multiplier,
                                          retain_rng())
    points = np.unique(index_set)
    cols = torch.as_tensor(points, device=ctx.data.device, dtype=torch.long)
    targets = ctx.target_oracle_logits().index_select(0, cols).float()[None]  # (1, K, C), shared
    match_logits(ctx, model, index_set, points, targets, cfg, meter, "matching")
    return MethodOutput(model=model, notes=notes)
