"""The stacked-model interface every architecture derives from (`StackedModel`: M independent members
computed as one) and the stacking strategies that compute a block of members (decision 28)."""

from __future__ import annotations

import contextlib
import copy
import json
from importlib import resources

import torch
from torch import nn
from torch.func import functional_call


STACKINGS = ("grouped", "loop", "streams")


class StackedModel(nn.Module):
    """Interface shared by all models. Inputs x: (M, B, C, H, W) float, normalized.

    features(x) -> (M, B, D) penultimate features; head(z) -> (M, B, classes) logits. Subclasses write
    `stacked_features` and `stacked_head` once, over all members (grouped convolutions, batched
    matmuls); `stacking` chooses how a block runs them:
      grouped: one computation over all M members (as written);
      loop:    each member alone in turn, its parameters sliced out of the stack: the same dense
               kernels as a model of one, hence bit-identical to the member trained alone;
      streams: the loop with member k's kernels (and autograd's backward of them) on CUDA stream k.
    `head_prefix` names the final layer's parameters (DEL fine-tunes it whole).
    """

    head_prefix = "fc."
    stacking = "grouped"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._by_member("logits", x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self._by_member("features", x)

    def head(self, z: torch.Tensor) -> torch.Tensor:
        return self._by_member("head", z)

    def stacked_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.stacked_head(self.stacked_features(x))

    def set_stacking(self, stacking: str) -> "StackedModel":
        if stacking not in STACKINGS:
            raise ValueError(f"unknown stacking {stacking!r}; valid: {list(STACKINGS)}")
        self.stacking = stacking
        return self

    def _by_member(self, part: str, x: torch.Tensor) -> torch.Tensor:
        compute = getattr(self, "stacked_" + part)
        m = x.shape[0]
        if self.stacking == "grouped" or m == 1:
            return compute(x)
        streams = self._member_streams(m, x.device)
        outs = []
        for k in range(m):
            with _on_stream(streams[k] if streams else None):
                # views of row k: gradients reach the stack, BatchNorm updates its row in place
                state = {name: t[k : k + 1] for name, t in self._stacked_tensors()}
                outs.append(functional_call(self, state, (x[k : k + 1],), {"_part": part}))
        if streams:
            current = torch.cuda.current_stream(x.device)
            for s, out in zip(streams, outs):
                current.wait_stream(s)
                out.record_stream(current)
        return torch.cat(outs)

    def _stacked_tensors(self):
        yield from self.named_parameters()
        yield from self.named_buffers()

    def _member_streams(self, m: int, device: torch.device) -> list | None:
        if self.stacking != "streams" or device.type != "cuda":
            return None
        cached = getattr(self, "_streams", None)
        if cached is None or len(cached) < m:
            cached = [torch.cuda.Stream(device) for _ in range(m)]
            self._streams = cached
        current = torch.cuda.current_stream(device)
        for s in cached[:m]:
            s.wait_stream(current)
        return cached[:m]

    def __call__(self, x: torch.Tensor, _part: str | None = None) -> torch.Tensor:
        if _part is None:
            return super().__call__(x)
        return getattr(self, "stacked_" + _part)(x)  # one member, inside functional_call

    @property
    def n_models(self) -> int:
        return next(self.parameters()).shape[0]

    def select(self, idx) -> "StackedModel":
        """A new stacked model holding members idx (copies, independent of self)."""
        streams, self._streams = getattr(self, "_streams", None), None  # streams do not deep-copy
        out = copy.deepcopy(self)
        self._streams = streams
        idx = torch.as_tensor(idx, dtype=torch.long, device=next(self.parameters()).device)
        with torch.no_grad():
            for module in out.modules():
                for name, p in list(module.named_parameters(recurse=False)):
                    setattr(module, name, nn.Parameter(p.index_select(0, idx).clone()))
                for name, b in list(module.named_buffers(recurse=False)):
                    module.register_buffer(name, b.index_select(0, idx).clone())
        return out

    def stacked_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}


def resolve_stacking(stacking: str, device) -> str:
    """`auto` -> the strategy calibrated for this device (stacking_calibration.json); others as given.
    `streams` off CUDA is the loop (one stream is all a CPU has)."""
    device = torch.device(device)
    if stacking == "auto":
        calib = json.loads(resources.files(__package__).joinpath("stacking_calibration.json").read_text())
        if device.type == "cuda":
            entry = calib["cuda"].get(torch.cuda.get_device_name(device), calib["cuda_default"])
        else:
            entry = calib["cpu"]
        stacking = entry["strategy"]
    if stacking not in STACKINGS:
        raise ValueError(f"unknown stacking {stacking!r}; valid: {list(STACKINGS) + ['auto']}")
    return "loop" if stacking == "streams" and device.type != "cuda" else stacking


def _on_stream(stream):
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
