"""Batch order, below both the data layer and the trainer (decision 12): seeds derived from names, a
block's members, and each member's seeded batches per epoch, the same on every data path.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts (stage id, role, model index, ...): stable across runs and machines."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass(frozen=True)
class Member:
    """One model of a block: init seed, data-order seed, and its training indices."""

    seed: int
    indices: np.ndarray


def block_steps(members: list[Member], epoch: int, batch_size: int):
    """Per step of one epoch: (step, training indices (M, B), active (M,) bool). A member whose epoch
    is over sits out (inactive) on a repeat of its last batch."""
    order, lengths = block_order(members, epoch, batch_size)
    for step in range(order.shape[0]):
        yield step, order[step], step < lengths


def block_order(members: list[Member], epoch: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One epoch of a block at once: training indices (steps, M, B) and each member's steps (M,)."""
    batches = [torch.as_tensor(epoch_batches(m, epoch, batch_size)) for m in members]
    lengths = torch.tensor([len(b) for b in batches])
    steps = torch.arange(int(lengths.max()))
    return torch.stack([b[steps.clamp(max=len(b) - 1)] for b in batches], dim=1), lengths


def epoch_batches(member: Member, epoch: int, batch_size: int) -> np.ndarray:
    """The member's batches for one epoch: a seeded permutation of its indices, cut into full batches.
    Returns (steps, batch_size) training indices. The same on every data path (decision 12)."""
    gen = torch.Generator().manual_seed(derive_seed(member.seed, "order", epoch))
    perm = torch.randperm(len(member.indices), generator=gen).numpy()
    steps = len(perm) // batch_size
    return member.indices[perm[: steps * batch_size]].reshape(steps, batch_size)
