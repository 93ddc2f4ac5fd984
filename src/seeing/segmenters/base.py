"""The one interface every segmenter offers: images in [-1, 1] -> per-pixel class indices.

A :class:`Segmenter` is a frozen inference wrapper around some network. Subclasses
implement :meth:`Segmenter.class_scores` (per-pixel scores at the input resolution,
with whatever input normalisation the network was trained with); the base class
checks the input, moves it to the segmenter's device and takes the argmax.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

from seeing.provenance import record_input

log = logging.getLogger(__name__)

# Generators may overshoot [-1, 1] a little (ProGAN has no output tanh); anything far outside
# is almost certainly the wrong scale (0..255 or 0..1 mixed up with something else).
_RANGE_TOLERANCE = 2.0


class Segmenter(nn.Module):
    """Per-pixel classifier of RGB images in [-1, 1].

    Attributes:
        class_names: the name of every output class, in output order.
        segmenter_id: which loader's kind of segmenter it is (the ``load_segmenter`` name); results
            record it with a digest of the weights and the label space.
    """

    segmenter_id = "custom"

    def __init__(self, class_names: Iterable[str]):
        super().__init__()
        self.class_names: list[str] = [str(n) for n in class_names]
        if not self.class_names:
            raise ValueError(f"{type(self).__name__} needs at least one class name")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def device(self) -> torch.device:
        for t in list(self.parameters()) + list(self.buffers()):
            return t.device
        return torch.device("cpu")

    def train(self, mode: bool = True) -> "Segmenter":
        # Segmenters are measuring instruments: batch-norm statistics must never drift, so
        # the wrapper stays in eval mode whatever a caller (or Lightning) asks for.
        return super().train(False)

    def class_scores(self, images: torch.Tensor) -> torch.Tensor:
        """N x num_classes x H x W scores (higher = more likely) for images N x 3 x H x W in [-1, 1],
        already checked and on this segmenter's device."""
        raise NotImplementedError

    def check_images(self, images: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"{type(self).__name__}.segment expects images N x 3 x H x W, got {shape}")
        if not images.is_floating_point():
            raise TypeError(f"{type(self).__name__}.segment expects float images in [-1, 1], got {images.dtype}")
        if images.numel():
            lo, hi = float(images.min()), float(images.max())
            if not (lo >= -_RANGE_TOLERANCE and hi <= _RANGE_TOLERANCE):
                raise ValueError(
                    f"{type(self).__name__}.segment expects images in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]"
                )
        return images.clamp(-1, 1)

    @torch.no_grad()
    def segment(self, images: torch.Tensor) -> torch.Tensor:
        """Class index per pixel: LongTensor N x H x W on the images' device."""
        images = self.check_images(images)
        scores = self.class_scores(images.to(self.device, torch.float32))
        if scores.shape[0] != images.shape[0] or scores.shape[-2:] != images.shape[-2:]:
            raise RuntimeError(
                f"{type(self).__name__}.class_scores returned {tuple(scores.shape)} for images {tuple(images.shape)}"
            )
        return scores.argmax(dim=1).to(images.device)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.segment(images)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}"


def require_file(path: str | Path, what: str) -> Path:
    """The path if it is a file; otherwise an error naming the file that was expected.
    Nothing is ever downloaded: weights come from the user's disk."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"{what}: expected the file {path}, which does not exist. "
            "Nothing is downloaded; put the file there or point the config at it."
        )
    if path.is_file():
        record_input(path, what)  # the run's provenance lists the segmenter it measured with
    return path


def load_state_dict_file(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """A flat name -> tensor dict from a checkpoint file (also unwraps {'state_dict': ...}
    and DataParallel's 'module.' prefixes)."""
    path = require_file(path, what)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"{what}: could not read {path} as a PyTorch state dict ({e})") from e
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"{what}: {path} does not hold a state dict (name -> tensor)")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)
