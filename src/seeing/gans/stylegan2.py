"""StyleGAN2 (Karras et al. 2020, config F, "skip" generator) in the genforce model zoo layout
(``stylegan2_*256.pth``).

Layers: ``mapping`` (z -> w+), ``layer0`` ... ``layer{2R-2}`` (genforce's indices: ``layer0``
convolves the learned constant at 4x4, odd layers double the resolution, even layers hold a
resolution's second conv *and* its to-RGB, which adds to the upsampled skip image carried in
:class:`~seeing.gans.stylegan_common.StyledState`), ``output`` (the accumulated image,
clamped). Conv layer ``k`` reads w+ row ``k``, the to-RGB after it row ``k + 1``.

A modulated conv scales the weight's input channels by the style ``A(w) + 1``, then divides
each output channel by the norm of its modulated weights (demodulation; to-RGB skips it),
adds the *stored* noise map times a scalar strength, the bias, and applies ``sqrt(2) *
leaky ReLU``. Upsampling convs are a stride-2 transposed conv followed by the stored 4x4
filter; the skip image is upsampled by zero insertion and the stored 4x4 kernel.
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

LAYOUT = "genforce_stylegan2"

KEY_PATTERN = re.compile(
    r"mapping\.dense\d+\.(weight|bias)|truncation\.w_avg|synthesis\.early_layer\.const|synthesis\.upsample\.kernel"
    r"|synthesis\.layer\d+\.(weight|bias|noise_strength|noise|filter\.kernel|style\.(weight|bias))"
    r"|synthesis\.output\d+\.(weight|bias|style\.(weight|bias))")


def _fir_kernel(gain: float) -> torch.Tensor:
    k = torch.tensor([1.0, 3.0, 3.0, 1.0])
    k = torch.outer(k, k)
    return (k / k.sum() * gain ** 2).view(1, 1, 4, 4)


def _depthwise(x: torch.Tensor, kernel: torch.Tensor, pad: tuple[int, int, int, int]) -> torch.Tensor:
    """The same 2D kernel on every channel, after zero padding (left, right, top, bottom)."""
    channels = x.shape[1]
    return F.conv2d(F.pad(x, pad), kernel.expand(channels, 1, -1, -1), groups=channels)


class FIRFilter(nn.Module):
    """Stored 4x4 low-pass kernel applied after a stride-2 transposed conv (2H+1 -> 2H)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("kernel", _fir_kernel(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _depthwise(x, self.kernel, (1, 1, 1, 1))


class SkipUpsample(nn.Module):
    """2x upsampling of the skip image: zero insertion then the stored 4x4 kernel (gain 4)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("kernel", _fir_kernel(2.0))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        n, c, h, w = image.shape
        spread = image.new_zeros(n, c, 2 * h, 2 * w)
        spread[:, :, ::2, ::2] = image
        return _depthwise(spread, self.kernel, (2, 1, 2, 1))


class StyleAffine(nn.Module):
    """w -> per-input-channel style ``A(w) + 1`` (equalised lr, gain 1)."""

    def __init__(self, w_dim: int, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels, w_dim))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.scale = 1.0 / math.sqrt(w_dim)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return F.linear(w, self.weight * self.scale, self.bias) + 1.0


class ModulatedConv(nn.Module):
    """Modulated (and optionally demodulated) conv with noise, bias and activation."""

    def __init__(self, in_ch: int, out_ch: int, w_dim: int, resolution: int, kernel: int = 3,
                 upsample: bool = False, demodulate: bool = True, noise: bool = True, activate: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        self.style = StyleAffine(w_dim, in_ch)
        self.weight_scale = 1.0 / math.sqrt(in_ch * kernel * kernel)
        self.upsample = upsample
        if upsample:
            self.filter = FIRFilter()
        self.demodulate = demodulate
        self.has_noise = noise
        if noise:
            self.register_buffer("noise", torch.randn(1, 1, resolution, resolution))
            self.noise_strength = nn.Parameter(torch.zeros(()))
        self.activate = activate

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        style = self.style(w)  # N x in
        weight = self.weight * self.weight_scale
        # modulating the input channels of x equals modulating the weights; the
        # demodulation factor is per (sample, output channel), so it applies after the conv
        x = x * style[:, :, None, None]
        if self.upsample:
            x = F.conv_transpose2d(x, weight.flip(2, 3).transpose(0, 1), stride=2)
            x = self.filter(x)
        else:
            x = F.conv2d(x, weight, padding=weight.shape[-1] // 2)
        if self.demodulate:
            norm = (weight.pow(2).sum(dim=(2, 3)).unsqueeze(0) * style.pow(2).unsqueeze(1)).sum(dim=2)
            x = x * torch.rsqrt(norm + 1e-8)[:, :, None, None]
        if self.has_noise:
            x = x + self.noise * self.noise_strength
        x = x + self.bias.view(1, -1, 1, 1)
        return F.leaky_relu(x, 0.2) * math.sqrt(2) if self.activate else x


class SynthesisLayer(nn.Module):
    """Conv layer ``index``; even ones also run their resolution's to-RGB into the skip image."""

    def __init__(self, index: int, in_ch: int, out_ch: int, w_dim: int, resolution: int,
                 upsample: bool = False, const: bool = False, to_rgb: bool = False, skip_upsample: bool = False):
        super().__init__()
        self.index = index
        self.from_const = const
        if const:
            self.const = nn.Parameter(torch.randn(1, in_ch, resolution, resolution))
        self.conv = ModulatedConv(in_ch, out_ch, w_dim, resolution, upsample=upsample)
        self.to_rgb = (ModulatedConv(out_ch, 3, w_dim, resolution, kernel=1, demodulate=False, noise=False,
                                     activate=False) if to_rgb else None)
        self.skip_upsample = SkipUpsample() if skip_upsample else None

    def forward(self, state: StyledState) -> StyledState:
        ws = state.ws
        x = self.const.expand(ws.shape[0], -1, -1, -1) if self.from_const else state.x
        x = self.conv(x, ws[:, self.index])
        image = state.image
        if self.to_rgb is not None:
            rgb = self.to_rgb(x, ws[:, self.index + 1])
            image = rgb if image is None else rgb + self.skip_upsample(image)
        return StyledState(x, ws, image)


class StyleGAN2Generator(StyleGenerator):
    """StyleGAN2 (skip architecture) with ``widths[i]`` channels at resolution ``4 * 2**i``.

    Args:
        z_dim, w_dim, widths, mapping_layers: sizes (read from the checkpoint by the loader).
        truncation_psi, truncation_layers: truncation applied by the ``mapping`` layer (layers None: every row).
        clamp_output: clamp the image to [-1, 1].
    """

    layout = LAYOUT

    def __init__(self, z_dim: int = 512, w_dim: int = 512,
                 widths: Sequence[int] = (512, 512, 512, 512, 512, 256, 128), mapping_layers: int = 8,
                 truncation_psi: float = 1.0, truncation_layers: int | None = 8, clamp_output: bool = True):
        widths = [int(c) for c in widths]
        num_ws = 2 * len(widths)
        mapping = Mapping(z_dim, w_dim, num_ws, mapping_layers, lr_mul=0.01, weight_gain=1.0,
                          activation_gain=math.sqrt(2), truncation_psi=truncation_psi,
                          truncation_layers=truncation_layers)
        synthesis: list[tuple[str, nn.Module]] = [
            ("layer0", SynthesisLayer(0, widths[0], widths[0], w_dim, 4, const=True, to_rgb=True))]
        for block in range(1, len(widths)):
            res = 4 * 2 ** block
            synthesis.append((f"layer{2 * block - 1}", SynthesisLayer(
                2 * block - 1, widths[block - 1], widths[block], w_dim, res, upsample=True)))
            synthesis.append((f"layer{2 * block}", SynthesisLayer(
                2 * block, widths[block], widths[block], w_dim, res, to_rgb=True, skip_upsample=True)))
        self.widths = widths
        super().__init__(mapping, synthesis, StyleOutput(None, clamp=clamp_output),
                         resolution=4 * 2 ** (len(widths) - 1))


def infer_sizes(state_dict: MappingType[str, torch.Tensor]) -> dict:
    """Constructor sizes of :class:`StyleGAN2Generator` from a genforce StyleGAN2 state dict."""
    return infer_style_sizes(state_dict, "synthesis.early_layer.const", LAYOUT)


def to_internal(state_dict: MappingType[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """genforce keys -> :class:`StyleGAN2Generator` keys. The shared skip-upsampling kernel is
    given to every layer that upsamples the skip image."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if (internal := mapping_key(key)) is not None:
            out[internal] = value
        elif key == "synthesis.early_layer.const":
            out["layers.layer0.const"] = value
        elif key == "synthesis.upsample.kernel":
            outputs = [k for k in state_dict if re.fullmatch(r"synthesis\.output\d+\.weight", k)]
            for block in range(1, len(outputs)):
                out[f"layers.layer{2 * block}.skip_upsample.kernel"] = value
        elif m := re.fullmatch(r"synthesis\.(layer\d+)\.(.+)", key):
            out[f"layers.{m[1]}.conv.{m[2]}"] = value
        elif m := re.fullmatch(r"synthesis\.output(\d+)\.(.+)", key):
            out[f"layers.layer{2 * int(m[1])}.to_rgb.{m[2]}"] = value
        else:
            out[key] = value  # reported as unexpected by the loader
    return out


def file_key(key: str) -> str:
    """This module's key -> the genforce key (inverse of :func:`to_internal`); other keys as they are."""
    if key == "layers.mapping.w_avg":
        return "truncation.w_avg"
    if key.startswith("layers.mapping."):
        return "mapping." + key.removeprefix("layers.mapping.")
    if key == "layers.layer0.const":
        return "synthesis.early_layer.const"
    if re.fullmatch(r"layers\.layer\d+\.skip_upsample\.kernel", key):
        return "synthesis.upsample.kernel"
    if m := re.fullmatch(r"layers\.layer(\d+)\.to_rgb\.(.+)", key):
        return f"synthesis.output{int(m[1]) // 2}.{m[2]}"
    if m := re.fullmatch(r"layers\.(layer\d+)\.conv\.(.+)", key):
        return f"synthesis.{m[1]}.{m[2]}"
    return key


def from_state_dict(state_dict: MappingType[str, torch.Tensor], **options) -> StyleGAN2Generator:
    """A :class:`StyleGAN2Generator` sized from and holding a genforce StyleGAN2 state dict.

    ``options``: ``truncation_psi``, ``truncation_layers``, ``clamp_output``.
    """
    sizes = infer_sizes(state_dict)
    return build_and_load(lambda: StyleGAN2Generator(**sizes, **options), to_internal(state_dict),
                          f"{LAYOUT} generator", spell=file_key)
