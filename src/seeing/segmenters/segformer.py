"""``segformer``: SegFormer (Xie et al., NeurIPS 2021) from a transformers ``save_pretrained`` folder.

    seg = load_segmenter("segformer", path="/data/segformer-b0-finetuned-ade-512-512")

The image processor's preprocessing is applied in torch (:class:`~seeing.segmenters.hf.Preprocessing`);
the logits (stride 4 of the model's input) are upsampled bilinearly to the image size, which is
what ``SegformerImageProcessor.post_process_semantic_segmentation`` does before its argmax.

:func:`build_segformer_net` makes a randomly initialised one from a transformers config, for
``python train.py stage=segformer`` (the scenes world), which saves it as such a folder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from seeing.devices import resolve_device

from .hf import (HFSegmenter, Preprocessing, class_names_of, from_pretrained, import_transformers, pretrained_folder,
                 torch_image_processor)

EXAMPLE = "nvidia/segformer-b0-finetuned-ade-512-512"
# the SegFormer `python train.py stage=segformer` trained on the scenes world, shipped with the package
SCENES_FOLDER = Path(__file__).resolve().parents[1] / "assets" / "scenes_segformer"
SCENES_COMMAND = "python train.py stage=segformer"


def segformer_logits(model: nn.Module, preprocessing: Preprocessing, images: torch.Tensor) -> torch.Tensor:
    """Class logits N x C x H x W at the images' size, for images N x 3 x H x W in [-1, 1]."""
    logits = model(pixel_values=preprocessing(images)).logits
    return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


class SegformerSegmenter(HFSegmenter):
    """``SegformerForSemanticSegmentation`` behind the :class:`Segmenter` interface."""

    segmenter_id = "segformer"

    def class_scores(self, images: torch.Tensor) -> torch.Tensor:
        return segformer_logits(self.model, self.preprocessing, images)


def load_segformer_segmenter(path: str | Path | None, device: str | torch.device = "auto") -> SegformerSegmenter:
    """SegFormer from the folder ``path`` (config.json, weights, preprocessor_config.json)."""
    transformers = import_transformers("segformer")
    folder = pretrained_folder(path, "segformer", "segformer", EXAMPLE)
    model = from_pretrained(transformers.SegformerForSemanticSegmentation, folder, weights_only=True)
    processor = from_pretrained(torch_image_processor(transformers, "SegformerImageProcessor"), folder)
    names = class_names_of(model.config, folder)
    return SegformerSegmenter(model.eval(), Preprocessing(processor, folder), names, folder).to(resolve_device(device))


def load_scenes_segformer_segmenter(path: str | Path | None = None,
                                    device: str | torch.device = "auto") -> SegformerSegmenter:
    """The scenes world's SegFormer: the folder shipped in the package (``path=None``), or one that
    ``python train.py stage=segformer`` wrote."""
    if path in (None, ""):
        path = SCENES_FOLDER
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"the shipped SegFormer folder {path} is incomplete; `{SCENES_COMMAND}` "
                                    f"writes one (pass it as segmenter.path=<run>/scenes_segformer)")
    return load_segformer_segmenter(path, device)


# ------------------------------------------------------------------------------ training


class SegformerNet(nn.Module):
    """A trainable SegFormer with its image processor: images in [-1, 1] -> logits at the image size,
    through the same preprocessing the loaded segmenter applies."""

    def __init__(self, model: nn.Module, processor: Any):
        super().__init__()
        self.model, self.processor = model, processor
        self.preprocessing = Preprocessing(processor)
        self.num_classes = int(model.config.num_labels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return segformer_logits(self.model, self.preprocessing, images)

    def save_pretrained(self, folder: str | Path, class_names: Sequence[str]) -> Path:
        """The folder ``load_segmenter("segformer", path=folder)`` reads: config (with ``id2label``),
        weights and the image processor's config."""
        folder = Path(folder)
        import_transformers("segformer").utils.logging.disable_progress_bar()
        self.model.config.id2label = dict(enumerate(class_names))
        self.model.config.label2id = {n: i for i, n in enumerate(class_names)}
        self.model.save_pretrained(folder)
        self.processor.save_pretrained(folder)
        return folder


def build_segformer_net(num_classes: int, input_size: int = 128, **config: Any) -> SegformerNet:
    """A randomly initialised SegFormer for ``num_classes`` classes: ``config`` is passed to
    transformers' ``SegformerConfig`` (``hidden_sizes``, ``depths``, ``num_attention_heads``, ...);
    the image processor resizes every image to ``input_size`` square (ImageNet normalisation)."""
    transformers = import_transformers("segformer")
    known = transformers.SegformerConfig().to_dict()
    unknown = sorted(k for k in config if k not in known)
    if unknown:  # SegformerConfig would keep unknown keys as attributes: a typo must not pass silently
        raise ValueError(f"stage.segformer: SegformerConfig has no {', '.join(unknown)}")
    try:
        seg_config = transformers.SegformerConfig(num_labels=int(num_classes), **config)
    except (TypeError, ValueError) as e:
        raise ValueError(f"stage.segformer: not a valid SegformerConfig ({e})") from e
    if not (isinstance(input_size, int) and input_size >= 32):
        raise ValueError(f"stage.segformer.input_size={input_size!r}: give the model's input size in pixels (>= 32)")
    model = transformers.SegformerForSemanticSegmentation(seg_config)
    processor = torch_image_processor(transformers, "SegformerImageProcessor")(size={"height": input_size, "width": input_size})
    return SegformerNet(model, processor)
