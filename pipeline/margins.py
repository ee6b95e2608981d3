"""Model outputs: margins and logits of stacked models on every point (spec decision 1)."""

from __future__ import annotations

import torch


def margins_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """margin = z_y - logsumexp_{j != y} z_j, in float32.  logits (..., P, C), labels (P,) -> (..., P)."""
    z = logits.float()
    y = labels.expand(z.shape[:-1]).unsqueeze(-1)
    correct = z.gather(-1, y).squeeze(-1)
    others = z.scatter(-1, y, float("-inf"))
    return correct - torch.logsumexp(others, dim=-1)


def stacked_logits(model, images: torch.Tensor, normalize, batch: int = 1024) -> torch.Tensor:
    """Logits of every member on every image, eval mode, float32.
    images (P, C, H, W) uint8 on the model's device -> (M, P, classes)."""
    chunks = (images[start : start + batch] for start in range(0, images.shape[0], batch))
    return logits_over_chunks(model, chunks, normalize)


@torch.no_grad()
def logits_over_chunks(model, chunks, normalize) -> torch.Tensor:
    """Logits of every member on uint8 image chunks, concatenated in order: (M, P, classes)."""
    was_training = model.training
    model.eval()
    m = model.n_models
    out = []
    for images in chunks:
        x = normalize(images)
        out.append(model(x.unsqueeze(0).expand(m, *x.shape)).float())
    model.train(was_training)
    return torch.cat(out, dim=1)
