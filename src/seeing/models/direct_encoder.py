"""Ablations (b) and (c): a direct encoder from an image straight to the latent, trained end to end.

Unlike the layer-wise hybrid encoder, nothing is inverted layer by layer: a ResNet-18
trunk (the same :class:`~seeing.models.image_encoder.ImageEncoder` the hybrid uses for E_f,
with its head predicting the whole latent as a ``D x 1 x 1`` map) maps G(z) back to
the latent, trained with

    corr. error(E(G(z)), z) + image_weight * L1(G(E(G(z))), G(z))

so gradients flow through the whole generator ("end to end"). The latent is ``z``,
or w+ after ``mapping`` for style-based models (the same latent the hybrid recovers).

``python train.py model=scenes_progan stage=direct_encoder`` writes
``<run_root>/<model>/direct_encoder/direct_encoder.pt``; :func:`load_direct_encoder` reads it.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from seeing.gans.layered import LATENT, LayeredGenerator
from seeing.models.image_encoder import EncoderSpec, ImageEncoder, encoder_spec
from seeing.models.hybrid import encoder_from_record, module_record
from seeing.reporting import load_format_file

FORMAT = "seeing.models.direct_encoder/v1"
STAGE = "direct_encoder"


def latent_tensor_shape(generator: LayeredGenerator, latent_name: str) -> tuple[int, ...]:
    """Per-image shape of the latent tensor searched ("z", or e.g. w+ after ``mapping``)."""
    if latent_name == LATENT:
        return tuple(generator.latent_shape)
    return generator.latent_shape_searched()


class DirectEncoder(nn.Module):
    """Image in [-1, 1] ``(B, 3, S, S)`` -> latent ``(B, *latent_shape)``.

    A flat ``z`` latent comes out scaled to unit root-mean-square, like the draws of N(0, I)
    and like the hybrid encoder's first inverter returns it: the scale of z carries no
    information for generators that pixel-normalise it, but it sets how far an optimiser's
    step moves its direction, so variants c and e must start from latents of the same scale.
    """

    def __init__(self, image_size: int, latent_shape: Sequence[int], latent_name: str = LATENT,
                 trunk_stages: int | str = "auto", head_channels: int | None = None,
                 spec: EncoderSpec | None = None, normalize: bool | None = None):
        super().__init__()
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.latent_name = latent_name
        self.normalize = (latent_name == LATENT and len(self.latent_shape) == 1) if normalize is None else normalize
        size = math.prod(self.latent_shape)
        # a 1x1 "map" of the flattened latent: the trunk's features are pooled over the image
        self.encoder = ImageEncoder(spec or encoder_spec(image_size, (size, 1, 1), latent_name,
                                                         trunk_stages, head_channels))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        latent = self.encoder(images).reshape(images.shape[0], *self.latent_shape)
        if self.normalize:
            latent = latent * torch.rsqrt(latent.pow(2).mean(dim=1, keepdim=True) + 1e-8)
        return latent

    def to_file_dict(self, meta: Mapping[str, Any] | None = None, half: bool = False) -> dict[str, Any]:
        return {"format": FORMAT, "latent_name": self.latent_name, "latent_shape": list(self.latent_shape),
                "normalize": bool(self.normalize),
                "encoder": module_record(self.encoder, half), "meta": dict(meta or {})}


def load_direct_encoder(path: str | Path, generator: LayeredGenerator | None = None,
                        map_location: str | torch.device = "cpu") -> DirectEncoder:
    """A :class:`DirectEncoder` from its file, in eval mode (checked against ``generator`` if given)."""
    obj = load_format_file(path, FORMAT, "direct encoder",
                           f"Re-copy it, re-run `python train.py model=<model> stage={STAGE}` to write it again, "
                           "or point the option that names it at the right file.")
    for key in ("encoder", "latent_shape", "latent_name"):
        if key not in obj:
            raise ValueError(f"{path}: a direct encoder file needs {key!r}, which is missing. Re-run "
                             f"`python train.py model=<model> stage={STAGE}` to write it again")
    trunk = encoder_from_record(obj["encoder"], str(path))  # names a missing or mis-shaped tensor
    spec = trunk.spec
    model = DirectEncoder(spec.image_size, obj["latent_shape"], obj["latent_name"], spec=spec,
                          normalize=bool(obj.get("normalize", False)))
    model.encoder.load_state_dict(trunk.state_dict())
    if generator is not None:
        shape = latent_tensor_shape(generator, model.latent_name)
        if shape != model.latent_shape or spec.image_size != generator.resolution:
            raise ValueError(f"{path}: the direct encoder maps {spec.image_size}px images to latents "
                             f"{model.latent_shape}, but this generator makes {generator.resolution}px images "
                             f"from {shape}: it was trained for another model")
    model.meta = dict(obj.get("meta") or {})
    return model.to(map_location).eval()
