"""What `train.py` and `evaluate.py` do with a composed config.

Training is the same for every stage: ``cfg.stage`` is a LightningModule's config (its
``_target_`` and keyword arguments), ``cfg.data`` the LightningDataModule when the stage
reads data, ``cfg.trainer`` the Trainer; this file checks the config, builds them with the
loggers and callbacks, and fits. A module that has an ``export(output_dir)`` method writes its
compact result file (the weights later stages load) after fitting. Evaluation calls the
``run`` function its metric config names.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from seeing.config import check_config, instantiate, resolved, run_identity
from seeing.stages.trainer import build_trainer

log = logging.getLogger(__name__)


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a config group that maps names to ``_target_`` configs."""
    if not group:
        return []
    return [hydra.utils.instantiate(c) for c in group.values() if c is not None and "_target_" in c]


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """``ckpt_path=last`` resumes from the stage's own last checkpoint when there is one."""
    ckpt = cfg.get("ckpt_path")
    if ckpt in (None, ""):
        return None
    if ckpt == "last":
        last = Path(cfg.output_dir) / "checkpoints" / "last.ckpt"
        if last.exists():
            check_readable_checkpoint(last)
            log.info("resuming from %s", last)
            return str(last)
        log.info("no %s yet: starting fresh", last)
        return None
    if not Path(ckpt).exists():
        raise FileNotFoundError(f"ckpt_path={ckpt} does not exist")
    check_readable_checkpoint(Path(ckpt))
    return str(ckpt)


def check_readable_checkpoint(path: Path) -> None:
    """A Lightning checkpoint is a zip archive whose directory sits at its end: a copy cut short
    (an interrupted save or transfer) has none, and is refused here, before any work."""
    import zipfile

    if not zipfile.is_zipfile(path):
        others = sorted(p.name for p in path.parent.glob("*.ckpt") if p != path)
        raise ValueError(f"{path} ({path.stat().st_size} bytes) is not a readable Lightning checkpoint (truncated or "
                         f"damaged). Resume from an earlier one with ckpt_path=<file>"
                         + (f" (in {path.parent}: {', '.join(others)})" if others else "")
                         + f", or start fresh: drop ckpt_path (or delete {path})")


def set_threads() -> None:
    """Respect SEEING_THREADS on shared CPU machines (torch otherwise takes every core)."""
    n = os.environ.get("SEEING_THREADS")
    if n:
        torch.set_num_threads(int(n))


def build_loggers(cfg: DictConfig) -> list[Any]:
    """The ``logger`` group; a W&B logger is named for the run, grouped by its grid, typed by its
    stage, and every logger records the resolved config."""
    from pytorch_lightning.loggers import WandbLogger

    loggers = []
    for node in (cfg.get("logger") or {}).values():
        if node is None or "_target_" not in node:
            continue
        wandb = hydra.utils.get_class(node._target_) is WandbLogger
        loggers.append(hydra.utils.instantiate(node, **(run_identity(cfg) if wandb else {})))
    config = resolved(cfg)
    for lg in loggers:
        lg.log_hyperparams(config)
    return loggers


def train(cfg: DictConfig) -> dict[str, float]:
    check_config(cfg, [k for k in cfg.keys() if k != "model"])
    set_threads()
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, Path(cfg.output_dir) / "config.yaml", resolve=False)

    datamodule = hydra.utils.instantiate(cfg.data) if "data" in cfg else None
    module = instantiate(cfg.stage)
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = build_loggers(cfg)
    trainer = build_trainer(cfg, callbacks, loggers or False)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resolve_ckpt_path(cfg))
    if hasattr(module, "export") and trainer.is_global_zero:  # written once, by process 0
        path = module.export(Path(cfg.output_dir))
        log.info("exported %s", path)
        print(f"[{cfg.stage.name}] wrote {path}")
    trainer.strategy.barrier("export")  # the other processes end only once the file is there
    print(f"[{cfg.stage.name}] outputs in {cfg.output_dir}")
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    for lg in loggers:
        if hasattr(lg, "experiment") and hasattr(lg.experiment, "finish"):
            lg.experiment.finish()
    return metrics


def evaluate(cfg: DictConfig) -> Any:
    """Each ``metric`` config names a ``run`` function taking the whole config."""
    check_config(cfg, [k for k in cfg.keys() if k != "model"])
    set_threads()
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, Path(cfg.output_dir) / "config.yaml", resolve=False)
    run = hydra.utils.get_method(cfg.metric.run)
    result = run(cfg)
    print(f"[{cfg.metric.name}] outputs in {cfg.output_dir}")
    return result
