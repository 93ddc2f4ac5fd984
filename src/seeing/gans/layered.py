"""A generator seen as a named sequence of layers: z -> layer1 -> ... -> output.

Every downstream stage (layer-wise inverters, the image encoder, the per-layer
delta-optimisation, samplers, FSD on samples) talks to generators only through
:class:`LayeredGenerator`, so a new architecture needs nothing but a list of
named layer modules.

The value that flows between layers is a tensor. ``r_0`` is the latent (the
``z`` the generator was sampled from, or ``w``/``w+`` for style-based models:
see :mod:`seeing.gans.stylegan`), ``r_i`` is the output of ``layer_names[i-1]``
and the last layer's output is the image in [-1, 1].
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

LATENT = "z"


def module_key(name: str) -> str:
    """The key a layer named ``name`` has in module containers (``nn.ModuleDict`` and the like
    refuse dots, which upstream names such as NVlabs' ``b8.conv0`` or rosinality's ``convs.0``
    hold): the name with dots as underscores."""
    return name.replace(".", "_")


class LayeredGenerator(nn.Module):
    """Wraps ordered named layers; the first consumes the latent, the last emits the image.

    Args:
        layers: ordered ``name -> module``; names must be unique and not ``"z"``.
        z_dim: size of the latent vector ``sample_z`` draws.
        resolution: side of the square output image.
        latent_shape: shape of one latent as the first layer consumes it
            (defaults to ``(z_dim,)``).
    """

    def __init__(
        self,
        layers: Mapping[str, nn.Module] | Sequence[tuple[str, nn.Module]],
        z_dim: int,
        resolution: int,
        latent_shape: Sequence[int] | None = None,
    ):
        super().__init__()
        layers = OrderedDict(layers)
        if LATENT in layers:
            raise ValueError(f"'{LATENT}' names the latent and cannot name a layer")
        keys = [module_key(name) for name in layers]
        if len(set(keys)) != len(keys):
            raise ValueError(f"layer names {list(layers)} collide once dots become underscores")
        self.layers = nn.ModuleDict(zip(keys, layers.values()))
        self._layer_names = list(layers)
        self.z_dim = int(z_dim)
        self.resolution = int(resolution)
        self.latent_shape = tuple(latent_shape) if latent_shape is not None else (self.z_dim,)

    # ------------------------------------------------------------------ names
    @property
    def layer_names(self) -> list[str]:
        return list(self._layer_names)

    def index(self, name: str | None) -> int:
        """Position of the *output* of ``name`` in the chain: 0 for the latent ("z" or None)."""
        if name is None or name == LATENT:
            return 0
        try:
            return self.layer_names.index(name) + 1
        except ValueError:
            raise KeyError(f"unknown layer {name!r}; layers are {[LATENT] + self.layer_names}") from None

    def layer(self, name: str) -> nn.Module:
        self.index(name)  # a clear KeyError for unknown names
        return self.layers[module_key(name)]

    # ---------------------------------------------------------------- latents
    def sample_z(self, n: int, seed: int = 0, device: torch.device | str | None = None) -> torch.Tensor:
        """``n`` latents from N(0, I), identical for a given seed on any device and batch split.

        Latent ``k`` of seed ``s`` depends only on ``(s, k)``: draws are made on the CPU in
        a fixed-size stream, so ``sample_z(8, s)[:4] == sample_z(4, s)``.
        """
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        # Fixed-size blocks: torch's CPU randn fills the tail of a request differently when
        # its size is not a multiple of 16, so a prefix of a larger draw would not match.
        block = 64
        blocks = [torch.randn((block, *self.latent_shape), generator=gen, dtype=torch.float32)
                  for _ in range(-(-n // block))]
        z = torch.cat(blocks)[:n] if blocks else torch.empty((0, *self.latent_shape))
        return z.to(device) if device is not None else z

    # ------------------------------------------------------- the searched latent
    #: the value inversion searches and reconstruction optimises: the Gaussian "z" here;
    #: style-based generators search w+ after their "mapping" layer
    latent_name = LATENT

    def latent_of(self, z: torch.Tensor) -> torch.Tensor:
        """The searched latent (as a tensor) of Gaussian latents ``z``."""
        if self.latent_name == LATENT:
            return z
        from .values import feature_tensor

        return feature_tensor(self.features(z, [self.latent_name])[self.latent_name])

    def latent_value(self, t: torch.Tensor):
        """What the layer after :attr:`latent_name` consumes for the latent tensor ``t``."""
        return t

    def render_latent(self, t: torch.Tensor, stop: str | None = None):
        """The image (or layer ``stop``'s output) of the latent tensor ``t``."""
        return self.run(self.latent_value(t), start=self.latent_name, stop=stop)

    def latent_shape_searched(self) -> tuple[int, ...]:
        """Per-sample shape of the searched latent tensor: ``(z_dim,)``, or ``(num_ws, w_dim)`` for w+."""
        with torch.no_grad():
            device = next((p.device for p in self.parameters()), torch.device("cpu"))
            return tuple(self.latent_of(self.sample_z(1, device=device)).shape[1:])

    # ---------------------------------------------------------------- running
    def run(self, x: torch.Tensor, start: str | None = None, stop: str | None = None) -> torch.Tensor:
        """Feed ``x`` (the output of ``start``; the latent when ``start`` is None/"z") through the
        layers after ``start`` up to and including ``stop`` (the image when ``stop`` is None)."""
        begin, end = self.index(start), (self.index(stop) if stop is not None else len(self.layers))
        if end < begin:
            raise ValueError(f"layer {stop!r} comes before {start!r}")
        for name in self.layer_names[begin:end]:
            x = self.layers[module_key(name)](x)
        return x

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.run(z)

    def features(
        self, x: torch.Tensor, names: Iterable[str], start: str | None = None
    ) -> dict[str, torch.Tensor]:
        """Outputs of several layers in one pass (``"z"`` may be asked for too). Stops after the
        deepest requested layer, so asking for early layers is cheap."""
        wanted = list(names)
        if not wanted:
            return {}
        deepest = max(self.index(n) for n in wanted)
        out: dict[str, torch.Tensor] = {}
        if start in (None, LATENT) and LATENT in wanted:
            out[LATENT] = x
        begin = self.index(start)
        for name in self.layer_names[begin:deepest]:
            x = self.layers[module_key(name)](x)
            if name in wanted:
                out[name] = x
        return {n: out[n] for n in wanted if n in out}

    def sub_generator(self, start: str | None, stop: str | None = None) -> "LayerRange":
        """A module computing the layers after ``start`` through ``stop`` (shares weights)."""
        return LayerRange(self, start, stop)


class LayerRange(nn.Module):
    """The slice ``(start, stop]`` of a :class:`LayeredGenerator`, as a plain module."""

    def __init__(self, generator: LayeredGenerator, start: str | None, stop: str | None):
        super().__init__()
        generator.index(start), generator.index(stop)  # validate names early
        self.generator = generator
        self.start, self.stop = start, stop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.generator.run(x, self.start, self.stop)
