"""What a reconstruction run shows: errors, correlations, and the objects the GAN leaves out.

The central question is per image: which classes does the segmenter find in the
target but not in the reconstruction? Counted over a set of images and ranked,
these are the objects the generator cannot draw (the paper's "what is missing").

* :func:`class_presence` / :class:`MissingClasses` (a torchmetrics Metric): a class is
  present in an image when it covers at least ``min_fraction`` of it. It is missing from the
  reconstruction when present in the target and the reconstruction does not draw it *there*:
  fewer than ``min_recall`` of the target's pixels of that class are labelled with it in the
  reconstruction (``min_recall=None``: missing only when absent from the whole reconstruction,
  which a few stray pixels of an artefact elsewhere can defeat).
* :func:`rank_missing`: classes ranked by how often they go missing when present
  (ties: by how many images they go missing in), among classes present in at least
  ``min_support`` targets.
* :func:`iou_per_class`: per-class IoU of the reconstruction's segmentation against the
  target's (torchmetrics' multiclass Jaccard index), the segmentation-level agreement.
* :func:`latent_correlations`: for generated targets, the correlation of the recovered
  latent and of every recovered r_i with the truth.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.classification import MulticlassJaccardIndex

from seeing.reporting import save_figure, write_csv


# ------------------------------------------------------------------ per-image files of a run
def to_uint8(images: torch.Tensor) -> np.ndarray:
    """N x 3 x H x W in [-1, 1] -> N x H x W x 3 uint8."""
    x = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().byte()
    return x.permute(0, 2, 3, 1).cpu().numpy()


def worse_than_start(result: Mapping[str, Any]) -> torch.Tensor:
    """Per image: final pixel L1 above the initial one (derived for results written before it was stored)."""
    if "worse_than_start" in result:
        return result["worse_than_start"].bool()
    return result["final_pixel_l1"] > result["initial_pixel_l1"]


def write_per_image_files(result: Mapping[str, Any], output_dir: Path) -> None:
    """``images/NNNN.png`` (target | initial | final), ``per_image.csv`` (errors, the ``diverged``
    and ``worse_than_start`` flags, delta RMS, loss curve ends) and ``loss_curves.png``."""
    from PIL import Image

    output_dir = Path(output_dir)
    (output_dir / "images").mkdir(parents=True, exist_ok=True)
    strips = np.concatenate([to_uint8(result["targets"]), to_uint8(result["initial"]),
                             to_uint8(result["final"])], axis=2)
    ids = result.get("ids")
    rows = []
    curves = result["loss_curves"]
    worse = worse_than_start(result)
    diverged = result.get("diverged", torch.zeros(len(worse), dtype=torch.bool))
    for i, strip in enumerate(strips):
        Image.fromarray(strip).save(output_dir / "images" / f"{i:04d}.png")
        row = {"index": i, "id": int(ids[i]) if ids is not None else i,
               "initial_pixel_l1": float(result["initial_pixel_l1"][i]),
               "final_pixel_l1": float(result["final_pixel_l1"][i]),
               "diverged": bool(diverged[i]), "worse_than_start": bool(worse[i])}
        if curves.shape[1]:
            row["loss_first"], row["loss_last"] = float(curves[i, 0]), float(curves[i, -1])
        for p, v in result["delta_rms"].items():
            row[f"delta_rms_{p}"] = float(v[i])
        rows.append(row)
    write_csv(output_dir / "per_image.csv", rows)
    loss_curve_figure(curves, output_dir / "loss_curves.png",
                      f"{(result.get('meta') or {}).get('variant', {}).get('name', '')}: per-image loss")


# ------------------------------------------------------------------ missing classes
def class_presence(labels: torch.Tensor, num_classes: int, min_fraction: float = 0.01) -> torch.Tensor:
    """N x K bool: class k covers at least ``min_fraction`` of image n."""
    n = labels.shape[0]
    flat = labels.reshape(n, -1).long()
    counts = torch.zeros(n, num_classes, dtype=torch.float64, device=labels.device)
    counts.scatter_add_(1, flat.clamp(0, num_classes - 1), torch.ones_like(flat, dtype=torch.float64))
    return counts / flat.shape[1] >= min_fraction


def class_recall(target_labels: torch.Tensor, recon_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """N x K: the share of each target class's pixels that the reconstruction labels the same (NaN: absent)."""
    n = target_labels.shape[0]
    t = target_labels.reshape(n, -1).long().clamp(0, num_classes - 1)
    hit = (target_labels == recon_labels).reshape(n, -1).double()
    total = torch.zeros(n, num_classes, dtype=torch.float64, device=t.device)
    total.scatter_add_(1, t, torch.ones_like(hit))
    same = torch.zeros_like(total).scatter_add_(1, t, hit)
    return same / total  # 0/0 -> NaN for classes the target lacks


def missing_per_image(target_labels: torch.Tensor, recon_labels: torch.Tensor, num_classes: int,
                      min_fraction: float = 0.01, min_recall: float | None = 0.2) -> torch.Tensor:
    """N x K bool: present in the target and not drawn by the reconstruction (see the module doc)."""
    present = class_presence(target_labels, num_classes, min_fraction)
    if min_recall is None:
        return present & ~class_presence(recon_labels, num_classes, min_fraction)
    return present & (class_recall(target_labels, recon_labels, num_classes) < min_recall)


class MissingClasses(Metric):
    """Per class: in how many targets it is present, and in how many of those the reconstruction misses it."""

    full_state_update = False
    is_differentiable = False

    def __init__(self, num_classes: int, min_fraction: float = 0.01, min_recall: float | None = 0.2, **kwargs):
        super().__init__(**kwargs)
        self.num_classes, self.min_fraction = int(num_classes), float(min_fraction)
        self.min_recall = None if min_recall is None else float(min_recall)
        self.add_state("present", default=torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("missing", default=torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")
        # pixels of the target's class k that the reconstruction labels as something else
        self.add_state("target_pixels", default=torch.zeros(num_classes, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("lost_pixels", default=torch.zeros(num_classes, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, target_labels: torch.Tensor, recon_labels: torch.Tensor) -> None:
        if target_labels.shape != recon_labels.shape:
            raise ValueError(f"label maps differ in shape: {tuple(target_labels.shape)} vs {tuple(recon_labels.shape)}")
        k = self.num_classes
        self.present += class_presence(target_labels, k, self.min_fraction).sum(0)
        self.missing += missing_per_image(target_labels, recon_labels, k, self.min_fraction, self.min_recall).sum(0)
        t = target_labels.reshape(-1).long().clamp(0, k - 1)
        lost = (target_labels != recon_labels).reshape(-1).double()
        self.target_pixels += torch.bincount(t, minlength=k).double()
        self.lost_pixels += torch.zeros(k, dtype=torch.float64, device=t.device).scatter_add_(0, t, lost)

    def compute(self) -> dict[str, torch.Tensor]:
        rate = self.missing.double() / self.present.clamp(min=1).double()
        lost = self.lost_pixels / self.target_pixels.clamp(min=1)
        return {"present": self.present, "missing": self.missing, "missing_rate": rate, "lost_pixel_fraction": lost}


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


def iou_per_class(target_labels: torch.Tensor, recon_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """IoU of every class between reconstruction and target segmentations (NaN: class in neither)."""
    metric = MulticlassJaccardIndex(num_classes=num_classes, average=None, zero_division=float("nan"))
    metric.update(recon_labels.reshape(-1).long(), target_labels.reshape(-1).long())
    return metric.compute().float()


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
    from seeing.inversion.correlation import cosine_map

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
    n = min(max_rows, targets.shape[0])
    miss = missing_per_image(target_labels[:n], recon_labels[:n], k, min_fraction, min_recall)
    t_img, r_img = to_uint8(targets[:n]), to_uint8(recons[:n])
    fig, axes = plt.subplots(n, 5, figsize=(10, 2.1 * n + 0.6), squeeze=False)
    heads = ["target", "reconstruction", "target segmentation", "reconstruction segmentation", "missing"]
    used: set[int] = set()
    for i in range(n):
        tl, rl = target_labels[i].cpu().numpy(), recon_labels[i].cpu().numpy()
        used |= set(np.unique(tl).tolist()) | set(np.unique(rl).tolist())
        missing = torch.nonzero(miss[i]).flatten().tolist()
        panels = [t_img[i], r_img[i], pal[tl % k], pal[rl % k], missing_overlay(t_img[i], tl, missing)]
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


def loss_curve_figure(curves: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """Per-image loss curves (thin) and their mean (thick)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    c = curves.float().numpy()
    if c.shape[1]:
        for row in c:
            ax.plot(row, lw=0.5, alpha=0.4, color="tab:blue")
        ax.plot(np.nanmean(c, axis=0), lw=2, color="black", label="mean")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    ax.set_xlabel("step")
    ax.set_ylabel("per-image loss")
    ax.set_title(title or "reconstruction loss", fontsize=9)
    return save_figure(fig, path)
