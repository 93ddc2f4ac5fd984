"""Per-image layer corrections delta, optimised as a LightningModule (``stage=reconstruct``).

A target image x starts from a latent z0 (from the hybrid encoder E(x), a direct
encoder, the generator's mean latent or a fixed random draw). The generator is run
from z0, and at the output of each chosen position p (the latent ``"z"`` and/or
early layers 1..n-1) a learned correction is added::

    r_p <- r_p + delta_p

With every delta at zero the result is exactly G(z0). The corrections are the
module's parameters, one tensor per position holding a row per image.

Batched, yet every image is its own problem:

* the loss back-propagated is the SUM over images of per-image means
  (:class:`~seeing.reconstruct.losses.ReconstructionLoss`), so image i's gradient
  is the gradient of its own loss;
* Adam's update of an element depends only on that element's gradient history,
  and the learning-rate schedule only on the step count;
* the frozen generator runs in eval mode and uses no batch statistics.

Hence an image's result does not depend on what else shares its batch (a test
checks alone vs. in a batch of 8). Target sets larger than ``batch_size`` are
split into chunks, each with its own corrections, Adam state and schedule; the
training step ``k`` advances chunk ``k mod n_chunks`` once, so every chunk gets
``steps`` steps.

Distributed (``trainer=ddp``): chunk c belongs to process ``c mod world``; each process
advances only its own chunks, no gradient is averaged, and at the end every process
gathers every image's corrections, curves and flags from its owner. Each image is
optimised once, with the result one process would give (``optimised_steps`` counts it).

Resumable: the corrections, the optimisers and the per-image loss (and pixel L1)
curves live in Lightning checkpoints; the frozen networks do not (they are rebuilt
from their files), and a checkpoint made for other targets is refused.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from seeing.frozen import freeze
from seeing.gans.layered import LATENT, LayeredGenerator, module_key
from seeing.models.hybrid import latent_value
from seeing.gans.values import feature_tensor, with_feature
from seeing.reporting import load_format_file, torch_save_atomic

from seeing.reconstruct.lbfgs import PerImageLBFGS
from seeing.reconstruct.losses import ReconstructionLoss

log = logging.getLogger(__name__)

RESULT_FILE = "reconstruction.pt"
RESULT_FORMAT = "seeing.reconstruct/v1"
# submodules rebuilt from their own files on resume, kept out of checkpoints
_FROZEN_PREFIXES = ("generator.", "loss.")
OPTIMIZERS = ("adam", "lbfgs")


def correction_positions(optimize: str, inversion_layers: Sequence[str], latent: bool = False) -> list[str]:
    """Where corrections go: ``none`` -> nowhere, ``z`` -> the latent, ``deltas`` -> the outputs
    of layers 1..n-1 of the inversion layers (plus the latent when ``latent``)."""
    if optimize == "none":
        return []
    if optimize == "z":
        return [LATENT]
    if optimize == "deltas":
        layers = list(inversion_layers)[:-1]
        if not layers:
            raise ValueError("optimize=deltas needs at least two inversion layers (corrections go at 1..n-1)")
        return ([LATENT] if latent else []) + layers
    raise ValueError(f"optimize must be none, z or deltas; got {optimize!r}")


def render(generator: LayeredGenerator, latents: torch.Tensor, deltas: Mapping[str, torch.Tensor],
           record: Sequence[str] = (), latent_name: str = LATENT) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """G from ``latents`` with ``deltas[p]`` added at the output of every position p, and the
    (corrected) feature tensors of the ``record`` positions.

    ``latent_name`` is where the latent enters: "z", or the layer whose output is the searched
    latent (``mapping`` for style-based models, whose latent is w+). Position "z" always means
    that latent.
    """
    t = latents + deltas[LATENT] if LATENT in deltas else latents
    recorded = {LATENT: t} if LATENT in record else {}
    x = t if latent_name == LATENT else latent_value(generator, latent_name, t)
    # (layers before the first correction build no graph: nothing there requires grad)
    for name in generator.layer_names[generator.index(latent_name):]:
        x = generator.layer(name)(x)
        if name in deltas:
            x = with_feature(x, feature_tensor(x) + deltas[name].to(feature_tensor(x).dtype))
        if name in record:
            recorded[name] = feature_tensor(x)
    return x, recorded


def feature_shapes(generator: LayeredGenerator, latent: torch.Tensor, positions: Sequence[str],
                   latent_name: str = LATENT) -> dict[str, tuple]:
    """Per-image shape of each position's feature tensor (probed with one latent)."""
    with torch.no_grad():
        _, rec = render(generator, latent[:1], {}, record=positions, latent_name=latent_name)
    return {p: tuple(rec[p].shape[1:]) for p in positions}


def step_milestones(milestones: Sequence[float], steps: int) -> list[int]:
    """Milestones given as fractions of ``steps`` (< 1) or absolute step numbers (>= 1)."""
    return sorted({int(round(m * steps)) if m < 1 else int(m) for m in milestones})


class _Ticks(Dataset):
    """The optimisation has no data to stream: every batch is a tick; the step count picks the chunk."""

    def __init__(self, n: int):
        self.n = max(1, n)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class Reconstructor(pl.LightningModule):
    """Optimise per-image corrections so that G reproduces ``targets``.

    Args:
        generator: the frozen generator.
        targets: ``(N, 3, S, S)`` images in [-1, 1] at the generator's resolution.
        init_latents: ``(N, *latent_shape)`` starting latents z0.
        positions: where corrections go (see :func:`correction_positions`); empty: no optimisation.
        loss: the per-image objective.
        steps: optimisation steps per image.
        lr, milestones, gamma: Adam's learning rate, stepped down by ``gamma`` at the milestones
            (fractions of ``steps`` or absolute steps).
        batch_size: images optimised together (the chunk size).
        record: positions whose final (corrected) features are exported, e.g. the inversion layers.
        extras: per-image tensors carried to the result file untouched (true latents, labels, ids).
        meta: anything JSON-able describing the run (variant, target source, command).
        latent_name: where the latent enters the generator (see :func:`render`).
        optimizer: ``"adam"``, or ``"lbfgs"``: :class:`~seeing.reconstruct.lbfgs.PerImageLBFGS` (the
            paper's variant e), one L-BFGS iteration per step with ``lr`` its initial step length;
            every image keeps its own history and line search, so images stay independent.
    """

    def __init__(self, generator: LayeredGenerator, targets: torch.Tensor, init_latents: torch.Tensor,
                 positions: Sequence[str], loss: ReconstructionLoss | None = None, steps: int = 3000,
                 lr: float = 0.01, milestones: Sequence[float] = (0.5, 0.75), gamma: float = 0.1,
                 batch_size: int = 8, record: Sequence[str] = (), extras: Mapping[str, Any] | None = None,
                 meta: Mapping[str, Any] | None = None, latent_name: str = LATENT, optimizer: str = "adam"):
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {optimizer!r}")
        self.optimizer_name = optimizer
        if targets.ndim != 4 or targets.shape[1] != 3:
            raise ValueError(f"targets must be N x 3 x H x W, got {tuple(targets.shape)}")
        if targets.shape[-1] != generator.resolution or targets.shape[-2] != generator.resolution:
            raise ValueError(f"targets are {tuple(targets.shape[-2:])} but the generator makes "
                             f"{generator.resolution}x{generator.resolution} images")
        if init_latents.shape[0] != targets.shape[0]:
            raise ValueError(f"{targets.shape[0]} targets but {init_latents.shape[0]} initial latents")
        for p in positions:
            generator.index(p)  # unknown names fail here
        # fixed networks, the same in train and eval mode (seeing.frozen)
        self.generator = freeze(generator)
        self.loss = freeze(loss or ReconstructionLoss())
        self.positions = list(positions)
        self.latent_name = latent_name
        self.steps = int(steps) if self.positions else 0
        self.lr, self.gamma = float(lr), float(gamma)
        self.milestones = step_milestones(milestones, self.steps)
        self.batch_size = int(batch_size)
        if self.batch_size <= 0:
            raise ValueError("batch_size must be positive")
        self.record = list(record)
        self.extras = dict(extras or {})
        self.meta = dict(meta or {})
        self.stage_name = str(self.meta.get("name", "reconstruct"))
        self.automatic_optimization = False
        # frozen networks are left out of checkpoints (see on_save_checkpoint)
        self.strict_loading = False

        n = targets.shape[0]
        self.register_buffer("targets", targets.detach().float().clone())
        self.register_buffer("init_latents", init_latents.detach().float().clone())
        self.register_buffer("loss_curves", torch.full((n, self.steps), float("nan")))
        # the pixel L1 term alone, step by step: comparable across variants whatever else the loss holds
        self.register_buffer("pixel_curves", torch.full((n, self.steps), float("nan")))
        # images whose loss turned non-finite: they keep their last finite corrections (and are counted)
        self.register_buffer("diverged", torch.zeros(n, dtype=torch.bool))
        # optimisation steps each image received (from whichever process owns it): each image once
        self.register_buffer("optimised_steps", torch.zeros(n, dtype=torch.long))
        self._last_good: dict[int, dict[str, torch.Tensor]] = {}
        shapes = feature_shapes(generator, self.init_latents, self.positions, latent_name)
        self.chunks = [(s, min(s + self.batch_size, n)) for s in range(0, n, self.batch_size)]
        self.deltas = nn.ModuleList(
            nn.ParameterDict({module_key(p): nn.Parameter(torch.zeros(e - s, *shapes[p])) for p in self.positions})
            for s, e in self.chunks
        )

    # ------------------------------------------------------------ properties
    @property
    def num_images(self) -> int:
        return self.targets.shape[0]

    # Under DDP every process holds every image but optimises only its own chunks (chunk c belongs
    # to process c % world): each image is optimised once, by one process, exactly as one process
    # would (images are independent problems), and :meth:`gather_shards` collects the results.
    @property
    def _world(self) -> tuple[int, int]:
        return (self.global_rank, self.trainer.world_size) if self._trainer is not None else (0, 1)

    @property
    def own_chunks(self) -> list[int]:
        rank, world = self._world
        return [c for c in range(len(self.chunks)) if c % world == rank]

    @property
    def chunk_slots(self) -> int:
        """Chunks per round on every process (the most any process owns): all take the same steps."""
        return -(-len(self.chunks) // self._world[1])

    @property
    def total_steps(self) -> int:
        return self.steps * self.chunk_slots

    # ------------------------------------------------------------- rendering
    def chunk_deltas(self, c: int) -> dict[str, torch.Tensor]:
        # (parameter containers refuse dots: they hold each position under its module key)
        return {p: self.deltas[c][module_key(p)] for p in self.positions}

    def render_chunk(self, c: int, zero: bool = False, record: Sequence[str] = ()):
        s, e = self.chunks[c]
        deltas = {} if zero else self.chunk_deltas(c)
        return render(self.generator, self.init_latents[s:e], deltas, record, self.latent_name)

    # -------------------------------------------------------------- training
    def on_fit_start(self) -> None:
        if self.device.type == "cuda":  # convolutions run faster channels-last (bf16 tensor cores)
            self.generator.to(memory_format=torch.channels_last)

    def train_dataloader(self) -> StatefulDataLoader:
        # stateful, so a run resumed mid-way continues its ticks rather than starting them again
        return StatefulDataLoader(_Ticks(self.total_steps), batch_size=1)

    def configure_optimizers(self):
        if not self.positions:
            return None
        pairs = []
        for chunk in self.deltas:
            if self.optimizer_name == "lbfgs":
                opt = PerImageLBFGS(chunk.parameters(), lr=self.lr)
            else:
                opt = torch.optim.Adam(chunk.parameters(), lr=self.lr)
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=self.milestones, gamma=self.gamma)
            pairs.append((opt, sched))
        return [o for o, _ in pairs], [s for _, s in pairs]

    def on_train_start(self) -> None:
        from torch.nn.parallel import DistributedDataParallel

        model = self.trainer.model
        if isinstance(model, DistributedDataParallel):
            # process 0's buffers (curves, flags) must not overwrite the rows the others own
            model.broadcast_buffers = False

    def on_train_batch_start(self, batch: Any, batch_idx: int):
        if self.global_step >= self.total_steps:
            self.trainer.should_stop = True
            return -1  # nothing left: skip the rest of the epoch
        return None

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        k = self.global_step
        slot, step = k % self.chunk_slots, k // self.chunk_slots
        own = self.own_chunks
        opts, scheds = self.optimizers(), self.lr_schedulers()
        opts = opts if isinstance(opts, list) else [opts]
        scheds = scheds if isinstance(scheds, list) else [scheds]
        if slot >= len(own):
            # this process owns fewer chunks than another: an optimiser step without gradients moves
            # nothing but counts, so every process stays at the same global step
            opts[0].zero_grad(set_to_none=True)
            opts[0].step()
            if k + 1 >= self.total_steps:
                self.trainer.should_stop = True
            return None
        c = own[slot]
        s, e = self.chunks[c]
        deltas = self.chunk_deltas(c)
        if self.optimizer_name == "lbfgs":
            return self._lbfgs_step(c, step, opts[c], scheds[c], last=k + 1 >= self.total_steps)
        image, _ = render(self.generator, self.init_latents[s:e], deltas, latent_name=self.latent_name)
        terms = self.loss.terms(image, self.targets[s:e], deltas)
        per_image = terms["loss"]
        was_stopped = self.diverged[s:e].clone()
        newly = ~torch.isfinite(per_image.detach()) & ~was_stopped
        stopped = was_stopped | newly
        if newly.any():
            ids = (s + torch.nonzero(newly).flatten()).tolist()
            log.warning("non-finite reconstruction loss at step %d for images %s: keeping their last finite "
                        "corrections and optimising them no further", step, ids)
            if bool(stopped.all()) and all(bool(self.diverged[a:b].all()) for o, (a, b) in enumerate(self.chunks)
                                           if o in own and o != c):
                raise FloatingPointError(f"non-finite reconstruction loss at step {step} for images {ids}, "
                                         f"and no image is left to optimise")
        live_loss = torch.where(stopped, torch.zeros_like(per_image), per_image)
        opts[c].zero_grad(set_to_none=True)
        # each image belongs to one process (see own_chunks): no gradient is averaged across processes
        # (DDP would otherwise wait for every process to backward through this same chunk)
        with getattr(self.trainer.strategy, "block_backward_sync", contextlib.nullcontext)():
            self.manual_backward(live_loss.sum())  # SUM of per-image means: images stay independent
        # these corrections just gave a finite loss; a newly diverged image goes back to its last good ones
        kept = {p: d.detach().clone() for p, d in deltas.items()}
        if stopped.any():
            last = self._last_good.get(c)
            for p, d in deltas.items():
                if newly.any():
                    kept[p][newly] = last[p][newly] if last is not None else 0.0
                if d.grad is not None:
                    d.grad[stopped] = 0.0
        opts[c].step()
        scheds[c].step()
        if stopped.any():
            with torch.no_grad():  # Adam's momentum would still move them
                for p, d in deltas.items():
                    d[stopped] = kept[p][stopped]
        self._last_good[c] = kept
        self.diverged[s:e] = stopped
        self.optimised_steps[s:e] += 1
        nan = torch.full_like(per_image, float("nan"))
        self.loss_curves[s:e, step] = torch.where(stopped, nan, per_image).detach().float()
        self.pixel_curves[s:e, step] = torch.where(stopped, nan, terms["pixel"]).detach().float()
        live = ~stopped
        if live.any():
            self.log("train/loss", per_image.detach()[live].mean(), prog_bar=True)
            self.log("train/pixel", terms["pixel"].detach()[live].mean())
            if "perceptual" in terms:
                self.log("train/perceptual", terms["perceptual"].detach()[live].mean())
        if k + 1 >= self.total_steps:
            self.trainer.should_stop = True
        return live_loss.sum().detach()

    def _lbfgs_step(self, c: int, step: int, opt: Any, sched: Any, last: bool) -> torch.Tensor:
        """One L-BFGS iteration for chunk ``c`` (up to 10 line-search evaluations of its loss).

        The curves record the loss and pixel L1 where the step started, as the Adam steps do.
        Images whose starting loss is not finite are flagged ``diverged`` and never moved; the
        line search accepts only finite values, so no other image can diverge later."""
        import contextlib

        s, e = self.chunks[c]
        deltas = self.chunk_deltas(c)

        def closure():
            opt.zero_grad(set_to_none=True)
            image, _ = render(self.generator, self.init_latents[s:e], deltas, latent_name=self.latent_name)
            terms = self.loss.terms(image, self.targets[s:e], deltas)
            # SUM of per-image losses: each image's gradient is its own; no gradient is shared across
            # processes either (each image belongs to one)
            with getattr(self.trainer.strategy, "block_backward_sync", contextlib.nullcontext)():
                self.manual_backward(terms["loss"].sum())
            return terms["loss"], {"pixel": terms["pixel"]}

        loss, extras = opt.step(closure=closure)
        sched.step()
        frozen = opt.optimizer.frozen() if hasattr(opt, "optimizer") else opt.frozen()
        newly = frozen & ~self.diverged[s:e]
        if newly.any():
            log.warning("non-finite reconstruction loss at the start for images %s: they are not optimised",
                        (s + torch.nonzero(newly).flatten()).tolist())
        self.diverged[s:e] = frozen
        if hasattr(self, "optimised_steps"):  # (counted per image where kept)
            self.optimised_steps[s:e] += 1
        nan = torch.full_like(loss, float("nan"))
        self.loss_curves[s:e, step] = torch.where(frozen, nan, loss)
        self.pixel_curves[s:e, step] = torch.where(frozen, nan, extras["pixel"])
        live = ~frozen
        if live.any():
            self.log("train/loss", loss[live].mean(), prog_bar=True)
            self.log("train/pixel", extras["pixel"][live].mean())
        if last:
            self.trainer.should_stop = True
        return torch.where(frozen, torch.zeros_like(loss), loss).sum()

    @torch.no_grad()
    def on_train_end(self) -> None:
        """Every variant logs where it ended, also the single-pass ones (b, d) that take no step:
        the mean pixel L1 of the initial and final images, so a grid compares all six."""
        self.gather_shards()
        s_initial, s_final = [], []
        for c, (s, e) in enumerate(self.chunks):
            target = self.targets[s:e]
            s_initial.append((self.render_chunk(c, zero=True)[0] - target).abs().flatten(1).mean(1))
            s_final.append((self.render_chunk(c)[0] - target).abs().flatten(1).mean(1))
        metrics = {"final/pixel_l1_initial": float(torch.cat(s_initial).mean()),
                   "final/pixel_l1": float(torch.cat(s_final).mean()),
                   "final/diverged": float(self.diverged.sum())}
        self.final_metrics = metrics  # also what train.py returns to a sweeper (optimized_metric)
        for lg in self.loggers:
            lg.log_metrics(metrics, step=int(self.global_step))

    @torch.no_grad()
    def gather_shards(self) -> None:
        """Every process ends with every image's corrections, curves and flags, each taken from the
        process that optimised it (a collective: all processes call it, from :meth:`on_train_end`)."""
        rank, world = self._world
        if world == 1:
            return
        owner = [c % world for c in range(len(self.chunks))]
        for name in ("loss_curves", "pixel_curves", "diverged"):
            mine = getattr(self, name)
            every = self.all_gather(mine.float() if mine.dtype == torch.bool else mine)  # (world, *shape)
            for c, (s, e) in enumerate(self.chunks):
                mine[s:e] = every[owner[c], s:e].to(mine.dtype)
        for c, chunk in enumerate(self.deltas):
            for d in chunk.values():
                d.copy_(self.all_gather(d.detach())[owner[c]])
        # summed, not taken from the owner: an image optimised by two processes would show it
        self.optimised_steps.copy_(self.all_gather(self.optimised_steps).sum(0))

    # ------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(_FROZEN_PREFIXES)]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        own = {k: v for k, v in self.state_dict().items() if not k.startswith(_FROZEN_PREFIXES)}
        missing = [k for k in own if k not in state]
        wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        if missing or wrong:
            raise ValueError(f"checkpoint does not fit this reconstruction: missing {missing[:4]}, "
                             f"shape mismatch {wrong[:4]} (other targets, variant or steps?)")
        for key in ("targets", "init_latents"):
            if not torch.allclose(state[key].to(own[key]), own[key], atol=1e-5, equal_nan=True):
                raise ValueError(f"checkpoint was made for other {key.replace('_', ' ')}: refusing to resume "
                                 "(delete the run's checkpoints/ to start over)")

    # ----------------------------------------------------------------- result
    @torch.no_grad()
    def result(self) -> dict[str, Any]:
        """Everything the report needs, per image, on the CPU."""
        was_training = self.training
        self.eval()
        initial, final, features, norms = [], [], {p: [] for p in self.record}, {p: [] for p in self.positions}
        for c in range(len(self.chunks)):
            initial.append(self.render_chunk(c, zero=True)[0].float().cpu())
            image, rec = self.render_chunk(c, record=self.record)
            final.append(image.float().cpu())
            for p in self.record:
                features[p].append(rec[p].float().cpu())
            for p, d in self.chunk_deltas(c).items():
                norms[p].append(d.detach().float().pow(2).flatten(1).mean(1).sqrt().cpu())
        self.train(was_training)
        initial_t, final_t = torch.cat(initial), torch.cat(final)
        targets = self.targets.float().cpu()
        initial_l1 = (initial_t - targets).abs().flatten(1).mean(1)
        final_l1 = (final_t - targets).abs().flatten(1).mean(1)
        out = {
            "format": RESULT_FORMAT,
            "targets": targets,
            "initial": initial_t,
            "final": final_t,
            "init_latents": self.init_latents.cpu(),
            "final_latents": self.final_latents().cpu(),
            "positions": list(self.positions),
            "delta_rms": {p: torch.cat(v) for p, v in norms.items()},
            "loss_curves": self.loss_curves.cpu(),
            "pixel_curves": self.pixel_curves.cpu(),
            "initial_pixel_l1": initial_l1,
            "final_pixel_l1": final_l1,
            # the optimisation made these images worse than where they started (too large a step size)
            "worse_than_start": final_l1 > initial_l1,
            "recovered_features": {p: torch.cat(v) for p, v in features.items()},
            "steps": self.steps,
            "steps_done": int(self.global_step) // max(1, self.chunk_slots),
            "diverged": self.diverged.cpu().clone(),
            "optimised_steps": self.optimised_steps.cpu().clone(),
            "meta": dict(self.meta),
            # the run's settings, identity and inputs (set by seeing.pipeline before exporting)
            "provenance": getattr(self, "provenance", None),
        }
        for k, v in self.extras.items():
            out.setdefault(k, v.cpu() if torch.is_tensor(v) else v)
        return out

    def final_latents(self) -> torch.Tensor:
        if LATENT not in self.positions:
            return self.init_latents.clone()
        return torch.cat([self.init_latents[s:e] + self.deltas[c][LATENT].detach()
                          for c, (s, e) in enumerate(self.chunks)])

    def export(self, output_dir: str | Path) -> Path:
        """``reconstruction.pt`` plus per-image PNG strips and a CSV (see :mod:`seeing.reports.missing_objects`)."""
        from seeing.stages.reconstruct_files import write_per_image_files

        result = self.result()
        path = torch_save_atomic(result, Path(output_dir) / RESULT_FILE)
        rows = write_per_image_files(result, Path(output_dir))
        warn_bad_images(result, self.lr, Path(output_dir) / "per_image.csv")
        self.log_tables(result, rows)
        return path

    def log_tables(self, result: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> None:
        """To W&B: the per-image table, and an image table (target | start | reconstruction) beside it."""
        from pytorch_lightning.loggers import WandbLogger

        from seeing.reporting import to_uint8

        strips = [to_uint8(result[k]) for k in ("targets", "initial", "final")]
        for lg in self.loggers:
            if isinstance(lg, WandbLogger):
                columns = list(rows[0]) if rows else []
                lg.log_table("reconstruct/per_image", columns=columns, data=[[r[c] for c in columns] for r in rows])
                import wandb

                lg.log_table("reconstruct/images", columns=["id", "target", "start", "reconstruction",
                                                            "final_pixel_l1"],
                             data=[[r["id"], *(wandb.Image(s[i]) for s in strips), r["final_pixel_l1"]]
                                   for i, r in enumerate(rows)])


def warn_bad_images(result: Mapping[str, Any], lr: float, table: Path) -> None:
    """Log how many images diverged or ended worse than they started, and what to try."""
    def which(flags: torch.Tensor) -> str:
        ids = torch.nonzero(flags).flatten().tolist()
        return ", ".join(map(str, ids[:10])) + (", ..." if len(ids) > 10 else "")

    worse, diverged = result["worse_than_start"], result["diverged"]
    if worse.any():
        log.warning("%d of %d images ended worse than they started (final pixel L1 > initial; images %s, "
                    "flagged worse_than_start in %s): the step size is too large for them; lower stage.lr "
                    "(now %g)", int(worse.sum()), len(worse), which(worse), table, lr)
    if diverged.any():
        log.warning("%d of %d images diverged (non-finite loss; images %s, flagged diverged in %s): lower "
                    "stage.lr (now %g)", int(diverged.sum()), len(diverged), which(diverged), table, lr)


def load_result(path: str | Path) -> dict[str, Any]:
    return load_format_file(path, RESULT_FORMAT, "reconstruction result",
                            f"Re-copy it, re-run `python train.py stage=reconstruct ...` to write it again, or "
                            f"point metric.result at the right {RESULT_FILE}.")
