"""Which classes a reconstruction leaves out, per image and over a set: a torchmetrics Metric.

A class is present in an image when it covers at least ``min_fraction`` of it. It is missing from
the reconstruction when present in the target and the reconstruction does not draw it *there*:
fewer than ``min_recall`` of the target's pixels of that class are labelled with it in the
reconstruction (``min_recall=None``: missing only when absent from the whole reconstruction, which
a few stray pixels of an artefact elsewhere can defeat). :func:`iou_per_class` is the
segmentation-level agreement (torchmetrics' multiclass Jaccard index).
"""
from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.classification import MulticlassJaccardIndex


def class_presence(labels: torch.Tensor, num_classes: int, min_fraction: float = 0.01) -> torch.Tensor:
    """N x K bool: class k covers at least ``min_fraction`` of image n."""
    n = labels.shape[0]
    flat = labels.reshape(n, -1).long()
    counts = torch.zeros(n, num_classes, dtype=torch.float64, device=labels.device)
    counts.scatter_add_(1, flat.clamp(0, num_classes - 1), torch.ones_like(flat, dtype=torch.float64))
    return counts / flat.shape[1] >= min_fraction


def class_recall(target_labels: torch.Tensor, recon_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """N x K: the share of each target class's pixels that the reconstruction labels the same (NaN: absent)."""
    n = target_labels.shape[0]
    t = target_labels.reshape(n, -1).long().clamp(0, num_classes - 1)
    hit = (target_labels == recon_labels).reshape(n, -1).double()
    total = torch.zeros(n, num_classes, dtype=torch.float64, device=t.device)
    total.scatter_add_(1, t, torch.ones_like(hit))
    same = torch.zeros_like(total).scatter_add_(1, t, hit)
    return same / total  # 0/0 -> NaN for classes the target lacks


def missing_per_image(target_labels: torch.Tensor, recon_labels: torch.Tensor, num_classes: int,
                      min_fraction: float = 0.01, min_recall: float | None = 0.2) -> torch.Tensor:
    """N x K bool: present in the target and not drawn by the reconstruction (see the module doc)."""
    present = class_presence(target_labels, num_classes, min_fraction)
    if min_recall is None:
        return present & ~class_presence(recon_labels, num_classes, min_fraction)
    return present & (class_recall(target_labels, recon_labels, num_classes) < min_recall)


class MissingClasses(Metric):
    """Per class: in how many targets it is present, and in how many of those the reconstruction misses it."""

    full_state_update = False
    is_differentiable = False

    def __init__(self, num_classes: int, min_fraction: float = 0.01, min_recall: float | None = 0.2, **kwargs):
        super().__init__(**kwargs)
        self.num_classes, self.min_fraction = int(num_classes), float(min_fraction)
        self.min_recall = None if min_recall is None else float(min_recall)
        self.add_state("present", default=torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("missing", default=torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")
        # pixels of the target's class k that the reconstruction labels as something else
        self.add_state("target_pixels", default=torch.zeros(num_classes, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("lost_pixels", default=torch.zeros(num_classes, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, target_labels: torch.Tensor, recon_labels: torch.Tensor) -> None:
        if target_labels.shape != recon_labels.shape:
            raise ValueError(f"label maps differ in shape: {tuple(target_labels.shape)} vs {tuple(recon_labels.shape)}")
        k = self.num_classes
        self.present += class_presence(target_labels, k, self.min_fraction).sum(0)
        self.missing += missing_per_image(target_labels, recon_labels, k, self.min_fraction, self.min_recall).sum(0)
        t = target_labels.reshape(-1).long().clamp(0, k - 1)
        lost = (target_labels != recon_labels).reshape(-1).double()
        self.target_pixels += torch.bincount(t, minlength=k).double()
        self.lost_pixels += torch.zeros(k, dtype=torch.float64, device=t.device).scatter_add_(0, t, lost)

    def compute(self) -> dict[str, torch.Tensor]:
        rate = self.missing.double() / self.present.clamp(min=1).double()
        lost = self.lost_pixels / self.target_pixels.clamp(min=1)
        return {"present": self.present, "missing": self.missing, "missing_rate": rate, "lost_pixel_fraction": lost}


def iou_per_class(target_labels: torch.Tensor, recon_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """IoU of every class between reconstruction and target segmentations (NaN: class in neither)."""
    metric = MulticlassJaccardIndex(num_classes=num_classes, average=None, zero_division=float("nan"))
    metric.update(recon_labels.reshape(-1).long(), target_labels.reshape(-1).long())
    return metric.compute().float()
