"""The per-member adapter (decision 37): an ordinary single-model method, a function of one `nn.Module`
and its forget and retain examples, run on each member of a stack in turn, exact as the `loop` stacking
is: member k is sliced out as a model of one, given its own random streams (from its model index alone),
unlearned by the function, and written back into row k of the stack. The result is bit-identical to the
function run on that member alone, whichever block the member runs in.

    from pipeline.unlearn.adapter import per_member
    method = per_member(my_function, MyConfig)          # my_function(model, forget, retain, cfg, member)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from pipeline.batches import derive_seed
from pipeline.data.device import DeviceData
from pipeline.unlearn import Method
from pipeline.unlearn.base import ComputeMeter, MethodOutput, index_batches


class MemberModel(nn.Module):
    """One member as an ordinary model: inputs (B, C, H, W) normalized, logits (B, classes). Its
    parameters are the member's, with a leading axis of 1 (any torch optimizer steps them as usual)."""

    def __init__(self, stack: nn.Module):
        super().__init__()
        if stack.n_models != 1:
            raise ValueError(f"a MemberModel holds one member, got a stack of {stack.n_models}")
        self.stack = stack

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stack(x.unsqueeze(0))[0]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stack.features(x.unsqueeze(0))[0]


@dataclass(frozen=True)
class Examples:
    """Training examples by index (the forget or the retain set), served normalized on the device.
    A torch Dataset (len, [i] -> (x, y)), and, faster, `batch(idx)`, `batches(...)`, `tensors()`."""

    data: DeviceData
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.batch(np.asarray([self.indices[i]]))
        return x[0], y[0]

    def batch(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, H, W) and labels (B,) of training indices idx (values of `indices`)."""
        return self.data.train_inputs(torch.as_tensor(np.asarray(idx), device=self.data.device, dtype=torch.long))

    def batches(self, batch_size: int, rng: np.random.Generator | None = None, drop_last: bool = False):
        """(x, y) per batch, in an order shuffled by rng (in index order when rng is None)."""
        for idx in index_batches(self.indices, batch_size, rng, drop_last):
            yield self.batch(idx)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch(self.indices)


@dataclass
class Member:
    """What the function gets beside the model: which full model this is, its own random streams (from
    the stage and the model index only), its own compute meter (count example-passes as base.py says),
    the device, and the block's context (`ctx.forget_rows()` etc., for the method's NEEDS)."""

    index: int
    rng: np.random.Generator
    generator: torch.Generator  # a CPU generator for torch (DataLoader shuffles, torch.randn)
    meter: ComputeMeter
    device: torch.device
    ctx: object


def member_of(ctx, index: int) -> Member:
    """Member `index` (a full model's index) of a block: its streams depend on (stage, index) alone."""
    seed = derive_seed(ctx.seed, "model", index, "per_member")
    return Member(index=index, rng=np.random.default_rng(seed), generator=torch.Generator().manual_seed(seed),
                  meter=ComputeMeter(), device=ctx.data.device, ctx=ctx)


def per_member(fn: Callable, config: type, needs: tuple[str, ...] = ()) -> Method:
    """A method running `fn(model, forget, retain, cfg, member) -> None | MemberModel` on each member:
    model a MemberModel (unlearn it in place, or return another), forget / retain `Examples`, cfg the
    validated `config`, member a `Member`. Compute is the mean over members of their meters."""

    def run(ctx, model, forget, retain, cfg, meter) -> MethodOutput:
        forget_ex, retain_ex = Examples(ctx.data, np.asarray(forget)), Examples(ctx.data, np.asarray(retain))
        members = []
        for k, index in enumerate(ctx.model_indices):
            member = member_of(ctx, index)
            alone = MemberModel(model.select([k]))
            out = fn(alone, forget_ex, retain_ex, cfg, member)
            write_member(model, k, (out if out is not None else alone).stack)
            members.append(member.meter)
        meter.backward += float(np.mean([m.backward for m in members]))
        meter.forward_only += float(np.mean([m.forward_only for m in members]))
        return MethodOutput(model=model)

    run.__doc__ = fn.__doc__
    return Method(Config=config, run=run, NEEDS=tuple(needs))


def write_member(stack: nn.Module, k: int, one: nn.Module) -> None:
    """Row k of every parameter and buffer of `stack` := the single-member model `one`'s."""
    source = dict(one.named_parameters()) | dict(one.named_buffers())
    with torch.no_grad():
        for name, t in list(stack.named_parameters()) + list(stack.named_buffers()):
            t[k].copy_(source[name][0])
