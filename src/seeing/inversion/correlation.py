"""Correlation error, the loss and the score of every inversion stage.

Following the paper, two activations agree when their *directions* agree: the
error is ``1 - cosine similarity`` taken across channels at every location (for a
flat latent: across its entries), averaged over locations and samples. The
held-out score reported everywhere is its complement, the mean cosine similarity
("correlation"), accumulated by :class:`MeanCorrelation`, a torchmetrics Metric.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric


def cosine_map(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Cosine similarity over dim 1 (channels), one value per sample and location.

    Computed in float32 even under bf16 autocast: the error of nearly equal
    vectors is a small difference of numbers close to one.
    """
    if a.shape != b.shape:
        raise ValueError(f"cannot compare activations of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    return F.cosine_similarity(a.float(), b.float(), dim=1, eps=eps)


def correlation_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``1 - cos(a, b)`` across channels, averaged over samples and locations (a scalar)."""
    return 1.0 - cosine_map(a, b).mean()


class MeanCorrelation(Metric):
    """Mean cosine similarity across channels over every sample and location seen."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, estimate: torch.Tensor, target: torch.Tensor) -> None:
        cos = cosine_map(estimate.detach(), target.detach())
        self.total += cos.double().sum()
        self.count += cos.numel()

    def compute(self) -> torch.Tensor:
        if self.count == 0:
            raise RuntimeError("MeanCorrelation.compute() called before any update()")
        return (self.total / self.count).float()
