"""StyleGAN3 (Karras et al. 2021, "Alias-Free Generative Adversarial Networks"; configs T and R)
read from NVlabs/stylegan3 snapshots.

Layers: ``mapping`` (z, and the class of a conditional network, -> w+), ``input`` (Fourier
features of w+ row 0), ``L0`` ... ``L{N}`` (the synthesis layers; ``L{k}`` reads w+ row
``k + 1``; upstream names them ``L{k}_{size}_{channels}``, kept in
:attr:`StyleGAN3Generator.upstream_names`) and ``output`` (the last layer's image times the
network's ``output_scale``). Between them flows a
:class:`~seeing.gans.stylegan_common.StyledState` ``(x, ws)``; there is no noise, so the image
is a function of w+ alone and ``render_latent(ws)`` is upstream's ``G.synthesis(ws)``.

Each synthesis layer: a style ``A(w)``; a modulated conv (the weights normalised, the style
normalised, modulated, demodulated, times the input gain ``magnitude_ema ** -0.5``; ToRGB
scales the style by ``1/sqrt(in * k * k)`` and does not demodulate); then the filtered leaky
ReLU (:mod:`seeing.gans.filtered_lrelu`) with the layer's stored up/down filters, factors,
padding and ``conv_clamp``. Every constant (sizes, sampling rate, bandwidth, factors, padding,
kernel size, clamp, gains) is an attribute of the pickled record and every filter, frequency,
phase, transform and magnitude average a stored tensor: nothing is designed again here, so the
same code runs config T (3x3 convs, separable filters) and config R (1x1 convs, radial 2-d
downsampling filters).

Computation is float32: snapshots trained with ``num_fp16_res`` run their last layers in half
precision on CUDA; their clamp (``conv_clamp``, applied to every layer, as upstream does) is
kept. One deliberate difference: the style pre-normalisation of the modulated conv divides each
sample's style by its own RMS (upstream divides by the RMS over the whole batch). Demodulation
cancels that factor up to its 1e-8 epsilon, so images agree, and a sample's image no longer
depends on the other samples of its batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .filtered_lrelu import filtered_lrelu
from .materialize import as_float32, build_and_load
from .nvlabs_pickle import PersistentRecord
from .stylegan_common import Mapping, StyledState, StyleGenerator, StyleOutput, pixel_norm

LAYOUT = "nvlabs_stylegan3"
SIGNATURE = "synthesis.input.freqs"  # the key only StyleGAN3 generators have
OPTIONS = ("truncation_psi", "truncation_cutoff", "class_index", "clamp_output")


# ------------------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class AffineSpec:
    """An NVlabs fully connected layer: ``x @ (weight * weight_gain).T + bias * bias_gain``."""

    in_features: int
    out_features: int
    weight_gain: float
    bias_gain: float


@dataclass(frozen=True)
class InputSpec:
    channels: int
    size: tuple[int, int]  # (width, height), margin included
    sampling_rate: float
    bandwidth: float
    affine: AffineSpec


@dataclass(frozen=True)
class LayerSpec:
    upstream_name: str
    in_channels: int
    out_channels: int
    in_size: tuple[int, int]  # (width, height)
    out_size: tuple[int, int]
    conv_kernel: int
    is_torgb: bool
    up: int
    down: int
    padding: tuple[int, int, int, int]  # (left, right, top, bottom) on the upsampled image
    conv_clamp: float | None
    up_filter: tuple[int, ...] | None  # shape of the stored filter; None: identity
    down_filter: tuple[int, ...] | None
    affine: AffineSpec


@dataclass(frozen=True)
class GeneratorSpec:
    z_dim: int
    c_dim: int
    w_dim: int
    num_ws: int
    resolution: int
    mapping: tuple[AffineSpec, ...]  # fc0, fc1, ...
    embed: AffineSpec | None
    input: InputSpec
    layers: tuple[LayerSpec, ...]
    output_scale: float


def _attribute(record: PersistentRecord, name: str, where: str) -> Any:
    value = record.attribute(name, None)
    if value is None and name not in record.state:
        raise ValueError(f"not a StyleGAN3 generator: {where} ({record.class_name}) has no attribute {name!r}")
    return value


def _child(record: PersistentRecord, name: str, where: str) -> PersistentRecord:
    child = record.children.get(name)
    if not isinstance(child, PersistentRecord):
        raise ValueError(f"not a StyleGAN3 generator: {where} has no module {name!r}")
    return child


def _pair(value: Any) -> tuple[int, int]:
    width, height = np.broadcast_to(np.asarray(value), [2])
    return int(width), int(height)


def _affine_spec(record: PersistentRecord, where: str) -> AffineSpec:
    if _attribute(record, "activation", where) not in ("linear", "lrelu"):
        raise ValueError(f"{where}: unsupported activation {record.attribute('activation')!r}")
    bias_gain = _attribute(record, "bias_gain", where)
    return AffineSpec(int(_attribute(record, "in_features", where)), int(_attribute(record, "out_features", where)),
                      float(_attribute(record, "weight_gain", where)), float(bias_gain))


def _filter_shape(record: PersistentRecord, name: str) -> tuple[int, ...] | None:
    value = (record.state.get("_buffers") or {}).get(name)
    return tuple(value.shape) if value is not None else None


def _layer_spec(record: PersistentRecord, name: str) -> LayerSpec:
    where = f"synthesis.{name}"
    clamp = _attribute(record, "conv_clamp", where)
    return LayerSpec(
        upstream_name=name,
        in_channels=int(_attribute(record, "in_channels", where)),
        out_channels=int(_attribute(record, "out_channels", where)),
        in_size=_pair(_attribute(record, "in_size", where)),
        out_size=_pair(_attribute(record, "out_size", where)),
        conv_kernel=int(_attribute(record, "conv_kernel", where)),
        is_torgb=bool(_attribute(record, "is_torgb", where)),
        up=int(_attribute(record, "up_factor", where)),
        down=int(_attribute(record, "down_factor", where)),
        padding=tuple(int(p) for p in _attribute(record, "padding", where)),
        conv_clamp=float(clamp) if clamp is not None else None,
        up_filter=_filter_shape(record, "up_filter"),
        down_filter=_filter_shape(record, "down_filter"),
        affine=_affine_spec(_child(record, "affine", where), f"{where}.affine"),
    )


def read_spec(record: PersistentRecord) -> GeneratorSpec:
    """Every constant of a pickled StyleGAN3 ``Generator`` record (nothing re-derived)."""
    if SIGNATURE not in record.state_dict():
        raise ValueError(f"not a StyleGAN3 generator: the network has no {SIGNATURE} (a {record.class_name} "
                         "of another architecture)")
    mapping, synthesis = _child(record, "mapping", "G"), _child(record, "synthesis", "G")
    num_layers = int(_attribute(mapping, "num_layers", "mapping"))
    embed = mapping.children.get("embed")
    source_input = _child(synthesis, "input", "synthesis")
    names = list(_attribute(synthesis, "layer_names", "synthesis"))
    return GeneratorSpec(
        z_dim=int(_attribute(record, "z_dim", "G")),
        c_dim=int(_attribute(record, "c_dim", "G")),
        w_dim=int(_attribute(record, "w_dim", "G")),
        num_ws=int(_attribute(synthesis, "num_ws", "synthesis")),
        resolution=int(_attribute(synthesis, "img_resolution", "synthesis")),
        mapping=tuple(_affine_spec(_child(mapping, f"fc{i}", "mapping"), f"mapping.fc{i}") for i in range(num_layers)),
        embed=_affine_spec(embed, "mapping.embed") if isinstance(embed, PersistentRecord) else None,
        input=InputSpec(
            channels=int(_attribute(source_input, "channels", "synthesis.input")),
            size=_pair(_attribute(source_input, "size", "synthesis.input")),
            sampling_rate=float(_attribute(source_input, "sampling_rate", "synthesis.input")),
            bandwidth=float(_attribute(source_input, "bandwidth", "synthesis.input")),
            affine=_affine_spec(_child(source_input, "affine", "synthesis.input"), "synthesis.input.affine")),
        layers=tuple(_layer_spec(_child(synthesis, name, "synthesis"), name) for name in names),
        output_scale=float(_attribute(synthesis, "output_scale", "synthesis")),
    )


def short_name(upstream_name: str) -> str:
    """``L3_36_512`` -> ``L3``: the same name in every StyleGAN3, whatever its sizes."""
    return upstream_name.split("_", 1)[0]


# ----------------------------------------------------------------------------------- modules
class Affine(nn.Module):
    """NVlabs' linear fully connected layer, with the gains stored in the snapshot."""

    def __init__(self, spec: AffineSpec):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(spec.out_features, spec.in_features))
        self.bias = nn.Parameter(torch.empty(spec.out_features))
        self.weight_gain, self.bias_gain = spec.weight_gain, spec.bias_gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.weight_gain, self.bias * self.bias_gain)


class StyleGAN3Mapping(Mapping):
    """z (and, for a conditional network, the embedded one-hot class ``class_index``) -> w -> w+.

    Truncation (upstream's): rows ``[0, truncation_cutoff)`` of w+ (every row when the cutoff
    is None) move toward the stored ``w_avg`` by ``truncation_psi``.
    """

    def __init__(self, spec: GeneratorSpec, truncation_psi: float = 1.0, truncation_cutoff: int | None = None,
                 class_index: int | None = None):
        first = spec.mapping[0]
        super().__init__(first.in_features, spec.w_dim, spec.num_ws, len(spec.mapping),
                         activation_gain=math.sqrt(2), truncation_psi=truncation_psi,
                         truncation_layers=spec.num_ws if truncation_cutoff is None else int(truncation_cutoff))
        for i, fc in enumerate(spec.mapping):  # the stored gains, in place of Mapping's own
            dense = getattr(self, f"dense{i}")
            dense.weight_scale, dense.lr_mul = fc.weight_gain, fc.bias_gain
        self.embed = Affine(spec.embed) if spec.embed is not None else None
        self.c_dim = spec.c_dim
        self.class_index = class_index

    def map_z(self, z: torch.Tensor) -> torch.Tensor:
        x = pixel_norm(z)
        if self.embed is not None:
            label = torch.full((z.shape[0],), int(self.class_index), device=z.device)
            y = pixel_norm(self.embed(F.one_hot(label, self.c_dim).to(z.dtype)))
            x = torch.cat([x, y], dim=1)
        for i in range(self.num_layers):
            x = getattr(self, f"dense{i}")(x)
        return x


class FourierInput(nn.Module):
    """``input``: Fourier features at the stored frequencies and phases, rotated and translated
    by ``A(w)`` (w+ row 0) after the stored user transform, then mixed by a learned matrix."""

    def __init__(self, spec: InputSpec):
        super().__init__()
        c = spec.channels
        self.spec = spec
        self.weight = nn.Parameter(torch.empty(c, c))
        self.affine = Affine(spec.affine)
        self.register_buffer("transform", torch.empty(3, 3))
        self.register_buffer("freqs", torch.empty(c, 2))
        self.register_buffer("phases", torch.empty(c))

    def features(self, w: torch.Tensor) -> torch.Tensor:
        spec, n = self.spec, w.shape[0]
        t = self.affine(w)  # (cos, sin, tx, ty) of the inverse rotation and translation
        t = t / t[:, :2].norm(dim=1, keepdim=True)
        zero, one = torch.zeros_like(t[:, 0]), torch.ones_like(t[:, 0])
        rotate = torch.stack([t[:, 0], -t[:, 1], zero, t[:, 1], t[:, 0], zero, zero, zero, one], 1).view(n, 3, 3)
        translate = torch.stack([one, zero, -t[:, 2], zero, one, -t[:, 3], zero, zero, one], 1).view(n, 3, 3)
        transforms = rotate @ translate @ self.transform
        phases = self.phases + (self.freqs @ transforms[:, :2, 2:]).squeeze(2)  # N x C
        freqs = self.freqs @ transforms[:, :2, :2]  # N x C x 2
        # frequencies the transform pushed beyond the band fade out
        amplitudes = (1 - (freqs.norm(dim=2) - spec.bandwidth) / (spec.sampling_rate / 2 - spec.bandwidth)).clamp(0, 1)
        width, height = spec.size
        theta = torch.zeros(1, 2, 3, device=w.device, dtype=w.dtype)
        theta[0, 0, 0] = 0.5 * width / spec.sampling_rate
        theta[0, 1, 1] = 0.5 * height / spec.sampling_rate
        grid = F.affine_grid(theta, [1, 1, height, width], align_corners=False)[0]  # H x W x 2
        x = torch.einsum("hwk,nck->nhwc", grid, freqs) + phases[:, None, None, :]
        x = torch.sin(x * (2 * math.pi)) * amplitudes[:, None, None, :]
        x = x @ (self.weight / math.sqrt(spec.channels)).t()
        return x.permute(0, 3, 1, 2)

    def forward(self, state: StyledState) -> StyledState:
        return StyledState(self.features(state.ws[:, 0]), state.ws)


class AliasFreeLayer(nn.Module):
    """One synthesis layer (``L{k}``, reading w+ row ``row``); see the module docs."""

    def __init__(self, spec: LayerSpec, row: int):
        super().__init__()
        self.spec, self.row = spec, row
        k = spec.conv_kernel
        self.affine = Affine(spec.affine)
        self.weight = nn.Parameter(torch.empty(spec.out_channels, spec.in_channels, k, k))
        self.bias = nn.Parameter(torch.empty(spec.out_channels))
        self.register_buffer("magnitude_ema", torch.empty(()))
        self.register_buffer("up_filter", torch.empty(spec.up_filter) if spec.up_filter else None)
        self.register_buffer("down_filter", torch.empty(spec.down_filter) if spec.down_filter else None)

    def modulated_conv(self, x: torch.Tensor, styles: torch.Tensor) -> torch.Tensor:
        """The modulated conv, computed as conv(x * style * gain) times the demodulation factor
        (equal to upstream's per-sample modulated weights)."""
        weight, spec = self.weight, self.spec
        if spec.is_torgb:
            styles = styles / math.sqrt(spec.in_channels * spec.conv_kernel ** 2)
        else:  # pre-normalise (for fp16's range upstream; cancelled by demodulation)
            weight = weight * weight.square().mean(dim=[1, 2, 3], keepdim=True).rsqrt()
            styles = styles * styles.square().mean(dim=1, keepdim=True).rsqrt()
        input_gain = self.magnitude_ema.rsqrt()
        x = F.conv2d(x * (styles * input_gain)[:, :, None, None], weight, padding=spec.conv_kernel - 1)
        if not spec.is_torgb:
            energy = styles.square() @ weight.square().sum(dim=[2, 3]).t()  # N x out
            x = x * (energy + 1e-8).rsqrt()[:, :, None, None]
        return x

    def forward(self, state: StyledState) -> StyledState:
        spec, x = self.spec, state.x
        expected = (spec.in_channels, spec.in_size[1], spec.in_size[0])
        if x is None or tuple(x.shape[1:]) != expected:
            raise ValueError(f"StyleGAN3 layer {spec.upstream_name} takes (N, {', '.join(map(str, expected))}) "
                             f"features, got {None if x is None else tuple(x.shape)}")
        x = self.modulated_conv(x, self.affine(state.ws[:, self.row]))
        gain, slope = (1.0, 1.0) if spec.is_torgb else (math.sqrt(2), 0.2)
        x = filtered_lrelu(x, self.up_filter, self.down_filter, self.bias, spec.up, spec.down, spec.padding,
                           gain=gain, slope=slope, clamp=spec.conv_clamp)
        return StyledState(x, state.ws)


class ScaledImage(nn.Module):
    """The image of the last layer's state, times the network's ``output_scale``."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = float(scale)

    def forward(self, state: StyledState) -> torch.Tensor:
        return state.x * self.scale if self.scale != 1 else state.x


class StyleGAN3Generator(StyleGenerator):
    """A StyleGAN3 as ``mapping, input, L0 ... L{N}, output``; built by :func:`from_record`.

    Args:
        spec: the network's constants (:func:`read_spec`).
        truncation_psi, truncation_cutoff: upstream's truncation, applied by ``mapping``.
        class_index: the class a conditional network draws (required when it has classes).
        clamp_output: clamp the image to [-1, 1] (off: upstream's raw output).
    """

    layout = LAYOUT

    def __init__(self, spec: GeneratorSpec, truncation_psi: float = 1.0, truncation_cutoff: int | None = None,
                 class_index: int | None = None, clamp_output: bool = False):
        mapping = StyleGAN3Mapping(spec, truncation_psi, truncation_cutoff, class_index)
        synthesis: list[tuple[str, nn.Module]] = [("input", FourierInput(spec.input))]
        synthesis += [(short_name(layer.upstream_name), AliasFreeLayer(layer, row))
                      for row, layer in enumerate(spec.layers, start=1)]
        super().__init__(mapping, synthesis, StyleOutput(ScaledImage(spec.output_scale), clamp=clamp_output),
                         resolution=spec.resolution)
        # the mapping's first layer also reads the class embedding: z alone is what is sampled
        self.z_dim, self.latent_shape = spec.z_dim, (spec.z_dim,)
        self.c_dim, self.class_index = spec.c_dim, class_index
        self.spec = spec
        #: this project's layer name -> upstream's module name
        self.upstream_names = {"mapping": "mapping", "input": "synthesis.input",
                               **{short_name(l.upstream_name): f"synthesis.{l.upstream_name}" for l in spec.layers}}


# ----------------------------------------------------------------------------------- loading
def to_internal(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """NVlabs keys -> :class:`StyleGAN3Generator` keys (``mapping.fc0.weight`` ->
    ``layers.mapping.dense0.weight``, ``synthesis.L3_36_512.bias`` -> ``layers.L3.bias``)."""
    out = {}
    for key, value in state_dict.items():
        module, _, rest = key.partition(".")
        if module == "mapping":
            head, _, tail = rest.partition(".")
            rest = f"dense{head[2:]}.{tail}" if head.startswith("fc") and head[2:].isdigit() else rest
            out[f"layers.mapping.{rest}"] = value
        elif module == "synthesis":
            name, _, tail = rest.partition(".")
            out[f"layers.{short_name(name)}.{tail}"] = value
        else:
            out[key] = value  # reported as unexpected
    return out


def check_class_index(spec: GeneratorSpec, class_index: int | None) -> None:
    if spec.c_dim == 0:
        if class_index is not None:
            raise ValueError(f"this StyleGAN3 is unconditional (c_dim 0); class_index={class_index} cannot be "
                             "honoured: drop it (model.class_index=null)")
        return
    if class_index is None:
        raise ValueError(f"this StyleGAN3 is conditional with {spec.c_dim} classes: choose one with "
                         f"class_index=K (model.class_index=K), 0 <= K < {spec.c_dim}")
    if isinstance(class_index, bool) or not isinstance(class_index, (int, np.integer)) \
            or not 0 <= int(class_index) < spec.c_dim:
        raise ValueError(f"class_index={class_index!r} is not one of this StyleGAN3's {spec.c_dim} classes "
                         f"(0 <= K < {spec.c_dim})")


def from_record(record: PersistentRecord, truncation_psi: float = 1.0, truncation_cutoff: int | None = None,
                class_index: int | None = None, clamp_output: bool = False) -> StyleGAN3Generator:
    """The :class:`StyleGAN3Generator` of a pickled ``G_ema`` record
    (:func:`seeing.gans.nvlabs_pickle.read_snapshot_generator`), every stored tensor loaded."""
    spec = read_spec(record)
    check_class_index(spec, class_index)
    if truncation_cutoff is not None and (isinstance(truncation_cutoff, bool) or int(truncation_cutoff) < 0):
        raise ValueError(f"truncation_cutoff={truncation_cutoff!r}: give a number of w+ rows >= 0, or None (all)")
    return build_and_load(
        lambda: StyleGAN3Generator(spec, truncation_psi, truncation_cutoff,
                                   None if class_index is None else int(class_index), clamp_output),
        as_float32(to_internal(record.state_dict())), f"{LAYOUT} generator")
