"""The reconstruction objective, reduced to one number per image.

``loss_i = L1(x_i, y_i) + w_p * L1(phi(x_i), phi(y_i)) + lambda * sum_l mean(delta_l[i]^2)
+ w_E * mean((E(x_i) - E(y_i))^2)``

Every term is a mean over *one image's* elements, and the batch loss that is
back-propagated is the SUM of these per-image numbers. So the gradient reaching
image i's corrections is the gradient of loss_i alone, whatever else shares the
batch; with an elementwise optimiser (Adam) every image is its own problem.

``phi`` is VGG-16's convolutional trunk through relu4_2 (torchvision
``features[:21]``) with ImageNet weights read from disk: nothing is downloaded. It sees
either the raw [-1, 1] image, as the paper's reference code feeds it
(``perceptual_input="raw"``), or the image ImageNet-normalised as VGG was trained
(``"imagenet"``). ``E`` is the hybrid encoder (its latent estimate): the encoder term of the
reference's z optimisation (variant e). The targets' ``phi(y)`` and ``E(y)`` are computed
once per target batch and reused while those targets are unchanged.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from seeing.frozen import freeze

VGG16_FILE = "vgg16-397923af.pth"  # torchvision's ImageNet VGG-16 weights
RELU4_2 = 21  # features[:21] ends with the ReLU after conv4_2
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PERCEPTUAL_INPUTS = ("raw", "imagenet")


def default_vgg16_path() -> Path:
    """Where torch hub caches torchvision's VGG-16: ``$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth``."""
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch")
    return Path(torch_home) / "hub" / "checkpoints" / VGG16_FILE


def load_vgg16_trunk(path: Path) -> nn.Sequential:
    """torchvision VGG-16 ``features[:21]`` with the weights stored in ``path`` (a full VGG-16
    state dict as torchvision ships it, or just its ``features.*`` entries), frozen, eval mode."""
    from torchvision.models import vgg16

    from seeing.reporting import load_torch_file
    from seeing.state_dicts import load_exact

    fix = (f"Expected torchvision's ImageNet VGG-16 state dict ({VGG16_FILE}, what vgg16(pretrained=True) loads: "
           f"features.0.weight ... classifier.6.bias). Re-copy it, or point stage.loss.vgg_path at it.")
    state = load_torch_file(path, "VGG-16 weights", fix)  # a damaged file: one error naming it
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a VGG-16 state dict (it holds a {type(state).__name__}). {fix}")
    with torch.device("meta"):  # the architecture only: the 100M-parameter classifier is never allocated
        trunk = vgg16(weights=None).features[:RELU4_2]
    wanted = {k for k in trunk.state_dict()}
    feats = {k[len("features."):]: v for k, v in state.items() if isinstance(k, str) and k.startswith("features.")}
    missing = sorted(wanted - set(feats))
    if missing:
        raise ValueError(f"{path} is not a torchvision VGG-16 state dict: no features.{missing[0]} "
                         f"({len(missing)} trunk tensors missing). {fix}")
    load_exact(trunk, {k: feats[k] for k in wanted}, str(path), optional=(), spell=lambda k: f"features.{k}",
               expected=f"torchvision's VGG-16, {VGG16_FILE}")
    return freeze(trunk)


class VGGPerceptual(nn.Module):
    """Frozen VGG-16 features through relu4_2 of images in [-1, 1]: ImageNet-normalised inside
    (``input="imagenet"``) or fed as they are (``input="raw"``, the paper's reference code)."""

    def __init__(self, weights_path: str | Path | None = None, input: str = "imagenet"):
        super().__init__()
        if input not in PERCEPTUAL_INPUTS:
            raise ValueError(f"perceptual_input must be one of {', '.join(PERCEPTUAL_INPUTS)}, got {input!r}")
        self.input = input
        path = Path(weights_path).expanduser() if weights_path else default_vgg16_path()
        if not path.is_file():
            raise FileNotFoundError(
                f"perceptual=vgg needs torchvision's ImageNet VGG-16 weights at {path} (file {VGG16_FILE}); "
                "nothing is downloaded. Put the file there (or set stage.loss.vgg_path / $TORCH_HOME), "
                "or use perceptual=none.")
        self.features = load_vgg16_trunk(path)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.source = str(path)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images if self.input == "raw" else ((images + 1) / 2 - self.mean) / self.std
        return self.features(x)


def per_image_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over everything but the batch dimension."""
    return t.reshape(t.shape[0], -1).mean(dim=1)


class ReconstructionLoss(nn.Module):
    """Per-image reconstruction loss (a vector with one entry per image).

    Args:
        perceptual: ``"none"`` or ``"vgg"``.
        perceptual_weight: weight of the VGG feature L1 term.
        delta_weight: lambda, the weight of ``sum_l mean(delta_l^2)`` for layer corrections.
        latent_delta_weight: the same for a correction of the latent (0: a latent
            that moves freely, as in direct optimisation of z).
        vgg_path: VGG-16 weights file (default: the torch hub cache).
        perceptual_input: what VGG sees: ``"imagenet"`` (ImageNet-normalised) or ``"raw"``
            (the [-1, 1] image, as the paper's reference code feeds it).
        encoder_weight: weight of ``mean((E(x) - E(y))^2)``, ``E`` the hybrid encoder's latent
            estimate (0: off; the paper's variant e uses 0.25).
        encoder: that encoder (frozen here, :func:`seeing.frozen.freeze`; needed when ``encoder_weight > 0``).
    """

    # target features kept for reuse (per kind): a few target batches, e.g. a run's chunks
    CACHE_SIZE = 4

    def __init__(self, perceptual: str = "none", perceptual_weight: float = 1.0, delta_weight: float = 0.01,
                 latent_delta_weight: float = 0.0, vgg_path: str | Path | None = None,
                 perceptual_input: str = "imagenet", encoder_weight: float = 0.0,
                 encoder: nn.Module | None = None):
        super().__init__()
        if perceptual not in ("none", "vgg"):
            raise ValueError(f"perceptual must be 'none' or 'vgg', got {perceptual!r}")
        if perceptual_input not in PERCEPTUAL_INPUTS:
            raise ValueError(f"perceptual_input must be one of {', '.join(PERCEPTUAL_INPUTS)}, "
                             f"got {perceptual_input!r}")
        self.perceptual = VGGPerceptual(vgg_path, perceptual_input) if perceptual == "vgg" else None
        self.perceptual_weight = float(perceptual_weight)
        self.delta_weight = float(delta_weight)
        self.latent_delta_weight = float(latent_delta_weight)
        self.encoder_weight = float(encoder_weight)
        if self.encoder_weight < 0:
            raise ValueError(f"encoder_weight must be >= 0, got {encoder_weight}")
        if self.encoder_weight > 0 and encoder is None:
            raise ValueError("encoder_weight > 0 needs the encoder E (the hybrid encoder)")
        self.encoder = freeze(encoder) if self.encoder_weight > 0 else None
        self._cache: dict[str, list] = {}

    def _of_target(self, kind: str, net: nn.Module, target: torch.Tensor) -> torch.Tensor:
        """``net(target)`` without gradients, reused while the same target tensor is unchanged
        (same storage, offset, shape and version; the entry holds the tensor, so its memory cannot
        be taken by another one meanwhile)."""
        key = (target.data_ptr(), tuple(target.shape), tuple(target.stride()), target._version, target.device,
               torch.is_autocast_enabled(target.device.type))
        entries = self._cache.setdefault(kind, [])
        for i, (k, _, value) in enumerate(entries):
            if k == key:
                entries.append(entries.pop(i))
                return value
        with torch.no_grad():
            value = net(target)
        entries.append((key, target, value))
        del entries[:-self.CACHE_SIZE]
        return value

    def terms(self, image: torch.Tensor, target: torch.Tensor,
              deltas: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Each term per image (float32), and their weighted sum under ``"loss"``."""
        image, target = image.float(), target.float()
        out = {"pixel": per_image_mean((image - target).abs())}
        total = out["pixel"]
        if self.perceptual is not None:
            phi_target = self._of_target("perceptual", self.perceptual, target)
            out["perceptual"] = per_image_mean((self.perceptual(image) - phi_target).abs()).float()
            total = total + self.perceptual_weight * out["perceptual"]
        if self.encoder is not None:
            e_target = self._of_target("encoder", self.encoder, target)
            out["encoder"] = per_image_mean((self.encoder(image).float() - e_target.float()) ** 2)
            total = total + self.encoder_weight * out["encoder"]
        reg = torch.zeros_like(total)
        for name, d in (deltas or {}).items():
            weight = self.latent_delta_weight if name == "z" else self.delta_weight
            if weight:
                reg = reg + weight * per_image_mean(d.float() ** 2)
        out["delta"] = reg
        out["loss"] = total + reg
        return out

    def forward(self, image: torch.Tensor, target: torch.Tensor,
                deltas: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        return self.terms(image, target, deltas)["loss"]


def pixel_l1(image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image mean absolute error (images in [-1, 1])."""
    return per_image_mean((image.float() - target.float()).abs())


def resize_to(images: torch.Tensor, size: int) -> torch.Tensor:
    """Square images resized to ``size`` (area-averaged when shrinking)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    mode = "area" if images.shape[-1] > size else "bilinear"
    kwargs = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(images, size=(size, size), mode=mode, **kwargs)
