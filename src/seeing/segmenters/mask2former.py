"""``mask2former``: Mask2Former (Cheng et al., CVPR 2022) from a transformers ``save_pretrained`` folder.

    seg = load_segmenter("mask2former", path="/data/mask2former-swin-tiny-ade-semantic")

The semantic map is the one ``Mask2FormerImageProcessor.post_process_semantic_segmentation``
computes: the query masks are upsampled to 384 x 384 (transformers' fixed intermediate size,
whatever the input), each class's score is the sum over queries of the query's class probability
(softmax without the "no object" entry) times its mask probability (sigmoid), and those scores
are upsampled bilinearly to the image size. The images of a batch share one size, so no padding
is needed and every pixel of the model's input is image.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from seeing.devices import resolve_device

from .hf import (HFSegmenter, Preprocessing, class_names_of, from_pretrained, import_transformers, pretrained_folder,
                 torch_image_processor)

EXAMPLE = "facebook/mask2former-swin-tiny-ade-semantic"
# post_process_semantic_segmentation's mask size before the final resize ("(384, 384) for all models")
MASK_SIZE = (384, 384)


class Mask2FormerSegmenter(HFSegmenter):
    """``Mask2FormerForUniversalSegmentation`` behind the :class:`Segmenter` interface."""

    segmenter_id = "mask2former"

    def class_scores(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=self.preprocessing(images))  # no pixel_mask: no padding, all pixels valid
        masks = F.interpolate(out.masks_queries_logits, size=MASK_SIZE, mode="bilinear", align_corners=False)
        classes = out.class_queries_logits.softmax(-1)[..., :-1]
        scores = torch.einsum("bqc,bqhw->bchw", classes, masks.sigmoid())
        return F.interpolate(scores, size=images.shape[-2:], mode="bilinear", align_corners=False)


def load_mask2former_segmenter(path: str | Path | None, device: str | torch.device = "auto") -> Mask2FormerSegmenter:
    """Mask2Former from the folder ``path`` (config.json, weights, preprocessor_config.json)."""
    transformers = import_transformers("mask2former")
    folder = pretrained_folder(path, "mask2former", "mask2former", EXAMPLE)
    model = from_pretrained(transformers.Mask2FormerForUniversalSegmentation, folder, weights_only=True)
    # the class, not AutoImageProcessor: the public ADE folders name MaskFormer's feature extractor
    processor = from_pretrained(torch_image_processor(transformers, "Mask2FormerImageProcessor"), folder)
    names = class_names_of(model.config, folder)
    return Mask2FormerSegmenter(model.eval(), Preprocessing(processor, folder), names, folder).to(resolve_device(device))
