"""Build a generator from a state dict without allocating its weights twice.

Modules are constructed on the ``meta`` device (no memory, no random init cost) and the
checkpoint tensors are then *assigned* as parameters and buffers. A state dict of meta
tensors therefore yields a meta model through the very same code, which is how the tests
check full-size layouts without their gigabytes.
"""
from __future__ import annotations

from typing import Callable, Mapping, TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)


def as_float32(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating tensors as float32 (the public checkpoints are float32; half copies run too)."""
    return {k: (v.float() if v.is_floating_point() and v.dtype != torch.float32 else v)
            for k, v in state_dict.items()}


def build_and_load(factory: Callable[[], M], state_dict: Mapping[str, torch.Tensor], what: str) -> M:
    """``factory()`` on the meta device, then ``state_dict`` assigned strictly into it.

    Raises ValueError naming ``what`` when keys are missing, unexpected or mis-shaped.
    """
    with torch.device("meta"):
        module = factory()
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(k for k in expected.keys() & state_dict.keys()
                   if tuple(expected[k].shape) != tuple(state_dict[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:20]}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:20]}")
        if wrong:
            parts.append("shape mismatches " + ", ".join(
                f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
                for k in wrong[:20]))
        raise ValueError(f"cannot load {what}: " + "; ".join(parts))
    module.load_state_dict(dict(state_dict), strict=True, assign=True)
    return module
