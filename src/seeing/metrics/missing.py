"""What a reconstruction leaves out, object by object: a torchmetrics Metric.

An *object* is a region of the target's segmentation: a connected component (8-connected) of
one class covering at least ``min_region`` of the image. It is *missing* from the
reconstruction when the reconstruction's segmentation labels fewer than ``min_covered`` of
its pixels with its class, wherever else that class may appear: a house that is gone is
missing even when another building of the same image is redrawn. The whole-class view (the
class vanishes from the entire reconstruction: it covers less than ``min_region`` of it) is
kept beside it. :func:`iou_per_class` is the segmentation-level agreement (torchmetrics'
multiclass Jaccard index).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from torchmetrics import Metric
from torchmetrics.classification import MulticlassJaccardIndex

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass
class ObjectRegion:
    """One object of a target: its class, size, how much of it the reconstruction draws."""

    class_index: int
    pixels: int
    share: float  # of the image
    covered: float  # share of its pixels the reconstruction labels with its class
    missing: bool
    mask: np.ndarray | None  # H x W bool, kept for missing regions (the figure outlines them)


def object_regions(target: torch.Tensor | np.ndarray, recon: torch.Tensor | np.ndarray, num_classes: int,
                   min_region: float = 0.002, min_covered: float = 0.2) -> list[ObjectRegion]:
    """Every object region of one target label map ``H x W`` and whether ``recon`` misses it,
    largest first."""
    t = np.asarray(torch.as_tensor(target).cpu()).astype(np.int64)
    r = np.asarray(torch.as_tensor(recon).cpu()).astype(np.int64)
    if t.shape != r.shape or t.ndim != 2:
        raise ValueError(f"label maps must be two H x W maps of one shape, got {t.shape} and {r.shape}")
    min_pixels = max(1, int(np.ceil(min_region * t.size)))
    regions = []
    for c in np.unique(t):
        if not 0 <= c < num_classes:
            raise ValueError(f"class-count mismatch: label {c} is outside [0, {num_classes})")
        components, count = ndimage.label(t == c, structure=EIGHT_CONNECTED)
        flat = components.ravel()
        sizes = np.bincount(flat, minlength=count + 1)
        drawn = np.bincount(flat, weights=(r == c).ravel(), minlength=count + 1)
        for j in np.nonzero(sizes[1:] >= min_pixels)[0] + 1:
            covered = float(drawn[j] / sizes[j])
            missing = covered < min_covered
            regions.append(ObjectRegion(int(c), int(sizes[j]), float(sizes[j] / t.size), covered, missing,
                                        components == j if missing else None))
    return sorted(regions, key=lambda g: -g.pixels)


class MissingObjects(Metric):
    """Per class, over the targets: object regions, missing regions, the images showing the class
    and those missing some of it, lost pixels, and the whole-class view.

    ``compute()`` returns a dict of K-vectors: ``regions``, ``missing_regions``, ``missing_rate``
    (missing / regions), ``images_present`` (targets with an object of the class),
    ``images_missing`` (targets with a missing one), ``images_whole_class_missing`` (targets whose
    reconstruction lacks the class altogether), ``lost_pixel_fraction`` (of every target pixel of
    the class, the share the reconstruction labels otherwise).
    """

    full_state_update = False
    is_differentiable = False
    COUNTS = ("regions", "missing_regions", "images_present", "images_missing", "images_whole_class_missing")

    def __init__(self, num_classes: int, min_region: float = 0.002, min_covered: float = 0.2, **kwargs):
        super().__init__(**kwargs)
        if not 0 < min_region < 1 or not 0 < min_covered <= 1:
            raise ValueError(f"min_region={min_region} must be in (0, 1) and min_covered={min_covered} in (0, 1]")
        self.num_classes, self.min_region, self.min_covered = int(num_classes), float(min_region), float(min_covered)
        for name in self.COUNTS:
            self.add_state(name, default=torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")
        # pixels of the target's class k, and those the reconstruction labels as something else
        self.add_state("target_pixels", default=torch.zeros(num_classes, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("lost_pixels", default=torch.zeros(num_classes, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, target_labels: torch.Tensor, recon_labels: torch.Tensor) -> None:
        if target_labels.shape != recon_labels.shape or target_labels.dim() != 3:
            raise ValueError(f"label maps must be N x H x W of one shape, got {tuple(target_labels.shape)} and "
                             f"{tuple(recon_labels.shape)}")
        k = self.num_classes
        counts = {name: torch.zeros(k, dtype=torch.long) for name in self.COUNTS}
        for t, r in zip(target_labels, recon_labels):
            regions = object_regions(t, r, k, self.min_region, self.min_covered)
            present = sorted({g.class_index for g in regions})
            for g in regions:
                counts["regions"][g.class_index] += 1
                counts["missing_regions"][g.class_index] += int(g.missing)
            counts["images_present"][present] += 1
            counts["images_missing"][sorted({g.class_index for g in regions if g.missing})] += 1
            drawn = torch.bincount(r.reshape(-1).long().cpu(), minlength=k)[:k].double() / r.numel()
            whole = [c for c in present if drawn[c] < self.min_region]
            counts["images_whole_class_missing"][whole] += 1
        for name, value in counts.items():
            setattr(self, name, getattr(self, name) + value.to(self.regions.device))
        t = target_labels.reshape(-1).long().clamp(0, k - 1)
        lost = (target_labels != recon_labels).reshape(-1).double()
        self.target_pixels += torch.bincount(t, minlength=k).double().to(self.target_pixels.device)
        self.lost_pixels += torch.zeros(k, dtype=torch.float64, device=t.device).scatter_add_(0, t, lost).to(
            self.lost_pixels.device)

    def compute(self) -> dict[str, torch.Tensor]:
        out = {name: getattr(self, name) for name in self.COUNTS}
        out["missing_rate"] = self.missing_regions.double() / self.regions.clamp(min=1).double()
        out["lost_pixel_fraction"] = self.lost_pixels / self.target_pixels.clamp(min=1)
        return out


def iou_per_class(target_labels: torch.Tensor, recon_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """IoU of every class between reconstruction and target segmentations (NaN: class in neither)."""
    metric = MulticlassJaccardIndex(num_classes=num_classes, average=None, zero_division=float("nan"))
    metric.update(recon_labels.reshape(-1).long(), target_labels.reshape(-1).long())
    return metric.compute().float()
