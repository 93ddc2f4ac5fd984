"""The training stages of layer-wise inversion, one LightningModule each.

* ``stage=layerN`` -> :class:`LayerInverterStage`: e_N with r_{N-1} ~ e_N(r_N);
* ``stage=encoder`` -> :class:`ImageEncoderStage`: E_f from generated images to r_n;
* ``stage=hybrid`` -> :class:`~seeing.stages.hybrid.HybridStage`: E = e_1 o ... o e_n o E_f
  assembled from the stage files and fine-tuned end to end (its own module).

They share :class:`InversionStage`: the frozen generator, an endless stream of
latents drawn on the fly (batch ``k`` of a run is ``generator.sample_z(B, seed(k))``,
so a resumed run continues the same stream), a fixed held-out set of latents for
validation, correlation metrics on it, image grids of G(z) next to its
reconstruction, optimisation, and the export of the stage's file.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset
from torchmetrics import MeanSquaredError

from seeing.frozen import freeze
from seeing.gans.layered import LATENT, LayeredGenerator, module_key
from seeing.reporting import save_figure, write_json

from seeing.metrics.correlation import MeanCorrelation, correlation_error
from seeing.models.image_encoder import ImageEncoder, encoder_spec
from seeing.models.hybrid import check_against_generator, generator_fingerprint, read_layer_inverter, save_inversion_file
from seeing.models.inverters import check_chain, inverter_spec, LayerInverter, probe_shapes
from seeing.gans.values import feature_tensor, with_feature
from seeing.validation import check_numbers

log = logging.getLogger(__name__)

LR_DECAYS = ("cosine", "none", "multistep")
# Training batch k draws its latents with seed TRAIN_SEED_BASE * (train_seed + 1) + k; the
# held-out set uses seed val_seed, far below, so training never sees a held-out latent.
TRAIN_SEED_BASE = 1_000_000_007


class LatentStream(IterableDataset):
    """Endless batches of latents: step ``k`` of process ``rank`` (of ``world``) draws
    ``sample_z(batch_size, first_seed + k * world + rank)``.

    Every process of a distributed run thus trains on latents of its own, and the stream is
    still a function of the step alone, so a resumed run continues it; one process (world 1)
    draws exactly what it always did.
    """

    def __init__(self, generator: LayeredGenerator, batch_size: int, first_seed: int, start: int = 0,
                 rank: int = 0, world: int = 1):
        super().__init__()
        self.sample_z = generator.sample_z  # uses only the latent shape; no weights are touched
        self.batch_size, self.first_seed, self.start = int(batch_size), int(first_seed), int(start)
        self.rank, self.world = int(rank), int(world)

    def __iter__(self) -> Iterator[torch.Tensor]:
        k = self.start
        while True:
            yield self.sample_z(self.batch_size, seed=self.first_seed + k * self.world + self.rank)
            k += 1


class InversionStage(pl.LightningModule):
    """What every inversion stage shares; subclasses define the trained modules, the loss
    (:meth:`losses`) and what validation compares (:meth:`evaluate`).

    Args:
        generator: the frozen generator (a :class:`LayeredGenerator`).
        inversion_layers: the generator layers inverted one by one, first to last (the
            model config's ``inversion_layers``; the last is r_n, E_f's target).
        name: the stage's name; names the exported file ``<output_dir>/<name>.pt``.
        model_name: recorded in the exported file.
        batch_size, lr, betas, weight_decay: Adam's.
        lr_decay: "cosine" (over max_steps, to 1% of lr), "none", or "multistep": lr x ``gamma``
            at each of the ``milestones`` (absolute step numbers; the paper's schedules).
        val_size, val_batch_size, val_seed: the fixed held-out latents.
        train_seed: selects the training stream.
        grid_size: how many held-out samples the image grids show.
        export_half: store float weights as float16 in the exported file.
    """

    def __init__(
        self,
        generator: LayeredGenerator,
        inversion_layers: Sequence[str],
        name: str,
        model_name: str = "",
        batch_size: int = 32,
        lr: float = 1e-3,
        betas: Sequence[float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        lr_decay: str = "cosine",
        milestones: Sequence[int] = (),
        gamma: float = 0.1,
        val_size: int = 256,
        val_batch_size: int = 64,
        val_seed: int = 0,
        train_seed: int = 0,
        grid_size: int = 8,
        export_half: bool = False,
    ):
        super().__init__()
        check_numbers({"batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "gamma": gamma,
                       "val_size": val_size, "val_batch_size": val_batch_size, "grid_size": grid_size}, "stage")
        # objects built by Hydra are config, not hyperparameters: checkpoints stay plain Python
        self.save_hyperparameters(ignore=["generator", "real_source"])
        # checkpoints are read back with weights_only=True: keep hyperparameters plain Python
        for hp in (self._hparams, self._hparams_initial):
            for k, v in list(hp.items()):
                if isinstance(v, (DictConfig, ListConfig)):
                    hp[k] = OmegaConf.to_container(v, resolve=True)
        if not isinstance(generator, LayeredGenerator):
            raise TypeError(f"generator must be a LayeredGenerator, got {type(generator).__name__}")
        if lr_decay not in LR_DECAYS:
            raise ValueError(f"lr_decay must be one of {', '.join(LR_DECAYS)}, got {lr_decay!r}")
        if any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in milestones):
            raise ValueError(f"stage.milestones={list(milestones)}: give absolute step numbers (whole numbers >= 1)")
        if not gamma > 0:
            raise ValueError(f"stage.gamma={gamma}: must be positive")
        self.generator = freeze(generator)  # fixed, and the same in train and eval mode
        self.inversion_layers = list(inversion_layers)
        # "z", or the layer whose output is the latent searched (``mapping`` for style-based models)
        self.latent_name = check_chain(generator, self.inversion_layers)
        self.stage_name, self.model_name = name, model_name
        self.val_metrics = nn.ModuleDict()
        self._grid_pending = False
        # set by stages that continue an earlier file (see :meth:`record_start`)
        self.started_from: dict[str, Any] | None = None

    # ------------------------------------------------------------ subclass API
    def trained_modules(self) -> nn.Module:
        raise NotImplementedError

    def losses(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named loss terms for one batch of latents; "loss" is the one optimised."""
        raise NotImplementedError

    def evaluate(self, z: torch.Tensor) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]],
                                                  dict[str, tuple[torch.Tensor, torch.Tensor]],
                                                  tuple[torch.Tensor, torch.Tensor]]:
        """For held-out latents: ``(correlations, squared_errors, (images, reconstructions))``,
        the first two mapping metric names to ``(estimate, target)``."""
        raise NotImplementedError

    def export(self, output_dir: str | Path) -> Path:
        raise NotImplementedError

    # ------------------------------------------------------------ generator
    def features(self, z: torch.Tensor, names: Sequence[str]) -> dict[str, Any]:
        with torch.no_grad():
            return self.generator.features(z, list(dict.fromkeys(names)))

    def on_fit_start(self) -> None:
        if self.device.type == "cuda":
            self.to(memory_format=torch.channels_last)

    # ------------------------------------------------------------ data
    def train_dataloader(self) -> DataLoader:
        # created after a checkpoint restore, so a resumed run continues the stream
        first = TRAIN_SEED_BASE * (self.hparams.train_seed + 1)
        rank, world = (self.global_rank, self.trainer.world_size) if self._trainer is not None else (0, 1)
        stream = LatentStream(self.generator, self.hparams.batch_size, first, start=self.global_step,
                              rank=rank, world=world)
        return DataLoader(stream, batch_size=None, num_workers=0)

    def heldout_latents(self) -> torch.Tensor:
        return self.generator.sample_z(self.hparams.val_size, seed=self.hparams.val_seed)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.heldout_latents()), batch_size=self.hparams.val_batch_size,
                          shuffle=False)

    # ------------------------------------------------------------ training
    def training_step(self, z: torch.Tensor, batch_idx: int) -> torch.Tensor:
        terms = self.losses(z.to(self.device))
        loss = terms["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{self.stage_name}: non-finite loss {loss.item()} at step {self.global_step} "
                                     f"({ {k: float(v.detach()) for k, v in terms.items()} })")
        self.log_dict({f"train/{k}": v.detach() for k, v in terms.items()}, prog_bar=False)
        self.log("loss", loss.detach(), prog_bar=True, logger=False)
        return loss

    def configure_optimizers(self):
        # frozen parameters (the hybrid stage's ``freeze``) are left out
        params = [p for p in self.trained_modules().parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=self.hparams.lr,
                               betas=tuple(self.hparams.betas), weight_decay=self.hparams.weight_decay)
        if self.hparams.lr_decay == "multistep":
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=sorted(self.hparams.milestones),
                                                         gamma=self.hparams.gamma)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        steps = self._trainer.max_steps if self._trainer is not None else -1
        if self.hparams.lr_decay == "none" or steps is None or steps <= 0:
            return opt
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=self.hparams.lr * 0.01)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------ validation
    def _log_metric(self, kind: str, name: str, est: torch.Tensor, target: torch.Tensor) -> None:
        # metrics appear with the first validation batch (their names depend on the stage)
        key = f"{kind}_{name}"
        attribute = module_key(key)  # module containers refuse dots (NVlabs' b8.conv0)
        if attribute not in self.val_metrics:
            self.val_metrics[attribute] = (MeanCorrelation() if kind == "corr" else MeanSquaredError()).to(self.device)
        metric = self.val_metrics[attribute]
        metric.update(est.float(), target.float())
        self.log(f"val/{key}", metric, metric_attribute=f"val_metrics.{attribute}",
                 prog_bar=kind == "corr" and name in (self.inversion_layers[-1], LATENT))

    def on_validation_epoch_start(self) -> None:
        self._grid_pending = True

    def validation_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> None:
        z = batch[0].to(self.device)
        corrs, sq_errors, (images, recon) = self.evaluate(z)
        for name, (est, target) in corrs.items():
            self._log_metric("corr", name, est, target)
        for name, (est, target) in sq_errors.items():
            self._log_metric("mse", name, est, target)
        if self._grid_pending and not self.trainer.sanity_checking:
            self._grid_pending = False
            self.log_grid(images, recon)

    @torch.no_grad()
    def log_grid(self, images: torch.Tensor, recon: torch.Tensor) -> None:
        """Top row G(z), bottom row its reconstruction; PNG under images/ and to W&B."""
        from torchvision.utils import make_grid
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        k = min(self.hparams.grid_size, images.shape[0])
        pair = torch.cat([images[:k], recon[:k]]).float().clamp(-1, 1).add(1).div(2).cpu()
        grid = make_grid(pair, nrow=k, padding=1).permute(1, 2, 0).numpy()
        root = Path(self._trainer.default_root_dir) if self._trainer is not None else Path(".")
        fig, ax = plt.subplots(figsize=(1.2 * k, 2.6))
        ax.imshow(grid)
        ax.set_axis_off()
        ax.set_title(f"{self.stage_name} step {self.global_step}: G(z) (top), reconstruction (bottom)", fontsize=8)
        save_figure(fig, root / "images" / f"step_{self.global_step:07d}.png")
        for lg in self.loggers:
            if hasattr(lg, "log_image"):  # W&B
                lg.log_image(key="val/reconstructions", images=[grid], step=self.global_step,
                             caption=["G(z) top, reconstruction bottom"])

    @torch.no_grad()
    def heldout_scores(self) -> dict[str, float]:
        """Every validation metric over the whole held-out set, computed afresh (eval mode) by this
        process alone: no collective, so process 0 can score and export while the others wait, and
        the scores equal a one-process scoring of the same weights.

        Each ``corr_<name>`` comes with ``chance_corr_<name>``: the correlation of every
        held-out target with another sample's (the batch rolled by one). Activations of
        different samples already agree in direction to some degree (shared biases), so
        this is the score of a guess that knows nothing about the image.
        """
        was_training = self.training
        self.eval()
        metrics: dict[str, nn.Module] = {}
        try:
            for (z,) in self.val_dataloader():
                corrs, sq_errors, _ = self.evaluate(z.to(self.device))
                for prefix, table, make in (("corr", corrs, MeanCorrelation), ("mse", sq_errors, MeanSquaredError)):
                    for name, (est, target) in table.items():
                        key = f"{prefix}_{name}"
                        metrics.setdefault(key, make(sync_on_compute=False).to(self.device)).update(est.float(), target.float())
                        if prefix == "corr" and target.shape[0] > 1:
                            metrics.setdefault(f"chance_{key}", MeanCorrelation(sync_on_compute=False).to(self.device)).update(
                                target.roll(1, dims=0), target)
            extra = self.extra_heldout_scores()
        finally:
            self.train(was_training)
        return {**{k: float(m.compute()) for k, m in metrics.items()}, **extra}

    def extra_heldout_scores(self) -> dict[str, float]:
        """Scores beyond the held-out latents' (computed in eval mode, without gradients)."""
        return {}

    def record_start(self, path: str | Path, meta: Mapping[str, Any]) -> None:
        """This run continues the file ``path`` (meta ``meta``): its export keeps how that file was made."""
        self.started_from = {"file": str(path), **{k: v for k, v in meta.items()
                                                   if k in ("steps", "command", "started_from")}}

    def export_meta(self, scores: Mapping[str, float]) -> dict[str, Any]:
        meta = {
            "model": self.model_name,
            "generator_fingerprint": generator_fingerprint(self.generator),
            "stage": self.stage_name,
            "steps": int(self.global_step),
            "heldout": {"size": int(self.hparams.val_size), "seed": int(self.hparams.val_seed), **scores},
            "command": " ".join(["python", *sys.argv]),
            # the run's settings, identity and inputs (set by seeing.pipeline before exporting)
            "provenance": getattr(self, "provenance", None),
        }
        if self.started_from:
            meta["started_from"] = self.started_from
        return meta

    def scored_export_meta(self, output_dir: Path) -> dict[str, Any]:
        """What every export does first: round to the export precision, score the held-out
        set, write ``heldout.json``; returns the meta of the exported file."""
        self.round_to_export_precision()
        scores = self.heldout_scores()
        self.write_scores(output_dir, scores)
        return self.export_meta(scores)

    @torch.no_grad()
    def round_to_export_precision(self) -> None:
        """With ``export_half``, round the trained weights to float16 values before scoring,
        so that the held-out scores written into the file are the scores of the file."""
        if self.hparams.export_half:
            for t in [*self.trained_modules().parameters(), *self.trained_modules().buffers()]:
                if t.is_floating_point():
                    t.copy_(t.half().to(t.dtype))

    def write_scores(self, output_dir: Path, scores: Mapping[str, float]) -> None:
        write_json(output_dir / "heldout.json", self.export_meta(scores))
        for lg in self.loggers:  # the final held-out scores next to the training curves (W&B, CSV)
            lg.log_metrics({f"heldout/{k}": v for k, v in scores.items()}, step=self.global_step)
        log.info("%s held-out: %s", self.stage_name, {k: round(v, 5) for k, v in scores.items()})

    # ------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the frozen generator is config, not state: keep checkpoints small
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if not k.startswith("generator.")}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"].update({f"generator.{k}": v for k, v in self.generator.state_dict().items()})


class LayerInverterStage(InversionStage):
    """``stage=layerN``: trains e_N so that e_N(r_N) ~ r_{N-1}.

    Loss: correlation error between r_{N-1} and e_N(r_N), plus ``regen_weight`` times
    the correlation error between r_N and g_N(e_N(r_N)). ``index`` is N (1-based) in
    ``inversion_layers``. ``architecture``: ``"seeing"`` (this project's inverter) or
    ``"ganseeing"`` (the paper's released modules, see :mod:`seeing.models.inverters`).
    ``inverter_file`` starts from an existing inverter file instead of random weights (to train
    it further, or, with ``max_steps=0``, to score it and write it again, e.g. rounded to
    float16 with ``export_half``).
    """

    def __init__(self, generator: LayeredGenerator, inversion_layers: Sequence[str], index: int,
                 name: str | None = None, hidden_channels: int | None = None, regen_weight: float = 0.01,
                 inverter_file: str | Path | None = None, architecture: str = "seeing", **kwargs):
        layers = list(inversion_layers)
        if not 1 <= int(index) <= len(layers):
            raise ValueError(f"stage layer{index}: this model inverts {len(layers)} layers ({layers}); "
                             f"choose stage=layer1 ... layer{len(layers)}")
        super().__init__(generator, layers, name or f"layer{index}", **kwargs)
        check_numbers({"regen_weight": regen_weight}, "stage")
        self.layer = layers[int(index) - 1]
        if inverter_file:
            self.inverter = self._load_inverter(Path(inverter_file), hidden_channels, architecture)
        else:
            self.inverter = LayerInverter(inverter_spec(generator, self.layer, hidden_channels, architecture))
        self.target = self.inverter.spec.target
        self.regen_weight = float(regen_weight)

    def _load_inverter(self, path: Path, hidden_channels: int | None, architecture: str) -> LayerInverter:
        inverter, meta = read_layer_inverter(path, self.layer)
        if hidden_channels and int(hidden_channels) != inverter.spec.hidden_channels:
            raise ValueError(f"{path} has hidden_channels {inverter.spec.hidden_channels}, the config asks for "
                             f"{hidden_channels}: drop stage.hidden_channels to continue that file")
        if architecture != inverter.spec.architecture:
            raise ValueError(f"{path} holds a {inverter.spec.architecture!r} inverter, the config asks for "
                             f"{architecture!r}: set stage.architecture={inverter.spec.architecture} to continue "
                             f"that file")
        check_against_generator(self.generator, {self.layer: inverter}, source=str(path))
        self.record_start(path, meta)
        return inverter

    def trained_modules(self) -> nn.Module:
        return self.inverter

    def _pass(self, z: torch.Tensor):
        feats = self.features(z, [self.target, self.layer])
        r_prev, r = feats[self.target], feats[self.layer]
        est = self.inverter(feature_tensor(r))
        # g_N applied to the estimate; styles / skip images of r_{N-1} are carried over
        regen = self.generator.run(with_feature(r_prev, est), start=self.target, stop=self.layer)
        return r_prev, r, est, regen

    def losses(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        r_prev, r, est, regen = self._pass(z)
        inv = correlation_error(est, feature_tensor(r_prev))
        reg = correlation_error(feature_tensor(regen), feature_tensor(r))
        return {"loss": inv + self.regen_weight * reg, f"corr_error_{self.target}": inv,
                f"corr_error_{self.layer}_regen": reg}

    def evaluate(self, z: torch.Tensor):
        r_prev, r, est, regen = self._pass(z)
        images = self.generator.run(r, start=self.layer)
        recon = self.generator.run(regen, start=self.layer)
        corrs = {self.target: (est, feature_tensor(r_prev)), f"{self.layer}_regen": (feature_tensor(regen),
                                                                                   feature_tensor(r))}
        return corrs, {"pixel": (recon, images)}, (images, recon)

    def export(self, output_dir: str | Path) -> Path:
        meta = self.scored_export_meta(Path(output_dir))
        return save_inversion_file(Path(output_dir) / f"{self.stage_name}.pt", "inverter",
                                   inverters={self.layer: self.inverter}, meta=meta, half=self.hparams.export_half)


class ImageEncoderStage(InversionStage):
    """``stage=encoder``: trains E_f (ResNet-18 trunk + 1x1 conv head) from G(z) to r_n with MSE.
    ``architecture``: the head, ``"seeing"`` (1x1 conv, leaky ReLU, 1x1 conv) or ``"ganseeing"``
    (the paper's: one 1x1 conv and a leaky ReLU)."""

    def __init__(self, generator: LayeredGenerator, inversion_layers: Sequence[str], name: str = "encoder",
                 trunk_stages: int | str = "auto", head_channels: int | None = None, architecture: str = "seeing",
                 **kwargs):
        super().__init__(generator, inversion_layers, name, **kwargs)
        self.target = self.inversion_layers[-1]
        shape = probe_shapes(generator, [self.target])[self.target]
        self.encoder = ImageEncoder(encoder_spec(generator.resolution, shape, self.target, trunk_stages,
                                                 head_channels, architecture))

    def trained_modules(self) -> nn.Module:
        return self.encoder

    def _pass(self, z: torch.Tensor):
        r = self.features(z, [self.target])[self.target]
        with torch.no_grad():
            images = self.generator.run(r, start=self.target)
        return r, images, self.encoder(images)

    def losses(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        r, _, est = self._pass(z)
        mse = F.mse_loss(est.float(), feature_tensor(r).float())
        return {"loss": mse, f"mse_{self.target}": mse}

    def evaluate(self, z: torch.Tensor):
        r, images, est = self._pass(z)
        recon = self.generator.run(with_feature(r, est), start=self.target)
        target = feature_tensor(r)
        return {self.target: (est, target)}, {self.target: (est, target), "pixel": (recon, images)}, (images, recon)

    def export(self, output_dir: str | Path) -> Path:
        meta = self.scored_export_meta(Path(output_dir))
        return save_inversion_file(Path(output_dir) / f"{self.stage_name}.pt", "encoder", encoder=self.encoder,
                                   meta=meta, half=self.hparams.export_half)
