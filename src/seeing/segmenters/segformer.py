"""``segformer``: SegFormer (Xie et al., NeurIPS 2021) from a transformers ``save_pretrained`` folder.

    seg = load_segmenter("segformer", path="/data/segformer-b0-finetuned-ade-512-512")

The image processor's preprocessing is applied in torch (:class:`~seeing.segmenters.hf.Preprocessing`);
the logits (stride 4 of the model's input) are upsampled bilinearly to the image size, which is
what ``SegformerImageProcessor.post_process_semantic_segmentation`` does before its argmax.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from seeing.devices import resolve_device

from .hf import HFSegmenter, Preprocessing, class_names_of, from_pretrained, import_transformers, pretrained_folder

EXAMPLE = "nvidia/segformer-b0-finetuned-ade-512-512"


class SegformerSegmenter(HFSegmenter):
    """``SegformerForSemanticSegmentation`` behind the :class:`Segmenter` interface."""

    segmenter_id = "segformer"

    def class_scores(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.model(pixel_values=self.preprocessing(images)).logits
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def load_segformer_segmenter(path: str | Path | None, device: str | torch.device = "auto") -> SegformerSegmenter:
    """SegFormer from the folder ``path`` (config.json, weights, preprocessor_config.json)."""
    transformers = import_transformers("segformer")
    folder = pretrained_folder(path, "segformer", "segformer", EXAMPLE)
    model = from_pretrained(transformers.SegformerForSemanticSegmentation, folder, weights_only=True)
    processor = from_pretrained(transformers.SegformerImageProcessor, folder)
    names = class_names_of(model.config, folder)
    return SegformerSegmenter(model.eval(), Preprocessing(processor, folder), names, folder).to(resolve_device(device))
