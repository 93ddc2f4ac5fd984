"""What a reconstruction run shows: errors, correlations, and the objects the GAN leaves out.

The central question is per image: which classes does the segmenter find in the target but
not in the reconstruction? :class:`seeing.metrics.missing.MissingClasses` counts them; here
they are ranked and drawn:

* :func:`rank_missing`: classes ranked by how often they go missing when present
  (ties: by how many images they go missing in), among classes present in at least
  ``min_support`` targets.
* :func:`rank_agreement`: how well that ranking agrees with FSD's most-dropped classes.
* :func:`latent_correlations`: for generated targets, the correlation of the recovered
  latent and of every recovered r_i with the truth.
* :func:`missing_figure`: target | reconstruction | segmentations | missing objects.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from seeing.metrics.missing import missing_per_image
from seeing.reporting import save_figure, to_uint8


def rank_missing(stats: Mapping[str, torch.Tensor], class_names: Sequence[str], min_support: int = 2,
                 skip: Sequence[str] = ("-", "unlabeled")) -> list[dict[str, Any]]:
    """Rows ``{rank, class, present, missing, missing_rate, lost_pixel_fraction}``, most missing first."""
    rows = []
    for k, name in enumerate(class_names):
        present = int(stats["present"][k])
        if name in skip or present < min_support:
            continue
        rows.append({"class": name, "present": present, "missing": int(stats["missing"][k]),
                     "missing_rate": float(stats["missing_rate"][k]),
                     "lost_pixel_fraction": float(stats["lost_pixel_fraction"][k])})
    rows.sort(key=lambda r: (-r["missing_rate"], -r["missing"], -r["lost_pixel_fraction"], r["class"]))
    return [{"rank": i + 1, **r} for i, r in enumerate(rows)]


def rank_agreement(ours: Sequence[str], theirs: Sequence[str], k: int = 5) -> dict[str, Any]:
    """How two class rankings agree: overlap of their top-k, and Spearman's rho over the shared classes."""
    from scipy.stats import spearmanr

    top = set(ours[:k]) & set(theirs[:k])
    shared = [c for c in ours if c in theirs]
    rho = float("nan")
    if len(shared) >= 3:
        rho = float(spearmanr([ours.index(c) for c in shared], [list(theirs).index(c) for c in shared]).statistic)
    return {"top_k": k, "top_k_overlap": len(top), "top_k_shared": sorted(top), "spearman_shared": rho,
            "shared_classes": len(shared)}


# ------------------------------------------------------------------ latents and features
def latent_correlations(result: Mapping[str, Any]) -> dict[str, float]:
    """Mean correlation (cosine across channels / latent entries) between recovered and true
    latent and features, for generated targets; initial (encoder only) and final values."""
    from seeing.metrics.correlation import cosine_map

    true = result.get("true_features") or {}
    out: dict[str, float] = {}
    for name, truth in true.items():
        rec = result["recovered_features"].get(name)
        if rec is not None:
            out[f"corr_{name}"] = float(cosine_map(rec, truth).mean())
    if "z" in true:
        out["corr_z_initial"] = float(cosine_map(result["init_latents"].reshape(true["z"].shape), true["z"]).mean())
    return out


# ------------------------------------------------------------------ figure
def palette(num_classes: int) -> np.ndarray:
    """K x 3 uint8 colours: the scenes world's own palette when it fits, else a fixed colour wheel."""
    from seeing.data.scenes import LABEL_COLORS

    if num_classes <= len(LABEL_COLORS):
        return LABEL_COLORS[:num_classes]
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    return (np.array([cmap(i % 20)[:3] for i in range(num_classes)]) * 255).astype(np.uint8)


def missing_overlay(image: np.ndarray, target_labels: np.ndarray, missing_classes: Sequence[int]) -> np.ndarray:
    """The target with pixels of its missing classes tinted red and the rest dimmed."""
    mask = np.isin(target_labels, list(missing_classes))
    out = (image.astype(np.float32) * 0.45).astype(np.uint8)
    red = np.array([255, 30, 30], dtype=np.float32)
    out[mask] = (0.35 * image[mask] + 0.65 * red).astype(np.uint8)
    return out


PANELS = ["target", "reconstruction", "target segmentation", "reconstruction segmentation", "missing"]


def missing_panels(targets: torch.Tensor, recons: torch.Tensor, target_labels: torch.Tensor,
                   recon_labels: torch.Tensor, num_classes: int, min_fraction: float = 0.01,
                   min_recall: float | None = 0.2, n: int | None = None) -> list[tuple[list[np.ndarray], list[int]]]:
    """Per image: the five :data:`PANELS` (uint8 H x W x 3) and the classes missing from it."""
    k = num_classes
    pal = palette(k)
    n = targets.shape[0] if n is None else min(n, targets.shape[0])
    miss = missing_per_image(target_labels[:n], recon_labels[:n], k, min_fraction, min_recall)
    t_img, r_img = to_uint8(targets[:n]), to_uint8(recons[:n])
    out = []
    for i in range(n):
        tl, rl = target_labels[i].cpu().numpy(), recon_labels[i].cpu().numpy()
        missing = torch.nonzero(miss[i]).flatten().tolist()
        out.append(([t_img[i], r_img[i], pal[tl % k], pal[rl % k], missing_overlay(t_img[i], tl, missing)], missing))
    return out


def missing_figure(targets: torch.Tensor, recons: torch.Tensor, target_labels: torch.Tensor,
                   recon_labels: torch.Tensor, class_names: Sequence[str], path: str | Path,
                   min_fraction: float = 0.01, max_rows: int = 8, title: str = "",
                   min_recall: float | None = 0.2) -> Path:
    """Rows of [target | reconstruction | segmentation of each | missing objects highlighted]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    k = len(class_names)
    pal = palette(k)
    rows = missing_panels(targets, recons, target_labels, recon_labels, k, min_fraction, min_recall, max_rows)
    n = len(rows)
    fig, axes = plt.subplots(n, 5, figsize=(10, 2.1 * n + 0.6), squeeze=False)
    heads = PANELS
    used: set[int] = set()
    for i, (panels, missing) in enumerate(rows):
        used |= set(np.unique(target_labels[i].cpu().numpy()).tolist()) | set(
            np.unique(recon_labels[i].cpu().numpy()).tolist())
        for j, panel in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(panel, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(heads[j], fontsize=8)
        axes[i, 4].set_xlabel(", ".join(class_names[c] for c in missing) or "(nothing missing)", fontsize=7)
    handles = [Patch(color=pal[c] / 255.0, label=class_names[c]) for c in sorted(used) if c < k]
    fig.legend(handles=handles, loc="lower center", ncol=min(6, max(1, len(handles))), fontsize=7,
               frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    return save_figure(fig, path)


