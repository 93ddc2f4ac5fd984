"""``deeplab``: torchvision's DeepLabV3-ResNet50 (21 Pascal VOC classes).

The weights come from a local file: the user's path, or the torch hub cache where
torchvision keeps ``deeplabv3_resnet50_coco-cd0a2569.pth``. The network is built
empty (``weights=None``) and the state dict loaded here, so nothing is ever
downloaded.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models.segmentation import DeepLabV3_ResNet50_Weights, deeplabv3_resnet50

from seeing.state_dicts import load_exact

from seeing.devices import resolve_device

from .base import Segmenter, load_state_dict_file

HUB_FILE = Path(DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1.url).name  # deeplabv3_resnet50_coco-cd0a2569.pth
VOC_CLASSES: list[str] = list(DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1.meta["categories"])
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def hub_cache_path() -> Path:
    """``$TORCH_HOME/hub/checkpoints/deeplabv3_resnet50_coco-cd0a2569.pth`` (torch's own rule for $TORCH_HOME)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / HUB_FILE


class DeepLabSegmenter(Segmenter):
    """DeepLabV3 on ImageNet-normalised RGB; torchvision already upsamples its output to the input size."""

    segmenter_id = "deeplab"

    def __init__(self, net: nn.Module, class_names=VOC_CLASSES):
        super().__init__(class_names)
        self.net = net
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def class_scores(self, images: torch.Tensor) -> torch.Tensor:
        x = ((images + 1) / 2 - self.mean) / self.std
        return self.net(x)["out"]


def load_deeplab_segmenter(path: str | Path | None = None, device: str | torch.device = "auto") -> DeepLabSegmenter:
    """DeepLabV3-ResNet50 with weights from ``path`` (default: the torch hub cache file).
    The auxiliary FCN head is built only when the file has its weights; it is unused at inference."""
    path = hub_cache_path() if path in (None, "") else Path(path)
    state = load_state_dict_file(path, "deeplab segmenter weights")
    aux = any(k.startswith("aux_classifier.") for k in state)
    with torch.device("meta"):  # the weights come from the file; skip the random init
        net = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=len(VOC_CLASSES), aux_loss=aux)
    load_exact(net, state, f"deeplab segmenter weights {path}")
    return DeepLabSegmenter(net).to(resolve_device(device))
