"""What a reconstruction run shows: errors, correlations, and the objects the GAN leaves out.

The central question is per image: which objects does the segmenter find in the target but
not in the reconstruction? :class:`seeing.metrics.missing.MissingObjects` counts them (an
object is a connected region of one class; missing when the reconstruction draws less than
``min_covered`` of it); here they are ranked and drawn:

* :func:`rank_missing`: per class, object regions, missing regions, images, lost pixels and the
  whole-class view, ranked by the share of its regions that go missing (ties: by how many);
  :func:`most_missing` keeps the classes with at least one missing region.
* :func:`rank_agreement`: how well that ranking agrees with FSD's most-dropped classes.
* :func:`latent_correlations`: for generated targets, the correlation of the recovered
  latent and of every recovered r_i with the truth.
* :func:`missing_figure`: target | reconstruction | segmentations | missing objects outlined.
"""
from __future__ import annotations

import textwrap
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from scipy import ndimage

from seeing.metrics.missing import ObjectRegion, object_regions
from seeing.reporting import save_figure, to_uint8

SKIP = ("-", "unlabeled")


def rank_missing(stats: Mapping[str, torch.Tensor], class_names: Sequence[str], min_support: int = 2,
                 skip: Sequence[str] = SKIP) -> list[dict[str, Any]]:
    """One row per class with at least ``min_support`` object regions in the targets, most missing
    first: ``{rank, class, regions, missing_regions, missing_rate, images_present, images_missing,
    lost_pixel_fraction, images_whole_class_missing}``."""
    rows = []
    for k, name in enumerate(class_names):
        regions = int(stats["regions"][k])
        if name in skip or regions < max(1, min_support):
            continue
        rows.append({"class": name, "regions": regions, "missing_regions": int(stats["missing_regions"][k]),
                     "missing_rate": float(stats["missing_rate"][k]),
                     "images_present": int(stats["images_present"][k]),
                     "images_missing": int(stats["images_missing"][k]),
                     "lost_pixel_fraction": float(stats["lost_pixel_fraction"][k]),
                     # the whole-class view: images whose reconstruction lacks the class altogether
                     "images_whole_class_missing": int(stats["images_whole_class_missing"][k])})
    rows.sort(key=lambda r: (-r["missing_rate"], -r["missing_regions"], -r["lost_pixel_fraction"], r["class"]))
    return [{"rank": i + 1, **r} for i, r in enumerate(rows)]


def most_missing(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The ranked classes that are missing somewhere: a class never missed is never listed as missing."""
    return [r for r in rows if r["missing_regions"] > 0]


def missing_caption(regions: Sequence[ObjectRegion], class_names: Sequence[str]) -> str:
    """The missing objects of one image by class, largest first: ``building, window x2``."""
    counts = Counter(g.class_index for g in regions if g.missing)
    order = list(dict.fromkeys(g.class_index for g in regions if g.missing))
    return ", ".join(class_names[c] + (f" x{counts[c]}" if counts[c] > 1 else "") for c in order)


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


def missing_overlay(image: np.ndarray, regions: Sequence[ObjectRegion]) -> np.ndarray:
    """The target dimmed, each missing object tinted red and outlined in yellow (its outer edge)."""
    out = (image.astype(np.float32) * 0.45).astype(np.uint8)
    red, yellow = np.array([255, 30, 30], dtype=np.float32), np.array([255, 230, 0], dtype=np.uint8)
    for g in regions:
        if not g.missing:
            continue
        out[g.mask] = (0.35 * image[g.mask] + 0.65 * red).astype(np.uint8)
        outer = ndimage.binary_fill_holes(g.mask)  # its outline, not the edges of the windows inside it
        out[outer & ~ndimage.binary_erosion(outer)] = yellow
    return out


PANELS = ["target", "reconstruction", "target segmentation", "reconstruction segmentation", "missing"]


def missing_panels(targets: torch.Tensor, recons: torch.Tensor, target_labels: torch.Tensor,
                   recon_labels: torch.Tensor, num_classes: int, min_region: float = 0.002,
                   min_covered: float = 0.2, n: int | None = None
                   ) -> list[tuple[list[np.ndarray], list[ObjectRegion]]]:
    """Per image: the five :data:`PANELS` (uint8 H x W x 3) and its object regions (largest first)."""
    k = num_classes
    pal = palette(k)
    n = targets.shape[0] if n is None else min(n, targets.shape[0])
    t_img, r_img = to_uint8(targets[:n]), to_uint8(recons[:n])
    out = []
    for i in range(n):
        tl, rl = target_labels[i].cpu().numpy(), recon_labels[i].cpu().numpy()
        regions = object_regions(tl, rl, k, min_region, min_covered)
        out.append(([t_img[i], r_img[i], pal[tl % k], pal[rl % k], missing_overlay(t_img[i], regions)], regions))
    return out


def missing_figure(targets: torch.Tensor, recons: torch.Tensor, target_labels: torch.Tensor,
                   recon_labels: torch.Tensor, class_names: Sequence[str], path: str | Path,
                   min_region: float = 0.002, max_rows: int = 8, title: str = "",
                   min_covered: float = 0.2) -> Path:
    """Rows of [target | reconstruction | segmentation of each | missing objects outlined], each
    row captioned with the missing objects by class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    k = len(class_names)
    pal = palette(k)
    rows = missing_panels(targets, recons, target_labels, recon_labels, k, min_region, min_covered, max_rows)
    n = len(rows)
    fig, axes = plt.subplots(n, 5, figsize=(10, 2.1 * n + 0.9), squeeze=False)
    used: set[int] = set()
    for i, (panels, regions) in enumerate(rows):
        used |= set(np.unique(target_labels[i].cpu().numpy()).tolist()) | set(
            np.unique(recon_labels[i].cpu().numpy()).tolist())
        for j, panel in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(panel, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(PANELS[j], fontsize=8)
        caption = textwrap.fill(missing_caption(regions, class_names), 34) or "(nothing missing)"
        axes[i, 4].set_xlabel(caption, fontsize=6.5, linespacing=1.0)
    handles = [Patch(color=pal[c] / 255.0, label=class_names[c]) for c in sorted(used) if c < k]
    fig.legend(handles=handles, loc="lower center", ncol=min(6, max(1, len(handles))), fontsize=7,
               frameon=False)
    fig.text(0.5, 0.005 + 0.012 * ((len(handles) + 5) // 6), (
        f"missing: an object (a connected region of one class, at least {min_region:.1%} of the image) of which the "
        f"reconstruction's segmentation draws less than {min_covered:.0%}; outlined in yellow"),
        ha="center", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.03 + 0.012 * ((len(handles) + 5) // 6), 1, 0.97))
    return save_figure(fig, path)
