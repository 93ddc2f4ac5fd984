"""The activations that flow between generator layers, seen as tensors.

ProGAN-like layouts pass plain tensors. Style-based layouts pass a
``StyledState(x, ws)`` named tuple: the feature map ``x`` plus the per-layer styles
``ws`` that later layers consume. Inverters compare and predict the feature map;
these helpers take it out and put a new one back, so stage code never branches on
the layout.
"""
from __future__ import annotations

from typing import Any

import torch


def feature_tensor(value: Any) -> torch.Tensor:
    """The tensor that represents ``value``: itself, or the feature map of a styled state."""
    if torch.is_tensor(value):
        return value
    x = getattr(value, "x", None)
    if torch.is_tensor(x):
        return x
    raise TypeError(f"cannot read a feature tensor from a {type(value).__name__}")


def with_feature(value: Any, x: torch.Tensor) -> Any:
    """``value`` with its feature tensor replaced by ``x`` (a styled state keeps its styles)."""
    if torch.is_tensor(value):
        return x
    if hasattr(value, "_replace"):
        return value._replace(x=x)
    raise TypeError(f"cannot replace the feature tensor of a {type(value).__name__}")
