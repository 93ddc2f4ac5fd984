"""The genforce model zoo's ProGAN checkpoints (``pggan_*256.pth``) on :class:`ProGANGenerator`.

genforce stores the same network as the GAN Dissection conversion under other names:

=====================  ================================  ==========================
genforce key           GAN Dissection key                what it is
=====================  ================================  ==========================
``layer0.weight``      ``layer1.conv.weight``            4x4 conv (padding 3) on z
``layer{k}.weight``    ``layer{k+1}.conv.weight``        3x3 conv (nearest 2x first
                                                         in even k >= 2)
``layer{k}.bias``      ``layer{k+1}.wscale.b``           bias after the weight scale
``output{last}.*``     ``output_RxR.conv.weight / .b``   1x1 conv to RGB, gain 1
``output{i<last}.*``   (none)                            to-RGB of lower levels of
                                                         detail, unused at ``lod`` 0
``lod``                (none)                            level of detail; must be 0
=====================  ================================  ==========================

The arithmetic agrees too (checked against genforce's golden outputs to 1e-6): every block
pixel-normalises its input (genforce's extra ``* sqrt(z_dim)`` on z is undone by the first
block's pixel norm), weights are scaled at run time by ``gain / sqrt(k*k*in)`` with gain
sqrt(2) (1 for the output), which is the GAN Dissection ``sqrt(2)/k / sqrt(in)``. The only
difference is that genforce leaves the output linear while :class:`ProGANGenerator` clamps
it to [-1, 1] (hardtanh), the range every consumer of images here assumes.
"""
from __future__ import annotations

import math
import re
from typing import Mapping

import torch

from .progan import ProGANGenerator

LAYOUT = "genforce_pggan"

KEY_PATTERN = re.compile(r"lod|(layer|output)\d+\.(weight|bias)")


def to_ganseeing_layout(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The GAN Dissection layout state dict holding the same weights; drops unused to-RGBs."""
    if "lod" in state_dict and not state_dict["lod"].is_meta and float(state_dict["lod"]) != 0.0:
        raise ValueError(
            f"{LAYOUT} checkpoint has lod={float(state_dict['lod'])}: it is a snapshot taken while "
            "growing, whose image blends two resolutions; only finished models (lod 0) are supported")
    outputs = sorted(int(m[1]) for k in state_dict if (m := re.fullmatch(r"output(\d+)\.weight", k)))
    if not outputs:
        raise ValueError(f"not a {LAYOUT} state dict: no 'output<i>.weight' keys")
    last = outputs[-1]
    res = 4 * 2 ** last
    converted: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if m := re.fullmatch(r"layer(\d+)\.(weight|bias)", key):
            suffix = "conv.weight" if m[2] == "weight" else "wscale.b"
            converted[f"layer{int(m[1]) + 1}.{suffix}"] = value
    converted[f"output_{res}x{res}.conv.weight"] = state_dict[f"output{last}.weight"]
    converted[f"output_{res}x{res}.wscale.b"] = state_dict[f"output{last}.bias"]
    return converted


def genforce_key(key: str) -> str:
    """A GAN Dissection key -> the genforce key it was converted from (the table above, backwards);
    other keys as they are."""
    if m := re.fullmatch(r"layer(\d+)\.(conv\.weight|wscale\.b)", key):
        return f"layer{int(m[1]) - 1}.{'weight' if m[2] == 'conv.weight' else 'bias'}"
    if m := re.fullmatch(r"output_(\d+)x\d+\.(conv\.weight|wscale\.b)", key):
        last = int(round(math.log2(int(m[1]) / 4)))
        return f"output{last}.{'weight' if m[2] == 'conv.weight' else 'bias'}"
    return key


def from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> ProGANGenerator:
    """A :class:`ProGANGenerator` (layers ``layer1`` ... ``output_RxR``) holding these weights;
    a missing or mis-shaped tensor is named by its genforce key."""
    return ProGANGenerator.from_layout_state_dict(to_ganseeing_layout(state_dict), spell=genforce_key, layout=LAYOUT)
