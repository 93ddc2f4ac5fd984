"""The config surface: OmegaConf resolvers the YAML files use, and the checks every run makes
before any work.

Resolvers (registered on import; ``train.py`` and ``evaluate.py`` import this module):

* ``${model_id:name,checkpoint}``: what names a model's outputs, ``runs/<model_id>/<stage>/``:
  the model name, plus the checkpoint file's stem when one is given, so two checkpoints of one
  architecture never share a folder;
* ``${model_args:name,checkpoint}``: the command-line words that select the model, for complete
  commands in error messages;
* ``${path_stem:path}``: a file or folder name without its suffix (names folder/LSUN sources);
* ``${side_offset:real_value,fake_value}``: for a source config placed under ``fake``, the second
  value, else the first. One source definition serves ``real=`` and ``fake=``; a synthetic
  world drawn on both sides must not draw the same images twice;
* ``${run_dir:readable}``: the folder of this run's identity: the readable path for the preset's
  run, else a sibling named for what changed (:mod:`seeing.identity`);
* ``${inversion_preset:checkpoint,model}``: the default ``model.inversion_layers`` of a model
  whose checkpoint formats name their layers differently (``model=stylegan2``: genforce, NVlabs,
  rosinality), recognised from the file (:func:`seeing.gans.loading.inversion_preset`);
* ``${reconstruct_targets:kind,chosen,default,model_args}``: the photos ``stage=reconstruct``
  reconstructs: none for ``kind=generated``, else the ``real=`` source when one was chosen, else
  the recipe's default (the embedded world's held-out scenes); a public model's recipe has
  none, and the run stops (:class:`RequiredChoice`) naming the overrides to add.

Checks (:func:`check_config`): a mandatory value (``???``) that the run reads is unset.
Unknown group options (``variant=z``) and unknown keys (``stage.lr_typo=1``) are refused by
Hydra itself before this module is reached; keys the stage module does not take are refused
when it is built (every stage config *is* its module's keyword arguments).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue


UNSET = "__unset__"  # what the model configs pass for a checkpoint left at ???


def unset_checkpoint_message(name: str) -> str:
    return (f"model={name} loads a local file: add model.checkpoint=/path/to/weights.pth "
            f"(conf/model/{name}.yaml lists the public files it accepts)")


def model_id(name: str, checkpoint: str | None) -> str:
    if checkpoint == UNSET:  # the folder is named for the checkpoint: without one there is no folder
        raise ValueError(unset_checkpoint_message(str(name)))
    return str(name) if checkpoint in (None, "") else f"{name}-{Path(str(checkpoint)).stem}"


def path_stem(path: str) -> str:
    return Path(str(path)).stem


def side_offset(real_value: Any, fake_value: Any, *, _parent_: Any) -> Any:
    return fake_value if _parent_ is not None and _parent_._key() == "fake" else real_value


class RequiredChoice(ValueError):
    """A choice the run needs that has no default for this model (raised while resolving)."""


def missing_targets_message(model_args: str = "") -> str:
    """What to add when a reconstruction has no photos to reconstruct."""
    who = f" of {model_args}" if model_args else ""
    return (f"stage=reconstruct{who} has no default photos (the paper's recipe names none): add "
            f"real=folder real.path=/path/to/photos or real=lsun real.path=/path/to/lmdb, or reconstruct "
            f"the model's own samples with stage.targets.kind=generated")


def reconstruct_targets(kind: str, chosen: Any, default: Any, model_args: str = "") -> Any:
    if kind != "real":
        return None  # generated targets read no image source
    if chosen is not None:
        return chosen
    if default is not None:
        return default
    raise RequiredChoice(missing_targets_message(model_args))


def inversion_preset(checkpoint: Any, model: str) -> list[str]:
    from seeing.gans.loading import inversion_preset as preset  # (torch is imported on first use only)

    return preset(checkpoint, model)


def register_resolvers() -> None:
    from seeing.identity import run_dir
    from seeing.stage_files import model_args

    for name, fn in (("model_id", model_id), ("model_args", model_args), ("path_stem", path_stem),
                     ("side_offset", side_offset), ("reconstruct_targets", reconstruct_targets),
                     ("run_dir", run_dir), ("inversion_preset", inversion_preset)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()


# ------------------------------------------------------------------------------ checks
def _leaves(node: Any, prefix: str) -> Iterable[str]:
    if isinstance(node, DictConfig):
        for key in node.keys():
            yield from _leaves_of(node, key, f"{prefix}{key}")
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            yield from _leaves_of(node, i, f"{prefix}{i}")


def _leaves_of(parent: Any, key: Any, path: str) -> Iterable[str]:
    child = parent._get_node(key)
    if isinstance(child, (DictConfig, ListConfig)) and not child._is_interpolation():
        yield from _leaves(child, f"{path}.")
    else:
        yield path


def unset_keys(cfg: DictConfig, roots: Iterable[str]) -> list[str]:
    """The mandatory (``???``) values a run reads: every leaf under ``roots`` is resolved, and
    each one that is, or interpolates from, a missing value names that value. A missing value
    that nothing under ``roots`` reads (e.g. ``model.checkpoint`` of an ablation that was given
    its runs folder) is not reported."""
    missing: dict[str, None] = {}
    for root in roots:
        if root not in cfg:
            continue
        for path in _leaves(cfg[root], f"{root}.") if isinstance(cfg[root], (DictConfig, ListConfig)) else [root]:
            try:
                OmegaConf.select(cfg, path, throw_on_missing=True)
            except MissingMandatoryValue as err:
                missing[str(getattr(err, "full_key", "") or path)] = None
            except InterpolationResolutionError as err:
                cause = err.__cause__
                if isinstance(cause, MissingMandatoryValue):
                    missing[str(getattr(cause, "full_key", "") or path)] = None
                elif isinstance(cause, RequiredChoice):
                    raise cause from None
                elif isinstance(cause, ValueError) and str(cause) == unset_checkpoint_message(cfg.model.name):
                    missing["model.checkpoint"] = None
                else:
                    raise
    return list(missing)


def check_config(cfg: DictConfig, roots: Iterable[str]) -> None:
    """Fail before anything is built when a mandatory setting the run reads is unset, naming
    the override to add."""
    missing = unset_keys(cfg, roots)
    if not missing:
        return
    hints = []
    if "model.checkpoint" in missing:
        hints.append(unset_checkpoint_message(cfg.model.get("name", "?")))
    for side in ("real", "fake"):
        if f"{side}.path" in missing:
            hints.append(f"{side}={cfg[side].get('_target_', '?').rsplit('.', 1)[-1]} reads files: add "
                         f"{side}.path=/path/to/images")
    if "segmenter.path" in missing:
        hints.append(f"segmenter={cfg.segmenter.get('name', '?')} reads local weights: add "
                     f"segmenter.path=/path/to/its/folder (conf/segmenter/{cfg.segmenter.get('name', '?')}.yaml "
                     f"says what it holds)")
    if "trainer.devices" in missing:
        hints.append("Say how many devices (GPUs per node) it runs on: add trainer.devices=N")
    raise ValueError(f"missing required settings: {', '.join(missing)}." + "".join(f" {h}." for h in hints))


# ------------------------------------------------------------------------------ building
def instantiate(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, but an error that names a file or setting (FileNotFoundError,
    ValueError) surfaces as the builder raised it rather than wrapped in Hydra's
    InstantiationException; other errors (an unexpected keyword: a key nothing reads) keep Hydra's
    message, which names the target."""
    import hydra
    from hydra.errors import InstantiationException

    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, (FileNotFoundError, ValueError)) and not isinstance(cause, InstantiationException):
            raise cause from None
        raise


# ------------------------------------------------------------------------------ run identity
def resolved(cfg: DictConfig) -> dict[str, Any]:
    """The config as plain values, every interpolation resolved where it can be (a top-level
    group that reads an unset value nobody needed is kept unresolved rather than failing)."""
    out: dict[str, Any] = {}
    for key in cfg.keys():
        node = cfg._get_node(key)
        try:
            value = OmegaConf.select(cfg, str(key), throw_on_missing=True)
            out[str(key)] = OmegaConf.to_container(value, resolve=True) if isinstance(
                value, (DictConfig, ListConfig)) else value
        except Exception:  # noqa: BLE001 - unresolvable here means unread by this run
            out[str(key)] = OmegaConf.to_container(node, resolve=False) if isinstance(
                node, (DictConfig, ListConfig)) else str(node._value())
    return out


def run_identity(cfg: DictConfig) -> dict[str, str]:
    """How a run shows up in W&B: ``name`` = its output folder (relative to the run root),
    ``group`` = its multirun grid (Hydra's sweep folder) or, for a single run, its name,
    ``job_type`` = the stage or metric."""
    out, root = Path(str(cfg.output_dir)), Path(str(cfg.paths.run_root))
    name = str(out.relative_to(root)) if out.is_relative_to(root) else out.name
    group = name
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            group = "grid-" + Path(HydraConfig.get().sweep.dir).name
    except ValueError:  # no Hydra run (a library call): the run is its own group
        pass
    return {"name": name, "group": group, "job_type": str(cfg.get("job_type", ""))}


# ------------------------------------------------------------------------------ before Hydra writes
def unwritable_folder_problem(path: str | Path) -> str | None:
    """Why files cannot be written under ``path`` (made if missing), or None: a temporary file is
    created and removed."""
    import tempfile

    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        return f"{type(err).__name__}: {err}"
    return None


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - Hydra < 1.1
    _HydraCallback = object


class CheckRunRoot(_HydraCallback):
    """A Hydra callback (conf/train.yaml, conf/evaluate.yaml): before Hydra creates a run's folder
    (and would fail there with a bare OSError), check that ``paths.run_root`` can be written, and
    say which key to change."""

    def _check(self, config: DictConfig) -> None:
        root = OmegaConf.select(config, "paths.run_root")
        problem = unwritable_folder_problem(root) if root else None
        if problem:
            from seeing.errors import StopBeforeWork, UsageError

            # a SystemExit: Hydra turns a callback's exceptions into warnings and goes on to fail anyway
            raise StopBeforeWork(UsageError(f"paths.run_root={root} cannot be written ({problem}): make it writable "
                                            f"or point paths.run_root (or $SEEING_RUNS) at a folder you can write"))

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)
