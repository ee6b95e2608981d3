"""Accuracy, loss and membership-inference metrics on margins (specs decisions 1 and 25)."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["accuracy", "loss_from_margin", "mia_balanced_accuracy"]


def accuracy(values: Any, labels: Any = None) -> float | np.ndarray:
    """Fraction of points classified correctly, averaged over the points axis.

    Margins (``labels is None``): ``values`` shape ``(..., points)``, correct means ``margin > 0``.
    With margin ``z_y - logsumexp_{j != y} z_j`` this is ``softmax_y > 1/2``, which implies
    ``argmax z == y``; the converse fails with more than two classes, so with many classes it can
    sit below top-1 accuracy. Pass logits and labels for top-1 accuracy.

    Logits: ``values`` shape ``(..., points, classes)``, ``labels`` shape ``(points,)``; correct
    means ``argmax z == y`` (ties go to the lowest class index, as ``np.argmax``).

    Returns a float when there is no leading axis, else an array of shape ``(...)`` (per model).
    """
    arr = np.asarray(values)
    if labels is None:
        correct = arr > 0
    else:
        correct = arr.argmax(axis=-1) == np.asarray(labels)
    acc = correct.mean(axis=-1)
    return float(acc) if np.ndim(acc) == 0 else acc


def loss_from_margin(margin: Any) -> np.ndarray:
    """Cross-entropy from margins: ``softplus(-margin) = log(1 + exp(-margin))``, same shape.

    Proof, with ``m = z_y - L`` and ``L = logsumexp_{j != y} z_j``:
    ``CE = -z_y + logsumexp_j z_j = -z_y + log(exp(z_y) + exp(L)) = log(1 + exp(L - z_y))
    = log(1 + exp(-m))``. Computed as ``logaddexp(0, -m)``, stable for large ``|m|``.
    """
    return np.logaddexp(0.0, -np.asarray(margin, dtype=np.float64))


def mia_balanced_accuracy(unlearned_losses: Any, oracle_losses: Any) -> float:
    """Balanced accuracy of the best single loss threshold separating the two samples.

    Inputs of any shape are pooled (e.g. ``(models, forget_points)``). For a threshold t and the
    rule "loss <= t means unlearned", balanced accuracy is ``1/2 + (F_u(t) - F_o(t)) / 2`` with
    ``F`` the empirical CDFs; the reverse rule gives ``1/2 - (...)``. The best over t and both
    directions is ``1/2 + max_t |F_u(t) - F_o(t)| / 2`` (half the two-sample KS statistic, plus
    1/2): 0.5 when indistinguishable, 1.0 when perfectly separable. The threshold is chosen on the
    same samples it scores, so the value is optimistic for small samples. O(n log n).
    """
    u = np.sort(np.ravel(np.asarray(unlearned_losses, dtype=np.float64)))
    o = np.sort(np.ravel(np.asarray(oracle_losses, dtype=np.float64)))
    if u.size == 0 or o.size == 0:
        raise ValueError("need at least one loss on each side")
    if np.isnan(u[-1]) or np.isnan(o[-1]):  # sort puts NaN last
        raise ValueError("losses contain NaN")
    # Thresholds at every distinct value cover every distinct split of the pooled sample.
    thresholds = np.unique(np.concatenate([u, o]))
    cdf_u = np.searchsorted(u, thresholds, side="right") / u.size
    cdf_o = np.searchsorted(o, thresholds, side="right") / o.size
    return float(0.5 + 0.5 * np.max(np.abs(cdf_u - cdf_o)))
