"""What every estimator shares: the ``Datamodel`` result and the checks and slices of its inputs.

Throughout the package:

* ``masks``   (m, n) bool: one row per subset model, one column per training point (True = included);
* ``outputs`` (m, t) float: the models' outputs (e.g. margins) on t targets;
* results are in raw inclusion units: ``prediction = bias + masks.float() @ weight``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor


# models per float batch where a caller names none (decision 35): a product with the masks holds one
# (batch, n) float buffer, never (m, n); ``fit.model_batch`` sets it for the fit stage
MODEL_BATCH = 4096


@dataclass(frozen=True, eq=False)
class Datamodel:
    """Linear datamodels of t targets over n training points, in raw inclusion units.

    weight: (n, t); bias: (t,); lam: (t,) the regularisation used per target, or None.
    """

    weight: Tensor
    bias: Tensor
    lam: Tensor | None = None

    def predict(self, masks: Tensor) -> Tensor:
        """masks (k, n) bool -> predicted outputs (k, t), model batch by model batch."""
        return predict(self.weight, self.bias, masks)


def predict(weight: Tensor, bias: Tensor, masks: Tensor | Masks, model_batch: int | None = MODEL_BATCH) -> Tensor:
    """bias + masks @ weight (k, t) for masks (k, n) bool, one model batch of float masks at a time."""
    return torch.cat([bias + x @ weight for _, x in as_masks(masks, model_batch).batches(weight.dtype, weight.device)])


@dataclass(frozen=True, eq=False)
class Masks:
    """Rows of a mask matrix, read as float model batch by model batch (MadryLab's fast_l1 streams its
    boolean masks the same way): the masks stay bool, one (batch, n) float buffer is filled at a time.

    masks (M, n) bool (or 0/1 float); rows (m,) long: the rows of masks this view holds, in order, or None
    for all of them; batch: models per float batch, None for all at once. A product that sums over
    models adds the batches' products in model order, the first one as it is: one batch (m <= batch)
    gives the very bits of the product over all models at once.
    """

    masks: Tensor
    rows: Tensor | None = None
    batch: int | None = MODEL_BATCH

    @property
    def m(self) -> int:
        return self.masks.shape[0] if self.rows is None else self.rows.shape[0]

    @property
    def n(self) -> int:
        return self.masks.shape[1]

    @property
    def device(self) -> torch.device:
        return self.masks.device

    def take(self, rows: Tensor) -> Masks:
        """The view of rows (k,) of this view."""
        rows = rows.to(self.device)
        return Masks(self.masks, rows if self.rows is None else self.rows.index_select(0, rows), self.batch)

    def spans(self) -> list[slice]:
        return _chunks(self.m, self.batch)

    def part(self, span: slice) -> Tensor:
        """Rows span of this view, as stored (bool)."""
        return self.masks[span] if self.rows is None else self.masks.index_select(0, self.rows[span])

    def batches(self, dtype: torch.dtype, device: torch.device | None = None) -> Iterator[tuple[slice, Tensor]]:
        """(span, the view's rows span as float (len, n), on device (default the masks')) per model batch,
        in order. The float rows are one buffer, refilled: valid until the next batch, and free to change
        in place."""
        buf = None
        for span in self.spans():
            part = self.part(span)
            if buf is None:
                buf = torch.empty(part.shape, dtype=dtype, device=device or self.device)
            out = buf[: part.shape[0]]
            out.copy_(part)
            yield span, out

    def counts(self, dtype: torch.dtype) -> Tensor:
        """(n,) the number of this view's models that include each point, as dtype (exact below 2^24 models).
        Summed from the float batches: a bool tensor's own sum makes an int64 copy of it (8 bytes a value)."""
        return accumulate(x.sum(0) for _, x in self.batches(dtype))


def as_masks(masks: Tensor | Masks, model_batch: int | None = MODEL_BATCH) -> Masks:
    return masks if isinstance(masks, Masks) else Masks(masks, None, model_batch)


def accumulate(parts: Iterable[Tensor]) -> Tensor:
    """The sum of parts in order, the first one taken as it is (one part keeps its own bits)."""
    total = None
    for part in parts:
        total = _add(total, part)
    return total


def _add(total: Tensor | None, part: Tensor) -> Tensor:
    return part if total is None else total.add_(part)


def _check(masks: Tensor, outputs: Tensor, dtype: torch.dtype) -> Tensor:
    """Validate shapes of masks (m, n) and outputs (m, t) -> outputs as dtype on masks' device (the
    masks stay as they are: products read them by model batches, ``Masks``)."""
    if masks.ndim != 2 or outputs.ndim != 2 or masks.shape[0] != outputs.shape[0]:
        raise ValueError(
            f"expected masks (m, n) and outputs (m, t), got {tuple(masks.shape)} and {tuple(outputs.shape)}"
        )
    if masks.shape[0] < 2:
        raise ValueError("need at least 2 models")
    return outputs.to(masks.device, dtype)


def _chunks(size: int, chunk: int | None) -> list[slice]:
    chunk = chunk or max(size, 1)
    return [slice(i, min(i + chunk, size)) for i in range(0, max(size, 1), chunk)]
