"""StyleGAN3's filtered leaky ReLU in plain PyTorch: the nonlinearity of every alias-free layer.

Per channel, in this order (the order of NVlabs' reference implementation, which is what the
CUDA kernel approximates and what CPU runs compute):

1. add the bias;
2. upsample by inserting ``up - 1`` zeros after every sample;
3. pad with zeros (negative padding crops), then convolve with the upsampling filter ``fu``
   scaled by ``up**2`` (so the zeros do not dim the signal);
4. multiply by ``gain``, leaky ReLU with ``slope``, clamp to ``[-clamp, clamp]``;
5. convolve with the downsampling filter ``fd`` and keep every ``down``-th sample.

Filters are stored tensors: 1-d taps applied along x then y (separable), 2-d kernels as they
are (StyleGAN3-R's radial downsampling filters), or None (identity). Convolution is a true
convolution (the filter is flipped for ``conv2d``), which matters for the perturbed,
asymmetric filters of test checkpoints.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def upsample_zeros(x: torch.Tensor, factor: int) -> torch.Tensor:
    """``x`` at every ``factor``-th position of a zero image ``factor`` times larger."""
    if factor == 1:
        return x
    n, c, h, w = x.shape
    out = x.new_zeros(n, c, h * factor, w * factor)
    out[:, :, ::factor, ::factor] = x
    return out


def pad_or_crop(x: torch.Tensor, padding: Sequence[int]) -> torch.Tensor:
    """Zero padding ``(left, right, top, bottom)``; negative amounts crop instead."""
    left, right, top, bottom = (int(p) for p in padding)
    x = F.pad(x, [max(left, 0), max(right, 0), max(top, 0), max(bottom, 0)])
    return x[:, :, max(-top, 0): x.shape[2] - max(-bottom, 0), max(-left, 0): x.shape[3] - max(-right, 0)]


def fir(x: torch.Tensor, f: torch.Tensor | None, gain: float = 1.0, stride: int = 1) -> torch.Tensor:
    """Convolve every channel with ``f`` (valid part only), scaled by ``gain``, keeping every
    ``stride``-th output (the strided conv equals filtering then dropping samples)."""
    if f is None:  # the identity filter [[1]]
        x = x * gain if gain != 1 else x
        return x[:, :, ::stride, ::stride] if stride > 1 else x
    channels = x.shape[1]
    kernel = (f * gain ** (f.ndim / 2)).flip(list(range(f.ndim))).to(x.dtype)
    if f.ndim == 2:
        return F.conv2d(x, kernel.expand(channels, 1, *kernel.shape), stride=stride, groups=channels)
    taps = kernel.shape[0]
    x = F.conv2d(x, kernel.view(1, 1, 1, taps).expand(channels, 1, 1, taps), stride=(1, stride), groups=channels)
    return F.conv2d(x, kernel.view(1, 1, taps, 1).expand(channels, 1, taps, 1), stride=(stride, 1), groups=channels)


def filtered_lrelu(x: torch.Tensor, fu: torch.Tensor | None, fd: torch.Tensor | None, bias: torch.Tensor | None,
                   up: int, down: int, padding: Sequence[int], gain: float, slope: float,
                   clamp: float | None) -> torch.Tensor:
    """Bias, ``up``-fold upsampling through ``fu``, gained leaky ReLU, clamp, ``down``-fold
    downsampling through ``fd`` (see the module docs). ``padding`` is (left, right, top,
    bottom) on the upsampled image."""
    if bias is not None:
        x = x + bias.view(1, -1, 1, 1).to(x.dtype)
    x = fir(pad_or_crop(upsample_zeros(x, up), padding), fu, gain=up ** 2)
    x = F.leaky_relu(x, slope) if slope != 1 else x
    if gain != 1:
        x = x * gain
    if clamp is not None:
        x = x.clamp(-clamp, clamp)
    return fir(x, fd, stride=down)
