"""How much of an activation the image determines, two ways.

:func:`image_fit_correlation` starts from *another* sample's r_n, fits it freely to
the image G(r_n) by gradient descent on the pixels, and reports how well the fitted
activation correlates with the true one. When the pixels match closely but the
correlation stays low, the rest of the generator ignores much of r_n: many
activations make the same image, so an image encoder must also learn which
activations the generator actually produces (the ones reachable from a latent).

:func:`latent_fit_correlation` restricts the search to those: it fits the latent
instead (from another sample's latent) and scores r_n computed from the fitted
latent. Its correlation is what optimisation through the whole generator reaches
from a poor start; encoders trained longer approach the identifiable part.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from seeing.gans.layered import LayeredGenerator

from seeing.metrics.correlation import cosine_map
from seeing.gans.values import feature_tensor, with_feature


@dataclass
class ImageFitResult:
    layer: str
    samples: int
    steps: int
    start_correlation: float  # corr(r_n of another sample, r_n): knowing nothing
    fitted_correlation: float  # corr(fitted r_n, r_n) once the image is matched
    start_pixel_mse: float
    fitted_pixel_mse: float  # on the [-1, 1] image scale

    def to_dict(self) -> dict:
        return asdict(self)


def image_fit_correlation(generator: LayeredGenerator, layer: str, samples: int = 16, steps: int = 500,
                          lr: float = 0.05, seed: int = 0) -> ImageFitResult:
    """Fit ``layer``'s output to images made from other samples' outputs (see module docs)."""
    generator = generator.eval().requires_grad_(False)
    with torch.no_grad():
        true_value = generator.features(generator.sample_z(samples, seed=seed), [layer])[layer]
        images = generator.run(true_value, start=layer)
        start_value = generator.features(generator.sample_z(samples, seed=seed + 1), [layer])[layer]
    target = feature_tensor(true_value)
    fitted = feature_tensor(start_value).clone().requires_grad_(True)
    opt = torch.optim.Adam([fitted], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)

    def pixel_mse(t: torch.Tensor) -> torch.Tensor:
        # styles / skip images (style-based models) are those of the true sample
        return (generator.run(with_feature(true_value, t), start=layer) - images).pow(2).mean()

    with torch.no_grad():
        start_mse = pixel_mse(fitted).item()
    for _ in range(steps):
        loss = pixel_mse(fitted)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        return ImageFitResult(
            layer=layer, samples=samples, steps=steps,
            start_correlation=cosine_map(feature_tensor(start_value), target).mean().item(),
            fitted_correlation=cosine_map(fitted, target).mean().item(),
            start_pixel_mse=start_mse, fitted_pixel_mse=pixel_mse(fitted).item(),
        )


def latent_fit_correlation(generator: LayeredGenerator, layer: str, samples: int = 16, steps: int = 500,
                           lr: float = 0.05, seed: int = 0) -> ImageFitResult:
    """Fit the latent to G(z) from another sample's latent; score ``layer``'s output of the fit."""
    generator = generator.eval().requires_grad_(False)
    z_true = generator.sample_z(samples, seed=seed)
    with torch.no_grad():
        target = feature_tensor(generator.features(z_true, [layer])[layer])
        images = generator(z_true)
    z = generator.sample_z(samples, seed=seed + 1).requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)

    def scores() -> tuple[float, float]:
        with torch.no_grad():
            r = feature_tensor(generator.features(z, [layer])[layer])
            return cosine_map(r, target).mean().item(), (generator(z) - images).pow(2).mean().item()

    start_corr, start_mse = scores()
    for _ in range(steps):
        loss = (generator(z) - images).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    fitted_corr, fitted_mse = scores()
    return ImageFitResult(layer=layer, samples=samples, steps=steps, start_correlation=start_corr,
                          fitted_correlation=fitted_corr, start_pixel_mse=start_mse, fitted_pixel_mse=fitted_mse)
