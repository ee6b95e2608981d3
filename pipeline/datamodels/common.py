"""What every estimator shares: the ``Datamodel`` result and the checks and slices of its inputs.

Throughout the package:

* ``masks``   (m, n) bool: one row per subset model, one column per training point (True = included);
* ``outputs`` (m, t) float: the models' outputs (e.g. margins) on t targets;
* results are in raw inclusion units: ``prediction = bias + masks.float() @ weight``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)
class Datamodel:
    """Linear datamodels of t targets over n training points, in raw inclusion units.

    weight: (n, t); bias: (t,); lam: (t,) the regularisation used per target, or None.
    """

    weight: Tensor
    bias: Tensor
    lam: Tensor | None = None

    def predict(self, masks: Tensor) -> Tensor:
        """masks (k, n) bool -> predicted outputs (k, t)."""
        return self.bias + masks.to(self.weight) @ self.weight


def _as_float(masks: Tensor, outputs: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Validate shapes; masks (m, n) and outputs (m, t) -> float X (m, n), Y (m, t) on masks' device."""
    if masks.ndim != 2 or outputs.ndim != 2 or masks.shape[0] != outputs.shape[0]:
        raise ValueError(
            f"expected masks (m, n) and outputs (m, t), got {tuple(masks.shape)} and {tuple(outputs.shape)}"
        )
    if masks.shape[0] < 2:
        raise ValueError("need at least 2 models")
    return masks.to(masks.device, dtype), outputs.to(masks.device, dtype)


def _chunks(size: int, chunk: int | None) -> list[slice]:
    chunk = chunk or max(size, 1)
    return [slice(i, min(i + chunk, size)) for i in range(0, max(size, 1), chunk)]
