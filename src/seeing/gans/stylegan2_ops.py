"""The arithmetic NVlabs' and rosinality's StyleGAN2 share, in plain PyTorch (float32, any device).

Both upstream projects ship CUDA kernels with reference fallbacks; these functions compute what
those references compute, with the conventions that decide golden-exact results:

* :func:`upfirdn2d`: upsample by zero insertion (zeros *after* each sample), pad (negative pads
  crop), **convolve** with the FIR filter (so the stored filter is flipped before
  ``F.conv2d``, which correlates; the stored filters of real checkpoints are symmetric, those
  of a perturbed test checkpoint are not), then keep every ``down``-th sample;
* :func:`modulated_conv`: the style scales the weight's input channels and, with
  demodulation, each output channel is divided by the norm of its modulated weights. It is
  computed by scaling the activations before and after a shared-weight convolution, which
  equals upstream's per-sample (grouped) weights;
* upsampling convolutions are a stride-2 transposed convolution with the weight *not* flipped,
  followed by the FIR filter with gain 4.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def upfirdn2d(x: torch.Tensor, f: torch.Tensor, up: int = 1, down: int = 1,
              pad: tuple[int, int, int, int] = (0, 0, 0, 0), gain: float = 1.0) -> torch.Tensor:
    """Upsample, pad ``(left, right, top, bottom)``, convolve with ``f * gain``, downsample.

    ``f`` is 2-D ``[fh, fw]``, or 1-D (separable: the outer product with itself).
    """
    n, c, h, w = x.shape
    if up > 1:
        x = F.pad(x.reshape(n, c, h, 1, w, 1), [0, up - 1, 0, 0, 0, up - 1]).reshape(n, c, h * up, w * up)
    left, right, top, bottom = pad
    x = F.pad(x, [max(left, 0), max(right, 0), max(top, 0), max(bottom, 0)])
    x = x[:, :, max(-top, 0): x.shape[2] - max(-bottom, 0), max(-left, 0): x.shape[3] - max(-right, 0)]
    f = f.to(x.dtype)
    if f.ndim == 1:
        f = torch.outer(f, f)
    kernel = (f * gain).flip(0, 1)[None, None].expand(c, 1, *f.shape)
    x = F.conv2d(x, kernel, groups=c)
    return x[:, :, ::down, ::down] if down > 1 else x


def upsample_skip(image: torch.Tensor, f: torch.Tensor, gain: float) -> torch.Tensor:
    """2x upsampling of the skip image: zero insertion, then ``f`` (padded to keep the footprint)."""
    fh, fw = (f.shape[0], f.shape[-1])
    pad = ((fw + 1) // 2, (fw - 2) // 2, (fh + 1) // 2, (fh - 2) // 2)
    return upfirdn2d(image, f, up=2, pad=pad, gain=gain)


def modulated_conv(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, *, demodulate: bool = True,
                   up: bool = False, up_filter: torch.Tensor | None = None, up_pad: tuple[int, int, int, int] | None = None,
                   up_gain: float = 4.0) -> torch.Tensor:
    """Modulated (and optionally demodulated) convolution of ``x`` (N x I x H x W).

    ``weight`` (O x I x k x k) is the *effective* weight (any equalised-lr gain already applied);
    ``styles`` is N x I. With ``up``, a stride-2 transposed convolution followed by
    ``up_filter`` (padding ``up_pad``, gain ``up_gain``) doubles the resolution; otherwise the
    convolution keeps it ("same" padding).
    """
    x = x * styles[:, :, None, None].to(x.dtype)
    if up:
        x = F.conv_transpose2d(x, weight.transpose(0, 1).to(x.dtype), stride=2)
        x = upfirdn2d(x, up_filter, pad=up_pad, gain=up_gain)
    else:
        x = F.conv2d(x, weight.to(x.dtype), padding=weight.shape[-1] // 2)
    if demodulate:
        # per (sample, output channel): the norm of the weights after modulation
        norm = (weight.unsqueeze(0) * styles[:, None, :, None, None]).square().sum(dim=(2, 3, 4))
        x = x * torch.rsqrt(norm + 1e-8)[:, :, None, None].to(x.dtype)
    return x


def transposed_up_pad(kernel: int, filter_taps: int, padding: int) -> tuple[int, int, int, int]:
    """NVlabs' padding of the filter that follows a stride-2 transposed conv (``conv2d_resample``
    with ``up=2``), for a square ``kernel`` and filter, when that leaves the transposed conv
    itself unpadded (every StyleGAN2 layout: 3x3 kernel, 4-tap filter, padding 1 -> 1 on each side)."""
    before = padding + (filter_taps + 1) // 2 - (kernel - 1)
    after = padding + (filter_taps - 2) // 2 - (kernel - 2)
    if min(before, after) < 0:
        raise ValueError(f"unsupported upsampling conv (kernel {kernel}, {filter_taps}-tap filter, padding {padding})")
    return (before, after, before, after)


class StyleAffine(nn.Module):
    """w -> styles: an equalised-lr dense layer whose stored bias already holds its initial 1
    (NVlabs' ``affine``, rosinality's ``modulation``)."""

    def __init__(self, w_dim: int, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, w_dim))
        self.bias = nn.Parameter(torch.empty(channels))
        self.weight_gain = 1.0 / math.sqrt(w_dim)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return F.linear(w, self.weight * self.weight_gain, self.bias)


def bias_leaky_relu(x: torch.Tensor, bias: torch.Tensor, gain: float = math.sqrt(2),
                    clamp: float | None = None) -> torch.Tensor:
    """``clamp(leaky_relu(x + bias, 0.2) * gain)``: both upstreams' fused bias and activation."""
    x = F.leaky_relu(x + bias.to(x.dtype).view(1, -1, 1, 1), 0.2) * gain
    return x.clamp(-clamp, clamp) if clamp is not None else x
