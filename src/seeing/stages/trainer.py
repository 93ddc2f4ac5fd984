"""The Lightning Trainer every stage runs under, built from the ``trainer`` config group."""
from __future__ import annotations

from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig


def batches_per_epoch(cfg: DictConfig, datamodule: Any) -> int | None:
    """Training batches one process sees in an epoch of ``datamodule`` (a scenes datamodule: its
    ``train_set`` in batches of ``batch_size``, the last partial one dropped), else unknown."""
    dataset, batch = getattr(datamodule, "train_set", None), getattr(datamodule, "batch_size", None)
    if dataset is None or not isinstance(batch, int) or batch <= 0:
        return None
    devices, nodes = cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1)
    world = devices * nodes if isinstance(devices, int) and isinstance(nodes, int) and devices > 0 else 1
    return len(dataset) // (batch * world)


def build_trainer(cfg: DictConfig, callbacks: list[Any], loggers: list[Any] | bool,
                  module: Any = None, datamodule: Any = None) -> pl.Trainer:
    """``cfg.trainer`` as a Trainer. A progress-bar callback is left out when the trainer is
    told to show none (``trainer.enable_progress_bar=false``), which Lightning would refuse.
    With the ``module`` it will fit, the logging interval is at most the run's step budget:
    a run shorter than ``trainer.log_every_n_steps`` logs its last step (Lightning would log
    nothing of it, and warn). With the ``datamodule`` it is also at most one epoch, which Lightning
    warns about otherwise (a smoke run on a few scenes)."""
    from pytorch_lightning.callbacks.progress import ProgressBar

    from seeing.progress import planned_steps

    if not cfg.trainer.get("enable_progress_bar", True):
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    extra = {}
    every = cfg.trainer.get("log_every_n_steps")
    budget = planned_steps(cfg.trainer.get("max_steps"), module) if module is not None else None
    limits = [n for n in (budget, batches_per_epoch(cfg, datamodule)) if n is not None]
    if every is not None and limits and min(limits) < int(every):
        extra["log_every_n_steps"] = max(1, min(limits))  # a run of no steps still runs one batch
    return hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers, **extra)
