"""StyleGAN2 as rosinality/stylegan2-pytorch builds it (``model.py``), from its checkpoints
(``torch.save`` of ``{'g', 'd', 'g_ema', 'g_optim', 'd_optim', 'args', ...}``; the converted
official weights, e.g. ``stylegan2-ffhq-config-f.pt``, hold ``g_ema`` and ``latent_avg``).

Layered view, under upstream's names::

    mapping -> conv1 -> convs.0 -> convs.1 -> ... -> convs.<2R-1> -> output

``mapping`` is upstream's ``style`` (pixel norm, then the dense layers) followed by the
broadcast to w+ and truncation toward ``latent_avg``; ``conv1`` convolves the stored constant
``input`` and runs ``to_rgb1``; ``convs.<2i>`` doubles the resolution; ``convs.<2i+1>`` also
runs ``to_rgbs.<i>`` into the skip image it upsamples with its stored kernel (carried in the
:class:`~seeing.gans.stylegan_common.StyledState`). Conv layer k reads w+ row k and the
stored ``noises.noise_<k>`` (``randomize_noise=False``), a to-RGB row k + 1, as upstream's
``forward`` does. Channel counts are read from the tensor shapes (forks change the table).

``latent_avg``: the file's, when it stores one; otherwise the mean of the mapping's output over
:data:`LATENT_AVG_SAMPLES` latents drawn with ``sample_z(..., seed=LATENT_AVG_SEED)`` (upstream
leaves the estimate to the caller, ``mean_latent(4096)`` on random z). Deliberate difference:
upstream ignores a truncation ``psi >= 1``; here any ``psi != 1`` moves w+ by
``latent_avg + psi * (w - latent_avg)``, so a setting always takes effect.
"""
from __future__ import annotations

import math
import re
from typing import Mapping as MappingType

import torch
from torch import nn

from .layered import module_key
from .materialize import build_and_load
from .stylegan2_ops import StyleAffine, bias_leaky_relu, modulated_conv, upsample_skip
from .stylegan_common import Mapping, StyledState, StyleGenerator, StyleOutput

LAYOUT = "rosinality_stylegan2"
SIGNATURE = "input.input"
LR_MLP = 0.01  # upstream's Generator(lr_mlp=0.01), which its train.py never changes
LATENT_AVG_SAMPLES = 10_000
LATENT_AVG_SEED = 0
INVERSION_LAYERS = ("conv1", "convs.0", "convs.1")  # 4x4, then both 8x8 convs

_CONV = r"(conv1|convs\.\d+)\.(conv\.weight|conv\.blur\.kernel|conv\.modulation\.(weight|bias)|noise\.weight|activate\.bias)"
_RGB = r"(to_rgb1|to_rgbs\.\d+)\.(bias|upsample\.kernel|conv\.weight|conv\.modulation\.(weight|bias))"
KEY_PATTERN = re.compile(rf"style\.\d+\.(weight|bias)|input\.input|latent_avg|noises\.noise_\d+|{_CONV}|{_RGB}")


class StyledConv(nn.Module):
    """Upstream's ``StyledConv``: modulated conv (upsampling: transposed conv, then the stored blur
    kernel, which holds its gain of 4), stored noise times its weight, bias, sqrt(2) * leaky ReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, w_dim: int, resolution: int,
                 blur_taps: int | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, out_ch, in_ch, kernel, kernel))
        self.modulation = StyleAffine(w_dim, in_ch)
        self.weight_gain = 1.0 / math.sqrt(in_ch * kernel * kernel)
        self.upsample = blur_taps is not None
        if self.upsample:
            self.register_buffer("blur_kernel", torch.empty(blur_taps, blur_taps))
            p = (blur_taps - 2) - (kernel - 1)
            self.blur_pad = ((p + 1) // 2 + 1, p // 2 + 1) * 2
        self.register_buffer("noise", torch.empty(1, 1, resolution, resolution))
        self.noise_weight = nn.Parameter(torch.empty(1))
        self.bias = nn.Parameter(torch.empty(out_ch))

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        x = modulated_conv(x, self.weight[0] * self.weight_gain, self.modulation(w), up=self.upsample,
                           up_filter=getattr(self, "blur_kernel", None),
                           up_pad=getattr(self, "blur_pad", None), up_gain=1.0)
        x = x + (self.noise_weight * self.noise).to(x.dtype)
        return bias_leaky_relu(x, self.bias)


class ToRGB(nn.Module):
    """Upstream's ``ToRGB``: modulated 1x1 conv without demodulation, plus bias; the skip image
    before it is upsampled with the stored kernel (gain included)."""

    def __init__(self, in_ch: int, w_dim: int, upsample_taps: int | None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, 3, in_ch, 1, 1))
        self.modulation = StyleAffine(w_dim, in_ch)
        self.weight_gain = 1.0 / math.sqrt(in_ch)
        self.bias = nn.Parameter(torch.empty(1, 3, 1, 1))
        if upsample_taps is not None:
            self.register_buffer("upsample_kernel", torch.empty(upsample_taps, upsample_taps))

    def forward(self, x: torch.Tensor, w: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        rgb = modulated_conv(x, self.weight[0] * self.weight_gain, self.modulation(w), demodulate=False)
        rgb = rgb + self.bias.to(rgb.dtype)
        return rgb if skip is None else rgb + upsample_skip(skip, self.upsample_kernel, gain=1.0)


class ChainLayer(nn.Module):
    """``conv1`` (from the constant, with ``to_rgb1``), or ``convs.<j>`` (odd j with a to-RGB)."""

    def __init__(self, conv: StyledConv, w_row: int, to_rgb: ToRGB | None = None,
                 const_shape: tuple[int, ...] | None = None):
        super().__init__()
        self.conv, self.to_rgb, self.w_row = conv, to_rgb, w_row
        self.from_const = const_shape is not None
        if self.from_const:
            self.const = nn.Parameter(torch.empty(const_shape))

    def forward(self, state: StyledState) -> StyledState:
        ws = state.ws
        x = self.const.expand(ws.shape[0], -1, -1, -1) if self.from_const else state.x
        x = self.conv(x, ws[:, self.w_row])
        image = state.image
        if self.to_rgb is not None:
            image = self.to_rgb(x, ws[:, self.w_row + 1], image)
        return StyledState(x, ws, image)


class RosinalityStyleGAN2Generator(StyleGenerator):
    """A rosinality StyleGAN2 generator as ``mapping, conv1, convs.0, ..., output``."""

    layout = LAYOUT


def _layer_names(num_convs: int) -> list[str]:
    return ["conv1"] + [f"convs.{j}" for j in range(num_convs)]


def _internal_key(key: str) -> str:
    """rosinality key -> :class:`RosinalityStyleGAN2Generator` key (unknown keys unchanged: the
    loader reports them as unexpected)."""
    if m := re.fullmatch(r"style\.(\d+)\.(weight|bias)", key):
        return f"layers.mapping.dense{int(m[1]) - 1}.{m[2]}"
    if key == "latent_avg":
        return "layers.mapping.w_avg"
    if key == "input.input":
        return "layers.conv1.const"
    if m := re.fullmatch(r"noises\.noise_(\d+)", key):  # conv layer k's stored noise
        owner = "conv1" if m[1] == "0" else f"convs.{int(m[1]) - 1}"
        return f"layers.{module_key(owner)}.conv.noise"
    if m := re.fullmatch(r"(conv1|convs\.\d+)\.(.+)", key):
        rest = {"conv.weight": "weight", "conv.blur.kernel": "blur_kernel", "noise.weight": "noise_weight",
                "activate.bias": "bias"}.get(m[2], m[2].replace("conv.modulation.", "modulation."))
        return f"layers.{module_key(m[1])}.conv.{rest}"
    if m := re.fullmatch(r"(to_rgb1|to_rgbs\.(\d+))\.(.+)", key):
        owner = "conv1" if m[1] == "to_rgb1" else f"convs.{2 * int(m[2]) + 1}"
        rest = {"conv.weight": "weight", "upsample.kernel": "upsample_kernel"}.get(
            m[3], m[3].replace("conv.modulation.", "modulation."))
        return f"layers.{module_key(owner)}.to_rgb.{rest}"
    return key


def _shape(state_dict: MappingType[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in state_dict:
        raise ValueError(f"not a {LAYOUT} state dict: it lacks {key!r}")
    return tuple(state_dict[key].shape)


def from_state_dict(state_dict: MappingType[str, torch.Tensor], truncation_psi: float = 1.0,
                    truncation_layers: int | None = None, clamp_output: bool = True
                    ) -> RosinalityStyleGAN2Generator:
    """The generator of a rosinality ``g_ema`` state dict (plus the checkpoint's ``latent_avg``
    under that key, when it has one). Options: ``truncation_psi``, ``truncation_layers`` (None:
    every row of w+, as upstream), ``clamp_output``."""
    dense = sorted(int(m[1]) for k in state_dict if (m := re.fullmatch(r"style\.(\d+)\.weight", k)))
    convs = sorted(int(m[1]) for k in state_dict if (m := re.fullmatch(r"convs\.(\d+)\.conv\.weight", k)))
    if not dense or dense != list(range(1, len(dense) + 1)) or convs != list(range(len(convs))) or len(convs) % 2:
        raise ValueError(f"not a {LAYOUT} state dict: style.1..N and an even number of convs.0..M are needed "
                         f"(found style {dense}, convs {convs})")
    w_dim, z_dim = _shape(state_dict, f"style.{dense[-1]}.weight")[0], _shape(state_dict, "style.1.weight")[1]
    num_ws = len(convs) + 2  # conv1, to_rgb1, then two convs and a to-RGB per resolution (rows overlap)
    names = _layer_names(len(convs))
    keys = ["conv1"] + [f"convs.{j}" for j in convs]

    def build() -> RosinalityStyleGAN2Generator:
        mapping = Mapping(z_dim, w_dim, num_ws, num_layers=len(dense), hidden=_shape(state_dict, "style.1.weight")[0],
                          lr_mul=LR_MLP, weight_gain=1.0, activation_gain=math.sqrt(2),
                          truncation_psi=truncation_psi, truncation_layers=truncation_layers)
        chain = []
        for k, (name, key) in enumerate(zip(names, keys)):
            _, out_ch, in_ch, kernel, _ = _shape(state_dict, f"{key}.conv.weight")
            resolution = _shape(state_dict, f"noises.noise_{k}")[-1]
            blur = _shape(state_dict, f"{key}.conv.blur.kernel")[0] if f"{key}.conv.blur.kernel" in state_dict else None
            conv = StyledConv(in_ch, out_ch, kernel, w_dim, resolution, blur)
            to_rgb, const = None, None
            if k == 0:
                to_rgb, const = ToRGB(out_ch, w_dim, None), _shape(state_dict, "input.input")
            elif k % 2 == 0:  # convs.<odd>: the resolution's second conv, then its to-RGB
                upsample = _shape(state_dict, f"to_rgbs.{(k - 2) // 2}.upsample.kernel")[0]
                to_rgb = ToRGB(out_ch, w_dim, upsample)
            chain.append((name, ChainLayer(conv, k, to_rgb, const)))
        return RosinalityStyleGAN2Generator(mapping, chain, StyleOutput(None, clamp=clamp_output),
                                            resolution=chain[-1][1].conv.noise.shape[-1])

    tensors = {_internal_key(k): v for k, v in state_dict.items()}
    estimate = "latent_avg" not in state_dict
    if estimate:  # filled below, from the loaded mapping
        tensors["layers.mapping.w_avg"] = torch.zeros(w_dim, device=state_dict["style.1.weight"].device)
    generator = build_and_load(build, tensors, f"{LAYOUT} generator")
    if estimate and not generator.mapping.w_avg.is_meta:
        generator.mapping.w_avg.copy_(estimate_latent_avg(generator))
    generator.latent_avg_estimated = estimate
    return generator


@torch.no_grad()
def estimate_latent_avg(generator: StyleGenerator, samples: int = LATENT_AVG_SAMPLES,
                        seed: int = LATENT_AVG_SEED, batch: int = 1000) -> torch.Tensor:
    """Mean of the mapping's w over ``samples`` latents of ``sample_z(samples, seed)``."""
    z = generator.sample_z(samples, seed=seed)
    total = sum(generator.mapping.map_z(z[i:i + batch]).sum(0) for i in range(0, samples, batch))
    return total / samples
