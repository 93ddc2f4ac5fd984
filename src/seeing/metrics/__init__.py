"""Metrics (torchmetrics): Frechet Segmentation Distance and its per-class report, missing objects,
feature correlation. The functional forms are in :mod:`seeing.metrics.functional`."""
from seeing.metrics.fsd import FrechetSegmentationDistance
from seeing.metrics.functional import (
    class_tally,
    frechet_distance,
    frechet_segmentation_distance,
    frechet_segmentation_distance_from_tallies,
    fsd_terms,
)
from seeing.metrics.per_class import bootstrap_relative_change, per_class_table, rank_classes

__all__ = [
    "FrechetSegmentationDistance",
    "bootstrap_relative_change",
    "class_tally",
    "frechet_distance",
    "frechet_segmentation_distance",
    "frechet_segmentation_distance_from_tallies",
    "fsd_terms",
    "per_class_table",
    "rank_classes",
]
