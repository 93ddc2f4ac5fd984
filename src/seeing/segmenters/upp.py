"""``upp``: the unified perceptual parsing segmenter used by the paper's FSD.

ResNet-50 with the three-conv "deep stem" encoder and the multi-task UPerNet
decoder of CSAIL's unified parsing release (Xiao et al., ECCV 2018), read from the
public ``upp-resnet50-upernet`` folder that holds ``encoder_epoch_40.pth``,
``decoder_epoch_40.pth`` and ``labels.json``. Module names follow that release,
so its state dicts load as they are.

Only the object head is used (336 Broden+ object classes, 0 = "-" no object):
the scene, part and material heads' weights are checked against ``labels.json``
and then left out.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import Bottleneck

from seeing.state_dicts import load_exact

from seeing.devices import resolve_device

from .base import Segmenter, load_state_dict_file, require_file
from .precise_pool import precise_roi_pool

log = logging.getLogger(__name__)

# The release feeds BGR images in 0..255 minus this per-channel (B, G, R) mean, no scaling.
BGR_MEAN = (102.9801, 115.9465, 122.7717)
OTHER_HEADS = ("scene_head", "part_head", "material_head")


def _conv_bn_relu(c_in: int, c_out: int, kernel_size: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel_size, stride, padding=kernel_size // 2, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class DeepStemResNet50(nn.Module):
    """ResNet-50 whose 7x7 stem is replaced by three 3x3 convs (64, 64, 128 channels).
    ``forward`` returns the four stage outputs (strides 4, 8, 16, 32)."""

    def __init__(self, blocks: Sequence[int] = (3, 4, 6, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = nn.Conv2d(64, 64, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(128)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_planes = 128
        for i, (planes, n, stride) in enumerate(zip((64, 128, 256, 512), blocks, (1, 2, 2, 2)), start=1):
            layers = []
            for b in range(n):
                down = None
                if b == 0 and (stride != 1 or in_planes != planes * Bottleneck.expansion):
                    down = nn.Sequential(nn.Conv2d(in_planes, planes * Bottleneck.expansion, 1, stride, bias=False),
                                         nn.BatchNorm2d(planes * Bottleneck.expansion))
                layers.append(Bottleneck(in_planes, planes, stride if b == 0 else 1, down))
                in_planes = planes * Bottleneck.expansion
            setattr(self, f"layer{i}", nn.Sequential(*layers))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        x = self.maxpool(x)
        features = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            features.append(x)
        return features


class UPerNetObjectDecoder(nn.Module):
    """The UPerNet decoder (pyramid pooling on the last stage, a feature pyramid, fusion of all
    pyramid levels at stride 4) with the object head only. Returns object logits at stride 4."""

    def __init__(self, num_objects: int, fpn_dim: int = 512, fc_dim: int = 2048,
                 fpn_inplanes: Sequence[int] = (256, 512, 1024, 2048), pool_scales: Sequence[int] = (1, 2, 3, 6),
                 ppm_dim: int = 512):
        super().__init__()
        self.pool_scales = tuple(pool_scales)
        self.ppm_conv = nn.ModuleList(_conv_bn_relu(fc_dim, ppm_dim, kernel_size=1) for _ in self.pool_scales)
        self.ppm_last_conv = _conv_bn_relu(fc_dim + len(self.pool_scales) * ppm_dim, fpn_dim)
        self.fpn_in = nn.ModuleList(_conv_bn_relu(c, fpn_dim, kernel_size=1) for c in fpn_inplanes[:-1])
        # Each fpn_out entry is wrapped in one more Sequential in the release (keys fpn_out.i.0.0.*).
        self.fpn_out = nn.ModuleList(nn.Sequential(_conv_bn_relu(fpn_dim, fpn_dim)) for _ in fpn_inplanes[:-1])
        self.conv_fusion = _conv_bn_relu(len(fpn_inplanes) * fpn_dim, fpn_dim)
        self.object_head = nn.Sequential(_conv_bn_relu(fpn_dim, fpn_dim), nn.Conv2d(fpn_dim, num_objects, 1))

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        top = features[-1]
        size = top.shape[-2:]
        # The release pools, upsamples back, and only then applies the 1x1 conv + BN + ReLU. It pools with
        # PrRoIPool2D(s, s, 1.0) on one RoI [0, 0, W, H], not average pooling (see precise_pool).
        pyramid = [top] + [conv(F.interpolate(precise_roi_pool(top, s), size, mode="bilinear", align_corners=False))
                           for s, conv in zip(self.pool_scales, self.ppm_conv)]
        f = self.ppm_last_conv(torch.cat(pyramid, 1))
        levels = [f]
        for i in reversed(range(len(features) - 1)):
            lateral = self.fpn_in[i](features[i])
            f = lateral + F.interpolate(f, lateral.shape[-2:], mode="bilinear", align_corners=False)
            levels.append(self.fpn_out[i](f))
        levels.reverse()  # finest (stride 4) first
        fine = levels[0].shape[-2:]
        fused = torch.cat([levels[0]] + [F.interpolate(p, fine, mode="bilinear", align_corners=False)
                                         for p in levels[1:]], 1)
        return self.object_head(self.conv_fusion(fused))


class UnifiedParsingSegmenter(Segmenter):
    """Object segmentation by the unified parsing network, with the release's input convention
    (BGR, 0..255, mean subtracted) and its multi-size voting: the image is resized to each of
    ``sizes`` (square), and the softmax probabilities at the input resolution are summed."""

    segmenter_id = "upp"

    def __init__(self, encoder: DeepStemResNet50, decoder: UPerNetObjectDecoder, class_names: Sequence[str],
                 sizes: Sequence[int] = (256,)):
        super().__init__(class_names)
        self.encoder, self.decoder = encoder, decoder
        self.sizes = tuple(int(s) for s in sizes)
        if not self.sizes or min(self.sizes) < 32:
            raise ValueError(f"upp segmenter sizes must be >= 32 pixels, got {sizes}")
        self.register_buffer("bgr_mean", torch.tensor(BGR_MEAN).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def class_scores(self, images: torch.Tensor) -> torch.Tensor:
        x = (images + 1) * 127.5
        x = x.flip(1) - self.bgr_mean
        out_size = images.shape[-2:]
        total = None
        for s in self.sizes:
            # AdaptiveAvgPool2d is how the paper's code resizes (area average down, repeat up).
            resized = x if tuple(x.shape[-2:]) == (s, s) else F.adaptive_avg_pool2d(x, (s, s))
            logits = self.decoder(self.encoder(resized))
            probs = F.interpolate(logits, out_size, mode="bilinear", align_corners=False).softmax(1)
            total = probs if total is None else total + probs
        return total


def read_labels(path: str | Path) -> dict[str, Any]:
    path = require_file(path, "upp segmenter labels")
    try:
        labels = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"upp segmenter labels: {path} is not valid JSON ({e})") from e
    if not isinstance(labels, dict) or not isinstance(labels.get("object"), list) or not labels["object"]:
        raise ValueError(f"upp segmenter labels: {path} has no 'object' list of class names")
    return labels


def head_sizes(labels: dict[str, Any]) -> dict[str, int]:
    """Output sizes of the decoder heads as the release derives them from labels.json."""
    sizes = {"object_head": len(labels["object"])}
    if isinstance(labels.get("scene"), list):
        sizes["scene_head"] = len(labels["scene"])
    if isinstance(labels.get("material"), list):
        sizes["material_head"] = len(labels["material"])
    if isinstance(labels.get("object_part"), dict):
        sizes["part_head"] = sum(len(p) for p in labels["object_part"].values())
    return sizes


def _head_out_channels(state: dict[str, torch.Tensor], head: str) -> int | None:
    """Output channels of a head = rows of its last conv weight (the one with a bias)."""
    biases = sorted(k for k in state if k.startswith(head + ".") and k.endswith(".bias") and state[k].dim() == 1
                    and k[:-len(".bias")] + ".weight" in state and state[k[:-len(".bias")] + ".weight"].dim() == 4)
    return int(state[biases[-1]].shape[0]) if biases else None


def load_upp_segmenter(path: str | Path, sizes: Sequence[int] = (256,), epoch: int = 40,
                       device: str | torch.device = "auto") -> UnifiedParsingSegmenter:
    """The unified parsing segmenter from the folder ``path`` holding ``encoder_epoch_<epoch>.pth``,
    ``decoder_epoch_<epoch>.pth`` and ``labels.json`` (the public ``upp-resnet50-upernet``)."""
    if path in (None, "", "???"):
        raise ValueError("segmenter=upp needs segmenter.path: the folder with encoder_epoch_40.pth, "
                         "decoder_epoch_40.pth and labels.json")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"upp segmenter: folder {folder} does not exist (expected encoder_epoch_{epoch}.pth, "
                                f"decoder_epoch_{epoch}.pth and labels.json in it). Nothing is downloaded.")
    labels = read_labels(folder / "labels.json")
    enc_state = load_state_dict_file(folder / f"encoder_epoch_{epoch}.pth", "upp segmenter encoder")
    dec_state = load_state_dict_file(folder / f"decoder_epoch_{epoch}.pth", "upp segmenter decoder")

    # Head sizes come from labels.json; a decoder trained on another vocabulary is refused.
    for head, expected in head_sizes(labels).items():
        found = _head_out_channels(dec_state, head)
        if found is not None and found != expected:
            raise ValueError(f"upp segmenter: {folder / 'labels.json'} implies {expected} outputs for {head} "
                             f"but decoder_epoch_{epoch}.pth has {found}")
    if "conv_fusion.0.weight" not in dec_state:
        raise ValueError(f"upp segmenter: decoder_epoch_{epoch}.pth has no conv_fusion.0.weight; "
                         "it is not a UPerNet decoder state dict")
    skipped = sorted(k for k in dec_state if k.split(".")[0] in OTHER_HEADS)
    if skipped:
        log.info("upp segmenter: using the object head only; skipping %d keys of %s", len(skipped),
                 ", ".join(h for h in OTHER_HEADS if any(k.startswith(h + ".") for k in skipped)))
    dec_state = {k: v for k, v in dec_state.items() if k not in skipped}

    with torch.device("meta"):  # the weights come from the files; skip the random init
        encoder = DeepStemResNet50()
        decoder = UPerNetObjectDecoder(len(labels["object"]), fpn_dim=int(dec_state["conv_fusion.0.weight"].shape[0]))
    load_exact(encoder, enc_state, f"upp segmenter encoder {folder / f'encoder_epoch_{epoch}.pth'}")
    load_exact(decoder, dec_state, f"upp segmenter decoder {folder / f'decoder_epoch_{epoch}.pth'}")
    return UnifiedParsingSegmenter(encoder, decoder, labels["object"], sizes).to(resolve_device(device))
