"""Segmenters: images in [-1, 1] -> per-pixel class indices, behind one interface.

    from seeing.segmenters import load_segmenter
    seg = load_segmenter("scenes")             # the trained weights shipped with the package
    seg = load_segmenter("upp", path="/data/segmodel/upp-resnet50-upernet")
    seg = load_segmenter("deeplab")            # from the torch hub cache, never downloaded
    labels = seg.segment(images)               # N x H x W class indices; seg.class_names

Hydra: ``conf/segmenter/<name>.yaml`` hold ``_target_`` configs of the same loaders.
"""
from __future__ import annotations

from typing import Any, Callable

from .base import Segmenter
from .deeplab import DeepLabSegmenter, load_deeplab_segmenter
from .scenes import ScenesSegmenter, load_scenes_segmenter
from .upp import UnifiedParsingSegmenter, load_upp_segmenter

LOADERS: dict[str, Callable[..., Segmenter]] = {
    "scenes": load_scenes_segmenter,
    "upp": load_upp_segmenter,
    "deeplab": load_deeplab_segmenter,
}


def load_segmenter(name: str, **kwargs: Any) -> Segmenter:
    """Segmenter ``name`` (one of :data:`LOADERS`), with its loader's keyword arguments."""
    if name not in LOADERS:
        raise ValueError(f"unknown segmenter {name!r}; choose one of {sorted(LOADERS)}")
    return LOADERS[name](**kwargs)


__all__ = [
    "DeepLabSegmenter", "LOADERS", "ScenesSegmenter", "Segmenter", "UnifiedParsingSegmenter",
    "load_deeplab_segmenter", "load_scenes_segmenter", "load_segmenter", "load_upp_segmenter",
]
