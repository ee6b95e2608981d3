"""dm-direct: predict the oracle's outputs with datamodels, no training (algorithms.md 2.4, decision 5).

Georgiev et al., "Attribute-to-Delete: Machine Unlearning via Datamodel Matching" (ICLR 2025),
Appendix C.2; reference code `unlearning/unlearning_algos/dm_direct.py`:

    logits_unlearned(x_j) = logits_f(x_j) - multiplier * sum_{i in F} theta[i, j, :]

with the member's own full-model logits as the base (its idiosyncrasies are kept, only the predicted
change is applied). It is a "model" only on the P = train ++ val points that have datamodel columns, so
it returns logits (M, P, classes) and no weights. `diagonal_only` keeps only the self-influence
theta[i, i, :] of the forget points, as the reference's option of that name. The reference's
`reg_path` option (marked "not used" there) is not offered.
Compute: one forward pass of the full model per point (the datamodel fit is amortized, decision 22).
"""

import numpy as np

from pipeline.unlearn.base import MethodOutput
from pipeline.unlearn.matching import dm_direct_logits
from pipeline.unlearn.hparams import NEEDS as _NEEDS, DmDirect as Config  # torch-free: see hparams.py

NEEDS = _NEEDS["dm_direct"]


def run(ctx, model, forget, retain, cfg: Config, meter) -> MethodOutput:
    n_points = ctx.data.n_train + ctx.data.val_x.shape[0]
    logits = dm_direct_logits(ctx, model, np.asarray(forget), np.arange(n_points), cfg.multiplier,
                              cfg.diagonal_only, meter)
    return MethodOutput(logits=logits, notes={"points": n_points})
