"""The per-image files a reconstruct run writes next to ``reconstruction.pt``: the image strips,
``per_image.csv`` and the loss curves."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from seeing.reporting import save_figure, to_uint8, write_csv


def worse_than_start(result: Mapping[str, Any]) -> torch.Tensor:
    """Per image: final pixel L1 above the initial one (derived for results written before it was stored)."""
    if "worse_than_start" in result:
        return result["worse_than_start"].bool()
    return result["final_pixel_l1"] > result["initial_pixel_l1"]


def write_per_image_files(result: Mapping[str, Any], output_dir: Path) -> list[dict[str, Any]]:
    """``images/NNNN.png`` (target | initial | final), ``per_image.csv`` (errors, the ``diverged``
    and ``worse_than_start`` flags, delta RMS, loss curve ends) and ``loss_curves.png``; returns the
    table's rows."""
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
    return rows


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
