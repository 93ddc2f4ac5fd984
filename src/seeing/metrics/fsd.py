"""Frechet Segmentation Distance (FSD, Bau et al. 2019, Sec. 3.1).

Each image is summarised by its *class tally*: the fraction of its pixels that a
segmenter assigns to each of K classes. FSD is the Frechet distance between two
Gaussians fitted to the real and the generated tallies:

    FSD = ||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2))

On the published scale the tallies are in percent (fractions x 100) and the
covariances are unbiased (ddof=1). The metric keeps, for real and fake each, the
image count, the sum of the tallies and the sum of their outer products in
float64: O(K^2) state, independent of the number of images, and exactly additive
across batches and processes.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torchmetrics import Metric

# Published FSD values are computed on tallies expressed in percent.
PERCENT = 100.0
ROLES = ("real", "fake")


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


def _as_tallies(tallies: Any, num_classes: int | None = None) -> torch.Tensor:
    t = torch.as_tensor(tallies)
    if t.dim() != 2:
        raise ValueError(f"tallies must be N x K per-image class fractions, got shape {tuple(t.shape)}")
    if num_classes is not None and t.shape[1] != num_classes:
        raise ValueError(
            f"class-count mismatch: tallies have {t.shape[1]} classes, the metric expects {num_classes}"
        )
    return t.to(torch.float64)


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
    """``(distance, mean_term, cov_term)`` between N(mu1, cov1) and N(mu2, cov2).

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


def _sums(tallies: torch.Tensor, scale: float):
    x = tallies.to(torch.float64) * scale
    return torch.tensor(float(x.shape[0]), dtype=torch.float64), x.sum(0), x.T @ x


def frechet_segmentation_distance(real: Any, fake: Any, scale: float = PERCENT) -> tuple[float, float, float]:
    """FSD between ``N x K`` real and ``M x K`` generated per-image class fractions.

    Returns ``(fsd, mean_term, cov_term)`` on the published scale (percent, ddof=1).
    """
    real_t, fake_t = _as_tallies(real), _as_tallies(fake)
    if real_t.shape[1] != fake_t.shape[1]:
        raise ValueError(
            f"class-count mismatch: real tallies have {real_t.shape[1]} classes, fake {fake_t.shape[1]}"
        )
    mu_r, cov_r = gaussian_from_sums(*_sums(real_t, scale))
    mu_f, cov_f = gaussian_from_sums(*_sums(fake_t, scale))
    return tuple(float(v) for v in frechet_distance(mu_r, cov_r, mu_f, cov_f))


class FrechetSegmentationDistance(Metric):
    """torchmetrics FSD: ``update(labels_or_tallies, real=...)`` then ``compute()``.

    ``update`` takes integer label maps ``N x H x W`` (tallied here) or float ``N x K``
    per-image class fractions (as :meth:`update_tally`). ``compute()`` returns a dict with
    ``fsd``, ``mean_term`` and ``cov_term`` (float64 scalars).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, num_classes: int, scale: float = PERCENT, **kwargs: Any):
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = int(num_classes)
        self.scale = float(scale)
        k = self.num_classes
        for role in ROLES:
            self.add_state(f"{role}_count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{role}_sum", torch.zeros(k, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{role}_outer", torch.zeros(k, k, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, labels: torch.Tensor, real: bool) -> None:  # type: ignore[override]
        labels = torch.as_tensor(labels)
        tallies = labels if labels.dtype.is_floating_point else class_tally(labels, self.num_classes)
        x = _as_tallies(tallies, self.num_classes).to(self.real_sum.device) * self.scale
        role = "real" if real else "fake"
        setattr(self, f"{role}_count", getattr(self, f"{role}_count") + x.shape[0])
        setattr(self, f"{role}_sum", getattr(self, f"{role}_sum") + x.sum(0))
        setattr(self, f"{role}_outer", getattr(self, f"{role}_outer") + x.T @ x)

    def update_tally(self, fractions: torch.Tensor, real: bool) -> None:
        """Add per-image class fractions (``N x K``, rows summing to 1)."""
        fractions = torch.as_tensor(fractions)
        if not fractions.dtype.is_floating_point:
            raise TypeError(f"tallies must be float class fractions, got {fractions.dtype}")
        self.update(fractions, real)  # through torchmetrics' wrapped update (update count, sync state)

    def gaussians(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {
            role: gaussian_from_sums(
                getattr(self, f"{role}_count"), getattr(self, f"{role}_sum"), getattr(self, f"{role}_outer")
            )
            for role in ROLES
        }

    def compute(self) -> dict[str, torch.Tensor]:
        g = self.gaussians()
        fsd, mean_term, cov_term = frechet_distance(*g["real"], *g["fake"])
        return {"fsd": fsd, "mean_term": mean_term, "cov_term": cov_term}

    def class_means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean fraction of pixels per class (0..1), real and fake; the per-class report's input.
        Read from the states synced over every process (as :meth:`compute` is)."""
        out = []
        with self.sync_context():
            for role in ROLES:
                n = float(getattr(self, f"{role}_count"))
                if n == 0:
                    raise ValueError(f"no {role} images were added")
                out.append((getattr(self, f"{role}_sum") / (n * self.scale)).clone())
        return out[0], out[1]

    def counts(self) -> dict[str, int]:
        """Images added per role, over every process."""
        with self.sync_context():
            return {role: int(getattr(self, f"{role}_count")) for role in ROLES}


def per_class_table(
    real_mean: Sequence[float] | torch.Tensor,
    fake_mean: Sequence[float] | torch.Tensor,
    class_names: Sequence[str],
) -> list[dict[str, Any]]:
    """One row per class: mean area real vs generated and the relative delta (gen - real) / real.

    A class absent from the real set has no relative delta (None), since it cannot be dropped.
    Rows are in class order.
    """
    real_mean = np.asarray(torch.as_tensor(real_mean, dtype=torch.float64).cpu())
    fake_mean = np.asarray(torch.as_tensor(fake_mean, dtype=torch.float64).cpu())
    if not (len(real_mean) == len(fake_mean) == len(class_names)):
        raise ValueError(
            f"class-count mismatch: {len(real_mean)} real, {len(fake_mean)} fake means, "
            f"{len(class_names)} class names"
        )
    rows = []
    for index, (name, r, f) in enumerate(zip(class_names, real_mean, fake_mean)):
        delta = (f - r) / r if r > 0 else None
        rows.append(
            {
                "index": index,
                "class": str(name),
                "real_area": float(r),
                "generated_area": float(f),
                "relative_delta": None if delta is None else float(delta),
            }
        )
    return rows


def rank_classes(
    rows: Sequence[dict[str, Any]], top: int = 10, min_real_area: float = 0.0, skip: Sequence[str] = ()
) -> dict[str, list[dict[str, Any]]]:
    """Most-dropped (most negative relative delta) and most over-generated classes.

    Classes whose mean real area is at most ``min_real_area`` are left out: a tiny
    denominator makes the relative delta noise. ``skip`` names classes never ranked
    (e.g. the "unlabeled" class 0).
    """
    ranked = [
        r
        for r in rows
        if r["relative_delta"] is not None and r["real_area"] > min_real_area and r["class"] not in set(skip)
    ]
    dropped = sorted(ranked, key=lambda r: (r["relative_delta"], -r["real_area"]))
    over = sorted(ranked, key=lambda r: (-r["relative_delta"], -r["real_area"]))
    return {
        "most_dropped": [r for r in dropped if r["relative_delta"] < 0][:top],
        "most_overgenerated": [r for r in over if r["relative_delta"] > 0][:top],
    }
