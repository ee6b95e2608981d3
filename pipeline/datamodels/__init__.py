"""Datamodels: linear surrogates from subset-inclusion masks to model outputs (specs decision 4).

Modules, one concern each: ``common`` (the Datamodel result, input checks), ``closed_form``
(difference in means, ridge), ``lasso_problem`` (the standardised LASSO problem both solvers solve),
``lasso_fista`` (batched accelerated proximal gradient in torch: GPUs, designs without a Gram
matrix), ``lasso_cd`` (compiled coordinate descent: the CPU kernel), ``lasso_fit`` (``lasso``,
``lasso_path``, ``lasso_design``: the split, the path, the per-target lambda), ``scoring`` (LDS).
"""

from collections.abc import Callable

from pipeline.datamodels.closed_form import diff_in_means, ridge
from pipeline.datamodels.common import MODEL_BATCH, Datamodel, Masks
from pipeline.datamodels.lasso_fit import LassoDesign, LassoPath, lasso, lasso_design, lasso_path
from pipeline.datamodels.scoring import lds

ESTIMATORS: dict[str, Callable[..., Datamodel]] = {
    "diff_in_means": diff_in_means,
    "lasso": lasso,
    "ridge": ridge,
}


def get_estimator(name: str) -> Callable[..., Datamodel]:
    """The estimator registered as ``name``: fn(masks (m, n) bool, outputs (m, t), **options) -> Datamodel."""
    try:
        return ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown datamodel estimator {name!r}; valid: {', '.join(sorted(ESTIMATORS))}") from None


__all__ = [
    "ESTIMATORS", "MODEL_BATCH", "Datamodel", "Masks", "LassoDesign", "LassoPath", "diff_in_means", "get_estimator", "lasso", "lasso_design",
    "lasso_path", "lds", "ridge",
]
