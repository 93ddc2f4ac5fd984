"""Files shipped with the package: the embedded world's generator, segmenter and encoders
(how each was made: README.md here). :func:`asset` is the one way code finds them."""
from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent


def asset(name: str) -> Path:
    """The path of a shipped file (it may not exist: callers say what is missing and how to make it)."""
    return ASSETS_DIR / name
