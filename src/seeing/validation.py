"""What a run is given, checked before any work: for a single run by the pipeline, for every job of
a multirun before the first one starts (:class:`CheckEveryJob`, a Hydra callback).

- mandatory values (``???``) the run reads are set (:func:`seeing.config.check_config`);
- the numbers are in range (:func:`check_numbers`: a batch size is a whole number >= 1, a learning
  rate is positive, ...); every stage also checks its own numbers when it is built, so library
  use is covered too;
- no choice is made that nothing reads (:func:`check_choices_are_read`: ``real=`` with
  ``stage.targets.kind=generated``, ``+real=`` for a stage that reads no photos).
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

from seeing.errors import StopBeforeWork, UsageError, mistake_message

# setting name (the last part of its key) -> (kind, bound): "whole" >= bound, "positive" > 0,
# "non-negative" >= 0, "fraction" in [0, 1), "size" a whole number >= 1 or auto
RULES: dict[str, tuple[str, float]] = {
    **{k: ("whole", 1) for k in ("batch_size", "val_batch_size", "real_batch_size", "segment_batch_size",
                                 "val_size", "real_val_size", "count", "n", "num_samples",
                                 "n_critic", "checkpoint_every", "min_images", "max_rows",
                                 "train_length", "val_length", "test_length", "resamples")},
    # 0 allowed: no steps, no figure, never (sample_every=0 writes no sample grids)
    **{k: ("whole", 0) for k in ("steps", "warmup_steps", "grid_size", "figure_images", "top_k", "sample_every",
                                 "max_nonfinite_steps", "offset", "shuffle_seed")},
    **{k: ("positive", 0) for k in ("lr", "gamma")},
    **{k: ("non-negative", 0) for k in ("weight_decay", "min_fraction", "min_region", "min_covered",
                                        "min_real_area", "augment_strength")},
    "ema_beta": ("fraction", 0),
    "resolution": ("size", 1),
}
# settings under these roots are checked; a nested node with a _target_ is an object built for the
# run (a generator, an image source): its own constructor checks its arguments
ROOTS = ("stage", "data", "metric")


def _describe(kind: str, bound: float) -> str:
    return {"whole": f"a whole number >= {int(bound)}", "positive": "a positive number",
            "non-negative": "a number >= 0", "fraction": "a number in [0, 1)",
            "size": "a whole number of pixels >= 1, or auto"}[kind]


def _fits(value: Any, kind: str, bound: float) -> bool:
    if kind == "size" and value == "auto":
        return True
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    if kind in ("whole", "size"):
        return value == int(value) and value >= bound
    if kind == "positive":
        return value > 0
    if kind == "fraction":
        return 0 <= value < 1
    return value >= 0


def rule_for(name: str) -> tuple[str, float] | None:
    if name in RULES:
        return RULES[name]
    if name.endswith("_weight"):  # loss weights (pixel, perceptual, delta, gp, ...)
        return ("non-negative", 0)
    return None


def check_numbers(values: Mapping[str, Any], prefix: str) -> None:
    """Every entry of ``values`` (nested mappings too, except objects' configs, those with a
    ``_target_``) whose name has a rule must fit it, and every entry of a ``weights`` mapping is
    a number >= 0; None means "not set" and is left to its reader. The error names the setting as
    it is written on the command line: ``stage.batch_size=-1``."""
    weights = prefix.rsplit(".", 1)[-1] == "weights"
    for name, value in values.items():
        key = f"{prefix}.{name}"
        if isinstance(value, Mapping):
            if "_target_" not in value:
                check_numbers(value, key)
            continue
        rule = ("non-negative", 0) if weights else rule_for(str(name))
        if rule is not None and value is not None and not _fits(value, *rule):
            raise UsageError(f"{key}={value!r}: must be {_describe(*rule)}")


def _plain(cfg: DictConfig, root: str) -> dict[str, Any]:
    """``cfg[root]`` as plain values: nodes with a ``_target_`` below the root are left out
    unresolved (building them is their constructors' business)."""
    node = cfg[root]
    out: dict[str, Any] = {}
    for key in node.keys():
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_interpolation() and "_target_" in child:
            continue
        value = OmegaConf.select(cfg, f"{root}.{key}")
        if isinstance(value, DictConfig) and "_target_" in value:
            continue
        out[str(key)] = OmegaConf.to_container(value, resolve=True) if isinstance(
            value, (DictConfig, ListConfig)) else value
    return out


def _source_name(node: Any) -> str:
    target = str(node.get("_target_", "")) if isinstance(node, Mapping) else ""
    return {"ScenesSource": "scenes", "ImageFolderSource": "folder", "LSUNSource": "lsun",
            "GeneratorSource": "generator"}.get(target.rsplit(".", 1)[-1], target.rsplit(".", 1)[-1] or "?")


def check_choices_are_read(cfg: DictConfig) -> None:
    """A chosen image source that the run would not read is an error, not silently ignored."""
    stage = cfg.get("stage")
    real = OmegaConf.select(cfg, "real", default=None)
    if real is not None and stage is not None:
        chosen = f"real={_source_name(real)}"
        if "targets" in stage:
            if OmegaConf.select(cfg, "stage.targets.kind") == "generated":
                raise UsageError(f"{chosen} is not read: stage.targets.kind=generated reconstructs the model's own "
                                 f"samples. Drop {chosen}, or reconstruct its photos with stage.targets.kind=real")
        elif "real_source" in stage:
            if not (OmegaConf.select(cfg, "stage.weights.real_pixel", default=0) or 0) > 0:
                raise UsageError(f"{chosen} is not read: stage={stage.get('name')} uses real photos only with "
                                 f"stage.weights.real_pixel > 0 (e.g. stage.weights.real_pixel=5). Set it, or "
                                 f"drop {chosen}")
        else:
            raise UsageError(f"{chosen} is not read: stage={stage.get('name')} reads no photos. Drop {chosen}")
    metric = cfg.get("metric")
    if metric is not None and stage is None:
        for side in ("real", "fake"):
            if OmegaConf.select(cfg, side, default=None) is not None and metric.get("name") != "fsd":
                raise UsageError(f"{side}={_source_name(cfg[side])} is not read: metric={metric.get('name')} "
                                 f"compares no image sources (metric=fsd does). Drop it")


def validate(cfg: DictConfig, skip: Sequence[str] = ()) -> None:
    """Everything about ``cfg`` that can be checked before anything is built (module docstring);
    ``skip``: top-level keys not to resolve (a multirun job's output_dir is resolved by its job)."""
    from seeing.config import check_config

    check_config(cfg, [k for k in cfg.keys() if k != "model" and k not in skip])
    for root in ROOTS:
        if isinstance(cfg.get(root), DictConfig):
            check_numbers(_plain(cfg, root), root)
    check_choices_are_read(cfg)


# ------------------------------------------------------------------------------ a multirun's jobs
try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - Hydra < 1.1
    _HydraCallback = object


def sweep_jobs(task_overrides: Iterable[str]) -> list[list[str]] | None:
    """Each job's overrides, as Hydra's basic sweeper will run them (None when they cannot be
    listed up front: a range or interval sweep, which only a search sweeper takes)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(task_overrides))
    if any(o.is_sweep_override() and not o.is_discrete_sweep() for o in parsed):
        return None
    return BasicSweeper.split_arguments(parsed, None)[0]


class CheckEveryJob(_HydraCallback):
    """A Hydra callback (conf/train.yaml, conf/evaluate.yaml): before a multirun's first job starts,
    compose every job's config and :func:`validate` it, so a bad value in the last job stops the
    grid before the first job has run and written its outputs. Only for Hydra's basic sweeper, whose
    jobs are known up front (a search sweeper's trials are checked as each one starts)."""

    def on_multirun_start(self, config: DictConfig, config_name: str | None = None, **kwargs: Any) -> None:
        sweeper = str(OmegaConf.select(config, "hydra.sweeper._target_", default=""))
        if not sweeper.endswith("BasicSweeper") or config_name is None:
            return
        jobs = sweep_jobs(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))
        if not jobs:
            return
        from hydra import compose

        swept = [k for k, v in _varying(jobs).items() if v]
        for i, job in enumerate(jobs, start=1):
            try:
                validate(compose(config_name=config_name, overrides=job), skip=("output_dir", "job_type"))
            except Exception as err:  # noqa: BLE001 - a bug here is found again when the job runs
                message = mistake_message(err)
                if message is None:
                    return
                which = " ".join(o for o in job if o.split("=", 1)[0].lstrip("+~") in swept)
                job_name = f"job {i} of {len(jobs)}" + (f" ({which})" if which else "")
                raise StopBeforeWork(err, f"{job_name}: {message.rstrip('.')}; no job was run") from err


def _varying(jobs: list[list[str]]) -> dict[str, bool]:
    """Override key -> whether its value differs between jobs."""
    values: dict[str, set[str]] = {}
    for job in jobs:
        for o in job:
            key, _, value = o.partition("=")
            values.setdefault(key.lstrip("+~"), set()).add(value)
    return {k: len(v) > 1 for k, v in values.items()}
