"""What StyleGAN and StyleGAN2 share: the state passed between layers, the mapping network
with truncation, and the generator wrapper.

Layered view of a style-based generator
---------------------------------------
``mapping`` -> ``layer0`` -> ``layer1`` -> ... -> ``output``. The names ``layer<k>`` are
genforce's synthesis layer indices (one per convolution; ``k`` also indexes the w+ row the
layer reads). Between layers flows a :class:`StyledState` ``(x, ws, image)``:

* ``mapping`` turns z into ``StyledState(None, ws)`` where ``ws`` is w+ (N x num_ws x
  w_dim): the mapping output repeated once per synthesis layer, truncated toward
  ``w_avg`` when truncation is enabled;
* each ``layer<k>`` maps a state to a state, replacing ``x`` by its feature map and passing
  ``ws`` on (StyleGAN2 also carries its running skip-connection ``image``);
* ``output`` returns the image tensor in [-1, 1].

For inversion "z" means w+: inverting a style-based model searches the output of
``mapping`` (``ws``), not the Gaussian z, because the mapping network is many-to-one and
its truncation makes z a poor search space. ``sample_z`` still draws Gaussian z, and
``run(state, start="mapping")`` renders a given w+.
"""
from __future__ import annotations

import math
import re
from typing import Mapping as MappingType, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layered import LayeredGenerator


class StyledState(NamedTuple):
    """The value between layers of a style-based generator."""

    x: torch.Tensor | None  # feature map (None right after the mapping)
    ws: torch.Tensor  # w+ : N x num_ws x w_dim
    image: torch.Tensor | None = None  # StyleGAN2's running skip image, None otherwise


def pixel_norm(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + eps)


class MappingDense(nn.Module):
    """Equalised-lr dense layer of the mapping network, followed by leaky ReLU.

    StyleGAN scales the weights by ``sqrt(2)/sqrt(in)``; StyleGAN2 scales by ``1/sqrt(in)`` and
    multiplies the activation by ``sqrt(2)`` instead: identical except for the bias, which is
    why both factors are parameters here.
    """

    def __init__(self, in_features: int, out_features: int, lr_mul: float, weight_gain: float,
                 activation_gain: float):
        super().__init__()
        # stored weights are N(0, 1) / lr_mul so that the effective weights are N(0, gain^2 / in)
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.weight_scale = weight_gain / math.sqrt(in_features) * lr_mul
        self.lr_mul = lr_mul
        self.activation_gain = activation_gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.linear(x, self.weight * self.weight_scale, self.bias * self.lr_mul)
        return F.leaky_relu(x, 0.2) * self.activation_gain


class Mapping(nn.Module):
    """z -> w by pixel norm and dense layers, then w -> w+ with optional truncation.

    Truncation moves the first ``truncation_layers`` rows of w+ (every row when it is None)
    toward ``w_avg``: ``w_avg + psi * (w - w_avg)``; ``psi = 1`` or ``truncation_layers = 0``
    disables it. ``label_features``: width of an embedded class label that a conditional
    subclass concatenates to the normalised z before the first dense layer.
    """

    def __init__(self, z_dim: int, w_dim: int, num_ws: int, num_layers: int = 8, hidden: int | None = None,
                 lr_mul: float = 0.01, weight_gain: float = math.sqrt(2), activation_gain: float = 1.0,
                 truncation_psi: float = 1.0, truncation_layers: int | None = 8, label_features: int = 0):
        super().__init__()
        hidden = hidden or w_dim
        dims = [z_dim + label_features] + [hidden] * (num_layers - 1) + [w_dim]
        for i in range(num_layers):
            self.add_module(f"dense{i}", MappingDense(dims[i], dims[i + 1], lr_mul, weight_gain, activation_gain))
        self.num_layers = num_layers
        self.z_dim = z_dim
        self.register_buffer("w_avg", torch.zeros(w_dim))
        self.num_ws = num_ws
        self.truncation_psi = float(truncation_psi)
        self.truncation_layers = None if truncation_layers is None else int(truncation_layers)

    def dense_stack(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.num_layers):
            x = getattr(self, f"dense{i}")(x)
        return x

    def map_z(self, z: torch.Tensor) -> torch.Tensor:
        return self.dense_stack(pixel_norm(z))

    def truncate(self, ws: torch.Tensor) -> torch.Tensor:
        rows = self.num_ws if self.truncation_layers is None else self.truncation_layers
        if self.truncation_psi == 1.0 or rows <= 0:
            return ws
        psi = torch.ones(self.num_ws, 1, dtype=ws.dtype, device=ws.device)
        psi[:rows] = self.truncation_psi
        return self.w_avg + (ws - self.w_avg) * psi

    def forward(self, z: torch.Tensor) -> StyledState:
        w = self.map_z(z)
        ws = w.unsqueeze(1).expand(-1, self.num_ws, -1).contiguous()
        return StyledState(None, self.truncate(ws))


class StyleOutput(nn.Module):
    """The ``output`` layer: a state's image clamped to [-1, 1] (or left raw)."""

    def __init__(self, to_image: nn.Module | None = None, clamp: bool = True):
        super().__init__()
        self.to_image = to_image
        self.clamp = clamp

    def forward(self, state: StyledState) -> torch.Tensor:
        image = self.to_image(state) if self.to_image is not None else state.image
        return image.clamp(-1, 1) if self.clamp else image


class StyleGenerator(LayeredGenerator):
    """A style-based generator as ``mapping, layer0 ... layerK, output``; see module docs."""

    layout = ""
    latent_name = "mapping"  # inversion searches w+, the mapping's output

    def __init__(self, mapping: Mapping, synthesis: Sequence[tuple[str, nn.Module]], output: StyleOutput,
                 resolution: int):
        layers = [("mapping", mapping), *synthesis, ("output", output)]
        super().__init__(layers, z_dim=mapping.z_dim, resolution=resolution)
        self.w_dim = int(mapping.w_avg.shape[0])
        self.num_ws = mapping.num_ws

    def latent_value(self, t: torch.Tensor) -> StyledState:
        """The state right after the mapping for a w+ tensor ``t`` (N x num_ws x w_dim)."""
        return StyledState(None, t)

    @property
    def mapping(self) -> Mapping:
        return self.layers["mapping"]

    def ws_from_w(self, w: torch.Tensor) -> StyledState:
        """The state after ``mapping`` for a given w (N x w_dim) or w+ (N x num_ws x w_dim),
        truncated as the mapping layer would."""
        ws = w.unsqueeze(1).expand(-1, self.num_ws, -1) if w.ndim == 2 else w
        return StyledState(None, self.mapping.truncate(ws))


def infer_style_sizes(state_dict: MappingType[str, torch.Tensor], const_key: str, layout: str) -> dict:
    """Constructor sizes (z_dim, w_dim, widths, mapping_layers) of a genforce StyleGAN/StyleGAN2
    state dict; ``const_key`` names the learned 4x4 input, whose channels are the first width."""
    dense = sorted(int(m[1]) for k in state_dict if (m := re.fullmatch(r"mapping\.dense(\d+)\.weight", k)))
    outputs = sorted(int(m[1]) for k in state_dict if (m := re.fullmatch(r"synthesis\.output(\d+)\.weight", k)))
    if not dense or not outputs or const_key not in state_dict:
        raise ValueError(f"not a {layout} state dict (needs mapping.dense*, {const_key}, synthesis.output*)")
    widths = [int(state_dict[const_key].shape[1])]
    widths += [int(state_dict[f"synthesis.layer{2 * b}.weight"].shape[0]) for b in range(1, outputs[-1] + 1)]
    return dict(z_dim=int(state_dict["mapping.dense0.weight"].shape[1]),
                w_dim=int(state_dict[f"mapping.dense{dense[-1]}.weight"].shape[0]),
                widths=widths, mapping_layers=len(dense))


def mapping_key(key: str) -> str | None:
    """The internal key of a genforce mapping-network entry (both StyleGANs), else None."""
    if key.startswith("mapping."):
        return "layers.mapping." + key.removeprefix("mapping.")
    if key == "truncation.w_avg":
        return "layers.mapping.w_avg"
    return None
