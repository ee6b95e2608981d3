"""Stacked layers: M independent models computed as one batched computation.

Every parameter and buffer has the model axis first (shape (M, ...)), so per-model operations
(norms, masks, top-k, clipping) are reductions over the trailing axes. Activations of conv stacks
travel as (B, M*C, H, W) so that a grouped convolution with groups=M applies model m's kernels only
to model m's channels; each model sees its own images in the same batch position.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def uniform_init(shape: tuple[int, ...], fan_in: int, gen: torch.Generator) -> torch.Tensor:
    """PyTorch's default Linear/Conv init (kaiming_uniform with a=sqrt(5)): U(-1/sqrt(fan_in), +)."""
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(shape, generator=gen) * 2 - 1) * bound


class StackedLinear(nn.Module):
    """x (M, B, in) -> (M, B, out); relu=True applies a ReLU in the same autograd node (the values and
    gradients F.relu gives, without a second pass over a fresh tensor on each side)."""

    def __init__(self, gens: list[torch.Generator], d_in: int, d_out: int, bias: bool = True, relu: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.stack([uniform_init((d_out, d_in), d_in, g) for g in gens]))
        self.bias = nn.Parameter(torch.stack([uniform_init((d_out,), d_in, g) for g in gens])) if bias else None
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _StackedAffine.apply(x, self.weight, self.bias, self.relu)


class _StackedAffine(torch.autograd.Function):
    """x (M, B, in) @ weight (M, out, in)^T + bias (M, out), then a ReLU in place when asked, with the
    weight gradient computed as g^T x, already in the weight's (M, out, in) layout. Autograd's own bmm
    backward gives x^T g, the transposed layout, and copies it into place: 19 % of a digits MLP step on
    a CPU. The ReLU's backward is autograd's own (threshold_backward on the output). Under autocast the
    inputs are cast as autocast casts bmm's, and the gradients cast back to the inputs' dtypes."""

    @staticmethod
    def forward(ctx, x, weight, bias, relu=False):
        device = x.device.type
        low = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        xc, wc = (x, weight) if low is None else (x.to(low), weight.to(low))
        bc = None if bias is None else (bias if low is None else bias.to(low))
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        with torch.autocast(device, enabled=False):
            if bc is None:
                out = torch.bmm(xc, wc.transpose(1, 2))
            else:
                out = torch.baddbmm(bc.unsqueeze(1), xc, wc.transpose(1, 2))
        if relu:
            out.relu_()
            ctx.save_for_backward(xc, wc, out)
        else:
            ctx.save_for_backward(xc, wc)
        return out

    @staticmethod
    def backward(ctx, g):
        xc, wc, *out = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        if out:
            g = torch.ops.aten.threshold_backward(g, out[0], 0)
        g = g.to(wc.dtype)
        gx = torch.bmm(g, wc).to(x_dtype) if ctx.needs_input_grad[0] else None
        gw = torch.bmm(g.transpose(1, 2), xc).to(w_dtype) if ctx.needs_input_grad[1] else None
        gb = g.sum(1).to(b_dtype) if b_dtype is not None and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None


class StackedConv2d(nn.Module):
    """x (B, M*C_in, H, W) -> (B, M*C_out, H', W'), one grouped convolution, no bias."""

    def __init__(self, gens: list[torch.Generator], c_in: int, c_out: int, k: int, stride: int = 1, padding: int | None = None):
        super().__init__()
        fan_in = c_in * k * k
        self.weight = nn.Parameter(torch.stack([uniform_init((c_out, c_in, k, k), fan_in, g) for g in gens]))
        self.stride, self.padding = stride, (k // 2 if padding is None else padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, c_out = self.weight.shape[:2]
        w = self.weight.reshape(m * c_out, *self.weight.shape[2:])
        return F.conv2d(x, w, stride=self.stride, padding=self.padding, groups=m)


class StackedBatchNorm2d(nn.Module):
    """Per-model BatchNorm over (B, M*C, H, W): statistics are per channel, hence per model."""

    def __init__(self, m: int, c: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(m, c))
        self.bias = nn.Parameter(torch.zeros(m, c))
        self.register_buffer("running_mean", torch.zeros(m, c))
        self.register_buffer("running_var", torch.ones(m, c))
        self.momentum, self.eps = momentum, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # views share storage with the buffers, so the running statistics update in place
        return F.batch_norm(
            x, self.running_mean.view(-1), self.running_var.view(-1), self.weight.view(-1),
            self.bias.view(-1), self.training, self.momentum, self.eps,
        )


def to_channels(x: torch.Tensor) -> torch.Tensor:
    """(M, B, C, H, W) -> (B, M*C, H, W)."""
    m, b, c, h, w = x.shape
    return x.permute(1, 0, 2, 3, 4).reshape(b, m * c, h, w)


def from_channels(x: torch.Tensor, m: int) -> torch.Tensor:
    """(B, M*C, H, W) -> (M, B, C, H, W)."""
    b, mc, h, w = x.shape
    return x.view(b, m, mc // m, h, w).permute(1, 0, 2, 3, 4)
