"""The ProGAN paper's WGAN-GP ablation generator (LSUN bedroom, 128x128; ``wgangp-*.pth``).

Same skeleton as ProGAN without its tricks (no pixel norm, no equalised learning rate, no
progressive growing): ``layer1`` maps the 128-d z, seen as a 128 x 1 x 1 map, to 4x4 by a
4x4 conv with padding 3; ``layer2`` is a 3x3 conv at 4x4; then per doubling an upsampling
layer (nearest 2x, then 3x3 conv) and a plain 3x3 layer. Every conv is bias-free and
followed by BatchNorm and ReLU. ``output_RxR``: 1x1 conv with bias, then hardtanh.

Checkpoint keys ``features.<i>.conv.weight`` / ``features.<i>.norm.*`` are layer ``i + 1``;
``output.conv.*`` is the output layer.

BatchNorm always uses its stored running statistics: this is a pretrained generator that
is only ever evaluated, and batch statistics would make an image depend on its batch.
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from seeing.frozen import FrozenBatchNorm

from .layered import LayeredGenerator
from .materialize import build_and_load

LAYOUT = "ganseeing_wgangp"

KEY_PATTERN = re.compile(
    r"features\.\d+\.(conv\.weight|norm\.(weight|bias|running_mean|running_var|num_batches_tracked))"
    r"|output\.conv\.(weight|bias)")


class ConvBNReLU(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, kernel: int, padding: int, upsample: bool = False):
        super().__init__()
        self.upsample = upsample
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, padding=padding, bias=False)
        self.norm = FrozenBatchNorm(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return F.relu(self.norm(self.conv(x)))


class LatentAsMap(nn.Module):
    """Feeds a flat latent to a block that expects a C x 1 x 1 map."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.block(z.reshape(z.shape[0], -1, 1, 1))


class RGBOutput(nn.Module):
    def __init__(self, in_ch: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.hardtanh(self.conv(x))


class WGANGPGenerator(LayeredGenerator):
    """``layer1`` ... ``layer{2R}``, ``output_RxR``; ``widths[i]`` channels at ``4 * 2**i``."""

    layout = LAYOUT

    def __init__(self, z_dim: int = 128, widths: Sequence[int] = (512, 512, 256, 128, 64, 32)):
        self.widths = [int(c) for c in widths]
        layers: list[tuple[str, nn.Module]] = [
            ("layer1", LatentAsMap(ConvBNReLU(z_dim, self.widths[0], 4, 3))),
            ("layer2", ConvBNReLU(self.widths[0], self.widths[0], 3, 1)),
        ]
        for cin, cout in zip(self.widths[:-1], self.widths[1:]):
            n = len(layers)
            layers.append((f"layer{n + 1}", ConvBNReLU(cin, cout, 3, 1, upsample=True)))
            layers.append((f"layer{n + 2}", ConvBNReLU(cout, cout, 3, 1)))
        res = 4 * 2 ** (len(self.widths) - 1)
        layers.append((f"output_{res}x{res}", RGBOutput(self.widths[-1])))
        super().__init__(layers, z_dim=z_dim, resolution=res)

    def layout_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under the checkpoint's key names (inverse of :func:`to_internal`)."""
        return {file_key(key): value for key, value in self.state_dict().items()}


def file_key(key: str) -> str:
    """This module's key -> the checkpoint's (inverse of :func:`to_internal`); other keys as they are."""
    if not key.startswith("layers.") or "." not in key.removeprefix("layers."):
        return key
    name, rest = key.removeprefix("layers.").split(".", 1)
    if name.startswith("output_"):
        return f"output.{rest}"
    if name.startswith("layer") and name.removeprefix("layer").isdigit():
        return f"features.{int(name.removeprefix('layer')) - 1}.{rest.removeprefix('block.')}"
    return key


def infer_sizes(state_dict: Mapping[str, torch.Tensor]) -> dict:
    convs = sorted(int(m[1]) for k in state_dict if (m := re.fullmatch(r"features\.(\d+)\.conv\.weight", k)))
    if not convs or convs[0] != 0:
        raise ValueError(f"not a {LAYOUT} state dict: no 'features.0.conv.weight'")
    first = state_dict["features.0.conv.weight"]
    widths = [int(first.shape[0])] + [int(state_dict[f"features.{i}.conv.weight"].shape[0])
                                      for i in convs if i >= 2 and i % 2 == 0]
    return dict(z_dim=int(first.shape[1]), widths=widths)


def to_internal(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    res = 4 * 2 ** (len(infer_sizes(state_dict)["widths"]) - 1)
    out = {}
    for key, value in state_dict.items():
        if m := re.fullmatch(r"features\.(\d+)\.(.+)", key):
            index = int(m[1])
            out[f"layers.layer{index + 1}.{'block.' if index == 0 else ''}{m[2]}"] = value
        elif key.startswith("output."):
            out[f"layers.output_{res}x{res}.{key.removeprefix('output.')}"] = value
        else:
            out[key] = value  # reported as unexpected by the loader
    return out


def from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> WGANGPGenerator:
    """A :class:`WGANGPGenerator` sized from and holding a ``wgangp-*.pth`` state dict."""
    sizes = infer_sizes(state_dict)
    return build_and_load(lambda: WGANGPGenerator(**sizes), to_internal(state_dict), f"{LAYOUT} generator",
                          spell=file_key)
