"""Datamodels: linear surrogates from subset-inclusion masks to model outputs (specs decision 4)."""

from collections.abc import Callable

from pipeline.datamodels.estimators import (
    Datamodel, LassoDesign, LassoPath, diff_in_means, lasso, lasso_design, lasso_path, lds, ridge,
)

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
    "ESTIMATORS", "Datamodel", "LassoDesign", "LassoPath", "diff_in_means", "get_estimator", "lasso", "lasso_design",
    "lasso_path", "lds", "ridge",
]
