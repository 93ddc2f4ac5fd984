"""The Lightning Trainer every stage runs under, built from the ``trainer`` config group."""
from __future__ import annotations

from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig


def build_trainer(cfg: DictConfig, callbacks: list[Any], loggers: list[Any] | bool,
                  module: Any = None) -> pl.Trainer:
    """``cfg.trainer`` as a Trainer. A progress-bar callback is left out when the trainer is
    told to show none (``trainer.enable_progress_bar=false``), which Lightning would refuse.
    With the ``module`` it will fit, the logging interval is at most the run's step budget:
    a run shorter than ``trainer.log_every_n_steps`` logs its last step (Lightning would log
    nothing of it, and warn)."""
    from pytorch_lightning.callbacks.progress import ProgressBar

    from seeing.progress import planned_steps

    if not cfg.trainer.get("enable_progress_bar", True):
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    extra = {}
    every = cfg.trainer.get("log_every_n_steps")
    budget = planned_steps(cfg.trainer.get("max_steps"), module) if module is not None else None
    if every is not None and budget is not None and budget < int(every):
        extra["log_every_n_steps"] = max(1, budget)  # a run of no steps still runs one batch
    return hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers, **extra)
