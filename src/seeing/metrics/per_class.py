"""FSD's per-class report: how much of each class the generator draws, relative to the real
images, with a bootstrap interval over images, and the classes whose change is beyond noise.

The relative change of class k is ``(mean_f - mean_r) / mean_r`` over the per-image class
fractions. Its interval resamples the images of each side (with replacement, independently)
and bounds the change of every class at once (a simultaneous band, by default); a class is
*dropped* (or *over-generated*) only when its whole interval lies below (above) zero, so the
lists do not report sampling noise.
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


def resampled_changes(real: np.ndarray, fake: np.ndarray, resamples: int, seed: int,
                      chunk: int = 100) -> np.ndarray:
    """``resamples x K`` relative changes of bootstrap resamples (each side's images resampled
    with replacement, independently). A resample whose real mean of a class is zero gives that
    class +inf when its fake mean is not zero, NaN when it is."""
    rng = np.random.default_rng(seed)
    changes = []
    for start in range(0, resamples, chunk):
        b = min(chunk, resamples - start)
        r, f = _resampled_means(real, b, rng), _resampled_means(fake, b, rng)
        with np.errstate(divide="ignore", invalid="ignore"):
            changes.append(np.where(r > 0, (f - r) / np.where(r > 0, r, 1.0), np.where(f > 0, np.inf, np.nan)))
    return np.concatenate(changes)


def bootstrap_relative_change(real_tallies: Any, fake_tallies: Any, resamples: int = 1000,
                              confidence: float = 0.95, seed: int = 0, simultaneous: bool = True,
                              family: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap interval of each class's relative change, over images: ``(low, high)``, K each.

    ``simultaneous=True``: one band for all classes at once (the bootstrap max-t band): with
    probability ``confidence`` every class of ``family`` (a K bool mask, default all) holds its true
    change inside its interval, so a list of the classes whose interval excludes 0 holds, at that
    level, no class that is there by sampling noise. Each interval is the change plus or minus
    ``q`` bootstrap standard errors, ``q`` the ``confidence`` quantile over resamples of the largest
    standardised deviation among the family's classes (q is about 2.8 for 12 classes at 95 %,
    against 1.96 for one class alone). ``simultaneous=False``: each class's own percentile interval.

    A class whose resampled change is ever undefined or infinite (absent from a resample of the
    real images) has an open interval (-inf, inf): it is never beyond noise.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence}: must be between 0 and 1 (e.g. 0.95)")
    if resamples < 2:
        raise ValueError(f"resamples={resamples}: must be at least 2")
    real, fake = _array(real_tallies), _array(fake_tallies)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1] or not len(real) or not len(fake):
        raise ValueError(f"tallies must be N x K and M x K with N, M >= 1, got {real.shape} and {fake.shape}")
    k = real.shape[1]
    d = resampled_changes(real, fake, resamples, seed)
    change = relative_change(real.mean(0), fake.mean(0))
    defined = np.isfinite(d).all(0) & np.isfinite(change)
    low, high = np.full(k, -np.inf), np.full(k, np.inf)
    if not simultaneous:
        alpha = (1 - confidence) / 2  # order statistics, no interpolation
        low[defined] = np.quantile(d[:, defined], alpha, axis=0, method="lower")
        high[defined] = np.quantile(d[:, defined], 1 - alpha, axis=0, method="higher")
        return low, high
    se = np.zeros(k)
    se[defined] = d[:, defined].std(0, ddof=1)
    members = defined & (se > 0) & (np.ones(k, bool) if family is None else np.asarray(family, bool))
    if members.any():
        deviation = np.abs(d[:, members] - change[members]) / se[members]
        q = float(np.quantile(deviation.max(1), confidence, method="higher"))
    else:  # nothing varies: the band is its classes' changes themselves
        q = 0.0
    low[defined] = np.maximum(change[defined] - q * se[defined], -1.0)  # a class cannot lose more than all of it
    high[defined] = change[defined] + q * se[defined]
    return low, high


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
