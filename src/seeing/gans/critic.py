"""A small ProGAN-style critic (discriminator) for WGAN-GP training.

It mirrors :class:`~seeing.gans.progan.ProGANGenerator`: ``widths[k]`` is the channel
count at resolution ``4 * 2**k``. Image -> 1x1 "from RGB" conv -> per resolution two 3x3
convs and a 2x average-pool -> at 4x4 the minibatch standard-deviation channel, a 3x3 and
a 4x4 conv -> one unbounded score per image. Every conv uses the equalised learning rate
of the generator (weights drawn from N(0, 1) and scaled at run time) and no normalisation
layer, because the WGAN-GP gradient penalty is defined per sample and batch norm would
couple the samples of a batch.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class EqualizedConv2d(nn.Module):
    """Conv with He-scaled weights applied at run time (so Adam sees unit-scale parameters)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, padding: int = 0, gain: float = math.sqrt(2)):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        self.scale = gain / math.sqrt(in_ch * kernel * kernel)
        self.padding = padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.scale, self.bias, padding=self.padding)


def minibatch_stddev(x: torch.Tensor, group: int = 4) -> torch.Tensor:
    """Append the average (over features) standard deviation within sample groups as a channel.

    Lets the critic see batch diversity, which counters mode collapse (Karras et al. 2018).
    """
    n, c, h, w = x.shape
    g = min(group, n)
    if n % g:
        g = 1
    y = x.reshape(g, -1, c, h, w)
    y = (y.var(dim=0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))  # one value per group
    y = y.reshape(-1, 1, 1, 1).repeat(g, 1, h, w)
    return torch.cat([x, y], dim=1)


class CriticBlock(nn.Module):
    """Two 3x3 convs with leaky ReLU, then a 2x average-pool down to the next resolution."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv0 = EqualizedConv2d(in_ch, in_ch, 3, padding=1)
        self.conv1 = EqualizedConv2d(in_ch, out_ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.conv0(x), 0.2)
        x = F.leaky_relu(self.conv1(x), 0.2)
        return F.avg_pool2d(x, 2)


class ProGANCritic(nn.Module):
    """WGAN critic for ``resolution = 4 * 2**(len(widths)-1)`` images in [-1, 1]."""

    def __init__(self, widths: Sequence[int] = (128, 128, 64, 32, 16), mbstd_group: int = 4):
        super().__init__()
        widths = list(widths)
        if not widths:
            raise ValueError("ProGANCritic needs at least one width")
        self.resolution = 4 * 2 ** (len(widths) - 1)
        self.mbstd_group = mbstd_group
        self.from_rgb = EqualizedConv2d(3, widths[-1], 1)
        # highest resolution first: widths[-1] at full size down to widths[0] at 4x4
        self.blocks = nn.ModuleList(
            CriticBlock(cin, cout) for cin, cout in zip(widths[::-1][:-1], widths[::-1][1:])
        )
        self.final_conv = EqualizedConv2d(widths[0] + 1, widths[0], 3, padding=1)
        self.final_dense = EqualizedConv2d(widths[0], widths[0], 4)  # a 4x4 "valid" conv = dense
        self.score = nn.Linear(widths[0], 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.shape[-1] != self.resolution or image.shape[-2] != self.resolution:
            raise ValueError(
                f"critic expects {self.resolution}x{self.resolution} images, got {tuple(image.shape[-2:])}"
            )
        x = F.leaky_relu(self.from_rgb(image), 0.2)
        for block in self.blocks:
            x = block(x)
        x = minibatch_stddev(x, self.mbstd_group)
        x = F.leaky_relu(self.final_conv(x), 0.2)
        x = F.leaky_relu(self.final_dense(x), 0.2)
        return self.score(x.flatten(1)).squeeze(1)


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """WGAN-GP penalty E[(||grad_x critic(x)||_2 - 1)^2] at random interpolates of real and fake.

    (Gulrajani et al. 2017, eq. 3; multiply by lambda = 10 outside.) The graph is kept
    (``create_graph``) so the penalty itself can be back-propagated into the critic.
    """
    alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype, generator=generator)
    mixed = (alpha * real.detach() + (1 - alpha) * fake.detach()).requires_grad_(True)
    scores = critic(mixed)
    (grad,) = torch.autograd.grad(scores.sum(), mixed, create_graph=True)
    norms = grad.flatten(1).norm(2, dim=1)
    return (norms - 1).pow(2).mean()
