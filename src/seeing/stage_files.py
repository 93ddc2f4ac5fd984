"""Where stages write their files and how later stages find them: the one finder.

Stage ``s`` of a model writes ``<run_root>/<model id>/<s>/<s>.pt`` (the model id is the model
name plus its checkpoint's stem, see :mod:`seeing.config`). A later stage takes a file named
explicitly, else that convention's file, else (for the embedded world) the shipped
``seeing/assets/<model id>_<s>.pt``. A missing file is an error naming every place looked at
and the complete command that makes it.
"""
from __future__ import annotations

from pathlib import Path

from seeing.assets import asset

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


def find_stage_file(stage: str, run_root: str | Path, model_id: str, model: str, explicit: str | Path | None = None,
                    option: str = "", shipped: bool = True) -> Path:
    """The file of ``stage`` (see module docstring). ``model`` is the command-line words selecting
    the model (:func:`model_args`), ``option`` the setting that names a file explicitly."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise FileNotFoundError(f"{option or stage} names {path}, which does not exist")
        return path
    tried = [stage_output_path(run_root, model_id, stage)] + ([asset(f"{model_id}_{stage}.pt")] if shipped else [])
    for path in tried:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"missing the {stage} file of {model_id} (looked for {', '.join(str(p) for p in tried)}). Make it with "
        f"`{make_command(stage, model, run_root)}`" + (f", or name a file with {option}=/path/to/{stage}.pt" if option
                                                      else "") + ".")
