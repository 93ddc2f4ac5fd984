"""FSD's per-class report: how much of each class the generator draws, relative to the real
images, with a bootstrap interval over images, and the classes whose change is beyond noise.

The relative change of class k is ``(mean_f - mean_r) / mean_r`` over the per-image class
fractions. Its interval resamples the images of each side (with replacement, independently)
and takes the percentiles of the change; a class is *dropped* (or *over-generated*) only when
its whole interval lies below (above) zero, so the lists do not report sampling noise.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch


def _array(x: Any) -> np.ndarray:
    return np.asarray(torch.as_tensor(x, dtype=torch.float64).cpu())


def relative_change(real_mean: Any, fake_mean: Any) -> np.ndarray:
    """``(fake - real) / real`` per class; NaN where the class is absent from the real images."""
    real, fake = _array(real_mean), _array(fake_mean)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(real > 0, (fake - real) / np.where(real > 0, real, 1.0), np.nan)


def _resampled_means(tallies: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``resamples x K`` class means of bootstrap resamples of the rows (one multinomial count
    vector per resample times the tallies: no N x K copy per resample)."""
    n = len(tallies)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)
    return counts @ tallies / n


def bootstrap_relative_change(real_tallies: Any, fake_tallies: Any, resamples: int = 1000,
                              confidence: float = 0.95, seed: int = 0,
                              chunk: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of each class's relative change, over images: ``(low, high)``,
    K each.

    A resample whose real mean of a class is zero gives that class no change (NaN, left out) when
    the fake mean is zero too, and +inf when it is not; the bounds are order statistics (no
    interpolation), so such a class keeps an open upper bound instead of a made-up number.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence}: must be between 0 and 1 (e.g. 0.95)")
    if resamples < 1:
        raise ValueError(f"resamples={resamples}: must be at least 1")
    real, fake = _array(real_tallies), _array(fake_tallies)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1] or not len(real) or not len(fake):
        raise ValueError(f"tallies must be N x K and M x K with N, M >= 1, got {real.shape} and {fake.shape}")
    rng = np.random.default_rng(seed)
    changes = []
    for start in range(0, resamples, chunk):
        b = min(chunk, resamples - start)
        r, f = _resampled_means(real, b, rng), _resampled_means(fake, b, rng)
        with np.errstate(divide="ignore", invalid="ignore"):
            changes.append(np.where(r > 0, (f - r) / np.where(r > 0, r, 1.0), np.where(f > 0, np.inf, np.nan)))
    d = np.concatenate(changes)
    alpha = (1 - confidence) / 2
    all_nan = np.isnan(d).all(0)
    d[:, all_nan] = 0.0  # a class in neither sample: no change, reported as [0, 0] (and never ranked)
    return np.nanquantile(d, alpha, axis=0, method="lower"), np.nanquantile(d, 1 - alpha, axis=0, method="higher")


def per_class_table(real_mean: Any, fake_mean: Any, class_names: Sequence[str],
                    interval: tuple[np.ndarray, np.ndarray] | None = None,
                    noise: dict[str, np.ndarray] | None = None) -> list[dict[str, Any]]:
    """One row per class, in class order: mean area real vs generated, the relative change
    ``(gen - real) / real`` (None for a class absent from the real images: it cannot be dropped)
    and, given ``interval = (low, high)``, its interval and ``beyond_noise`` (the interval
    excludes 0). ``noise`` adds the real-vs-real columns: ``{"delta", "low", "high"}`` of the
    change between two real samples.
    """
    real, fake = _array(real_mean), _array(fake_mean)
    if not (len(real) == len(fake) == len(class_names)):
        raise ValueError(f"class-count mismatch: {len(real)} real, {len(fake)} fake means, "
                         f"{len(class_names)} class names")
    delta = relative_change(real, fake)

    def finite(v: float) -> float | None:  # JSON and CSV have no infinity: None is an open bound
        return float(v) if np.isfinite(v) else None

    rows = []
    for k, name in enumerate(class_names):
        d = None if np.isnan(delta[k]) else float(delta[k])
        row: dict[str, Any] = {"index": k, "class": str(name), "real_area": float(real[k]),
                               "generated_area": float(fake[k]), "relative_delta": d}
        if interval is not None:
            low, high = float(interval[0][k]), float(interval[1][k])
            row.update(ci_low=finite(low) if d is not None else None, ci_high=finite(high) if d is not None else None,
                       beyond_noise=bool(d is not None and (low > 0 or high < 0)))
        if noise is not None:
            row.update(real_vs_real_delta=finite(noise["delta"][k]), real_vs_real_ci_low=finite(noise["low"][k]),
                       real_vs_real_ci_high=finite(noise["high"][k]))
        rows.append(row)
    return rows


def rank_classes(rows: Sequence[dict[str, Any]], top: int = 10, min_real_area: float = 0.0,
                 skip: Sequence[str] = ()) -> dict[str, list[dict[str, Any]]]:
    """Most-dropped (most negative relative change) and most over-generated classes.

    Rows with an interval (``beyond_noise``) are ranked only when the change is beyond noise;
    classes whose mean real area is at most ``min_real_area`` are left out (a tiny denominator
    makes the relative change noise); ``skip`` names classes never ranked (e.g. "unlabeled").
    """
    skip = set(skip)
    ranked = [r for r in rows if r["relative_delta"] is not None and r["real_area"] > min_real_area
              and r["class"] not in skip and r.get("beyond_noise", True)]
    dropped = sorted(ranked, key=lambda r: (r["relative_delta"], -r["real_area"]))
    over = sorted(ranked, key=lambda r: (-r["relative_delta"], -r["real_area"]))
    return {"most_dropped": [r for r in dropped if r["relative_delta"] < 0][:top],
            "most_overgenerated": [r for r in over if r["relative_delta"] > 0][:top]}
