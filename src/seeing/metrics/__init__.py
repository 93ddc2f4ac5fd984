"""Metrics: Frechet Segmentation Distance and its per-class report."""
from seeing.metrics.fsd import (
    FrechetSegmentationDistance,
    class_tally,
    frechet_distance,
    frechet_segmentation_distance,
    per_class_table,
    rank_classes,
)

__all__ = [
    "FrechetSegmentationDistance",
    "class_tally",
    "frechet_distance",
    "frechet_segmentation_distance",
    "per_class_table",
    "rank_classes",
]
