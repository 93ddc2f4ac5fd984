"""The ``scenes`` segmenter: a tiny U-Net for the embedded scenes world.

The network is trained by ``python train.py stage=segmenter data=scenes``
(:mod:`seeing.stages.segmenter`), which exports a compact weights file; the
trained file ships with the package as ``seeing/assets/scenes_segmenter.pt``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from seeing.state_dicts import load_exact

from seeing.devices import resolve_device

from .base import Segmenter, require_file

ASSET_NAME = "scenes_segmenter.pt"


def shipped_weights_path() -> Path:
    """Where the trained scenes segmenter ships inside the installed package."""
    import seeing

    return Path(seeing.__file__).resolve().parent / "assets" / ASSET_NAME


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class SceneSegmenterNet(nn.Module):
    """U-Net: ``len(widths)`` resolution levels (each halves the size), concatenated skips,
    a 1x1 classifier at full resolution. Full-resolution features matter here: the scenes'
    small classes (poles of signboards, fence slats) are one or two pixels wide at 64x64."""

    def __init__(self, num_classes: int, widths: Sequence[int] = (16, 32, 64, 96)):
        super().__init__()
        widths = [int(w) for w in widths]
        if num_classes < 1 or len(widths) < 2 or min(widths) < 1:
            raise ValueError(f"SceneSegmenterNet needs num_classes >= 1 and >= 2 positive widths, got {num_classes}, {widths}")
        self.num_classes, self.widths = int(num_classes), widths
        self.down = nn.ModuleList()
        for i, w in enumerate(widths):
            c_in = 3 if i == 0 else widths[i - 1]
            pool = [nn.MaxPool2d(2)] if i > 0 else []
            self.down.append(nn.Sequential(*pool, _conv_bn_relu(c_in, w), _conv_bn_relu(w, w)))
        # up[i] fuses the upsampled level i+1 with the skip from level i.
        self.up = nn.ModuleList(_conv_bn_relu(widths[i + 1] + widths[i], widths[i]) for i in range(len(widths) - 1))
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images N x 3 x H x W in [-1, 1] -> logits N x num_classes x H x W."""
        skips = []
        x = images
        for block in self.down:
            x = block(x)
            skips.append(x)
        x = skips.pop()
        for i in reversed(range(len(self.up))):
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = self.up[i](torch.cat([x, skip], dim=1))
        return self.head(x)


class ScenesSegmenter(Segmenter):
    """A trained :class:`SceneSegmenterNet` behind the :class:`Segmenter` interface."""

    segmenter_id = "scenes"

    def __init__(self, net: SceneSegmenterNet, class_names: Sequence[str], meta: dict[str, Any] | None = None):
        super().__init__(class_names)
        if net.num_classes != self.num_classes:
            raise ValueError(f"network has {net.num_classes} outputs but {self.num_classes} class names were given")
        self.net = net
        self.meta = dict(meta or {})
        self.requires_grad_(False)
        self.eval()

    def class_scores(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def make_weights_file(net: SceneSegmenterNet, class_names: Sequence[str], **meta: Any) -> dict[str, Any]:
    """The dict the weights file holds: weights, architecture and provenance."""
    if len(class_names) != net.num_classes:
        raise ValueError(f"{len(class_names)} class names for a {net.num_classes}-class network")
    return {
        "format": "seeing.scenes_segmenter/1",
        "state_dict": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
        "widths": list(net.widths),
        "class_names": list(class_names),
        "meta": meta,
    }


def load_scenes_segmenter(path: str | Path | None = None, device: str | torch.device = "auto") -> ScenesSegmenter:
    """The scenes segmenter from a weights file written by the segmenter stage's ``export``;
    ``path=None`` loads the trained weights shipped with the package."""
    path = require_file(shipped_weights_path() if path in (None, "") else path, "scenes segmenter weights")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"scenes segmenter weights: could not read {path} ({e})") from e
    if not isinstance(blob, dict) or blob.get("format") != "seeing.scenes_segmenter/1":
        raise ValueError(
            f"scenes segmenter weights: {path} is not a file written by the segmenter stage's export "
            "(expected a dict with format 'seeing.scenes_segmenter/1')"
        )
    names = blob["class_names"]
    net = SceneSegmenterNet(len(names), blob["widths"])
    load_exact(net, blob["state_dict"], f"scenes segmenter weights {path}")
    return ScenesSegmenter(net, names, meta=blob.get("meta")).to(resolve_device(device))
