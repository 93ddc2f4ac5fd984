"""The generator shipped with the package: a small ProGAN trained on the scenes world.

``model=scenes_progan`` builds its generator through :func:`embedded_generator`, which
reads ``src/seeing/assets/scenes_progan.pt`` (or a user-given file of the same format,
as written by ``python train.py stage=gan``).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .progan import ProGANGenerator

ASSET = Path(__file__).resolve().parents[1] / "assets" / "scenes_progan.pt"
MAKE_COMMAND = "python train.py stage=gan data=scenes model=scenes_progan"


def embedded_generator(checkpoint: str | Path | None = None) -> ProGANGenerator:
    """The shipped scenes GAN (``checkpoint=None``) or the generator file at ``checkpoint``, in eval mode."""
    path = Path(checkpoint) if checkpoint else ASSET
    if not path.is_file():
        raise FileNotFoundError(
            f"generator file {path} not found. `{MAKE_COMMAND}` trains one and writes "
            f"<run_root>/scenes_progan/gan/generator.pt; pass it as model.checkpoint=<path> "
            f"(the packaged default is {ASSET})"
        )
    try:
        from .loading import load_generator
    except ImportError:
        load_generator = None
    generator = load_generator(path) if load_generator is not None else _load_progan_file(path)
    return generator.eval()


def _load_progan_file(path: Path) -> ProGANGenerator:
    """Read ``{"layout": "ganseeing_proggan", "state_dict": ..., "meta": {...}}``."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("layout") != "ganseeing_proggan":
        raise ValueError(f"{path} is not a generator file written by stage=gan (layout ganseeing_proggan)")
    meta = blob.get("meta", {})
    generator = ProGANGenerator(int(meta["z_dim"]), list(meta["widths"]))
    generator.load_layout_state_dict(blob["state_dict"])
    return generator
