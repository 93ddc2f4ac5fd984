"""Where stages write their files and how later stages find them: the one finder.

Stage ``s`` of a model writes ``<run_root>/<model id>/<s>/<s>.pt`` (the model id is the model
name plus its checkpoint's stem, see :mod:`seeing.config`). A later stage takes a file named
explicitly, else that convention's file, else (for the embedded world) the shipped
``seeing/assets/<model id>_<s>.pt``. A missing file is an error naming every place looked at
and the complete command that makes it.
"""
from __future__ import annotations

from pathlib import Path

import logging

from omegaconf import OmegaConf

from seeing.assets import asset

log = logging.getLogger(__name__)

# how each kind of stage file is made ({model} = the command-line words selecting the model)
MAKE_COMMANDS = {
    "hybrid": ("python train.py -m {model} stage=layer1,layer2,layer3,layer4,encoder "
               "&& python train.py {model} stage=hybrid"),
}


def model_args(name: str, checkpoint: str | None) -> str:
    """The command-line words that select a model: ``model=progan model.checkpoint=/w/x.pth``."""
    return f"model={name}" + (f" model.checkpoint={checkpoint}" if checkpoint else "")


def stage_output_path(run_root: str | Path, model_id: str, stage: str) -> Path:
    """Where stage ``stage`` of the model ``model_id`` writes its file."""
    return Path(run_root) / model_id / stage / f"{stage}.pt"


def make_command(stage: str, model: str, run_root: str | Path) -> str:
    """The complete command that makes ``stage``'s file (every part of it given the model and run root)."""
    words = model + ("" if str(run_root) == "runs" else f" paths.run_root={run_root}")
    return MAKE_COMMANDS.get(stage, "python train.py {model} stage=" + stage).format(model=words)


# overrides that shape every stage's result alike (trainer=gpu, model.*, recipe.*, seed)
CARRIED_ROOTS = ("trainer", "model", "recipe", "seed")
_ABSENT = object()
MODEL_NAMING = ("model", "model.checkpoint")
# the current run's own choices, never applied to another stage
OWN_CHOICES = ("stage", "stage.name", "variant")


def expected_identities(stage: str) -> list[str]:
    """The identity digests a file of ``stage`` is taken from, most wanted first: ``stage`` made
    with the current Hydra run's overrides (those that apply to it: a smoke chain with
    ``trainer.max_steps=30 stage.batch_size=8`` finds its own earlier files), then with its
    ``trainer``/``model``/``recipe``/``seed`` overrides alone, then the stage's preset for the
    model. Empty outside a Hydra run."""
    from seeing.identity import compose, hydra_run, identity_config, identity_digest, ignored, override_key, \
        parse_overrides

    run = hydra_run()
    if run is None:
        return []
    model, carried, others = [], [], []
    for text, parsed in zip(run[1], parse_overrides(run[1])):
        key = override_key(parsed)
        if key in MODEL_NAMING or ignored(key):
            model.append(text)
        elif key in OWN_CHOICES:
            continue
        else:
            (carried if key.split(".")[0] in CARRIED_ROOTS else others).append((text, parsed))
    try:
        base = compose("train", [*model, f"stage={stage}"])
    except Exception:  # noqa: BLE001 - no such stage for this model: nothing to expect
        return []
    # only settings that stage has (+additions and other stages' own keys stay with the current run)
    others = [text for text, parsed in others if not parsed.is_add() and has_key(base, override_key(parsed))]
    carried = [text for text, _ in carried]
    digests: list[str] = []
    for overrides in dict.fromkeys((tuple(carried + others), tuple(carried), ())):
        try:
            digest = identity_digest("train", identity_config(compose("train", [*model, *overrides,
                                                                                 f"stage={stage}"])))
        except Exception:  # noqa: BLE001 - these overrides do not apply to that stage: try the next
            continue
        if digest not in digests:
            digests.append(digest)
    return digests


def has_key(cfg, key: str) -> bool:
    try:
        return OmegaConf.select(cfg, key, default=_ABSENT) is not _ABSENT
    except Exception:  # noqa: BLE001 - there, but not resolvable alone: still a key of that config
        return True


def stage_runs(stage: str, run_root: str | Path, model_id: str) -> list[tuple[Path, dict]]:
    """(folder, identity.json record) of every finished run of ``stage`` under ``<run_root>/<model id>/``."""
    from seeing.identity import IDENTITY_FILE, read_identity_file

    found = []
    for marker in sorted((Path(run_root) / model_id).glob(f"{stage}*/{IDENTITY_FILE}")):
        record = read_identity_file(marker.parent)
        if (record and record.get("entry") == "train" and record.get("config", {}).get("stage.name") == stage
                and (marker.parent / f"{stage}.pt").is_file()):
            found.append((marker.parent, record))
    return found


def find_stage_file(stage: str, run_root: str | Path, model_id: str, model: str, explicit: str | Path | None = None,
                    option: str = "", shipped: bool = True) -> Path:
    """The file of ``stage`` (see module docstring). ``model`` is the command-line words selecting
    the model (:func:`model_args`), ``option`` the setting that names a file explicitly.

    Inside a Hydra run only a file whose folder holds an expected identity
    (:func:`expected_identities`) is taken, so a smoke run's file never stands in for the preset's;
    outside one (a library call) the conventional folder's file is."""
    from seeing.identity import folders_of, read_identity_file
    from seeing.provenance import describe

    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise FileNotFoundError(f"{option or stage} names {path}, which does not exist")
        log.info("%s file: %s (named by %s)", stage, path, option or "the caller")
        return path
    conventional = stage_output_path(run_root, model_id, stage)
    digests = expected_identities(stage)
    tried = []
    for digest in digests:
        for folder in folders_of(digest, conventional.parent.parent):
            path = folder / f"{stage}.pt"
            if path.is_file():
                log.info("%s file: %s, made with %s", stage, path, describe(read_identity_file(folder) or {}))
                return path
    if not digests:
        tried.append(conventional)
        if conventional.is_file():
            return conventional
    if shipped:
        tried.append(asset(f"{model_id}_{stage}.pt"))
        if tried[-1].is_file():
            log.info("%s file: %s (shipped with seeing)", stage, tried[-1])
            return tried[-1]
    looked = (f"looked for {conventional} of the preset settings" if digests else "") + (
        ("; " if digests and tried else "") + ", ".join(str(p) for p in tried) if tried else "")
    others = [(f, r) for f, r in stage_runs(stage, run_root, model_id) if r.get("identity") not in digests]
    listing = "".join(f"\n  - {describe(r)}" + (f": use it with {option}={f / f'{stage}.pt'}" if option else "")
                      for f, r in others)
    raise FileNotFoundError(
        f"missing the {stage} file of {model_id} ({looked}). Make it with "
        f"`{make_command(stage, model, run_root)}`" + (f", or name a file with {option}=/path/to/{stage}.pt" if option
                                                      else "") + "."
        + (f" Runs of {stage} with other settings are there:{listing}" if others else ""))
