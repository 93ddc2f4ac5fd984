"""The generator shipped with the package: a small ProGAN trained on the scenes world.

``model=scenes_progan`` builds its generator through :func:`embedded_generator`, which
reads ``src/seeing/assets/scenes_progan.pt`` (or a user-given file of the same format,
as written by ``python train.py stage=gan``).
"""
from __future__ import annotations

from pathlib import Path

from .loading import load_generator
from .progan import ProGANGenerator

ASSET = Path(__file__).resolve().parents[1] / "assets" / "scenes_progan.pt"
MAKE_COMMAND = "python train.py stage=gan data=scenes model=scenes_progan"


def embedded_generator(checkpoint: str | Path | None = None) -> ProGANGenerator:
    """The shipped scenes GAN (``checkpoint=None``) or the generator file at ``checkpoint``,
    in eval mode with frozen weights."""
    path = Path(checkpoint) if checkpoint else ASSET
    if not path.is_file():
        raise FileNotFoundError(
            f"generator file {path} not found. `{MAKE_COMMAND}` trains one and writes "
            f"<run_root>/scenes_progan/gan/generator.pt; pass it as model.checkpoint=<path> "
            f"(the packaged default is {ASSET})"
        )
    return load_generator(path, layout="ganseeing_proggan")
