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

from seeing.state_dicts import load_exact

M = TypeVar("M", bound=nn.Module)


def as_float32(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating tensors as float32 (the public checkpoints are float32; half copies run too)."""
    return {k: (v.float() if v.is_floating_point() and v.dtype != torch.float32 else v)
            for k, v in state_dict.items()}


def build_and_load(factory: Callable[[], M], state_dict: Mapping[str, torch.Tensor], what: str,
                   spell: Callable[[str], str] | None = None) -> M:
    """``factory()`` on the meta device, then ``state_dict`` assigned strictly into it.

    Raises ValueError naming ``what`` when keys are missing, unexpected or mis-shaped, each key
    as the checkpoint spells it (``spell``: the module's key -> the file's, the inverse of the
    loader's renaming).
    """
    with torch.device("meta"):
        module = factory()
    load_exact(module, state_dict, f"cannot load {what}", optional=(), spell=spell)
    return module
