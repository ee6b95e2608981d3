"""The unlearning method interface (decision 24) and the pieces every method shares.

A method is one module with a frozen pydantic `Config` (every hyperparameter, spec defaults) and
`run(ctx, model, forget, retain, cfg, meter) -> MethodOutput`. `model` is a StackedModel of the M
full models being unlearned (train mode is the method's choice); every member is unlearned
independently: norms, clips, rankings and masks are per member (decision 23).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.batches import derive_seed
from pipeline.data.device import DeviceData
from pipeline.unlearn.hparams import MethodConfig  # noqa: F401 - every method's Config derives from it


@dataclass
class MethodOutput:
    """Either the unlearned stacked model, or logits (M, P, classes) on train ++ val (dm-direct)."""

    model: torch.nn.Module | None = None
    logits: torch.Tensor | None = None
    notes: dict = field(default_factory=dict)


class ComputeMeter:
    """Example-passes per member: forward+backward of one example = 1, forward-only counted apart
    and weighted 1/3 in the headline fraction (decisions 10, 22)."""

    def __init__(self):
        self.backward = 0.0
        self.forward_only = 0.0
        self.start = time.perf_counter()

    def train_pass(self, n: int) -> None:
        self.backward += n

    def forward_pass(self, n: int) -> None:
        self.forward_only += n

    def equivalent_passes(self) -> float:
        return self.backward + self.forward_only / 3.0

    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def summary(self) -> dict:
        return {"example_passes": self.backward, "forward_passes": self.forward_only,
                "equivalent_passes": self.equivalent_passes(), "seconds": self.seconds()}


@dataclass(frozen=True)
class ForgetRows:
    """A forget set F's per-logit datamodels as dm-direct and DMM use them: sums (P, classes) =
    sum_{i in F} theta[i, :, :], and diagonal (|F|, classes) = theta[i, i, :] in F's order."""

    sums: torch.Tensor
    diagonal: torch.Tensor

    @staticmethod
    def from_rows(rows: torch.Tensor, forget) -> ForgetRows:
        """From the rows themselves, (|F|, P, classes), row k belonging to forget[k]."""
        forget = torch.as_tensor(np.asarray(forget, dtype=np.int64), device=rows.device)
        return ForgetRows(rows.float().sum(0), rows[torch.arange(len(forget), device=rows.device), forget].float())


@dataclass
class Context:
    """What a method may need, served lazily (datamodel rows, target-oracle logits, full logits)."""

    data: DeviceData
    classes: int
    seed: int
    model_indices: list[int]
    make_fresh_model: Callable[[list[int]], torch.nn.Module] | None = None
    _forget_rows: Callable[[], ForgetRows] | None = None
    _target_oracle_logits: Callable[[], torch.Tensor] | None = None
    notes: dict = field(default_factory=dict)

    def forget_rows(self) -> ForgetRows:
        """The forget set's per-logit datamodels, summed, and their diagonal; float32, on the device."""
        if self._forget_rows is None:
            raise RuntimeError("this method needs the fit stage's per-logit datamodels (fit.per_logit: true)")
        return self._forget_rows()

    def target_oracle_logits(self) -> torch.Tensor:
        """Mean logits of the target oracles on train ++ val: (P, classes), float32, on the device."""
        if self._target_oracle_logits is None:
            raise RuntimeError("this method needs target oracles (train.oracle.target > 0)")
        return self._target_oracle_logits()

    def rng(self, *parts) -> np.random.Generator:
        """One stream for the whole block: only for what is the same for every member by design (a
        method's randomness is per member: `member_rngs`, `member_batches`)."""
        return np.random.default_rng(derive_seed(self.seed, *parts))

    def member_rngs(self, *parts) -> list[np.random.Generator]:
        """One stream per member, from (stage, model index, parts) only: unlearned model i draws the
        same numbers whichever block it runs in, and no two models share a draw (as the reference runs
        each model as its own seeded run)."""
        return [np.random.default_rng(derive_seed(self.seed, "model", i, *parts)) for i in self.model_indices]

    def member_batches(self, indices, batch_size: int, *parts, drop_last: bool = False) -> list[np.ndarray]:
        """Each member's own shuffle of indices cut into batches: a list of (M, B) index arrays (every
        member has the same batch sizes, since each permutes the same indices)."""
        per = [index_batches(indices, batch_size, rng, drop_last) for rng in self.member_rngs(*parts)]
        return [np.stack(batches) for batches in zip(*per)]


# ---------------------------------------------------------------------------------------- helpers
def index_batches(indices: np.ndarray, batch_size: int, rng: np.random.Generator | None,
                  drop_last: bool = False) -> list[np.ndarray]:
    """Cut indices (shuffled when rng is given) into batches; the last partial batch is kept unless asked."""
    order = rng.permutation(indices) if rng is not None else np.asarray(indices)
    stop = len(order) - (len(order) % batch_size if drop_last else 0)
    return [order[i : i + batch_size] for i in range(0, stop, batch_size)]


def batch_inputs(data: DeviceData, idx: np.ndarray, n_models: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized images of train indices: ((M, B, C, H, W), (M, B)). idx (B,) is the same batch for every
    member; idx (M, B) gives member k the row idx[k] (`Context.member_batches`)."""
    t = torch.as_tensor(np.asarray(idx), device=data.device, dtype=torch.long)
    if t.dim() == 2:
        if t.shape[0] != n_models:
            raise ValueError(f"per-member batch of {t.shape[0]} rows for {n_models} members")
        return data.train_inputs(t)
    x, y = data.train_inputs(t)
    return x.unsqueeze(0).expand(n_models, *x.shape), y.unsqueeze(0).expand(n_models, -1)


def batch_len(idx: np.ndarray) -> int:
    """Examples per member in a batch of `index_batches` (B,) or `Context.member_batches` (M, B)."""
    return int(np.shape(idx)[-1])


def per_model_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per member and example: (M, B)."""
    m, b, c = logits.shape
    return F.cross_entropy(logits.reshape(m * b, c).float(), labels.reshape(m * b), reduction="none").view(m, b)


def member_params(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
