"""StyleGAN2 as NVlabs' stylegan2-ada-pytorch builds it (``training/networks.py``), from the
``G_ema`` record of a snapshot pickle (:mod:`seeing.gans.nvlabs_pickle`).

Layered view, under upstream's names::

    mapping -> b4.conv1 -> b8.conv0 -> b8.conv1 -> ... -> b<R>.conv0 -> b<R>.conv1 -> output

``mapping`` is upstream's ``G.mapping`` (z, and for a conditional model the one-hot label of
the chosen class, -> w+, truncated toward the stored ``w_avg``); ``b<res>.conv0`` /
``b<res>.conv1`` are upstream's ``G.synthesis.b<res>.conv0`` / ``conv1``. The ``conv1`` layer
of a block also finishes the block as upstream does: it upsamples the skip image carried in
the :class:`~seeing.gans.stylegan_common.StyledState` with the block's stored filter and adds
the block's ``torgb`` output, so its state holds upstream's block outputs ``(x, img)``.
``b4.conv1`` convolves the stored constant. w+ rows are assigned as upstream's
``SynthesisNetwork`` splits ``ws``: conv layer k reads row k, a ``torgb`` the row after its
block's last conv. Noise is the stored ``noise_const`` times ``noise_strength``
(``noise_mode='const'``). Every tensor (filters, noise, ``w_avg``) is the file's; sizes come
from the tensor shapes, flags (``architecture``, ``up``, ``conv_clamp``, ``use_noise``,
``activation``) from the records' own attributes.

Architectures: ``skip`` (every published config), ``orig`` (one to-RGB, at the last block) and
``resnet`` (a block's ``conv0`` layer also runs its 1x1 upsampling ``skip`` conv, whose output
the state carries to ``conv1``, which adds it: :class:`ResidualState`).

Deliberate difference from upstream: blocks that upstream runs in float16 (``num_fp16_res > 0``)
run in float32 here (the float32 result upstream computes with ``force_fp32=True``).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .layered import module_key
from .materialize import as_float32, build_and_load
from .nvlabs_pickle import PersistentRecord
from .stylegan2_ops import StyleAffine, bias_leaky_relu, modulated_conv, transposed_up_pad, upsample_skip
from .stylegan_common import Mapping, StyledState, StyleGenerator, StyleOutput, pixel_norm

LAYOUT = "nvlabs_stylegan2"
SIGNATURE = "synthesis.b4.const"  # the learned 4x4 input: only StyleGAN2's synthesis has it
ARCHITECTURES = ("skip", "orig", "resnet")
RESIDUAL_GAIN = math.sqrt(0.5)  # resnet blocks scale both branches so their sum keeps the variance
# the layers layer-wise inversion treats as early: 4x4, then both 8x8 convs (as genforce's layer0..2)
INVERSION_LAYERS = ("b4.conv1", "b8.conv0", "b8.conv1")


class ConditionalMapping(Mapping):
    """The mapping of a conditional model, fixed to one class: the normalised embedding of that
    class's one-hot label is concatenated to the normalised z."""

    def __init__(self, c_dim: int, embed_features: int, class_index: int, **mapping_args: Any):
        super().__init__(label_features=embed_features, **mapping_args)
        # upstream's mapping.embed: the same equalised-lr linear layer as a style affine, from the one-hot label
        self.embed = StyleAffine(c_dim, embed_features)
        self.c_dim, self.class_index = c_dim, class_index

    def map_z(self, z: torch.Tensor) -> torch.Tensor:
        label = torch.zeros(z.shape[0], self.c_dim, dtype=z.dtype, device=z.device)
        label[:, self.class_index] = 1
        return self.dense_stack(torch.cat([pixel_norm(z), pixel_norm(self.embed(label))], dim=1))


class SynthesisConv(nn.Module):
    """Upstream's ``SynthesisLayer``: modulated 3x3 conv (optionally upsampling), stored constant
    noise, bias, ``sqrt(2) * leaky ReLU`` scaled by ``gain``, clamped to ``conv_clamp * gain``."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, w_dim: int, resolution: int, up: int,
                 use_noise: bool, conv_clamp: float | None, filter_shape: tuple[int, ...]):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_ch, in_ch, kernel, kernel))
        self.bias = nn.Parameter(torch.empty(out_ch))
        self.affine = StyleAffine(w_dim, in_ch)
        self.register_buffer("resample_filter", torch.empty(filter_shape))  # read when up == 2
        self.use_noise = use_noise
        if use_noise:
            self.register_buffer("noise_const", torch.empty(resolution, resolution))
            self.noise_strength = nn.Parameter(torch.empty(()))
        if up not in (1, 2):
            raise ValueError(f"SynthesisLayer with up={up}: StyleGAN2 layers upsample by 1 or 2")
        self.up = up
        self.up_pad = transposed_up_pad(kernel, filter_shape[-1], kernel // 2) if up == 2 else None
        self.conv_clamp = conv_clamp

    def forward(self, x: torch.Tensor, w: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        x = modulated_conv(x, self.weight, self.affine(w), up=self.up == 2, up_filter=self.resample_filter,
                           up_pad=self.up_pad, up_gain=self.up ** 2)
        if self.use_noise:
            x = x + (self.noise_const * self.noise_strength).to(x.dtype)
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_leaky_relu(x, self.bias, gain=math.sqrt(2) * gain, clamp=clamp)


class ToRGB(nn.Module):
    """Upstream's ``ToRGBLayer``: modulated 1x1 conv without demodulation, bias, clamp."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, w_dim: int, conv_clamp: float | None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_ch, in_ch, kernel, kernel))
        self.bias = nn.Parameter(torch.empty(out_ch))
        self.affine = StyleAffine(w_dim, in_ch)
        self.weight_gain = 1.0 / math.sqrt(in_ch * kernel * kernel)
        self.conv_clamp = conv_clamp

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        x = modulated_conv(x, self.weight, self.affine(w) * self.weight_gain, demodulate=False)
        x = x + self.bias.to(x.dtype).view(1, -1, 1, 1)
        return x.clamp(-self.conv_clamp, self.conv_clamp) if self.conv_clamp is not None else x


class ResidualState(NamedTuple):
    """The value between a resnet block's ``conv0`` and ``conv1``: a styled state plus the block's
    skip branch, which ``conv1`` adds to its output."""

    x: torch.Tensor
    ws: torch.Tensor
    image: torch.Tensor | None
    residual: torch.Tensor


class SkipConv(nn.Module):
    """Upstream's resnet ``skip``: a ``Conv2dLayer`` with a 1x1 kernel, no bias, linear activation,
    upsampling by 2 (convolve first, then the stored filter with gain 4), scaled by sqrt(1/2)."""

    def __init__(self, in_ch: int, out_ch: int, filter_shape: tuple[int, ...]):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_ch, in_ch, 1, 1))
        self.register_buffer("resample_filter", torch.empty(filter_shape))
        self.weight_gain = 1.0 / math.sqrt(in_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, (self.weight * self.weight_gain).to(x.dtype))
        return upsample_skip(x, self.resample_filter, gain=4) * RESIDUAL_GAIN


class BlockLayer(nn.Module):
    """One layer of the chain: a block's ``conv0`` or ``conv1``. A ``conv1`` layer ends its block
    (``ends_block``): it holds the block's skip-upsampling filter and its ``torgb`` (when the
    architecture gives the block one); the first block's also holds the constant input. In a
    resnet block ``conv0`` also holds the ``skip`` conv and ``conv1`` adds its output."""

    def __init__(self, conv: SynthesisConv, w_row: int, ends_block: bool, torgb: ToRGB | None = None,
                 const_shape: tuple[int, ...] | None = None, filter_shape: tuple[int, ...] | None = None,
                 skip: SkipConv | None = None, residual: bool = False):
        super().__init__()
        self.conv = conv
        self.w_row = w_row
        self.ends_block = ends_block
        if const_shape is not None:
            self.const = nn.Parameter(torch.empty(const_shape))
        self.from_const = const_shape is not None
        if ends_block:
            self.register_buffer("resample_filter", torch.empty(filter_shape))
        self.torgb = torgb
        self.skip = skip  # resnet conv0: the block's skip branch
        self.residual = residual  # resnet conv1: add the carried skip branch

    def forward(self, state: StyledState | ResidualState) -> StyledState | ResidualState:
        ws = state.ws
        x = self.const.unsqueeze(0).expand(ws.shape[0], -1, -1, -1) if self.from_const else state.x
        if self.skip is not None:
            return ResidualState(self.conv(x, ws[:, self.w_row]), ws, state.image, self.skip(x))
        if self.residual:
            x = state.residual + self.conv(x, ws[:, self.w_row], gain=RESIDUAL_GAIN)
        else:
            x = self.conv(x, ws[:, self.w_row])
        image = state.image
        if self.ends_block:
            if image is not None:
                image = upsample_skip(image, self.resample_filter, gain=4)
            if self.torgb is not None:
                rgb = self.torgb(x, ws[:, self.w_row + 1])
                image = rgb if image is None else image + rgb
        return StyledState(x, ws, image)


class NVlabsStyleGAN2Generator(StyleGenerator):
    """A stylegan2-ada-pytorch generator as ``mapping, b4.conv1, ..., b<R>.conv1, output``."""

    layout = LAYOUT

    def __init__(self, mapping: Mapping, synthesis: list[tuple[str, nn.Module]], resolution: int,
                 clamp_output: bool = True, c_dim: int = 0):
        super().__init__(mapping, synthesis, StyleOutput(None, clamp=clamp_output), resolution=resolution)
        self.c_dim = c_dim
        self.class_index = getattr(mapping, "class_index", None)


# ------------------------------------------------------------------ reading the record
@dataclass(frozen=True)
class _Conv:
    name: str  # "b8.conv0"
    key: str  # the record's path, "synthesis.b8.conv0"
    in_ch: int
    out_ch: int
    kernel: int
    resolution: int
    up: int
    use_noise: bool
    conv_clamp: float | None
    filter_shape: tuple[int, ...]


def _attribute(record: PersistentRecord, name: str, where: str) -> Any:
    value = record.attribute(name, _MISSING)
    if value is _MISSING:
        raise ValueError(f"NVlabs StyleGAN2 record {where} ({record.class_name}) lacks its attribute {name!r}")
    return value.item() if hasattr(value, "item") else value


_MISSING = object()


def _shape(tensors: dict[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in tensors:
        raise ValueError(f"NVlabs StyleGAN2 generator lacks the tensor {key!r}")
    return tuple(tensors[key].shape)


def _conv_plan(record: PersistentRecord, tensors: dict[str, torch.Tensor], res: int, which: str) -> _Conv:
    key = f"synthesis.b{res}.{which}"
    layer = record.child(key)
    if layer.class_name != "SynthesisLayer":
        raise ValueError(f"{key} is a {layer.class_name}, not an NVlabs StyleGAN2 SynthesisLayer")
    activation = _attribute(layer, "activation", key)
    if activation != "lrelu":
        raise ValueError(f"{key} uses activation {activation!r}; NVlabs StyleGAN2 generators use 'lrelu'")
    out_ch, in_ch, kernel, _ = _shape(tensors, f"{key}.weight")
    clamp = _attribute(layer, "conv_clamp", key)
    return _Conv(f"b{res}.{which}", key, in_ch, out_ch, kernel, int(_attribute(layer, "resolution", key)),
                 int(_attribute(layer, "up", key)), bool(_attribute(layer, "use_noise", key)),
                 None if clamp is None else float(clamp), _shape(tensors, f"{key}.resample_filter"))


def _internal_key(key: str) -> str:
    """A record tensor's key -> the :class:`NVlabsStyleGAN2Generator` key (unknown keys unchanged:
    the loader reports them as unexpected)."""
    if m := re.fullmatch(r"mapping\.fc(\d+)\.(weight|bias)", key):
        return f"layers.mapping.dense{m[1]}.{m[2]}"
    if m := re.fullmatch(r"mapping\.(w_avg|embed\.weight|embed\.bias)", key):
        return f"layers.mapping.{m[1]}"
    if m := re.fullmatch(r"synthesis\.b(\d+)\.(const|resample_filter)", key):
        return f"layers.{module_key(f'b{m[1]}.conv1')}.{m[2]}"
    if m := re.fullmatch(r"synthesis\.b(\d+)\.(conv[01])\.(.+)", key):
        return f"layers.{module_key(f'b{m[1]}.{m[2]}')}.conv.{m[3]}"
    if m := re.fullmatch(r"synthesis\.b(\d+)\.torgb\.(.+)", key):
        return f"layers.{module_key(f'b{m[1]}.conv1')}.torgb.{m[2]}"
    if m := re.fullmatch(r"synthesis\.b(\d+)\.skip\.(.+)", key):
        return f"layers.{module_key(f'b{m[1]}.conv0')}.skip.{m[2]}"
    return key


def from_record(record: PersistentRecord, truncation_psi: float = 1.0, truncation_layers: int | None = None,
                class_index: int | None = None, clamp_output: bool = True) -> NVlabsStyleGAN2Generator:
    """The generator of a stylegan2-ada-pytorch ``G_ema`` record.

    Options: ``truncation_psi`` / ``truncation_layers`` (upstream's ``truncation_psi`` /
    ``truncation_cutoff``: None = every row of w+), ``class_index`` (the class a conditional
    model draws; required for one, refused for an unconditional one), ``clamp_output``.
    """
    tensors = as_float32(dict(record.tensors()))
    if record.class_name != "Generator" or SIGNATURE not in tensors:
        raise ValueError(f"not an NVlabs StyleGAN2 generator: a {record.class_name} without {SIGNATURE!r}")
    mapping_record, synthesis = record.child("mapping"), record.child("synthesis")

    # ---- mapping
    z_dim = int(_attribute(mapping_record, "z_dim", "mapping"))
    c_dim = int(_attribute(mapping_record, "c_dim", "mapping"))
    w_dim = int(_attribute(mapping_record, "w_dim", "mapping"))
    num_ws = int(_attribute(mapping_record, "num_ws", "mapping"))
    if z_dim <= 0:
        raise ValueError("NVlabs StyleGAN2 generator with z_dim=0 (label-only): not supported")
    layers = sorted(int(m[1]) for k in tensors if (m := re.fullmatch(r"mapping\.fc(\d+)\.weight", k)))
    if not layers:
        raise ValueError("NVlabs StyleGAN2 generator without mapping.fc* layers")
    for i in layers:
        fc = mapping_record.child(f"fc{i}")
        if _attribute(fc, "activation", f"mapping.fc{i}") != "lrelu":
            raise ValueError(f"mapping.fc{i} uses activation {fc.attribute('activation')!r}; supported: 'lrelu'")
    lr_mul = float(_attribute(mapping_record.child("fc0"), "bias_gain", "mapping.fc0"))
    hidden = _shape(tensors, "mapping.fc0.weight")[0] if len(layers) > 1 else w_dim
    if "mapping.w_avg" not in tensors:
        raise ValueError("NVlabs StyleGAN2 generator without mapping.w_avg (trained with w_avg_beta=None): "
                         "upstream cannot truncate it either")
    mapping_args = dict(z_dim=z_dim, w_dim=w_dim, num_ws=num_ws, num_layers=len(layers), hidden=hidden,
                        lr_mul=lr_mul, weight_gain=1.0, activation_gain=math.sqrt(2),
                        truncation_psi=truncation_psi, truncation_layers=truncation_layers)
    if c_dim > 0:
        if class_index is None:
            raise ValueError(f"this NVlabs StyleGAN2 generator is conditional with {c_dim} classes: choose one "
                             f"with class_index=0..{c_dim - 1} (model.class_index=...)")
        if not 0 <= int(class_index) < c_dim:
            raise ValueError(f"class_index={class_index}: this generator has {c_dim} classes (0..{c_dim - 1})")
        embed = _shape(tensors, "mapping.embed.weight")[0]
        make_mapping = lambda: ConditionalMapping(c_dim, embed, int(class_index), **mapping_args)  # noqa: E731
    else:
        if class_index is not None:
            raise ValueError(f"class_index={class_index}: this NVlabs StyleGAN2 generator is unconditional")
        make_mapping = lambda: Mapping(**mapping_args)  # noqa: E731

    # ---- synthesis
    plan: list[tuple[_Conv, int, bool, dict]] = []  # conv, its w+ row, ends its block, block extras
    w_row = 0
    resolutions = [int(r) for r in _attribute(synthesis, "block_resolutions", "synthesis")]
    for res in resolutions:
        key = f"synthesis.b{res}"
        block = synthesis.child(f"b{res}")
        architecture = _attribute(block, "architecture", key)
        if architecture not in ARCHITECTURES:
            raise ValueError(f"{key} has architecture {architecture!r}; supported generator architectures: "
                             f"{list(ARCHITECTURES)}")
        first = int(_attribute(block, "in_channels", key)) == 0
        convs = ["conv1"] if first else ["conv0", "conv1"]
        torgb = None
        if int(_attribute(block, "num_torgb", key)):
            out_ch, in_ch, kernel, _ = _shape(tensors, f"{key}.torgb.weight")
            clamp = _attribute(block.child("torgb"), "conv_clamp", f"{key}.torgb")
            torgb = (in_ch, out_ch, kernel, None if clamp is None else float(clamp))
        skip = None
        if architecture == "resnet" and not first:
            layer = block.child("skip")
            if (_attribute(layer, "activation", f"{key}.skip") != "linear" or int(_attribute(layer, "up", f"{key}.skip")) != 2
                    or f"{key}.skip.bias" in tensors or _shape(tensors, f"{key}.skip.weight")[2:] != (1, 1)):
                raise ValueError(f"{key}.skip is not upstream's 1x1 upsampling conv without bias")
            skip = (*_shape(tensors, f"{key}.skip.weight")[1::-1], _shape(tensors, f"{key}.skip.resample_filter"))
        extras = {"torgb": torgb, "filter_shape": _shape(tensors, f"{key}.resample_filter"),
                  "const_shape": _shape(tensors, f"{key}.const") if first else None, "skip": skip}
        for which in convs:
            plan.append((_conv_plan(record, tensors, res, which), w_row, which == "conv1", extras))
            w_row += 1
    if w_row + 1 != num_ws:
        raise ValueError(f"NVlabs StyleGAN2 generator: {w_row} convs and a final to-RGB need {w_row + 1} rows "
                         f"of w+, the record says num_ws={num_ws}")

    def build() -> NVlabsStyleGAN2Generator:
        chain = []
        for conv, row, ends_block, extras in plan:
            module = SynthesisConv(conv.in_ch, conv.out_ch, conv.kernel, w_dim, conv.resolution, conv.up,
                                   conv.use_noise, conv.conv_clamp, conv.filter_shape)
            torgb = ToRGB(*extras["torgb"][:3], w_dim, extras["torgb"][3]) if ends_block and extras["torgb"] else None
            skip = SkipConv(*extras["skip"]) if extras["skip"] and not ends_block else None
            chain.append((conv.name, BlockLayer(module, row, ends_block, torgb,
                                                extras["const_shape"] if ends_block else None,
                                                extras["filter_shape"] if ends_block else None,
                                                skip=skip, residual=bool(extras["skip"]) and ends_block)))
        return NVlabsStyleGAN2Generator(make_mapping(), chain, resolution=resolutions[-1],
                                        clamp_output=clamp_output, c_dim=c_dim)

    return build_and_load(build, {_internal_key(k): v for k, v in tensors.items()}, f"{LAYOUT} generator")
