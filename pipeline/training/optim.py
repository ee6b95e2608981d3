"""Optimizers over stacked parameters (model axis first) with per-model learning rates and a per-model
`active` switch, so that a model that has finished its epoch's batches is left exactly as it is."""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import torch


@cache
def _sgd_kernel():
    """One pass over a parameter's rows (M, n): decay, momentum and the update, element by element, in
    float32 (compiled once per machine, numba's cache). The torch ops it replaces make four passes over
    memory: on a CPU the step is bound by memory (0.27 against 1.1 ms for the digits MLP's 128x128 layer
    of 64 models), and it was 13 % of a training step."""
    import numba

    @numba.njit(cache=True, nogil=True)
    def sgd_rows(p, g, buf, keep, on, step, weight_decay):
        for m in range(p.shape[0]):
            k, o, s = keep[m], on[m], step[m]
            for j in range(p.shape[1]):
                d = g[m, j]
                if weight_decay != 0:
                    d = d + weight_decay * p[m, j]
                b = buf[m, j] * k + o * d
                buf[m, j] = b
                p[m, j] = p[m, j] + s * b

    return sgd_rows


@cache
def _adam_kernel():
    """StackedAdam's step in one pass over a parameter's rows (M, n), in torch's order of operations
    (lerp, the second moment, the denominator, the update), float32; within an ulp of the torch ops
    (tests), which make about eight passes and a temporary: 22 % of a DMM task's time, 0.63 s of 2.8."""
    import numba

    @numba.njit(cache=True, nogil=True, error_model="numpy")  # no per-element zero check: it vectorises
    def adam_rows(p, g, m, v, step, w1, b2, c2, correction2, eps, weight_decay):
        for r in range(p.shape[0]):
            s = step[r]
            for j in range(p.shape[1]):
                d = g[r, j]
                if weight_decay != 0:
                    d = d + weight_decay * p[r, j]
                mm = m[r, j] + w1 * (d - m[r, j])
                vv = v[r, j] * b2 + c2 * d * d
                m[r, j] = mm
                v[r, j] = vv
                p[r, j] = p[r, j] + s * (mm / (np.sqrt(vv) / correction2 + eps))

    return adam_rows


def _compiled_ok(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors)


def _per_model_factors(momentum: float, lr: torch.Tensor, active: torch.Tensor | None):
    """(on, keep, step), each (M,): 1/0 for active members, the momentum buffer's factor (momentum when
    active, 1 when not) and the step (-lr when active, 0 when not)."""
    on = torch.ones_like(lr) if active is None else active.to(lr.device, lr.dtype)
    return on, momentum * on + (1.0 - on), -lr * on


def _sgd_rows(p, g, buf, keep, on, step, weight_decay: float) -> None:
    """The compiled step on (M, n) views; keep, on, step (M,) float32 on the CPU."""
    m = p.shape[0]
    _sgd_kernel()(p.view(m, -1).numpy(), g.view(m, -1).numpy(), buf.view(m, -1).numpy(), keep.numpy(),
                  on.numpy(), step.numpy(), np.float32(weight_decay))


class StackedSGD:
    """torch.optim.SGD semantics (momentum, L2 weight decay added to the gradient), per model. On a CPU a
    compiled pass per parameter (`compiled`; the same arithmetic, rounded once per operation where torch's
    vectorised kernels may fuse a multiply-add: models agree to float tolerance, not bit for bit)."""

    def __init__(self, params, momentum: float = 0.9, weight_decay: float = 0.0, compiled: bool = True):
        self.params = [p for p in params if p.requires_grad]
        self.momentum, self.weight_decay, self.compiled = momentum, weight_decay, compiled
        self.buffers = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, lr: torch.Tensor, active: torch.Tensor | None = None, grad_mask: list | None = None) -> None:
        """lr (M,), active (M,) bool; grad_mask: optional per-parameter 0/1 tensors (DEL, SFR-on).
        In place, no branches: an inactive member gets buf <- 1*buf + 0*d_p and p <- p - 0*buf."""
        on, keep_buf, step = _per_model_factors(self.momentum, lr, active)
        for i, (p, buf) in enumerate(zip(self.params, self.buffers)):
            if p.grad is None:
                continue
            masked = grad_mask is not None and grad_mask[i] is not None
            if self.compiled and not masked and _compiled_ok(p, p.grad, buf, lr):
                _sgd_rows(p.data, p.grad, buf, keep_buf, on, step, self.weight_decay)
                continue
            shape = (-1,) + (1,) * (p.dim() - 1)
            d_p = p.grad
            if self.weight_decay:
                d_p.add_(p, alpha=self.weight_decay)
            if masked:
                d_p.mul_(grad_mask[i])
            buf.mul_(keep_buf.view(shape)).addcmul_(on.view(shape), d_p)
            p.addcmul_(step.view(shape), buf)


class FlatStackedSGD(StackedSGD):
    """StackedSGD over one flat buffer: every parameter (M, ...) becomes a contiguous view of it and its
    gradient a view of a second one, so a step is a handful of kernels however many tensors the model
    has. Per-model scalars (lr, the active switch) are expanded to the buffer's layout. The same
    arithmetic, element by element, as StackedSGD. For the trainer, where every parameter gets a
    gradient at every step (a parameter without one would still decay and carry momentum here)."""

    def __init__(self, params, momentum: float = 0.9, weight_decay: float = 0.0, gather: bool | None = None,
                 compiled: bool = True):
        self.params = [p for p in params if p.requires_grad]
        self.momentum, self.weight_decay, self.compiled = momentum, weight_decay, compiled
        with torch.no_grad():
            self.flat = torch.cat([p.detach().reshape(-1) for p in self.params])
        self.flat_grad = torch.zeros_like(self.flat)
        self.flat_buf = torch.zeros_like(self.flat)
        m, start, self.segments = self.params[0].shape[0], 0, []
        for p in self.params:
            stop = start + p.numel()
            p.data = self.flat[start:stop].view(p.shape)
            p.grad = self.flat_grad[start:stop].view(p.shape)  # autograd accumulates into it in place
            self.segments.append(slice(start, stop))
            start = stop
        self.gather = self.flat.is_cuda if gather is None else gather
        if self.gather:  # the model of each element (runs of p[0].numel() per model): 4 bytes each
            runs = torch.tensor([p[0].numel() for p in self.params for _ in range(m)])
            owner = torch.repeat_interleave(torch.arange(m, dtype=torch.int32).repeat(len(self.params)), runs)
            self.owner = owner.to(self.flat.device)

    def zero_grad(self) -> None:
        self.flat_grad.zero_()

    def _per_element(self, per_model: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """Pairs of (per-model values broadcastable to a part, that part's slice) covering the buffer: on a
        GPU one gather of the values to every element (one kernel for the whole buffer); on a CPU, where
        that gather costs more than the update, a (M, 1) broadcast per parameter."""
        if self.gather:
            return [(per_model.index_select(0, self.owner), slice(None))]
        return [(per_model[:, None], seg) for seg in self.segments]

    def _part(self, t: torch.Tensor, seg: slice) -> torch.Tensor:
        """The whole buffer t, or one parameter's part of it as (M, n)."""
        return t if seg == slice(None) else t[seg].view(self.params[0].shape[0], -1)

    @torch.no_grad()
    def step(self, lr: torch.Tensor, active: torch.Tensor | None = None, grad_mask: list | None = None) -> None:
        if grad_mask is not None:
            raise ValueError("FlatStackedSGD takes no gradient masks: use StackedSGD")
        if self.compiled and not self.gather and _compiled_ok(self.flat, lr):  # StackedSGD's compiled pass
            on, keep, step = _per_model_factors(self.momentum, lr, active)
            for seg in self.segments:
                parts = (self._part(t, seg) for t in (self.flat, self.flat_grad, self.flat_buf))
                _sgd_rows(*parts, keep, on, step, self.weight_decay)
            return
        d_p = self.flat_grad
        if self.weight_decay:
            d_p.add_(self.flat, alpha=self.weight_decay)
        if active is None or (active.device.type == "cpu" and bool(active.all())):
            self.flat_buf.mul_(self.momentum).add_(d_p)  # = StackedSGD's with on = 1, bit for bit
            step = -lr
        else:
            on, keep, step = _per_model_factors(self.momentum, lr, active)
            for (k, seg), (o, _) in zip(self._per_element(keep), self._per_element(on)):
                self._part(self.flat_buf, seg).mul_(k).addcmul_(o, self._part(d_p, seg))
        for s, seg in self._per_element(step):
            self._part(self.flat, seg).addcmul_(s, self._part(self.flat_buf, seg))


class StackedAdam:
    """torch.optim.Adam semantics (bias-corrected, L2 weight decay added to the gradient), per model, in
    torch's own arithmetic (lerp for the first moment, the bias corrections folded into the step size and
    the denominator): a handful of passes over each parameter and one temporary."""

    def __init__(self, params, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 compiled: bool = True):
        self.params = [p for p in params if p.requires_grad]
        self.betas, self.eps, self.weight_decay, self.compiled = betas, eps, weight_decay, compiled
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, lr: torch.Tensor, grad_mask: list | None = None) -> None:
        self.t += 1
        b1, b2 = self.betas
        correction2 = math.sqrt(1 - b2**self.t)
        step = -lr / (1 - b1**self.t)  # (M,)
        for i, (p, m, v) in enumerate(zip(self.params, self.m, self.v)):
            if p.grad is None:
                continue
            masked = grad_mask is not None and grad_mask[i] is not None
            if self.compiled and not masked and _compiled_ok(p, p.grad, m, v, step):
                rows = p.shape[0]
                f32 = np.float32
                _adam_kernel()(*(t.view(rows, -1).numpy() for t in (p.data, p.grad, m, v)), step.numpy(),
                               f32(1 - b1), f32(b2), f32(1 - b2), f32(correction2), f32(self.eps),
                               f32(self.weight_decay))
                continue
            g = p.grad.add(p, alpha=self.weight_decay) if self.weight_decay else p.grad
            if masked:
                g = g * grad_mask[i]
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = v.sqrt().div_(correction2).add_(self.eps)
            p.addcmul_(step.view((-1,) + (1,) * (p.dim() - 1)), torch.div(m, denom, out=denom))


def per_model_grad_norm(params) -> torch.Tensor:
    """Global gradient norm of each member: (M,)."""
    sq = None
    for p in params:
        if p.grad is None:
            continue
        s = p.grad.pow(2).flatten(1).sum(1)
        sq = s if sq is None else sq + s
    return sq.sqrt()


@torch.no_grad()
def clip_grad_norm_per_model(params, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ applied to each member separately; returns the norms (M,)."""
    params = [p for p in params if p.grad is not None]
    norms = per_model_grad_norm(params)
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(scale.view((-1,) + (1,) * (p.dim() - 1)))
    return norms
