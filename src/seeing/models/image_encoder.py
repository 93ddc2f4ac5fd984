"""E_f: an image encoder from a generated image straight to r_n, the deepest inverted layer.

A torchvision ResNet-18 trunk (randomly initialised: nothing is downloaded) whose
average pooling and classifier are replaced by a 1x1 conv head with leaky ReLU that
predicts r_n's channels at every location.

The full trunk downsamples 32x, which is what a 256x256 ProGAN inverted at its 8x8
``layer4`` needs (the paper's setting). For other sizes the trunk is cut where its
output reaches r_n's resolution (``stages="auto"``: a 64x64 GAN inverted at 8x8
keeps conv1..layer2), or, when a fixed number of stages is asked for, the stride-2
convs of the extra stages become stride 1. Sizes that no power-of-two stride
reaches are pooled/resampled to r_n's size at the end.

Two heads (``EncoderSpec.architecture``): ``"seeing"`` (this project's) is 1x1 conv,
leaky ReLU, 1x1 conv; ``"ganseeing"`` is the paper's released encoder, whose trunk
ends in a single 1x1 conv straight to r_n's channels followed by a leaky ReLU (slope
0.2), so that its output resembles the generator's post-activation features; its
trunk starts, as the reference's, from PyTorch's default layer initialisation.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18

RESNET_STAGE_CHANNELS = (64, 128, 256, 512)
# output stride after conv1+maxpool and after each of layer1..layer4
RESNET_STAGE_STRIDES = (4, 8, 16, 32)
ENCODER_ARCHITECTURES = ("seeing", "ganseeing")


@dataclass(frozen=True)
class EncoderSpec:
    image_size: int  # generated images are image_size x image_size
    out_shape: tuple[int, int, int]  # r_n without batch: (C, H, W)
    target: str  # the name of the generator layer r_n comes from
    stages: int  # how many of ResNet-18's four stages the trunk keeps
    head_channels: int  # "ganseeing": the head has no hidden layer, this is r_n's channels
    architecture: str = "seeing"  # "seeing" or "ganseeing" (the paper's released encoder)

    def __post_init__(self):
        if self.architecture not in ENCODER_ARCHITECTURES:
            raise ValueError(f"unknown image-encoder architecture {self.architecture!r}; "
                             f"known: {', '.join(ENCODER_ARCHITECTURES)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EncoderSpec":
        # files written before the architecture option hold none: they are "seeing" files
        return cls(image_size=int(d["image_size"]), out_shape=tuple(d["out_shape"]), target=d["target"],
                   stages=int(d["stages"]), head_channels=int(d["head_channels"]),
                   architecture=str(d.get("architecture", "seeing")))


def encoder_spec(image_size: int, out_shape: tuple[int, ...], target: str, stages: int | str = "auto",
                 head_channels: int | None = None, architecture: str = "seeing") -> EncoderSpec:
    if len(out_shape) != 3:
        raise ValueError(f"the image encoder predicts a (C, H, W) map; {target} has shape {out_shape}")
    if stages == "auto":
        # the shallowest trunk whose output is no finer than r_n (at least two stages)
        needed = max(1, image_size // out_shape[1])
        stages = next((i + 1 for i, s in enumerate(RESNET_STAGE_STRIDES) if s >= needed), 4)
        stages = max(stages, 2)
    stages = int(stages)
    if not 1 <= stages <= 4:
        raise ValueError(f"ResNet-18 has 4 stages; cannot keep {stages}")
    if architecture == "ganseeing":
        if head_channels and head_channels != out_shape[0]:
            raise ValueError(f"the ganseeing head has no hidden layer: head_channels={head_channels} "
                             f"cannot be honoured ({target} has {out_shape[0]} channels)")
        head = out_shape[0]
    else:
        head = head_channels or max(RESNET_STAGE_CHANNELS[stages - 1], out_shape[0])
    return EncoderSpec(image_size=int(image_size), out_shape=tuple(int(s) for s in out_shape), target=target,
                       stages=stages, head_channels=int(head), architecture=architecture)


def _set_stride_one(stage: nn.Module) -> None:
    """Make the first block of a ResNet stage keep the resolution (conv and shortcut)."""
    block = stage[0]
    block.conv1.stride = (1, 1)
    if block.downsample is not None:
        block.downsample[0].stride = (1, 1)


class ImageEncoder(nn.Module):
    """Image in [-1, 1] ``(B, 3, S, S)`` -> estimate of r_n ``(B, C, H, W)``."""

    def __init__(self, spec: EncoderSpec):
        super().__init__()
        self.spec = spec
        c, h, w = spec.out_shape
        net = resnet18(weights=None)
        kept = [net.layer1, net.layer2, net.layer3, net.layer4][: spec.stages]
        stride = RESNET_STAGE_STRIDES[spec.stages - 1]
        # too coarse for r_n: undo stride-2 stages, deepest first (layer1 never downsamples)
        for stage in reversed(kept[1:]):
            if spec.image_size // stride >= h:
                break
            _set_stride_one(stage)
            stride //= 2
        self.trunk = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, *kept)
        trunk_channels = RESNET_STAGE_CHANNELS[spec.stages - 1]
        if spec.architecture == "ganseeing":
            if spec.head_channels != c:
                raise ValueError(f"the ganseeing head maps straight to {c} channels; head_channels is "
                                 f"{spec.head_channels}")
            self.head = nn.Sequential(nn.Conv2d(trunk_channels, c, 1), nn.LeakyReLU(0.2))
            # the reference's ResNet (its customnet.CustomResNet) starts from PyTorch's default
            # initialisation, not torchvision's ResNet one (Kaiming fan-out convs)
            for module in self.trunk.modules():
                if isinstance(module, (nn.Conv2d, nn.BatchNorm2d)):
                    module.reset_parameters()
        else:
            self.head = nn.Sequential(
                nn.Conv2d(trunk_channels, spec.head_channels, 1),
                nn.LeakyReLU(0.2),
                nn.Conv2d(spec.head_channels, c, 1),
            )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        y = self.head(self.trunk(image))
        size = tuple(self.spec.out_shape[1:])
        if tuple(y.shape[-2:]) != size:
            y = (F.adaptive_avg_pool2d(y, size) if y.shape[-1] > size[1]
                 else F.interpolate(y, size=size, mode="bilinear", align_corners=False))
        return y
