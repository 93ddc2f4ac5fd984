"""Strict state-dict loading with errors that say what does not fit.

Shared by the generator loaders and the segmenters: both take public checkpoints whose
layout must match the module exactly, and both may build the module on the meta device.
"""
from __future__ import annotations

import hashlib
from typing import Callable, Iterable, Mapping

import torch
from torch import nn


def load_exact(module: nn.Module, state: Mapping[str, torch.Tensor], what: str,
               optional: Iterable[str] = ("num_batches_tracked",), spell: Callable[[str], str] | None = None,
               expected: str = "") -> None:
    """Load ``state`` into ``module`` requiring the same keys and shapes, with an error that
    lists what is missing, unexpected or mis-shaped. Keys ending in an ``optional`` suffix may
    be absent (old checkpoints predate BatchNorm's ``num_batches_tracked``). ``module`` may
    live on the meta device; it takes over the state's tensors.

    ``what`` names the file; ``spell`` maps a key of ``state`` / ``module`` (a loader may have
    renamed the file's keys) back to the key as the file spells it, so the error names what the
    person can find in their file; ``expected`` describes the layout the file should have."""
    own = module.state_dict()
    optional = tuple(optional)
    spell = spell or (lambda key: key)
    missing = [spell(k) for k in own if k not in state and not k.endswith(optional)]
    unexpected = [spell(k) for k in state if k not in own]
    wrong = [f"{spell(k)}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        def head(items: list[str]) -> str:
            return ", ".join(items[:6]) + (f", ... ({len(items)} in all)" if len(items) > 6 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {head(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {head(unexpected)}")
        if wrong:
            parts.append(f"shape mismatches: {head(wrong)}")
        layout = f" ({expected})" if expected else ""
        raise ValueError(f"{what}: state dict does not match the expected layout{layout}; " + "; ".join(parts))
    full = dict(state)
    for k in own:
        if k not in full:  # an absent optional buffer (a counter): start it at zero
            full[k] = torch.zeros(own[k].shape, dtype=own[k].dtype)
    # assign=True adopts the file's tensors, so a module built on the meta device (no
    # wasted random init of tens of millions of weights) comes out fully materialised.
    module.load_state_dict(full, strict=True, assign=True)


def fingerprint(module: nn.Module) -> str:
    """sha256 of a module's state (names, shapes, dtypes and values): what results made with the
    module depend on, however it was loaded. The one fingerprint: tally cache keys and sample
    folders use it whole, inversion files record its first 16 digits for their generator."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        t = tensor.detach().cpu().contiguous().reshape(-1)  # 1-d: 0-d tensors cannot be viewed as bytes
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
