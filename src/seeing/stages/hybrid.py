"""``stage=hybrid``: the hybrid encoder E = e_1 o ... o e_n o E_f, assembled from the layer and
encoder stage files (or an earlier hybrid file) and fine-tuned end to end, optionally on real
images as well (:class:`RealImageStream`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from seeing.gans.layered import LATENT, LayeredGenerator
from seeing.reporting import torch_save_atomic

from seeing.metrics.correlation import correlation_error
from seeing.models.hybrid import assemble_hybrid_encoder, load_hybrid_encoder
from seeing.stages.inversion import InversionStage
from seeing.gans.values import feature_tensor
from seeing.validation import check_numbers


class RealImageStream:
    """Training batches and a held-out set of real images from an image-source config."""

    def __init__(self, source: Any, batch_size: int, resolution: int, pool: int | None,
                 val_size: int, val_offset: int):
        from seeing.data.sources import ImageSource, instantiate_unwrapped

        # Hydra instantiates a nested source config before the stage; a plain mapping also works
        self.source = source if isinstance(source, ImageSource) else instantiate_unwrapped(dict(source))
        self.batch_size, self.resolution = int(batch_size), int(resolution)
        self.pool = int(pool) if pool else None
        self.val_size, self.val_offset = int(val_size), int(val_offset)
        if self.pool is not None and self.val_offset < self.pool:
            raise ValueError(f"real_val_offset {self.val_offset} lies inside the training pool of {self.pool} "
                             f"images: held-out images would be trained on")
        self._heldout: torch.Tensor | None = None

    def _take(self, n: int, start: int) -> torch.Tensor:
        batches = [b.images for b in self.source.batches(n, n, self.resolution, extra_offset=start) if len(b.images)]
        if not batches:  # e.g. a folder smaller than the pool and held-out range the settings ask for
            raise ValueError(f"{self.source.describe()}: no readable images from position {start} (of the {n} "
                             f"asked for): the real images must reach past stage.real_val_offset="
                             f"{self.val_offset} + stage.real_val_size={self.val_size}; lower stage.real_pool and "
                             f"stage.real_val_offset for a smaller set")
        return torch.cat(batches)

    def train_batch(self, step: int) -> torch.Tensor:
        start = int(step) * self.batch_size
        if self.pool is not None:
            start %= self.pool
            if start + self.batch_size > self.pool:  # wrap around the end of a finite source
                return torch.cat([self._take(self.pool - start, start),
                                  self._take(start + self.batch_size - self.pool, 0)])
        elif start + self.batch_size > self.val_offset:
            raise ValueError(f"real image stream reached the held-out images at {self.val_offset}: "
                             f"set real_pool or a larger real_val_offset")
        return self._take(self.batch_size, start)

    def heldout(self) -> torch.Tensor:
        if self._heldout is None:
            self._heldout = self._take(self.val_size, self.val_offset)
        return self._heldout


def freeze_modules(module: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Stop training the sub-modules of ``module`` whose names match ``patterns`` (``fnmatch``);
    returns their names. Each pattern must match at least one module holding parameters."""
    from fnmatch import fnmatchcase

    named = {name: m for name, m in module.named_modules() if name and any(True for _ in m.parameters())}
    frozen = []
    for pattern in patterns:
        hits = [name for name in named if fnmatchcase(name, str(pattern))]
        if not hits:
            convs = sorted(name for name, m in named.items() if isinstance(m, nn.Conv2d) and "inverters." in name)
            raise ValueError(f"stage.freeze: {pattern!r} names no module of this hybrid encoder; its inverters' "
                             f"convs are {', '.join(convs)}")
        for name in hits:
            named[name].requires_grad_(False)
        frozen += [h for h in hits if h not in frozen]
    return frozen


class HybridStage(InversionStage):
    """``stage=hybrid``: assembles E from the layer and encoder stage files and fine-tunes it.

    Loss: ``weights.r_n`` x corr. error of the estimated r_n, ``weights.z`` x corr. error of
    the recovered latent, ``weights.regen`` x corr. error of r_n regenerated from the
    recovered latent, ``weights.pixel`` x pixel MSE of G(E(G(z))) against G(z), and
    ``weights.real_pixel`` x pixel L1 of G(E(x)) against real images x drawn from
    ``real_source`` (an image-source config, e.g. the scenes world; off by default, as in
    the paper, which trains on generated images only). Real batch k is images
    ``[k * real_batch_size, ...)`` of the source (modulo ``real_pool`` when set, for finite
    sources), so a resumed run continues the stream; ``real_val_size`` images starting at
    ``real_val_offset`` are held out and scored as ``real_pixel_l1``.
    Stage files come from ``<run_root>/<model_name>/<stage>/<stage>.pt`` unless
    ``stage_files`` names them (``{"layer3": path, "encoder": path}``); ``hybrid_file``
    starts instead from an existing hybrid encoder (to fine-tune it further, or to score
    it on the held-out latents with :meth:`heldout_scores`).
    ``freeze``: sub-modules of the encoder kept as they are (their parameters are not trained),
    named as in ``encoder.named_modules()`` or by ``fnmatch`` patterns, e.g.
    ``["inverters.*.net.conv3"]``: the final 1x1 conv of every map inverter, which the paper's
    reference code freezes (redundant with the next inverter's first conv). A name that
    matches no parameterised module is an error.
    """

    DEFAULT_WEIGHTS = {"r_n": 1.0, "z": 1.0, "regen": 1.0, "pixel": 1.0, "real_pixel": 0.0}

    def __init__(self, generator: LayeredGenerator, inversion_layers: Sequence[str], model_name: str,
                 run_root: str | Path, name: str = "hybrid", stage_files: Mapping[str, str] | None = None,
                 weights: Mapping[str, float] | None = None, hybrid_file: str | Path | None = None,
                 real_source: Any = None, real_batch_size: int = 32,
                 real_pool: int | None = None, real_val_size: int = 64, real_val_offset: int = 1_900_000,
                 model_args: str = "", freeze: Sequence[str] = (), **kwargs):
        super().__init__(generator, inversion_layers, name, model_name=model_name, **kwargs)
        check_numbers({"real_batch_size": real_batch_size, "real_val_size": real_val_size,
                       "weights": dict(weights or {})}, "stage")
        unknown = set(weights or {}) - set(self.DEFAULT_WEIGHTS)
        if unknown:
            raise ValueError(f"unknown hybrid loss weights {sorted(unknown)}; known: {sorted(self.DEFAULT_WEIGHTS)}")
        self.weights = {**self.DEFAULT_WEIGHTS, **dict(weights or {})}
        self.real_images = RealImageStream(real_source, real_batch_size, generator.resolution, real_pool,
                                           real_val_size, real_val_offset) if real_source else None
        if self.weights["real_pixel"] > 0 and self.real_images is None:
            raise ValueError("stage.weights.real_pixel > 0 needs real images: add a real= source, e.g. "
                             "`+real=folder real.path=/data/photos` (or `+real=scenes`)")
        if self.real_images is not None and self.weights["real_pixel"] == 0:
            raise ValueError("a real= source is set but stage.weights.real_pixel is 0, so nothing reads it: set "
                             "stage.weights.real_pixel (e.g. 5) or drop the real= source")
        if hybrid_file:
            self.encoder = load_hybrid_encoder(hybrid_file, generator).train()
            self.record_start(hybrid_file, self.encoder.meta)
            if self.encoder.layers != self.inversion_layers:
                raise ValueError(f"{hybrid_file} inverts {self.encoder.layers}, the model config says "
                                 f"{self.inversion_layers}")
        else:
            self.encoder = assemble_hybrid_encoder(generator, self.inversion_layers, run_root, model_name,
                                                   dict(stage_files or {}), model_args)
        self.target = self.inversion_layers[-1]
        self.frozen_modules = freeze_modules(self.encoder, freeze)

    def trained_modules(self) -> nn.Module:
        return self.encoder

    def _pass(self, z: torch.Tensor):
        names = [self.latent_name, *self.inversion_layers]
        feats = self.features(z, names)
        with torch.no_grad():
            images = self.generator.run(feats[self.target], start=self.target)
        est = self.encoder.invert(images)
        regen = self.encoder.generate(self.generator, est[LATENT], stop=self.target)
        recon = self.generator.run(regen, start=self.target)
        return feats, images, est, regen, recon

    def losses(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        feats, images, est, regen, recon = self._pass(z)
        r_n = feature_tensor(feats[self.target])
        terms = {
            "r_n": correlation_error(est[self.target], r_n),
            "z": correlation_error(est[LATENT], feature_tensor(feats[self.latent_name])),
            "regen": correlation_error(feature_tensor(regen), r_n),
            "pixel": F.mse_loss(recon.float(), images.float()),
        }
        if self.weights["real_pixel"] > 0:
            # like the latents, each process of a distributed run takes real batches of its own
            rank, world = (self.global_rank, self.trainer.world_size) if self._trainer is not None else (0, 1)
            real = self.real_images.train_batch(self.global_step * world + rank).to(self.device)
            terms["real_pixel"] = self.real_pixel_l1(real)
        loss = sum(self.weights[k] * v for k, v in terms.items())
        return {"loss": loss, **{f"term_{k}": v for k, v in terms.items()}}

    def real_pixel_l1(self, real: torch.Tensor) -> torch.Tensor:
        """Mean pixel L1 of G(E(x)) against real images x (what ablation d is scored on)."""
        recon = self.encoder.generate(self.generator, self.encoder(real))
        return F.l1_loss(recon.float(), real.float())

    def on_validation_epoch_end(self) -> None:
        if self.real_images is not None and not self.trainer.sanity_checking:
            with torch.no_grad():
                self.log("val/real_pixel_l1", self.real_pixel_l1(self.real_images.heldout().to(self.device)))

    def extra_heldout_scores(self) -> dict[str, float]:
        if self.real_images is None:
            return {}
        return {"real_pixel_l1": float(self.real_pixel_l1(self.real_images.heldout().to(self.device)))}

    def evaluate(self, z: torch.Tensor):
        feats, images, est, regen, recon = self._pass(z)
        corrs = {name: (est[name], feature_tensor(feats[name])) for name in self.inversion_layers}
        corrs[LATENT] = (est[LATENT], feature_tensor(feats[self.latent_name]))
        corrs[f"{self.target}_regen"] = (feature_tensor(regen), feature_tensor(feats[self.target]))
        return corrs, {"pixel": (recon, images)}, (images, recon)

    def export(self, output_dir: str | Path) -> Path:
        self.encoder.meta = self.scored_export_meta(Path(output_dir))
        return torch_save_atomic(self.encoder.to_file_dict(half=self.hparams.export_half),
                                 Path(output_dir) / f"{self.stage_name}.pt")
