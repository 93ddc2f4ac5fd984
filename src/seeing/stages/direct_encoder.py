"""``stage=direct_encoder`` (ablations b, c): a direct encoder x -> latent trained end to end on
generated images: correlation error of the latent + ``image_weight`` x L1(G(E(G(z))), G(z)). The
network and its file are :mod:`seeing.models.direct_encoder`."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from seeing.gans.layered import LATENT, LayeredGenerator
from seeing.gans.values import feature_tensor
from seeing.metrics.correlation import correlation_error
from seeing.models.direct_encoder import STAGE, DirectEncoder, latent_tensor_shape
from seeing.models.hybrid import generate_from_latent
from seeing.reporting import torch_save_atomic
from seeing.stages.inversion import InversionStage
from seeing.validation import check_numbers


class DirectEncoderStage(InversionStage):
    """``stage=direct_encoder``: trains :class:`DirectEncoder` on generated images (see module doc)."""

    def __init__(self, generator: LayeredGenerator, inversion_layers: Sequence[str], name: str = STAGE,
                 trunk_stages: int | str = "auto", head_channels: int | None = None, image_weight: float = 1.0,
                 **kwargs):
        super().__init__(generator, inversion_layers, name, **kwargs)
        check_numbers({"image_weight": image_weight}, "stage")
        self.image_weight = float(image_weight)
        self.encoder = DirectEncoder(generator.resolution, latent_tensor_shape(generator, self.latent_name),
                                     self.latent_name, trunk_stages, head_channels)

    def trained_modules(self) -> nn.Module:
        return self.encoder

    def _pass(self, z: torch.Tensor):
        with torch.no_grad():
            latent = z if self.latent_name == LATENT else feature_tensor(
                self.generator.features(z, [self.latent_name])[self.latent_name])
            images = generate_from_latent(self.generator, self.latent_name, latent)
        est = self.encoder(images)
        recon = generate_from_latent(self.generator, self.latent_name, est)
        return latent, images, est, recon

    def losses(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        latent, images, est, recon = self._pass(z)
        corr = correlation_error(est, latent)
        pixel = (recon.float() - images.float()).abs().mean()
        return {"loss": corr + self.image_weight * pixel, "corr_error_latent": corr, "pixel_l1": pixel}

    def evaluate(self, z: torch.Tensor):
        latent, images, est, recon = self._pass(z)
        return {LATENT: (est, latent)}, {"pixel": (recon, images)}, (images, recon)

    def export(self, output_dir: str | Path) -> Path:
        meta = self.scored_export_meta(Path(output_dir))
        return torch_save_atomic(self.encoder.to_file_dict(meta, self.hparams.export_half),
                                 Path(output_dir) / f"{self.stage_name}.pt")
