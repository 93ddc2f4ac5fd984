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
from omegaconf import DictConfig, OmegaConf, open_dict

from seeing.config import instantiate, resolved, run_identity
from seeing.identity import RunIdentity, changed_settings, current_identity
from seeing.provenance import changed_inputs, completed_record, current, finish_run, reset_inputs, start_run
from seeing.stages.trainer import build_trainer
from seeing.third_party import quiet_third_party
from seeing.validation import validate

log = logging.getLogger(__name__)

CHECKPOINT_IDENTITY = "seeing_identity"  # the key IdentityStamp adds to Lightning checkpoints


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a config group that maps names to ``_target_`` configs."""
    if not group:
        return []
    return [hydra.utils.instantiate(c) for c in group.values() if c is not None and "_target_" in c]


def without_logger_callbacks(callbacks: list[Any], loggers: list[Any]) -> list[Any]:
    """With no logger (``~logger``, as lightning-hydra-template turns logging off), the callbacks
    that only feed loggers are left out: Lightning would stop the run in them."""
    from pytorch_lightning.callbacks import DeviceStatsMonitor, LearningRateMonitor

    if loggers:
        return callbacks
    dropped = [c for c in callbacks if isinstance(c, (LearningRateMonitor, DeviceStatsMonitor))]
    if dropped:
        log.info("no logger: left out %s", ", ".join(type(c).__name__ for c in dropped))
    return [c for c in callbacks if c not in dropped]


def resolve_ckpt_path(cfg: DictConfig, identity: RunIdentity | None = None) -> str | None:
    """``ckpt_path=last`` resumes from the stage's own last checkpoint when there is one; any
    checkpoint resumed must have been written by this very identity (:func:`check_checkpoint_identity`)."""
    ckpt = cfg.get("ckpt_path")
    if ckpt in (None, ""):
        return None
    if ckpt == "last":
        last = Path(cfg.output_dir) / "checkpoints" / "last.ckpt"
        if not last.exists():
            log.info("no %s yet: starting fresh", last)
            return None
        path = last
    else:
        path = Path(ckpt)
        if not path.exists():
            raise FileNotFoundError(f"ckpt_path={ckpt} does not exist")
    check_readable_checkpoint(path)
    if identity is not None:
        check_checkpoint_identity(path, identity)
    log.info("resuming from %s", path)
    return str(path)


class IdentityStamp(pl.Callback):
    """Writes the run's identity (digest and settings) into every Lightning checkpoint it saves,
    so a resume can tell whether a checkpoint belongs to the settings it is asked to continue."""

    def __init__(self, identity: RunIdentity):
        self.identity = identity

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_IDENTITY] = {"identity": self.identity.digest, "config": self.identity.config}


def check_checkpoint_identity(path: Path, identity: RunIdentity) -> None:
    """Stop before any work unless ``path`` was saved by a run of ``identity``, naming the settings
    that differ."""
    stamp = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get(CHECKPOINT_IDENTITY)
    if stamp and stamp.get("identity") == identity.digest:
        return
    fix = (f"resume it with the settings it was made with, or start this run fresh with ckpt_path=null "
           f"(this run's folder: {identity.folder})")
    if not stamp:
        raise ValueError(f"{path} records no run identity (written by an older seeing): cannot tell which settings "
                         f"made it, so it is not resumed; {fix}")
    theirs = stamp.get("config") or {}
    differ = changed_settings(identity.config, theirs)
    shown = ", ".join(f"{k} (checkpoint {theirs.get(k, '<absent>')!r}, now {identity.config.get(k, '<absent>')!r})"
                      for k in list(differ)[:6]) + (f", ... ({len(differ)} in all)" if len(differ) > 6 else "")
    raise ValueError(f"{path} was saved by a run with other settings: {shown}; {fix}")


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


def build_loggers(cfg: DictConfig, log_config: bool = True) -> list[Any]:
    """The ``logger`` group; a W&B logger is named for the run, grouped by its grid, typed by its
    stage, and every logger records the resolved config (``log_config=False``: not yet, nothing
    is written; :func:`log_resolved_config` does it)."""
    from pytorch_lightning.loggers import WandbLogger

    loggers = []
    for node in (cfg.get("logger") or {}).values():
        if node is None or "_target_" not in node:
            continue
        wandb = issubclass(hydra.utils.get_class(node._target_), WandbLogger)
        loggers.append(hydra.utils.instantiate(node, **(run_identity(cfg) if wandb else {})))
    if log_config:
        log_resolved_config(cfg, loggers)
    return loggers


def log_resolved_config(cfg: DictConfig, loggers: list[Any]) -> None:
    config = resolved(cfg)
    for lg in loggers:
        lg.log_hyperparams(config)


def log_provenance(loggers: list[Any]) -> None:
    """The run's provenance (identity digest, input files with sha256, seed, version, commit) into
    the W&B config, once the run has read its inputs."""
    from pytorch_lightning.loggers import WandbLogger

    from seeing.provenance import for_logs

    record = for_logs()
    for lg in loggers:
        if record is not None and isinstance(lg, WandbLogger) and lg.experiment is not None:
            lg.experiment.config.update({"provenance": record}, allow_val_change=True)


def checked_trainer(cfg: DictConfig, callbacks: list[Any], loggers: list[Any], module: Any = None,
                    datamodule: Any = None) -> pl.Trainer:
    """The Trainer; a ``trainer.*`` value Lightning refuses (``trainer.precision=64-wrong``) is a mistake
    in the config, reported as one, naming the trainer settings."""
    from hydra.errors import InstantiationException
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    from seeing.errors import UsageError

    try:
        return build_trainer(cfg, without_logger_callbacks(callbacks, loggers), loggers or False, module, datamodule)
    except (InstantiationException, MisconfigurationException) as err:
        cause = err.__cause__ if isinstance(err, InstantiationException) else err
        if not isinstance(cause, (ValueError, TypeError, MisconfigurationException)):
            raise
        raise UsageError(f"a trainer.* setting is refused by Lightning: {cause}") from err


def begin(cfg: DictConfig, name: str) -> tuple[RunIdentity | None, dict[str, Any] | None]:
    """Before any work: the run's identity, its folder pinned into ``cfg.output_dir``, and the record
    of a run of this identity that already completed there (then nothing is to be done unless
    ``force=true``). Nothing is written yet: :func:`claim` does, once the run's parts are built."""
    reset_inputs()  # the inputs this run reads are recorded from here on
    identity = current_identity(cfg)
    if identity is None:  # a config built without Hydra: no identity, the folder as written
        return None, None
    with open_dict(cfg):
        cfg.output_dir = str(identity.folder)
    done = completed_record(identity)
    stale = changed_inputs(done) if done else []
    if stale:  # same settings, other input bytes: the stored result no longer describes them
        log.warning("inputs changed since %s was made (%s): running it again", identity.folder, "; ".join(stale))
        done = None
    if done and not cfg.get("force", False):
        print(f"[{name}] already complete with these settings: {identity.folder}"
              + (f" ({done['summary']})" if done.get("summary") else "")
              + ". Nothing to do; force=true runs it again.")
        return identity, done
    if not identity.is_preset:
        changed = ", ".join(f"{k}={v}" for k, v in list(identity.changed.items())[:8])
        log.info("settings differ from the preset (%s): outputs in %s", changed or "see identity.json", identity.folder)
    return identity, None


def claim(cfg: DictConfig, identity: RunIdentity | None) -> None:
    """The run's parts are built and its work begins: its folder gets identity.json (running) and
    the composed config; a run stopped earlier by a bad setting leaves no folder behind."""
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    if identity is not None:
        start_run(identity, cfg.get("seed"))
    OmegaConf.save(cfg, Path(cfg.output_dir) / "config.yaml", resolve=False)


def objective(cfg: DictConfig, metrics: dict[str, float]) -> Any:
    """What a sweeper minimises: ``metrics[optimized_metric]`` (lightning-hydra-template's convention),
    else the metrics."""
    key = cfg.get("optimized_metric")
    if not key:
        return metrics
    if key not in metrics:
        raise ValueError(f"optimized_metric={key} was not logged by this run; it logged: {', '.join(sorted(metrics))}")
    return metrics[key]


def train(cfg: DictConfig) -> Any:
    quiet_third_party()
    validate(cfg)
    set_threads()
    identity, done = begin(cfg, str(cfg.stage.name))
    if done:
        return objective(cfg, dict(done.get("metrics") or {}))
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = hydra.utils.instantiate(cfg.data) if "data" in cfg else None
    module = instantiate(cfg.stage)
    ckpt_path = resolve_ckpt_path(cfg, identity)
    callbacks = instantiate_group(cfg.get("callbacks")) + ([IdentityStamp(identity)] if identity else [])
    loggers = build_loggers(cfg, log_config=False)  # nothing written yet
    trainer = checked_trainer(cfg, callbacks, loggers, module, datamodule)  # a refused trainer.* setting stops before the claim
    claim(cfg, identity)
    log_resolved_config(cfg, loggers)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    outputs = []
    if hasattr(module, "export") and trainer.is_global_zero:  # written once, by process 0
        module.provenance = current()
        path = module.export(Path(cfg.output_dir))
        outputs.append(str(path))
        log.info("exported %s", path)
        print(f"[{cfg.stage.name}] wrote {path}")
    trainer.strategy.barrier("export")  # the other processes end only once the file is there
    print(f"[{cfg.stage.name}] outputs in {cfg.output_dir}")
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    metrics.update(getattr(module, "final_metrics", None) or {})
    log_provenance(loggers)
    finish_run(outputs, metrics)
    for lg in loggers:
        if hasattr(lg, "experiment") and hasattr(lg.experiment, "finish"):
            lg.experiment.finish()
    return objective(cfg, metrics)


def evaluate(cfg: DictConfig) -> Any:
    """Each ``metric`` config names a ``run`` function taking the whole config; a ``check(cfg)``
    function beside it (the FSD report's opens both image sources) runs before the folder is claimed."""
    quiet_third_party()
    validate(cfg)
    set_threads()
    identity, done = begin(cfg, str(cfg.metric.name))
    if done:
        return done.get("metrics")
    run = hydra.utils.get_method(cfg.metric.run)
    check = getattr(__import__(run.__module__, fromlist=["check"]), "check", None)
    if callable(check):
        check(cfg)
    claim(cfg, identity)
    result = run(cfg)
    print(f"[{cfg.metric.name}] outputs in {cfg.output_dir}")
    finish_run([], summary_numbers(result), summary_line(result))
    return result


def summary_numbers(result: Any) -> dict[str, float]:
    """The scalar numbers of an evaluation's result (kept in identity.json)."""
    if not isinstance(result, dict):
        return {}
    return {k: float(v) for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def summary_line(result: Any) -> str:
    numbers = summary_numbers(result)
    return ", ".join(f"{k} {v:.4g}" for k, v in list(numbers.items())[:4])
