"""Frechet Segmentation Distance (FSD, Bau et al. 2019, Sec. 3.1) as a torchmetrics Metric.

The metric keeps, for real and fake each, the image count, the sum of the (percent) class
tallies and the sum of their outer products in float64: O(K^2) state, independent of the
number of images, and exactly additive across batches and processes (``dist_reduce_fx="sum"``).
The formula and the functional form are in :mod:`seeing.metrics.functional`.

In one's own LightningModule, ``compute()`` being the scalar FSD, ``self.log("val/fsd", self.fsd)``
takes the metric: see ``docs/metrics.md`` (a doctest run by the test suite).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from torch import nn
from torchmetrics import Metric

from seeing.metrics.functional import (
    PERCENT,
    as_tallies,
    class_tally,
    frechet_distance,
    gaussian_from_sums,
)

ROLES = ("real", "fake")


class FrechetSegmentationDistance(Metric):
    """FSD between the real and the generated images it is given (lower is better).

    ``update(x, real)`` takes, for ``real`` True or False (or a per-image boolean mask):

    - float images ``N x 3 x H x W`` in [-1, 1], segmented by the metric's ``segmenter``
      (as torchmetrics' FID runs its feature extractor);
    - integer label maps ``N x H x W`` with classes ``0 .. num_classes - 1``;
    - float ``N x K`` per-image class fractions (tallies; also :meth:`update_tally`).

    ``compute()`` returns the FSD as a float64 scalar tensor; :meth:`terms` returns it with its
    mean and covariance terms. ``forward`` (calling the metric) adds the batch to the state and
    returns the FSD of the batch alone, as torchmetrics defines it: a batch that holds one side
    only has no distance of its own, so its value is NaN (no error); a batch holding both sides,
    ``real`` a mask, has one.

    Args:
        num_classes: K; taken from ``segmenter.class_names`` when a segmenter is given.
        segmenter: a module whose ``segment(images)`` returns label maps (any
            :class:`seeing.segmenters.base.Segmenter`); kept in eval mode, never trained.
        scale: the tallies' unit (100: percent, the published scale).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    plot_lower_bound = 0.0

    def __init__(self, num_classes: Optional[int] = None, segmenter: Optional[nn.Module] = None,
                 scale: float = PERCENT, **kwargs: Any):
        super().__init__(**kwargs)
        names = getattr(segmenter, "class_names", None) if segmenter is not None else None
        if segmenter is not None and not callable(getattr(segmenter, "segment", None)):
            raise TypeError(f"segmenter {type(segmenter).__name__} has no segment(images) method")
        if num_classes is None:
            if names is None:
                raise ValueError("FrechetSegmentationDistance needs num_classes, or a segmenter with class_names")
            num_classes = len(names)
        elif names is not None and len(names) != int(num_classes):
            raise ValueError(f"class-count mismatch: num_classes={num_classes} but the segmenter has "
                             f"{len(names)} classes")
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = int(num_classes)
        self.class_names = list(names) if names is not None else None
        self.segmenter = segmenter
        self.scale = float(scale)
        self._batch_value = False  # True while forward() computes the value of its batch alone
        k = self.num_classes
        for role in ROLES:
            self.add_state(f"{role}_count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{role}_sum", torch.zeros(k, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{role}_outer", torch.zeros(k, k, dtype=torch.float64), dist_reduce_fx="sum")

    # ------------------------------------------------------------------ input
    def tallies_of(self, x: torch.Tensor) -> torch.Tensor:
        """``N x K`` class fractions of images (segmented here), label maps or tallies."""
        x = torch.as_tensor(x)
        if x.dim() == 4:
            if self.segmenter is None:
                raise ValueError("FSD got images (N x 3 x H x W) but has no segmenter: build it with "
                                 "FrechetSegmentationDistance(segmenter=...), or pass label maps or tallies")
            with torch.no_grad():
                x = self.segmenter.segment(x)
        if x.dim() == 3:
            return class_tally(x, self.num_classes)
        return as_tallies(x, self.num_classes)

    def update(self, x: torch.Tensor, real: Union[bool, torch.Tensor]) -> None:  # type: ignore[override]
        tallies = self.tallies_of(x).to(self.real_sum.device) * self.scale
        if isinstance(real, bool) or torch.as_tensor(real).dim() == 0:
            parts = {"real" if bool(real) else "fake": tallies}
        else:
            mask = torch.as_tensor(real, dtype=torch.bool, device=tallies.device)
            if mask.shape != tallies.shape[:1]:
                raise ValueError(f"real must be a bool or a mask of {tallies.shape[0]} images, got shape "
                                 f"{tuple(mask.shape)}")
            parts = {"real": tallies[mask], "fake": tallies[~mask]}
        for role, t in parts.items():
            setattr(self, f"{role}_count", getattr(self, f"{role}_count") + t.shape[0])
            setattr(self, f"{role}_sum", getattr(self, f"{role}_sum") + t.sum(0))
            setattr(self, f"{role}_outer", getattr(self, f"{role}_outer") + t.T @ t)

    def update_tally(self, fractions: torch.Tensor, real: Union[bool, torch.Tensor]) -> None:
        """Add per-image class fractions (``N x K``, rows summing to 1)."""
        fractions = torch.as_tensor(fractions)
        if not fractions.dtype.is_floating_point:
            raise TypeError(f"tallies must be float class fractions, got {fractions.dtype}")
        self.update(fractions, real)  # through torchmetrics' wrapped update (update count, sync state)

    def train(self, mode: bool = True) -> "FrechetSegmentationDistance":
        super().train(mode)
        if self.segmenter is not None:  # a measuring instrument: its batch norms never switch to training
            self.segmenter.eval()
        return self

    # ------------------------------------------------------------------ output
    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """torchmetrics' ``forward``: update the state, return the FSD of this batch alone (NaN for a
        batch that holds one side only)."""
        self._batch_value = True
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._batch_value = False

    @contextmanager
    def _synced(self) -> Iterator[None]:
        """The states of every process (synced for the duration, then this process's own again)."""
        with self.sync_context():
            yield

    def _terms(self) -> dict[str, torch.Tensor]:
        counts = [int(getattr(self, f"{role}_count")) for role in ROLES]
        if self._batch_value and min(counts) < 2:
            nan = torch.tensor(float("nan"), dtype=torch.float64, device=self.real_sum.device)
            return {"fsd": nan, "mean_term": nan, "cov_term": nan}
        g = [gaussian_from_sums(getattr(self, f"{role}_count"), getattr(self, f"{role}_sum"),
                                getattr(self, f"{role}_outer")) for role in ROLES]
        fsd, mean_term, cov_term = frechet_distance(*g[0], *g[1])
        return {"fsd": fsd, "mean_term": mean_term, "cov_term": cov_term}

    def compute(self) -> torch.Tensor:
        """The FSD (float64 scalar tensor) over every image added, on every process."""
        return self._terms()["fsd"]

    def terms(self) -> dict[str, torch.Tensor]:
        """``{"fsd", "mean_term", "cov_term"}``: the FSD and its two parts, ``||mu_r - mu_f||^2``
        and ``Tr(S_r + S_f - 2 (S_r S_f)^(1/2))`` (float64 scalars, over every process)."""
        with self._synced():
            return self._terms()

    def class_means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean fraction of pixels per class (0..1), real and fake; the per-class report's input.
        Read from the states synced over every process (as :meth:`compute` is)."""
        out = []
        with self._synced():
            for role in ROLES:
                n = float(getattr(self, f"{role}_count"))
                if n == 0:
                    raise ValueError(f"no {role} images were added")
                out.append((getattr(self, f"{role}_sum") / (n * self.scale)).clone())
        return out[0], out[1]

    def counts(self) -> dict[str, int]:
        """Images added per role, over every process."""
        with self._synced():
            return {role: int(getattr(self, f"{role}_count")) for role in ROLES}

    def plot(self, val: Optional[Union[torch.Tensor, Sequence[torch.Tensor]]] = None,
             ax: Optional[Any] = None) -> Any:
        """Plot one FSD value or a sequence of them (e.g. one per epoch) with torchmetrics' plotting
        helpers; without ``val``, the current ``compute()``. Returns ``(figure, axes)``.

        >>> import torch
        >>> metric = FrechetSegmentationDistance(num_classes=3)
        >>> metric.update(torch.tensor([[0.5, 0.5, 0.0], [0.3, 0.6, 0.1]]), real=True)
        >>> metric.update(torch.tensor([[0.9, 0.1, 0.0], [0.7, 0.2, 0.1]]), real=False)
        >>> fig, ax = metric.plot()
        """
        return self._plot(val, ax)
