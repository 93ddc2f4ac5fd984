"""Segmenters: images in [-1, 1] -> per-pixel class indices, behind one interface.

    from seeing.segmenters import load_segmenter
    seg = load_segmenter("scenes")             # the trained weights shipped with the package
    seg = load_segmenter("scenes_segformer")   # the SegFormer trained on the scenes, also shipped
    seg = load_segmenter("upp", path="/data/segmodel/upp-resnet50-upernet")
    seg = load_segmenter("deeplab")            # from the torch hub cache, never downloaded
    seg = load_segmenter("segformer", path="/data/segformer-b0-finetuned-ade-512-512")  # transformers'
    seg = load_segmenter("mask2former", path="/data/mask2former-swin-tiny-ade-semantic")  # save_pretrained folders
    labels = seg.segment(images)               # N x H x W class indices; seg.class_names

Hydra: ``conf/segmenter/<name>.yaml`` hold ``_target_`` configs of the same loaders. SegFormer and
Mask2Former need the optional ``hf`` extra (transformers); the others do not.
"""
from __future__ import annotations

from typing import Any, Callable

from .base import Segmenter
from .deeplab import DeepLabSegmenter, load_deeplab_segmenter
from .mask2former import Mask2FormerSegmenter, load_mask2former_segmenter
from .scenes import ScenesSegmenter, load_scenes_segmenter
from .segformer import SegformerSegmenter, load_scenes_segformer_segmenter, load_segformer_segmenter
from .upp import UnifiedParsingSegmenter, load_upp_segmenter

LOADERS: dict[str, Callable[..., Segmenter]] = {
    "scenes": load_scenes_segmenter,
    "upp": load_upp_segmenter,
    "deeplab": load_deeplab_segmenter,
    "segformer": load_segformer_segmenter,
    "scenes_segformer": load_scenes_segformer_segmenter,
    "mask2former": load_mask2former_segmenter,
}


def load_segmenter(name: str, **kwargs: Any) -> Segmenter:
    """Segmenter ``name`` (one of :data:`LOADERS`), with its loader's keyword arguments."""
    if name not in LOADERS:
        raise ValueError(f"unknown segmenter {name!r}; choose one of {sorted(LOADERS)}")
    return LOADERS[name](**kwargs)


__all__ = [
    "DeepLabSegmenter", "LOADERS", "Mask2FormerSegmenter", "ScenesSegmenter", "SegformerSegmenter", "Segmenter",
    "UnifiedParsingSegmenter", "load_deeplab_segmenter", "load_mask2former_segmenter", "load_scenes_segmenter",
    "load_scenes_segformer_segmenter", "load_segformer_segmenter", "load_segmenter", "load_upp_segmenter",
]
