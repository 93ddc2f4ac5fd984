"""Correlation error, the loss and the score of every inversion stage.

Following the paper, two activations agree when their *directions* agree: the
error is ``1 - cosine similarity`` taken across channels at every location of a
feature map ``(B, C, H, W)``, across the entries of a latent ``(B, D)``, or across the
entries of each row of a w+ latent ``(B, L, D)``, averaged over everything else. The
held-out score reported everywhere is its complement, the mean cosine similarity
("correlation"), accumulated by :class:`MeanCorrelation`, a torchmetrics Metric.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric


def vector_dim(t: torch.Tensor) -> int:
    """The dimension holding the vectors compared: channels of a map, the last one otherwise."""
    return 1 if t.ndim == 4 else t.ndim - 1


def cosine_map(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Cosine similarity of the vectors along :func:`vector_dim`, one value per vector.

    Computed in float32 even under bf16 autocast: the error of nearly equal
    vectors is a small difference of numbers close to one.
    """
    if a.shape != b.shape:
        raise ValueError(f"cannot compare activations of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    return F.cosine_similarity(a.float(), b.float(), dim=vector_dim(a), eps=eps)


def correlation_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``1 - cos(a, b)`` across channels, averaged over samples and locations (a scalar)."""
    return 1.0 - cosine_map(a, b).mean()


class MeanCorrelation(Metric):
    """Mean cosine similarity (see :func:`cosine_map`) over every vector seen."""

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
