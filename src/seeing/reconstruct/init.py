"""Where a reconstruction starts: the latent z0 each target image is rendered from.

``init`` (the variant's choice):

* ``mean``: the generator's mean latent (the average of ``mean_samples`` draws; for
  style-based models the mean w), the same for every image;
* ``random``: a fixed random latent per image, drawn from the image's own id so it does not
  depend on the batch (``sample_z(id + 1, RANDOM_START_SEED + seed)[id]``: a seed stream of its
  own, so a generated target never starts at its own true latent);
* ``direct_encoder``: E_direct(x) (ablations b, c);
* ``hybrid``: the layer-wise hybrid encoder's latent E(x) (ablations d, e, f).
"""
from __future__ import annotations

from typing import Callable

import torch

from seeing.gans.layered import LATENT, LayeredGenerator

INITS = ("mean", "random", "direct_encoder", "hybrid")
# random starts draw from seeds far from the small seeds that sample generated targets
RANDOM_START_SEED = 1_000_003


def _latent_of(generator: LayeredGenerator, z: torch.Tensor, latent_name: str) -> torch.Tensor:
    if latent_name == LATENT:
        return z
    with torch.no_grad():
        return generator.latent_of(z)


@torch.no_grad()
def initial_latents(init: str, generator: LayeredGenerator, images: torch.Tensor, ids: torch.Tensor, *,
                    encoder: Callable[[torch.Tensor], torch.Tensor] | None = None, seed: int = 0,
                    latent_name: str = LATENT, mean_samples: int = 10000, batch_size: int = 64) -> torch.Tensor:
    """``(N, *latent)`` starting latents for ``images`` (see the module docstring)."""
    n = images.shape[0]
    if init == "mean":
        chunks = [_latent_of(generator, generator.sample_z(min(1000, mean_samples - i), RANDOM_START_SEED + seed + 1 + i),
                             latent_name)
                  for i in range(0, mean_samples, 1000)]
        mean = torch.cat(chunks).float().mean(0, keepdim=True)
        return mean.expand(n, *mean.shape[1:]).clone()
    if init == "random":
        ids = ids.long()
        if n and int(ids.min()) < 0:
            raise ValueError("target ids must be non-negative")
        z_all = generator.sample_z(int(ids.max()) + 1 if n else 0, RANDOM_START_SEED + seed)
        return _latent_of(generator, z_all[ids], latent_name).float().clone()
    if init in ("direct_encoder", "hybrid"):
        if encoder is None:
            raise ValueError(f"init={init} needs its encoder")
        device = next((p.device for p in encoder.parameters()), torch.device("cpu")) \
            if isinstance(encoder, torch.nn.Module) else torch.device("cpu")
        return torch.cat([encoder(images[i:i + batch_size].to(device)).float().cpu()
                          for i in range(0, n, batch_size)])
    raise ValueError(f"init must be one of {INITS}, got {init!r}")
