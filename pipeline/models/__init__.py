"""Model registry: every model is a StackedModel of M independent members (M = 1 for one model), built by
name (`build_model`); the interface and the stacking strategies (decision 28) are `pipeline.models.stacked`,
named from here too."""

from __future__ import annotations

import torch

from pipeline.config import ModelConfig
from pipeline.models.stacked import STACKINGS, StackedModel, resolve_stacking  # noqa: F401 - the registry's vocabulary


def build_model(cfg: ModelConfig, seeds: list[int], in_shape: tuple[int, int, int], classes: int,
                stacking: str = "grouped") -> StackedModel:
    """One stacked model whose member k is initialized from seeds[k] alone, computed by `stacking`."""
    from pipeline.models.nets import CNN, MLP, ResNet9

    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    registry = {
        "mlp": lambda: MLP(gens, in_shape, classes, cfg.hidden),
        "cnn": lambda: CNN(gens, in_shape, classes, cfg.hidden),
        "resnet9": lambda: ResNet9(gens, in_shape, classes, cfg.width),
    }
    if cfg.name not in registry:
        raise ValueError(f"unknown model {cfg.name!r}; valid: {sorted(registry)}")
    return registry[cfg.name]().set_stacking(stacking)


def fresh_init_like(model: StackedModel, cfg: ModelConfig, seeds: list[int], in_shape, classes) -> StackedModel:
    """A freshly initialized model of the same architecture (DEL's reset values)."""
    return build_model(cfg, seeds, in_shape, classes, model.stacking).to(next(model.parameters()).device)
