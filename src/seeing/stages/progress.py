"""A progress bar that counts optimisation steps against the stage's step budget.

Every stage here runs one endless (or single) epoch and stops on a step budget, so
Lightning's epoch counter ("Epoch 0/-2") says nothing; this bar shows
``<stage> step 1200/3000`` instead, resumed runs included (it reads the global step).
"""
from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar


def step_budget(trainer: pl.Trainer, module: pl.LightningModule) -> int | None:
    """The number of optimisation steps the run will take: ``trainer.max_steps`` when set, else
    what the module plans itself (the reconstruct stage: steps x chunks), else unknown."""
    if trainer.max_steps is not None and trainer.max_steps >= 0:
        own = getattr(module, "total_steps", None)
        return min(trainer.max_steps, own) if isinstance(own, int) else trainer.max_steps
    own = getattr(module, "total_steps", None)
    return own if isinstance(own, int) else None


class StepProgressBar(TQDMProgressBar):
    """TQDM bar over global steps of the step budget (see module docstring)."""

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        super().on_train_epoch_start(trainer)
        module = trainer.lightning_module
        bar = self.train_progress_bar
        bar.reset(total=step_budget(trainer, module))
        bar.n = trainer.global_step
        bar.set_description(f"{getattr(module, 'stage_name', type(module).__name__)} step")
        bar.refresh()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        bar = self.train_progress_bar
        n = trainer.global_step
        if bar is not None and self._should_update(n, bar.total):
            bar.n = n
            bar.set_postfix(self.get_metrics(trainer, pl_module))
            bar.refresh()
