"""Datamodel Matching (DMM): fine-tune the full model to match its own dm-direct prediction
(algorithms.md 3.1 and 2.4, decision 5).

Georgiev et al., "Attribute-to-Delete: Machine Unlearning via Datamodel Matching" (ICLR 2025),
Appendix C.3; reference code `unlearning/unlearning_algos/oracle_matching.py::dm_matching`.
Target of member k on point x: logits_k(x) - multiplier * sum_{i in F} theta[i, x, :], where logits_k
are the ORIGINAL member's eval-mode logits, computed once before fine-tuning (the reference wraps the
full model in a dm-direct module and evaluates it per batch; its student is a copy, so the targets are
the same). Targets are computed only on the points of the fine-tuning set, not on all P points: they are
the only ones the loss reads, and the count of forward passes stays honest.
Same fine-tuning routine and defaults as OM (see matching.py).
Compute: one forward pass of the original model per distinct fine-tuning point, plus the fine-tuning
passes; the subset models and the datamodel fit are amortized (decision 22).
"""

import numpy as np

from pipeline.unlearn.base import MethodOutput
from pipeline.unlearn.matching import dm_direct_logits, finetune_index_set, match_logits, retain_rng
from pipeline.unlearn.hparams import NEEDS as _NEEDS, Dmm as Config  # torch-free: see hparams.py

NEEDS = _NEEDS["dmm"]


def run(ctx, model, forget, retain, cfg: Config, meter) -> MethodOutput:
    index_set, notes = finetune_index_set(forget, retain, cfg.forget_multiplier, cfg.retain_multiplier,
                                          retain_rng())
    points = np.unique(index_set)
    targets = dm_direct_logits(ctx, model, np.asarray(forget), points, cfg.multiplier, cfg.diagonal_only,
                               meter)  # (M, K, C), from the model before any update
    match_logits(ctx, model, index_set, points, targets, cfg, meter, "matching")
    return MethodOutput(model=model, notes=notes)
