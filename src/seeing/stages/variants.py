"""``stage=reconstruct``: build a :class:`~seeing.stages.reconstruct.Reconstructor` from config.

    python train.py stage=reconstruct variant=f                       # held-out real scenes
    python train.py stage=reconstruct variant=f stage.targets.kind=generated
    python train.py -m stage=reconstruct variant=a,b,c,d,e,f          # the ablation

The encoders a variant starts from are found like every stage output, by convention:
``<run_root>/<model>/hybrid/hybrid.pt`` (else the package's shipped
``seeing/assets/<model>_hybrid.pt``) and ``<run_root>/<model>/direct_encoder/direct_encoder.pt``;
``hybrid_file`` / ``direct_encoder_file`` name other files.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from seeing.config import missing_targets_message
from seeing.gans.layered import LATENT, LayeredGenerator
from seeing.models.inverters import check_chain
from seeing.stage_files import find_stage_file, make_command
from seeing.validation import check_numbers

from seeing.stages.reconstruct import Reconstructor, correction_positions
from seeing.reconstruct.init import initial_latents
from seeing.reconstruct.losses import ReconstructionLoss
from seeing.data.targets import TargetSet, generated_targets, real_targets

log = logging.getLogger(__name__)


def find_hybrid(run_root: str | Path, model_id: str, explicit: str | Path | None = None, model: str = "") -> Path:
    """The hybrid encoder file: ``explicit``, the stage output, or the shipped asset."""
    return find_stage_file("hybrid", run_root, model_id, model or f"model={model_id}", explicit, "stage.hybrid_file")


def find_direct_encoder(run_root: str | Path, model_id: str, explicit: str | Path | None = None,
                        model: str = "") -> Path:
    """The direct encoder file (ablations b, c): ``explicit``, the stage output, or a shipped asset."""
    return find_stage_file("direct_encoder", run_root, model_id, model or f"model={model_id}", explicit,
                           "stage.direct_encoder_file")


def build_targets(generator: LayeredGenerator, targets: Mapping[str, Any], record: Sequence[str],
                  latent_name: str) -> TargetSet:
    kind = targets.get("kind", "real")
    count, seed, offset = int(targets.get("count", 16)), int(targets.get("seed", 0)), int(targets.get("offset", 0))
    if kind == "generated":
        return generated_targets(generator, count, seed, offset, record=record, latent_name=latent_name)
    if kind == "real":
        source = targets.get("source")
        if source is None:
            raise ValueError(missing_targets_message())
        if not hasattr(source, "batches"):
            import hydra

            source = hydra.utils.instantiate(source)
        return real_targets(source, count, generator.resolution, targets.get("with_classes") or (),
                            float(targets.get("min_fraction", 0.01)))
    raise ValueError(f"targets.kind must be real or generated, got {kind!r}")


def build_reconstructor(generator: LayeredGenerator, inversion_layers: Sequence[str], variant: Mapping[str, Any],
                        targets: Mapping[str, Any], name: str = "reconstruct", model_name: str = "",
                        run_root: str | Path = "runs",
                        loss: Mapping[str, Any] | None = None, steps: int = 3000, lr: float = 0.01,
                        milestones: Sequence[float] = (0.5, 0.75), gamma: float = 0.1, batch_size: int = 8,
                        hybrid_file: str | None = None, direct_encoder_file: str | None = None, model_args: str = "",
                        init_seed: int = 0, hybrid: torch.nn.Module | None = None,
                        direct_encoder: torch.nn.Module | None = None, optimizer: str = "adam") -> Reconstructor:
    """The reconstruct stage's module for one variant (``init`` x ``optimize``).

    ``hybrid`` / ``direct_encoder`` may be given as modules (tests); otherwise they are
    loaded from their files (see :func:`find_hybrid`, :func:`find_direct_encoder`). The hybrid
    encoder is also the ``E`` of the loss's encoder term (``loss.encoder_weight > 0``, the
    paper's variant e). ``optimizer``: ``adam`` or ``lbfgs`` (see :class:`Reconstructor`).
    """
    check_numbers({"steps": steps, "batch_size": batch_size, "lr": lr, "gamma": gamma,
                   "targets": {k: v for k, v in dict(targets).items() if k != "source"},
                   "loss": {k: v for k, v in dict(loss or {}).items() if not isinstance(v, torch.nn.Module)}}, "stage")
    init = variant.get("init", "hybrid")
    layers = list(inversion_layers)
    latent_name = check_chain(generator, layers)
    positions = correction_positions(variant.get("optimize", "deltas"), layers, bool(variant.get("latent_delta")))
    record = [LATENT] + layers
    target_set = build_targets(generator, targets, record, latent_name)
    encoder = None
    loss = dict(loss or {})
    encoder_term = float(loss.get("encoder_weight", 0.0) or 0.0) > 0
    if init == "hybrid" or encoder_term:
        if hybrid is None:
            from seeing.models.hybrid import load_hybrid_encoder

            path = find_hybrid(run_root, model_name, hybrid_file, model_args)
            log.info("hybrid encoder: %s", path)
            try:
                hybrid = load_hybrid_encoder(path, generator)
            except ValueError as e:  # e.g. the shipped encoder next to a user's own generator
                raise ValueError(f"{e}. Train a hybrid encoder for this generator with "
                                 f"`{make_command('hybrid', model_args or f'model={model_name}', run_root)}`") from e
        hybrid = hybrid.eval()
    if encoder_term:
        loss["encoder"] = hybrid
    if init == "hybrid":
        encoder = hybrid
    elif init == "direct_encoder":
        if direct_encoder is None:
            from seeing.models.direct_encoder import load_direct_encoder

            path = find_direct_encoder(run_root, model_name, direct_encoder_file, model_args)
            log.info("direct encoder: %s", path)
            direct_encoder = load_direct_encoder(path, generator)
        encoder = direct_encoder.eval()
    z0 = initial_latents(init, generator, target_set.images, target_set.ids, encoder=encoder, seed=init_seed,
                         latent_name=latent_name)
    meta = {"name": name, "variant": dict(variant), "model": model_name, "init": init, "positions": positions,
            "targets": target_set.description, "target_kind": target_set.kind, "steps": int(steps),
            "lr": float(lr), "optimizer": optimizer, "command": " ".join(["python", *sys.argv])}
    return Reconstructor(generator, target_set.images, z0, positions, ReconstructionLoss(**loss),
                         steps=steps, lr=lr, milestones=list(milestones), gamma=gamma, batch_size=batch_size,
                         record=record, extras=target_set.extras(), meta=meta, latent_name=latent_name,
                         optimizer=optimizer)
