"""WGAN-GP training of a :class:`~seeing.gans.layered.LayeredGenerator` (``stage=gan``).

Manual optimisation, one critic update per training batch and one generator update
every ``n_critic`` critic updates (Gulrajani et al. 2017). The critic loss is
``E[D(fake)] - E[D(real)] + gp_weight * GP + drift_weight * E[D(real)^2]`` (the small
drift term of Karras et al. 2018 keeps critic scores near zero); the generator loss is
``-E[D(G(z))]``. An exponential moving average of the generator weights is what gets
exported: it gives visibly cleaner samples than the raw weights at no training cost.

Lightning counts every optimizer step in ``trainer.global_step`` (critic and generator
both), so ``max_steps`` = critic steps + generator steps; the module keeps its own
``critic_steps`` / ``generator_steps`` counters (saved in checkpoints, so a resumed run
continues them).
"""
from __future__ import annotations

import copy
import io
import logging
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
import torchvision

from seeing.frozen import freeze
from seeing.gans.critic import ProGANCritic, gradient_penalty
from seeing.gans.layered import LayeredGenerator
from seeing.gans.loading import save_generator
from seeing.validation import check_numbers

log = logging.getLogger(__name__)

EXPORT_NAME = "generator.pt"


class NonFiniteLossError(RuntimeError):
    """Raised when the losses stay NaN/inf for too many steps in a row (training diverged)."""


class WGANGP(pl.LightningModule):
    """Trains ``generator`` against a :class:`ProGANCritic` with the WGAN-GP loss.

    Args:
        generator: the freshly built generator to train (e.g. a ``ProGANGenerator``).
        critic_widths: channel counts of the critic per resolution (4x4 first); defaults to
            the generator's ``widths``.
        lr, betas: Adam settings, shared by generator and critic.
        n_critic: critic updates per generator update.
        gp_weight: lambda of the gradient penalty (10 in Gulrajani et al.).
        drift_weight: weight of E[D(real)^2] (0.001 in Karras et al.; 0 turns it off).
        ema_beta: decay of the generator weight average (ramped up over the first steps).
        sample_every: write a fixed-z sample grid (and an intermediate export) every this many
            generator steps; 0 turns it off.
        num_samples, sample_seed: the fixed latents of the grids (``generator.sample_z``).
        max_nonfinite_steps: consecutive NaN/inf critic losses tolerated (each one is skipped
            and counted) before training stops with :class:`NonFiniteLossError`.
        meta: extra fields stored in the exported file's ``meta`` (e.g. the model name).
        name: the stage's name (progress bar, logs).
    """

    def __init__(
        self,
        generator: LayeredGenerator,
        critic_widths: Sequence[int] | None = None,
        lr: float = 1e-3,
        betas: Sequence[float] = (0.0, 0.99),
        n_critic: int = 1,
        gp_weight: float = 10.0,
        drift_weight: float = 1e-3,
        ema_beta: float = 0.999,
        sample_every: int = 250,
        num_samples: int = 64,
        sample_seed: int = 1234,
        max_nonfinite_steps: int = 20,
        meta: dict[str, Any] | None = None,
        name: str = "gan",
    ):
        super().__init__()
        self.stage_name = name
        check_numbers({"lr": lr, "n_critic": n_critic, "gp_weight": gp_weight, "drift_weight": drift_weight,
                       "ema_beta": ema_beta, "sample_every": sample_every, "num_samples": num_samples,
                       "max_nonfinite_steps": max_nonfinite_steps}, "stage")
        # Plain Python values only: checkpoints are read back with weights_only=True.
        betas = [float(b) for b in betas]
        critic_widths = [int(w) for w in critic_widths] if critic_widths is not None else None
        meta = _plain(meta or {})
        self.save_hyperparameters(ignore=["generator"])
        self.automatic_optimization = False
        self.generator = generator
        widths = list(critic_widths) if critic_widths is not None else list(getattr(generator, "widths"))
        self.critic = ProGANCritic(widths)
        if self.critic.resolution != generator.resolution:
            raise ValueError(
                f"critic widths {widths} give {self.critic.resolution}px but the generator makes "
                f"{generator.resolution}px images"
            )
        self.generator_ema = freeze(copy.deepcopy(generator))  # moved by the EMA update only
        # Counters live in buffers so checkpoints carry them and resumed runs continue them.
        for name in ("critic_steps", "generator_steps", "skipped_steps", "nonfinite_streak"):
            self.register_buffer(name, torch.zeros((), dtype=torch.long))
        self.register_buffer("train_seconds", torch.zeros((), dtype=torch.float64))
        self._clock: float | None = None

    # ----------------------------------------------------------------- set-up
    def configure_optimizers(self):
        betas = tuple(float(b) for b in self.hparams.betas)
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=self.hparams.lr, betas=betas)
        opt_d = torch.optim.Adam(self.critic.parameters(), lr=self.hparams.lr, betas=betas)
        return [opt_g, opt_d]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.generator_ema(z)

    def on_train_start(self) -> None:
        self._clock = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        now = time.perf_counter()
        if self._clock is not None:
            self.train_seconds += now - self._clock
        self._clock = now

    # --------------------------------------------------------------- training
    def training_step(self, batch, batch_idx: int):
        real = batch[0] if isinstance(batch, (tuple, list)) else batch
        opt_g, opt_d = self.optimizers()
        n = real.shape[0]

        # ---- critic step
        self.toggle_optimizer(opt_d)
        z = torch.randn(n, *self.generator.latent_shape, device=real.device)
        with torch.no_grad():
            fake = self.generator(z)
        d_real, d_fake = self.critic(real), self.critic(fake)
        wasserstein = d_real.mean() - d_fake.mean()
        gp = gradient_penalty(self.critic, real, fake)
        drift = d_real.pow(2).mean()
        d_loss = -wasserstein + self.hparams.gp_weight * gp + self.hparams.drift_weight * drift
        if not torch.isfinite(d_loss):
            self.untoggle_optimizer(opt_d)
            self._skip_nonfinite(d_loss)
            return None
        self.nonfinite_streak.zero_()
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(d_loss)
        opt_d.step()
        self.untoggle_optimizer(opt_d)
        self.critic_steps += 1
        self.log_dict(
            {"critic/loss": d_loss.detach(), "critic/wasserstein": wasserstein.detach(),
             "critic/gradient_penalty": gp.detach(), "critic/drift": drift.detach()},
            prog_bar=False, on_step=True, on_epoch=False,
        )
        self.log("wasserstein", wasserstein.detach(), prog_bar=True, on_step=True, on_epoch=False, logger=False)

        # ---- generator step, every n_critic critic steps
        if int(self.critic_steps) % self.hparams.n_critic == 0:
            self.toggle_optimizer(opt_g)
            z = torch.randn(n, *self.generator.latent_shape, device=real.device)
            g_loss = -self.critic(self.generator(z)).mean()
            if torch.isfinite(g_loss):
                opt_g.zero_grad(set_to_none=True)
                self.manual_backward(g_loss)
                opt_g.step()
                self.generator_steps += 1
                self._update_ema()
                self.log("generator/loss", g_loss.detach(), on_step=True, on_epoch=False)
            else:
                self._skip_nonfinite(g_loss)
            self.untoggle_optimizer(opt_g)
            self.log("generator_steps", self.generator_steps.float(), on_step=True, on_epoch=False, prog_bar=True)
            every = self.hparams.sample_every
            if every and int(self.generator_steps) % every == 0 and self.trainer.is_global_zero:
                self.write_samples()
                self.export(Path(self.trainer.default_root_dir))
        return None

    def _skip_nonfinite(self, loss: torch.Tensor) -> None:
        self.skipped_steps += 1
        self.nonfinite_streak += 1
        log.warning("non-finite GAN loss %s at critic step %d: step skipped (%d skipped so far)",
                    float(loss.detach()), int(self.critic_steps), int(self.skipped_steps))
        self.log("skipped_steps", self.skipped_steps.float(), on_step=True, on_epoch=False)
        if int(self.nonfinite_streak) >= self.hparams.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"GAN losses were NaN/inf for {int(self.nonfinite_streak)} steps in a row "
                f"(critic step {int(self.critic_steps)}): training diverged; lower stage.lr "
                f"or resume from an earlier checkpoint"
            )

    @torch.no_grad()
    def _update_ema(self) -> None:
        # Ramp the decay up so the average is not dominated by the random initial weights.
        step = int(self.generator_steps)
        beta = min(self.hparams.ema_beta, (1.0 + step) / (10.0 + step))
        for p_ema, p in zip(self.generator_ema.parameters(), self.generator.parameters()):
            p_ema.lerp_(p.detach(), 1.0 - beta)
        for b_ema, b in zip(self.generator_ema.buffers(), self.generator.buffers()):
            b_ema.copy_(b)

    # ---------------------------------------------------------------- outputs
    @torch.no_grad()
    def sample_grid(self, use_ema: bool = True) -> torch.Tensor:
        """The fixed-latent samples (``num_samples`` from ``sample_seed``) as one image grid in [0, 1]."""
        gen = self.generator_ema if use_ema else self.generator
        z = gen.sample_z(self.hparams.num_samples, self.hparams.sample_seed, device=self.device)
        images = gen(z).clamp(-1, 1).add(1).div(2)
        return torchvision.utils.make_grid(images.cpu(), nrow=int(math.sqrt(len(z))) or 1, padding=1)

    def write_samples(self) -> Path:
        """Save the fixed-z grid as ``samples/step_<generator step>.png`` and log it."""
        from PIL import Image

        from seeing.reporting import write_bytes_atomic

        grid = self.sample_grid()
        buf = io.BytesIO()
        Image.fromarray(grid.mul(255).round().byte().permute(1, 2, 0).numpy()).save(buf, format="PNG")
        out = Path(self.trainer.default_root_dir) / "samples"
        path = out / f"step_{int(self.generator_steps):07d}.png"
        write_bytes_atomic(path, buf.getvalue())
        write_bytes_atomic(out / "latest.png", buf.getvalue())
        for logger in self.loggers:
            if hasattr(logger, "log_image"):  # W&B
                logger.log_image("samples", images=[str(path)], step=self.global_step)
            elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoard
                logger.experiment.add_image("samples", grid, self.global_step)
        return path

    def export_meta(self) -> dict[str, Any]:
        gen = self.generator_ema
        meta = {
            "architecture": type(gen).__name__,
            "z_dim": gen.z_dim,
            "widths": list(getattr(gen, "widths", [])),
            "resolution": gen.resolution,
            "weights": "exponential moving average of the generator weights",
            "ema_beta": self.hparams.ema_beta,
            "loss": "WGAN-GP",
            "gp_weight": self.hparams.gp_weight,
            "drift_weight": self.hparams.drift_weight,
            "n_critic": self.hparams.n_critic,
            "lr": self.hparams.lr,
            "betas": list(self.hparams.betas),
            "critic_widths": list(self.hparams.critic_widths or getattr(gen, "widths", [])),
            "generator_steps": int(self.generator_steps),
            "critic_steps": int(self.critic_steps),
            "skipped_steps": int(self.skipped_steps),
            "train_seconds": round(float(self.train_seconds), 1),
            "threads": torch.get_num_threads(),
            "command": " ".join(shlex.quote(a) for a in sys.argv),
            # the run's settings, identity and inputs (set by seeing.pipeline before exporting)
            "provenance": getattr(self, "provenance", None),
        }
        trainer = self._trainer  # None when exporting a module that was never fitted
        if trainer is not None and getattr(trainer, "datamodule", None) is not None:
            meta["batch_size"] = getattr(trainer.datamodule, "batch_size", None)
        meta.update(self.hparams.meta or {})
        return meta

    def export(self, output_dir: str | Path) -> Path:
        """Write the averaged generator as ``<output_dir>/generator.pt`` (what ``load_generator`` reads)."""
        path = Path(output_dir) / EXPORT_NAME
        return save_generator(self.generator_ema, path, self.export_meta())


def _plain(value: Any) -> Any:
    """OmegaConf containers (what Hydra passes) as plain dicts and lists."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value
