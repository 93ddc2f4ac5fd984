"""Frechet Segmentation Distance as functions (torchmetrics' functional form of
:class:`seeing.metrics.fsd.FrechetSegmentationDistance`; same numbers, tensors out).

FSD (Bau et al. 2019, Sec. 3.1) summarises each image by its *class tally*, the fraction of its
pixels a segmenter assigns to each of K classes, and is the Frechet distance between Gaussians
fitted to the real and the generated tallies:

    FSD = ||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2))

On the published scale the tallies are in percent (fractions x 100) and the covariances are
unbiased (ddof=1).

>>> import torch
>>> real = torch.tensor([[[0, 0], [1, 1]], [[0, 1], [1, 1]], [[0, 0], [0, 1]]])  # 3 label maps, 2 classes
>>> fake = torch.tensor([[[1, 1], [1, 1]], [[0, 1], [1, 1]]])
>>> frechet_segmentation_distance(real, fake, num_classes=2)
tensor(2919.7330, dtype=torch.float64)

By hand: the class means are (50, 50) and (12.5, 87.5) percent, so the mean term is 2 x 37.5^2;
both covariances are rank one along (1, -1), with variances 1250 and 625 there, so the covariance
term is 1250 + 625 - 2 sqrt(1250 x 625) = 107.233.

>>> {k: round(float(v), 3) for k, v in fsd_terms(class_tally(real, 2), class_tally(fake, 2)).items()}
{'fsd': 2919.733, 'mean_term': 2812.5, 'cov_term': 107.233}
"""
from __future__ import annotations

from typing import Any

import torch

# Published FSD values are computed on tallies expressed in percent.
PERCENT = 100.0


def class_tally(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-image class fractions of integer label maps ``N x H x W`` -> ``N x K`` (float64).

    One ``bincount`` over ``image_index * K + label`` counts every image at once.
    """
    if labels.dim() != 3:
        raise ValueError(f"label maps must be N x H x W, got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"label maps must hold integer class indices, got {labels.dtype}")
    n = labels.shape[0]
    flat = labels.reshape(n, -1).long()
    if flat.numel():
        lo, hi = int(flat.min()), int(flat.max())
        if lo < 0 or hi >= num_classes:
            bad = hi if hi >= num_classes else lo
            raise ValueError(
                f"class-count mismatch: label {bad} is outside [0, {num_classes}); the segmenter's "
                f"classes do not match the metric's num_classes={num_classes}"
            )
    offsets = torch.arange(n, device=flat.device).unsqueeze(1) * num_classes
    counts = torch.bincount((flat + offsets).reshape(-1), minlength=n * num_classes)
    return counts.reshape(n, num_classes).to(torch.float64) / max(flat.shape[1], 1)


def as_tallies(tallies: Any, num_classes: int | None = None) -> torch.Tensor:
    """``N x K`` per-image class fractions as float64, checked."""
    t = torch.as_tensor(tallies)
    if t.dim() != 2:
        raise ValueError(f"tallies must be N x K per-image class fractions, got shape {tuple(t.shape)}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"tallies must be float class fractions, got {t.dtype}")
    if num_classes is not None and t.shape[1] != num_classes:
        raise ValueError(
            f"class-count mismatch: tallies have {t.shape[1]} classes, the metric expects {num_classes}"
        )
    return t.to(torch.float64)


def tally_sums(tallies: torch.Tensor, scale: float = PERCENT) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(n, sum x, sum x x^T)`` of the scaled tallies (float64): the additive state of FSD."""
    x = tallies.to(torch.float64) * scale
    return torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device), x.sum(0), x.T @ x


def gaussian_from_sums(count: torch.Tensor, total: torch.Tensor, outer: torch.Tensor):
    """Mean and unbiased covariance from ``n``, ``sum x`` and ``sum x x^T`` (float64)."""
    n = float(count)
    if n < 2:
        raise ValueError(f"FSD needs at least 2 images on each side, got {int(n)}")
    mean = total / n
    cov = (outer - n * torch.outer(mean, mean)) / (n - 1)
    return mean, (cov + cov.T) / 2  # symmetric up to rounding; make it exactly so


def _numerical_zeros_to_zero(vals: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a PSD matrix below its rounding noise (eps * largest) are zeros.

    Covariances of tallies are singular (absent classes, fewer images than classes). Left as
    they are, the square root would turn the rounding noise of those zero eigenvalues into
    errors of ~1e-8 relative that depend on how the images were batched; a larger cut-off
    would discard genuine small eigenvalues (measurably, against the published values).
    """
    tol = vals.abs().max() * torch.finfo(vals.dtype).eps
    return torch.where(vals > tol, vals, torch.zeros_like(vals))


def _psd_sqrt(mat: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix via its eigendecomposition."""
    vals, vecs = torch.linalg.eigh(mat)
    return (vecs * _numerical_zeros_to_zero(vals).sqrt()) @ vecs.T


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor):
    """``(distance, mean_term, cov_term)`` between N(mu1, cov1) and N(mu2, cov2), float64 tensors.

    ``Tr((S1 S2)^(1/2))`` is computed as the sum of square roots of the eigenvalues of the
    symmetric PSD matrix ``S1^(1/2) S2 S1^(1/2)`` (same spectrum as ``S1 S2``). Unlike a
    general ``sqrtm`` this stays real and stable when the covariances are singular, which
    they are whenever a class never appears (its row and column are zero).
    """
    mu1, mu2, cov1, cov2 = (torch.as_tensor(x, dtype=torch.float64) for x in (mu1, mu2, cov1, cov2))
    mean_term = torch.sum((mu1 - mu2) ** 2)
    root1 = _psd_sqrt(cov1)
    middle = root1 @ cov2 @ root1
    eig = _numerical_zeros_to_zero(torch.linalg.eigvalsh((middle + middle.T) / 2))
    cov_term = torch.trace(cov1) + torch.trace(cov2) - 2 * eig.sqrt().sum()
    return mean_term + cov_term, mean_term, cov_term


def fsd_terms(real_tallies: Any, fake_tallies: Any, scale: float = PERCENT) -> dict[str, torch.Tensor]:
    """``{"fsd", "mean_term", "cov_term"}`` (float64 scalar tensors) between ``N x K`` real and
    ``M x K`` generated per-image class fractions, on the published scale (percent, ddof=1)."""
    real_t, fake_t = as_tallies(real_tallies), as_tallies(fake_tallies)
    if real_t.shape[1] != fake_t.shape[1]:
        raise ValueError(
            f"class-count mismatch: real tallies have {real_t.shape[1]} classes, fake {fake_t.shape[1]}"
        )
    fsd, mean_term, cov_term = frechet_distance(*gaussian_from_sums(*tally_sums(real_t, scale)),
                                                *gaussian_from_sums(*tally_sums(fake_t, scale)))
    return {"fsd": fsd, "mean_term": mean_term, "cov_term": cov_term}


def frechet_segmentation_distance_from_tallies(real_tallies: Any, fake_tallies: Any,
                                               scale: float = PERCENT) -> torch.Tensor:
    """FSD (float64 scalar tensor) between ``N x K`` real and ``M x K`` generated class fractions."""
    return fsd_terms(real_tallies, fake_tallies, scale)["fsd"]


def frechet_segmentation_distance(real_labels: torch.Tensor, fake_labels: torch.Tensor, num_classes: int,
                                  scale: float = PERCENT) -> torch.Tensor:
    """FSD (float64 scalar tensor) between integer label maps ``N x H x W`` (real) and
    ``M x H' x W'`` (generated) with classes ``0 .. num_classes - 1``."""
    return frechet_segmentation_distance_from_tallies(class_tally(real_labels, num_classes),
                                                      class_tally(fake_labels, num_classes), scale)
