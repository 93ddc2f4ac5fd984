"""Layer inverters e_N: from layer N's output r_N back to layer N-1's output r_{N-1}.

The architecture follows the paper: pixel norm, two 3x3 conv + BatchNorm + leaky
ReLU blocks, then one 1x1 conv back to the previous layer's channels, strided where
the generator layer upsampled. The inverter of the first layer ends instead with a
conv covering the whole map (4x4 -> 1x1; larger maps are averaged to 4x4 first) and
returns the latent: a pixel-normalised z (a Gaussian z in D dimensions has norm close
to sqrt(D), so only its direction is unknown), or, for a style-based model, the w+ rows (not normalised: w lives in the
mapping network's output space).

Two architectures share this module (``InverterSpec.architecture``):

- ``"seeing"`` (this project's, the default): bias-free 3x3 convs (BatchNorm follows),
  the final 1x1 conv named ``to_previous`` / ``to_latent``;
- ``"ganseeing"``: the modules of the paper's released code, so that its published
  encoders load (see :mod:`seeing.models.ganseeing_layout`): every conv has a bias,
  the layers are named as there (``pnorm``, ``conv1``, ``bn1``, ``relu1``, ``conv2``,
  ``bn2``, ``relu2``, ``conv3``), conv weights start Kaiming-normal and biases at zero.
  The latent inverter is pixel norm, a conv covering the map, BN, leaky ReLU, a 1x1
  conv (``conv2``) and the output pixel norm.

Either may drop the final 1x1 conv (``final_conv=False``, the released encoder's
inverter of ``layer2``): the output is then the second block's activations, so the
hidden width must equal the previous layer's channels and the resolution must not change.

Shapes are not configured by hand: :func:`probe_shapes` runs one latent through the
generator and reads every activation's shape, so the same builder serves every
layout of the zoo.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

from seeing.gans.layered import LATENT, LayeredGenerator

from seeing.gans.values import feature_tensor


class PixelNorm(nn.Module):
    """Scale every location's channel vector to unit root-mean-square."""

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + self.eps)


ARCHITECTURES = ("seeing", "ganseeing")
# the largest map the latent inverter's last conv spans (ProGAN's and StyleGAN2's first layer)
LATENT_MAP = 4


def conv_bn_lrelu(cin: int, cout: int, kernel: int | tuple[int, int] = 3, padding: int = 1,
                  bias: bool = False) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, padding=padding, bias=bias), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2)]


def check_architecture(architecture: str) -> str:
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown inversion architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}")
    return architecture


@dataclass(frozen=True)
class InverterSpec:
    """Everything needed to rebuild an inverter (stored next to its weights)."""

    layer: str  # the generator layer whose output is inverted (r_N)
    target: str  # the layer before it, or "z" (r_{N-1})
    in_shape: tuple[int, ...]  # r_N without batch: (C, H, W)
    out_shape: tuple[int, ...]  # r_{N-1} without batch: (C, H, W), (D,) for z, (L, D) for w+
    hidden_channels: int
    normalize_output: bool = False  # pixel-normalise a predicted Gaussian z
    architecture: str = "seeing"  # "seeing" or "ganseeing" (the paper's released modules)
    final_conv: bool = True  # end with the 1x1 conv to the previous layer's channels

    def __post_init__(self):
        check_architecture(self.architecture)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "InverterSpec":
        # files written before the architecture options hold neither: they are "seeing" files
        return cls(
            layer=d["layer"], target=d["target"], in_shape=tuple(d["in_shape"]),
            out_shape=tuple(d["out_shape"]), hidden_channels=int(d["hidden_channels"]),
            normalize_output=bool(d.get("normalize_output", False)),
            architecture=str(d.get("architecture", "seeing")), final_conv=bool(d.get("final_conv", True)),
        )


class LayerInverter(nn.Module):
    """e_N as in the paper; maps a batch shaped ``(B, *spec.in_shape)`` to ``(B, *spec.out_shape)``."""

    def __init__(self, spec: InverterSpec):
        super().__init__()
        self.spec = spec
        if len(spec.in_shape) != 3:
            raise ValueError(f"inverter of {spec.layer}: expected a (C, H, W) feature map, got {spec.in_shape}")
        self.latent_output = len(spec.out_shape) != 3
        if self.latent_output and not spec.final_conv:
            raise ValueError(f"inverter of {spec.layer}: a latent output needs the final conv")
        if not self.latent_output:
            _check_map_output(spec)
        if spec.architecture == "ganseeing":
            body = _ganseeing_layers(spec)
        else:
            body = _seeing_layers(spec)
        self.net = nn.Sequential(OrderedDict(body))
        self.out_norm = PixelNorm() if spec.normalize_output else nn.Identity()
        if spec.architecture == "ganseeing":
            _kaiming_init(self.net)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        y = self.out_norm(self.net(r))
        if self.latent_output:
            y = y.reshape(y.shape[0], *self.spec.out_shape)
        return y


def _check_map_output(spec: InverterSpec) -> None:
    _, hin, win = spec.in_shape
    cout, hout, wout = spec.out_shape
    if hin % hout or win % wout or hin // hout != win // wout:
        raise ValueError(
            f"inverter of {spec.layer}: cannot map a {hin}x{win} map to {hout}x{wout} "
            "with a strided 1x1 conv (sizes must divide evenly)"
        )
    if not spec.final_conv and (spec.hidden_channels != cout or (hin, win) != (hout, wout)):
        raise ValueError(
            f"inverter of {spec.layer}: without the final conv the output is the hidden map "
            f"({spec.hidden_channels}x{hin}x{win}), which must already be {spec.out_shape}"
        )


def _seeing_layers(spec: InverterSpec) -> list[tuple[str, nn.Module]]:
    """This project's inverter: bias-free convs, the final conv named for what it predicts."""
    cin, hin, win = spec.in_shape
    hidden = spec.hidden_channels
    body: list[tuple[str, nn.Module]] = [("pixnorm", PixelNorm())]
    body += list(zip(("conv1", "bn1", "relu1"), conv_bn_lrelu(cin, hidden)))
    body += list(zip(("conv2", "bn2", "relu2"), conv_bn_lrelu(hidden, hidden)))
    if len(spec.out_shape) != 3:
        # the map collapses to the latent: one conv spanning the whole map. Maps larger than
        # 4 x 4 (StyleGAN3's 36 x 36 input) are averaged down to 4 x 4 first: a conv spanning
        # 36 x 36 x 512 into w+ (16 x 512) would hold 5.4G weights
        pooled = (min(hin, LATENT_MAP), min(win, LATENT_MAP))
        if pooled != (hin, win):
            body.append(("pool", nn.AdaptiveAvgPool2d(pooled)))
        body.append(("to_latent", nn.Conv2d(hidden, math.prod(spec.out_shape), pooled)))
    elif spec.final_conv:
        body.append(("to_previous", nn.Conv2d(hidden, spec.out_shape[0], 1, stride=hin // spec.out_shape[1])))
    return body


def _ganseeing_layers(spec: InverterSpec) -> list[tuple[str, nn.Module]]:
    """The released code's inverters, with its layer names (the state-dict keys of its files)."""
    cin, hin, win = spec.in_shape
    hidden = spec.hidden_channels
    body: list[tuple[str, nn.Module]] = [("pnorm", PixelNorm())]
    if len(spec.out_shape) != 3:
        # conv over the whole map (4x4 -> 1x1), then a 1x1 conv to the latent's size
        body += list(zip(("conv1", "bn1", "relu1"), conv_bn_lrelu(cin, hidden, (hin, win), 0, bias=True)))
        body.append(("conv2", nn.Conv2d(hidden, math.prod(spec.out_shape), 1)))
        return body
    body += list(zip(("conv1", "bn1", "relu1"), conv_bn_lrelu(cin, hidden, bias=True)))
    body += list(zip(("conv2", "bn2", "relu2"), conv_bn_lrelu(hidden, hidden, bias=True)))
    if spec.final_conv:
        body.append(("conv3", nn.Conv2d(hidden, spec.out_shape[0], 1, stride=hin // spec.out_shape[1])))
    return body


@torch.no_grad()
def _kaiming_init(net: nn.Module) -> None:
    """The released code's start: conv weights Kaiming-normal (fan in), conv biases zero."""
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight)
            if module.bias is not None:
                module.bias.zero_()


def previous_layer(generator: LayeredGenerator, name: str) -> str:
    """The name of the value that feeds ``name`` ("z" for the first layer)."""
    i = generator.index(name)
    if i == 0:
        raise ValueError("the latent has no inverter: name a generator layer")
    return generator.layer_names[i - 2] if i >= 2 else LATENT


@torch.no_grad()
def probe_shapes(generator: LayeredGenerator, names: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """Shape (without batch) of each named value, read off one generated sample."""
    names = list(names)
    device = next((p.device for p in generator.parameters()), torch.device("cpu"))
    was_training = generator.training
    generator.eval()
    try:
        z = generator.sample_z(2, seed=0, device=device)
        feats = generator.features(z, names)
    finally:
        generator.train(was_training)
    return {n: tuple(feature_tensor(feats[n]).shape[1:]) for n in names}


def inverter_spec(generator: LayeredGenerator, layer: str, hidden_channels: int | None = None,
                  architecture: str = "seeing") -> InverterSpec:
    check_architecture(architecture)
    target = previous_layer(generator, layer)
    shapes = probe_shapes(generator, [target, layer])
    in_shape, out_shape = shapes[layer], shapes[target]
    if hidden_channels:
        hidden = hidden_channels
    elif architecture == "ganseeing":  # the released code's width: the predicted map's channels
        hidden = out_shape[0] if len(out_shape) == 3 else in_shape[0]
    else:
        hidden = max(in_shape[0], out_shape[0])
    # the released code has no final 1x1 conv in the inverter that predicts the first layer's
    # output (its inv2); it can only be dropped where the hidden map already has that shape
    final_conv = not (architecture == "ganseeing" and len(out_shape) == 3
                      and generator.index(target) == 1 and (hidden, *in_shape[1:]) == tuple(out_shape))
    return InverterSpec(layer=layer, target=target, in_shape=in_shape, out_shape=out_shape,
                        hidden_channels=int(hidden), normalize_output=target == LATENT,
                        architecture=architecture, final_conv=final_conv)


def build_layer_inverter(
    generator: LayeredGenerator, layer: str, hidden_channels: int | None = None, architecture: str = "seeing"
) -> LayerInverter:
    """e_N for ``layer`` with channel counts and resolutions read from ``generator``."""
    return LayerInverter(inverter_spec(generator, layer, hidden_channels, architecture))


def check_chain(generator: LayeredGenerator, layers: Sequence[str]) -> str:
    """The inversion layers must be consecutive generator layers; returns the latent they end at.

    That latent is "z" when the chain starts at the first layer, or the layer before the
    chain (``mapping`` for style-based models, whose inversion searches w+).
    """
    layers = list(layers)
    if not layers:
        raise ValueError("inversion_layers is empty")
    for name in layers:
        generator.index(name)  # a clear KeyError for unknown names
    begin = generator.index(layers[0])
    expected = generator.layer_names[begin - 1: begin - 1 + len(layers)]
    if layers != expected:
        raise ValueError(f"inversion_layers must be consecutive generator layers: got {layers}, "
                         f"the generator has {expected} from {layers[0]} on")
    return previous_layer(generator, layers[0])
