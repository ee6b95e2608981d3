"""Model registry: every model is a StackedModel of M independent members (M = 1 for one model)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from pipeline.config import ModelConfig


class StackedModel(nn.Module):
    """Interface shared by all models. Inputs x: (M, B, C, H, W) float, normalized.

    features(x) -> (M, B, D) penultimate features; head(z) -> (M, B, classes) logits.
    `head_prefix` names the final layer's parameters (DEL fine-tunes it whole).
    """

    head_prefix = "fc."

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @property
    def n_models(self) -> int:
        return next(self.parameters()).shape[0]

    def select(self, idx) -> "StackedModel":
        """A new stacked model holding members idx (copies, independent of self)."""
        out = copy.deepcopy(self)
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


def build_model(cfg: ModelConfig, seeds: list[int], in_shape: tuple[int, int, int], classes: int) -> StackedModel:
    """One stacked model whose member k is initialized from seeds[k] alone."""
    from pipeline.models.nets import CNN, MLP, ResNet9

    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    registry = {
        "mlp": lambda: MLP(gens, in_shape, classes, cfg.hidden),
        "cnn": lambda: CNN(gens, in_shape, classes, cfg.hidden),
        "resnet9": lambda: ResNet9(gens, in_shape, classes, cfg.width),
    }
    if cfg.name not in registry:
        raise ValueError(f"unknown model {cfg.name!r}; valid: {sorted(registry)}")
    return registry[cfg.name]()


def fresh_init_like(model: StackedModel, cfg: ModelConfig, seeds: list[int], in_shape, classes) -> StackedModel:
    """A freshly initialized model of the same architecture (DEL's reset values)."""
    return build_model(cfg, seeds, in_shape, classes).to(next(model.parameters()).device)
