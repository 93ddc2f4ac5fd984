"""Precise RoI pooling (Jiang et al., ECCV 2018, "PrRoIPool") of a whole feature map.

The unified parsing UPerNet that the paper's FSD segmenter uses pools each scale of its
pyramid pooling module with ``PrRoIPool2D(s, s, 1.0)`` on a single RoI ``[0, 0, W, H]``
covering the whole map. That is *not* ``adaptive_avg_pool2d``: PrRoIPool averages the
continuous bilinear interpolant of the map, whose samples sit at integer coordinates and
which falls off to zero beyond the last row / column. Here it is in closed form.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["precise_roi_pool", "precise_pool_weights", "PrecisePool2d"]


def _hat_antiderivative(t: torch.Tensor) -> torch.Tensor:
    """``H(t) = integral_{-inf}^{t} max(0, 1 - |u|) du`` (0 below -1, 1 above 1, piecewise quadratic between)."""
    t = t.clamp(-1.0, 1.0)
    # (t + 1)^2 / 2 on [-1, 0] and 1 - (1 - t)^2 / 2 on [0, 1]; both equal 1/2 + t - sign(t) t^2 / 2.
    return 0.5 + t - torch.sign(t) * t * t / 2


def precise_pool_weights(n: int, bins: int, dtype: torch.dtype = torch.float32,
                         device: torch.device | str | None = None) -> torch.Tensor:
    """The ``(bins, n)`` matrix ``A`` of one axis: ``A[k, j]`` is the mean over bin ``k`` of
    ``[0, n]`` (length ``n / bins``) of the hat function ``max(0, 1 - |x - j|)`` of sample ``j``.

    Rows sum to less than 1 where a bin reaches past ``n - 1``, since there the interpolant
    runs towards the zero outside the map; the whole matrix sums to ``bins * (n - 1/2) / n``.
    """
    # The bin edges and integrals are computed in float64 and cast once: they are tiny (bins x n)
    # and the cast keeps float32 results within rounding of an exact reference.
    k = torch.arange(bins, dtype=torch.float64, device=device)
    j = torch.arange(n, dtype=torch.float64, device=device)
    width = n / bins
    lo, hi = (k * width)[:, None], ((k + 1) * width)[:, None]
    integral = _hat_antiderivative(hi - j) - _hat_antiderivative(lo - j)
    return (integral / width).to(dtype)


def precise_roi_pool(x: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    r"""Precise RoI pooling of the whole map ``x`` (``(..., H, W)``) to ``size`` (``s`` or ``(s_h, s_w)``).

    With the bilinear interpolant :math:`f(x, y) = \sum_{i, j} X_{ij}\, h(y - i)\, h(x - j)`,
    :math:`h(u) = \max(0, 1 - |u|)` (pixel ``(i, j)`` at coordinate ``(x=j, y=i)``, zero outside the
    map), output bin ``(k, l)`` covering :math:`[x_0, x_1] \times [y_0, y_1]` of the equal split of
    :math:`[0, W] \times [0, H]` is

    .. math::
        Y_{kl} = \frac{1}{(x_1 - x_0)(y_1 - y_0)} \int_{y_0}^{y_1}\!\int_{x_0}^{x_1} f(x, y)\, dx\, dy
               = (A_y X A_x^\top)_{kl},
        \qquad A_{kj} = \frac{1}{x_1 - x_0} \int_{x_0}^{x_1} h(x - j)\, dx,

    since the integrand separates per axis. This equals ``PrRoIPool2D(s_h, s_w, 1.0)`` with the RoI
    ``[0, 0, W, H]``, as the unified parsing UPerNet pools its pyramid. Unlike average pooling, the
    samples sit at ``0 .. W - 1`` but the bins tile ``[0, W]``, so the last unit interval fades to
    zero: a constant map ``c`` pools at size 1 to ``c (1 - 1/(2H)) (1 - 1/(2W))``, and at size 1 pixel 0
    carries half the weight of the others. Differentiable; any float dtype and device.

    Example:
        >>> import torch
        >>> from seeing.segmenters.precise_pool import precise_roi_pool, precise_pool_weights
        >>> x = torch.ones(1, 1, 2, 2)
        >>> precise_roi_pool(x, 1)  # (1 - 1/4)^2: the half-pixel past the last sample fades to 0
        tensor([[[[0.5625]]]])
        >>> precise_roi_pool(x, 2)  # bins [0, 1] are full, bins [1, 2] fade out
        tensor([[[[1.0000, 0.5000],
                  [0.5000, 0.2500]]]])
        >>> precise_pool_weights(4, 2)  # one axis: 4 samples, 2 bins [0, 2] and [2, 4]
        tensor([[0.2500, 0.5000, 0.2500, 0.0000],
                [0.0000, 0.0000, 0.2500, 0.5000]])
    """
    s_h, s_w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if x.dim() < 2 or s_h < 1 or s_w < 1:
        raise ValueError(f"precise_roi_pool needs a (..., H, W) tensor and a positive size, got {tuple(x.shape)}, {size}")
    if not x.is_floating_point():
        raise TypeError(f"precise_roi_pool needs a floating point tensor, got {x.dtype}")
    h, w = x.shape[-2:]
    a_y = precise_pool_weights(h, s_h, x.dtype, x.device)
    a_x = precise_pool_weights(w, s_w, x.dtype, x.device)
    # Two small matmuls (batched over the leading dims): rows first, then columns.
    return a_y @ x @ a_x.transpose(0, 1)


class PrecisePool2d(nn.Module):
    """Module form of :func:`precise_roi_pool` (the pyramid pooling of one scale)."""

    def __init__(self, size: int | Sequence[int]):
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return precise_roi_pool(x, self.size)

    def extra_repr(self) -> str:
        return f"size={self.size}"
