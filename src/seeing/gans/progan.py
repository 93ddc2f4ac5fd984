"""ProGAN generator (Karras et al. 2018) in the layer layout of the GAN Dissection conversion.

Layer boundaries: ``layer1`` (z as a C x 1 x 1 map -> 4x4 by a 4x4 conv with padding 3),
``layer2`` (3x3 conv at 4x4), then for each doubling an upsampling block and a plain block,
and finally ``output_RxR`` (1x1 conv to RGB). Every block pixel-normalises its input and uses
equalised learning rate (a weight scale applied at run time plus a bias, ``wscale.b``).
"""
from __future__ import annotations

import math
import re
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layered import LayeredGenerator
from .materialize import build_and_load

LAYOUT = "ganseeing_proggan"


def pixel_norm(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + eps)


class PixelNorm(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_norm(x)


class WScale(nn.Module):
    """Equalised-learning-rate scale and bias applied after a bias-free conv."""

    def __init__(self, channels: int, fan_in: int, gain: float):
        super().__init__()
        self.scale = gain / math.sqrt(fan_in)
        self.b = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.b.view(1, -1, 1, 1)


class ProGANBlock(nn.Module):
    """pixel norm -> (2x nearest upsample) -> conv -> wscale -> leaky ReLU (or clamp for output)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, padding: int, upsample: bool = False,
                 output: bool = False):
        super().__init__()
        self.upsample = upsample
        self.output = output
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, padding=padding, bias=False)
        # The converted checkpoints divide the usual sqrt(2) gain by the kernel size; the
        # output layer uses gain 1. Matching this is what makes public weights load exactly.
        gain = 1.0 if output else math.sqrt(2) / kernel
        self.wscale = WScale(out_ch, in_ch, gain)
        nn.init.normal_(self.conv.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pixel_norm(x)
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = self.wscale(self.conv(x))
        return F.hardtanh(x) if self.output else F.leaky_relu(x, 0.2)


def progan_layers(z_dim: int, widths: Sequence[int]) -> list[tuple[str, nn.Module]]:
    """Named layers for a ProGAN whose resolution doubles ``len(widths)-1`` times from 4x4.

    ``widths[k]`` is the channel count at resolution ``4 * 2**k``.
    """
    layers: list[tuple[str, nn.Module]] = [
        ("layer1", ProGANBlock(z_dim, widths[0], kernel=4, padding=3)),
        ("layer2", ProGANBlock(widths[0], widths[0], kernel=3, padding=1)),
    ]
    for cin, cout in zip(widths[:-1], widths[1:]):
        n = len(layers)
        layers.append((f"layer{n + 1}", ProGANBlock(cin, cout, 3, 1, upsample=True)))
        layers.append((f"layer{n + 2}", ProGANBlock(cout, cout, 3, 1)))
    res = 4 * 2 ** (len(widths) - 1)
    layers.append((f"output_{res}x{res}", ProGANBlock(widths[-1], 3, 1, 0, output=True)))
    return layers


class ProGANGenerator(LayeredGenerator):
    """ProGAN as a :class:`LayeredGenerator`; the latent is a flat ``z_dim`` vector."""

    layout = LAYOUT  # the public key layout of layout_state_dict()

    def __init__(self, z_dim: int = 512, widths: Sequence[int] = (512, 512, 512, 512, 256, 128, 64)):
        self.widths = list(widths)
        layers = progan_layers(z_dim, widths)
        # layer1 sees the flat latent as a (z_dim, 1, 1) map
        first_name, first = layers[0]
        layers[0] = (first_name, _FlatInput(first))
        super().__init__(layers, z_dim=z_dim, resolution=4 * 2 ** (len(widths) - 1))

    @classmethod
    def from_layout_state_dict(cls, state_dict: dict[str, torch.Tensor], spell=None,
                               layout: str = LAYOUT) -> "ProGANGenerator":
        """A generator sized from the tensor shapes of a public-layout state dict, holding
        those tensors (built on the meta device first, so nothing is allocated twice).
        ``spell``: a public-layout key -> the key as the checkpoint spells it (another layout
        converted to this one, genforce's), for errors that name the file's keys."""
        z_dim, widths = infer_progan_sizes(state_dict)
        internal = {_to_internal(k): v for k, v in state_dict.items()}
        public = (lambda k: spell(_to_public(k))) if spell else _to_public
        return build_and_load(lambda: cls(z_dim, widths), internal, f"{layout} generator", spell=public)

    def layout_state_dict(self) -> dict[str, torch.Tensor]:
        """This model's weights under the public layout's key names."""
        return {_to_public(k): v for k, v in self.state_dict().items()}


def infer_progan_sizes(state_dict: dict[str, torch.Tensor]) -> tuple[int, list[int]]:
    """``(z_dim, widths)`` from a GAN-Dissection-layout state dict: ``layer1`` maps z to the
    4x4 width, and every odd layer from ``layer3`` on opens a new resolution."""
    try:
        first = state_dict["layer1.conv.weight"]
    except KeyError:
        raise ValueError(f"not a {LAYOUT} state dict: no 'layer1.conv.weight'") from None
    numbers = sorted(int(m[1]) for k in state_dict if (m := re.fullmatch(r"layer(\d+)\.conv\.weight", k)))
    widths = [int(first.shape[0])] + [int(state_dict[f"layer{n}.conv.weight"].shape[0])
                                      for n in numbers if n >= 3 and n % 2 == 1]
    return int(first.shape[1]), widths


class _FlatInput(nn.Module):
    """Adapts a map-input block to a flat latent; keeps the wrapped block's parameter names."""

    def __init__(self, block: ProGANBlock):
        super().__init__()
        self.block = block

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.block(z.reshape(z.shape[0], -1, 1, 1))


def _to_internal(key: str) -> str:
    # public "layer1.conv.weight" -> internal "layers.layer1.block.conv.weight"
    name, rest = key.split(".", 1)
    return f"layers.{name}.block.{rest}" if name == "layer1" else f"layers.{name}.{rest}"


def _to_public(key: str) -> str:
    key = key.removeprefix("layers.")
    return key.replace("layer1.block.", "layer1.", 1) if key.startswith("layer1.block.") else key
