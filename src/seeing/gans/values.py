"""The activations that flow between generator layers, seen as tensors.

ProGAN-like layouts pass plain tensors. Style-based layouts pass a
``StyledState(x, ws, image)`` named tuple (:mod:`seeing.gans.stylegan_common`): the
feature map ``x`` plus the w+ styles ``ws`` that later layers consume. Right after
the ``mapping`` layer ``x`` is None and the state *is* w+, the latent that
inversion searches for a style-based model.

Inverters compare and predict one tensor per value: the feature map, or w+ for a
state that has no feature map yet. These helpers take that tensor out and put a
new one back (styles and skip images are carried over from the state given), so
stage code never branches on the layout.
"""
from __future__ import annotations

from typing import Any

import torch


def feature_tensor(value: Any) -> torch.Tensor:
    """The tensor inverted for ``value``: itself, a styled state's feature map, or its w+."""
    if torch.is_tensor(value):
        return value
    if hasattr(value, "_fields") and "ws" in value._fields:
        return value.x if value.x is not None else value.ws
    raise TypeError(f"cannot read a feature tensor from a {type(value).__name__}")


def with_feature(value: Any, t: torch.Tensor) -> Any:
    """``value`` with its feature tensor (see :func:`feature_tensor`) replaced by ``t``."""
    if torch.is_tensor(value):
        return t
    if hasattr(value, "_fields") and "ws" in value._fields:
        return value._replace(ws=t) if value.x is None else value._replace(x=t)
    raise TypeError(f"cannot replace the feature tensor of a {type(value).__name__}")
