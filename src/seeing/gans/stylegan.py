"""StyleGAN (Karras et al. 2019) in the genforce model zoo layout (``stylegan_*256.pth``).

Layers: ``mapping`` (z -> w+), ``layer0`` ... ``layer{2R-1}`` (genforce's synthesis layer
indices: two per resolution, ``layer0`` starts from the learned constant, every even
``layer<k>`` with k >= 2 doubles the resolution), ``output`` (1x1 conv to RGB, clamped).
What flows between them and what "z" means for inversion: :mod:`seeing.gans.stylegan_common`.

Each synthesis layer: [2x upsample + 3x3 conv + 3x3 blur | learned constant] -> add the
*stored* noise map times a per-channel weight -> bias -> leaky ReLU -> instance norm ->
style modulation ``x * (1 + s_scale) + s_bias`` with ``s = A(w_k)``. Upsampling layers at
``fused_scale_min_res`` and above use genforce's fused transposed conv (the 3x3 kernel summed
into a 4x4 one, stride 2), below it nearest upsampling then conv, as the public models did.
Using the stored noise buffers makes outputs deterministic (noise is not resampled).
"""
from __future__ import annotations

import math
import re
from typing import Mapping as MappingType, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .materialize import build_and_load
from .stylegan_common import Mapping, StyledState, StyleGenerator, StyleOutput, infer_style_sizes, mapping_key

LAYOUT = "genforce_stylegan"

KEY_PATTERN = re.compile(
    r"mapping\.dense\d+\.(weight|bias)|truncation\.w_avg|synthesis\.lod"
    r"|synthesis\.layer\d+\.(weight|bias|const|apply_noise\.(weight|noise)|style\.(weight|bias)|blur\.kernel)"
    r"|synthesis\.output\d+\.(weight|bias)")


class NoiseInput(nn.Module):
    """Adds a fixed noise map scaled per channel (genforce's ``apply_noise``)."""

    def __init__(self, channels: int, resolution: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(channels))
        self.register_buffer("noise", torch.randn(1, 1, resolution, resolution))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.noise * self.weight.view(1, -1, 1, 1)


class StyleAffine(nn.Module):
    """w -> (scale, bias) style per channel; equalised lr with gain 1."""

    def __init__(self, w_dim: int, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2 * channels, w_dim))
        self.bias = nn.Parameter(torch.zeros(2 * channels))
        self.scale = 1.0 / math.sqrt(w_dim)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return F.linear(w, self.weight * self.scale, self.bias)


class Blur(nn.Module):
    """Depthwise 3x3 filter after upsampling; the kernel is a stored buffer."""

    def __init__(self, channels: int):
        super().__init__()
        k = torch.tensor([1.0, 2.0, 1.0])
        k = torch.outer(k, k)
        self.register_buffer("kernel", (k / k.sum()).expand(channels, 1, 3, 3).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.kernel, padding=1, groups=x.shape[1])


def instance_norm(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    x = x - x.mean(dim=(2, 3), keepdim=True)
    return x * torch.rsqrt(x.pow(2).mean(dim=(2, 3), keepdim=True) + eps)


class StyleLayer(nn.Module):
    """One StyleGAN synthesis layer; reads row ``index`` of w+."""

    def __init__(self, index: int, in_ch: int, out_ch: int, w_dim: int, resolution: int,
                 const: bool = False, upsample: bool = False, fused: bool = False):
        super().__init__()
        self.index = index
        self.upsample = upsample
        self.fused = fused
        self.from_const = const
        if const:
            self.const = nn.Parameter(torch.ones(1, out_ch, resolution, resolution))
        else:
            self.weight = nn.Parameter(torch.randn(out_ch, in_ch, 3, 3))
            self.weight_scale = math.sqrt(2) / math.sqrt(in_ch * 9)
        if upsample:
            self.blur = Blur(out_ch)
        self.bias = nn.Parameter(torch.zeros(out_ch))
        self.apply_noise = NoiseInput(out_ch, resolution)
        self.style = StyleAffine(w_dim, out_ch)

    def convolve(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight * self.weight_scale
        if not self.upsample:
            return F.conv2d(x, weight, padding=1)
        if self.fused:
            # upsample+conv as one stride-2 transposed conv: the 3x3 kernel summed over
            # the four 1-pixel shifts gives the 4x4 kernel of nearest-upsample-then-conv
            w = F.pad(weight, (1, 1, 1, 1))
            w = w[:, :, 1:, 1:] + w[:, :, :-1, 1:] + w[:, :, 1:, :-1] + w[:, :, :-1, :-1]
            x = F.conv_transpose2d(x, w.transpose(0, 1), stride=2, padding=1)
        else:
            x = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, padding=1)
        return self.blur(x)

    def forward(self, state: StyledState) -> StyledState:
        ws = state.ws
        if self.from_const:
            x = self.const.expand(ws.shape[0], -1, -1, -1)
        else:
            x = self.convolve(state.x)
        x = self.apply_noise(x) + self.bias.view(1, -1, 1, 1)
        x = instance_norm(F.leaky_relu(x, 0.2))
        scale, shift = self.style(ws[:, self.index]).chunk(2, dim=1)
        x = x * (scale[:, :, None, None] + 1) + shift[:, :, None, None]
        return StyledState(x, ws, None)


class ToRGB(nn.Module):
    """1x1 conv to RGB with gain 1 (StyleGAN's output layer)."""

    def __init__(self, in_ch: int, channels: int = 3):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels, in_ch, 1, 1))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.scale = 1.0 / math.sqrt(in_ch)

    def forward(self, state: StyledState) -> torch.Tensor:
        return F.conv2d(state.x, self.weight * self.scale) + self.bias.view(1, -1, 1, 1)


class StyleGANGenerator(StyleGenerator):
    """StyleGAN with ``widths[i]`` channels at resolution ``4 * 2**i``.

    Args:
        z_dim, w_dim: latent sizes; ``mapping_layers``: dense layers in the mapping.
        widths: channels per resolution, from 4x4 up.
        truncation_psi, truncation_layers: truncation applied by the ``mapping`` layer.
        fused_scale_min_res: resolutions from which upsampling is the fused transposed conv
            (128 in the public TF models and genforce's ``fused_scale='auto'``).
        clamp_output: clamp the image to [-1, 1] (the raw output overshoots slightly).
    """

    layout = LAYOUT

    def __init__(self, z_dim: int = 512, w_dim: int = 512,
                 widths: Sequence[int] = (512, 512, 512, 512, 256, 128, 64), mapping_layers: int = 8,
                 truncation_psi: float = 1.0, truncation_layers: int = 8, fused_scale_min_res: int = 128,
                 clamp_output: bool = True):
        widths = [int(c) for c in widths]
        num_ws = 2 * len(widths)
        mapping = Mapping(z_dim, w_dim, num_ws, mapping_layers, lr_mul=0.01, weight_gain=math.sqrt(2),
                          activation_gain=1.0, truncation_psi=truncation_psi,
                          truncation_layers=truncation_layers)
        synthesis: list[tuple[str, nn.Module]] = []
        for block, ch in enumerate(widths):
            res = 4 * 2 ** block
            if block == 0:
                first = StyleLayer(0, ch, ch, w_dim, res, const=True)
            else:
                first = StyleLayer(2 * block, widths[block - 1], ch, w_dim, res, upsample=True,
                                   fused=res >= fused_scale_min_res)
            synthesis.append((f"layer{2 * block}", first))
            synthesis.append((f"layer{2 * block + 1}", StyleLayer(2 * block + 1, ch, ch, w_dim, res)))
        self.widths = widths
        super().__init__(mapping, synthesis, StyleOutput(ToRGB(widths[-1]), clamp=clamp_output),
                         resolution=4 * 2 ** (len(widths) - 1))


def infer_sizes(state_dict: MappingType[str, torch.Tensor]) -> dict:
    """Constructor sizes of :class:`StyleGANGenerator` from a genforce StyleGAN state dict."""
    return infer_style_sizes(state_dict, "synthesis.layer0.const", LAYOUT)


def to_internal(state_dict: MappingType[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """genforce keys -> :class:`StyleGANGenerator` keys; drops the unused lower to-RGBs and ``lod``."""
    lod = state_dict.get("synthesis.lod")
    if lod is not None and not lod.is_meta and float(lod) != 0.0:
        raise ValueError(f"{LAYOUT} checkpoint has lod={float(state_dict['synthesis.lod'])}; "
                         "only finished models (lod 0) are supported")
    last = max(int(m[1]) for k in state_dict if (m := re.fullmatch(r"synthesis\.output(\d+)\.weight", k)))
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if (internal := mapping_key(key)) is not None:
            out[internal] = value
        elif m := re.fullmatch(r"synthesis\.(layer\d+)\.(.+)", key):
            out[f"layers.{m[1]}.{m[2]}"] = value
        elif m := re.fullmatch(rf"synthesis\.output{last}\.(weight|bias)", key):
            out[f"layers.output.to_image.{m[1]}"] = value
        elif key == "synthesis.lod" or re.fullmatch(r"synthesis\.output\d+\.(weight|bias)", key):
            continue  # lower levels of detail: unused once growing has finished
        else:
            out[key] = value  # reported as unexpected by the loader
    return out


def file_key(key: str, last: int) -> str:
    """This module's key -> the genforce key (inverse of :func:`to_internal`; ``last``: the index
    of the final to-RGB, ``synthesis.output<last>``); other keys as they are."""
    if key == "layers.mapping.w_avg":
        return "truncation.w_avg"
    if key.startswith("layers.mapping."):
        return "mapping." + key.removeprefix("layers.mapping.")
    if key.startswith("layers.output.to_image."):
        return f"synthesis.output{last}." + key.removeprefix("layers.output.to_image.")
    if re.match(r"layers\.layer\d+\.", key):
        return "synthesis." + key.removeprefix("layers.")
    return key


def from_state_dict(state_dict: MappingType[str, torch.Tensor], **options) -> StyleGANGenerator:
    """A :class:`StyleGANGenerator` sized from and holding a genforce StyleGAN state dict.

    ``options``: ``truncation_psi``, ``truncation_layers``, ``fused_scale_min_res``, ``clamp_output``.
    """
    sizes = infer_sizes(state_dict)
    last = len(sizes["widths"]) - 1
    return build_and_load(lambda: StyleGANGenerator(**sizes, **options), to_internal(state_dict),
                          f"{LAYOUT} generator", spell=lambda key: file_key(key, last))
