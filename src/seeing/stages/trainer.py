"""The Lightning Trainer every stage runs under, built from the ``trainer`` config group."""
from __future__ import annotations

from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig


def build_trainer(cfg: DictConfig, callbacks: list[Any], loggers: list[Any] | bool) -> pl.Trainer:
    """``cfg.trainer`` as a Trainer. A progress-bar callback is left out when the trainer is
    told to show none (``trainer.enable_progress_bar=false``), which Lightning would refuse."""
    from pytorch_lightning.callbacks.progress import ProgressBar

    if not cfg.trainer.get("enable_progress_bar", True):
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    return hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
