"""The Lightning loggers the ``logger`` config group names (conf/logger/)."""
from __future__ import annotations

from typing import Any

from pytorch_lightning.loggers import WandbLogger as LightningWandbLogger


class WandbLogger(LightningWandbLogger):
    """Lightning's W&B logger without the ``anonymous=None`` it always hands to ``wandb.init``
    (pytorch-lightning 2.6.6): W&B >= 0.19 deprecated that setting and warns whenever it is given,
    even unset. Every argument is Lightning's."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)
