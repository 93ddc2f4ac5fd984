"""``python evaluate.py metric=reconstruction``: reconstruct images and report what is missing.

By default (``metric.result=null``) it reconstructs a handful of held-out real scenes
itself with the configured variant (f: hybrid encoder + layer corrections) and the
model's shipped weights, then reports; ``metric.result=<.../reconstruction.pt>``
reports an existing ``stage=reconstruct`` output instead.

Writes under ``output_dir``: ``reconstruction.json`` (all numbers), ``missing_classes.{csv,md}``
(per class: object regions of the targets, how many the reconstructions miss, in how many images,
lost pixels, the whole-class view; ranked), ``missing_objects.csv`` (every missing object: image,
class, size, share drawn), ``iou_per_class.csv``, ``missing.png`` (rows of target | reconstruction |
both segmentations | missing objects outlined), ``loss_curves.png`` (the loss and its pixel term,
named), and the same to W&B.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from seeing.metrics.missing import MissingObjects, iou_per_class, object_regions
from seeing.provenance import current
from seeing.reporting import WandbReport, save_figure, write_csv, write_json, write_markdown_table
from seeing.reports.missing_objects import (PANELS, latent_correlations, missing_caption, missing_figure,
                                            missing_panels, most_missing, rank_agreement, rank_missing)
from seeing.progress import StepProgressBar
from seeing.stages.reconstruct import load_result

log = logging.getLogger(__name__)


@torch.no_grad()
def segment_all(segmenter: Any, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    return torch.cat([segmenter.segment(images[i:i + batch_size].to(segmenter.device)).cpu()
                      for i in range(0, images.shape[0], batch_size)])


@torch.no_grad()
def perceptual_errors(result: Mapping[str, Any], vgg_path: str | None, batch_size: int = 16) -> dict[str, float]:
    """Mean VGG relu4_2 feature L1 of the initial and final reconstructions (needs VGG weights)."""
    from seeing.reconstruct.losses import VGGPerceptual, per_image_mean

    vgg = VGGPerceptual(vgg_path)
    out = {}
    for key in ("initial", "final"):
        errs = [per_image_mean((vgg(result[key][i:i + batch_size]) - vgg(result["targets"][i:i + batch_size])).abs())
                for i in range(0, result["targets"].shape[0], batch_size)]
        out[f"perceptual_{key}"] = float(torch.cat(errs).mean())
    return out


def missing_settings(m: Mapping[str, Any]) -> dict[str, Any]:
    """``metric.min_region`` / ``min_covered`` / ``min_support``, checked before any work."""
    region, covered, support = m.get("min_region", 0.002), m.get("min_covered", 0.2), m.get("min_support", 2)
    if isinstance(region, bool) or not isinstance(region, (int, float)) or not 0 < region < 1:
        raise ValueError(f"metric.min_region={region!r}: give the smallest object as a share of the image, "
                         f"between 0 and 1 (e.g. 0.002)")
    if isinstance(covered, bool) or not isinstance(covered, (int, float)) or not 0 < covered <= 1:
        raise ValueError(f"metric.min_covered={covered!r}: give the share of an object the reconstruction must "
                         f"draw for it not to be missing, in (0, 1] (e.g. 0.2)")
    if isinstance(support, bool) or not isinstance(support, int) or support < 1:
        raise ValueError(f"metric.min_support={support!r}: give the fewest object regions a ranked class needs "
                         f"(a whole number >= 1)")
    return {"min_region": float(region), "min_covered": float(covered), "min_support": support}


def summarize(result: Mapping[str, Any], segmenter: Any, min_region: float = 0.002, min_support: int = 2,
              batch_size: int = 32, perceptual: str = "none", vgg_path: str | None = None,
              min_covered: float = 0.2) -> dict[str, Any]:
    """Every number of one reconstruction run, plus the label maps the figure needs."""
    from seeing.stages.reconstruct_files import worse_than_start

    class_names = list(segmenter.class_names)
    k = len(class_names)
    target_labels = segment_all(segmenter, result["targets"], batch_size)
    recon_labels = segment_all(segmenter, result["final"].clamp(-1, 1), batch_size)
    initial_labels = segment_all(segmenter, result["initial"].clamp(-1, 1), batch_size)
    missing = MissingObjects(k, min_region, min_covered)
    missing.update(target_labels, recon_labels)
    stats = missing.compute()
    ranking = rank_missing(stats, class_names, min_support)
    ious = iou_per_class(target_labels, recon_labels, k)
    iou_initial = iou_per_class(target_labels, initial_labels, k)
    present = torch.nonzero(stats["images_present"] > 0).flatten().tolist()
    images = int(result["targets"].shape[0])
    ids = result.get("ids")
    objects = [{"image": i, "id": int(ids[i]) if ids is not None else i, "class": class_names[g.class_index],
                "pixels": g.pixels, "share_of_image": g.share, "share_drawn": g.covered}
               for i in range(images)
               for g in object_regions(target_labels[i], recon_labels[i], k, min_region, min_covered) if g.missing]
    metrics: dict[str, Any] = {
        "images": images,
        "target_kind": result.get("target_kind", ""),
        "variant": (result.get("meta") or {}).get("variant", {}).get("name", ""),
        "steps": int(result.get("steps", 0)),
        "pixel_l1_initial": float(result["initial_pixel_l1"].mean()),
        "pixel_l1_final": float(result["final_pixel_l1"].mean()),
        "miou_initial": float(iou_initial[present].nanmean()) if present else float("nan"),
        "miou_final": float(ious[present].nanmean()) if present else float("nan"),
        "objects_per_image": float(stats["regions"].sum()) / max(1, images),
        "missing_per_image": float(stats["missing_regions"].sum()) / max(1, images),
        "missing_definition": {"min_region": min_region, "min_covered": min_covered, "min_support": min_support,
                               "connectivity": 8},
        # images whose loss turned non-finite: they kept their last finite corrections
        "diverged": int(result["diverged"].sum()) if "diverged" in result else 0,
        # images the optimisation left with a larger pixel L1 than they started with (step size too large)
        "worse_than_start": int(worse_than_start(result).sum()),
    }
    if perceptual == "vgg":
        metrics.update(perceptual_errors(result, vgg_path))
    metrics.update(latent_correlations(result))
    iou_rows = [{"class": class_names[c], "images_present": int(stats["images_present"][c]),
                 "iou": float(ious[c]), "iou_initial": float(iou_initial[c])} for c in present]
    return {"metrics": metrics, "missing": ranking, "most_missing": most_missing(ranking), "objects": objects,
            "iou": iou_rows, "class_names": class_names, "target_labels": target_labels,
            "recon_labels": recon_labels}


def fsd_comparison(missing_rows: list[dict[str, Any]], fsd_json: str | Path | None, k: int = 5) -> dict[str, Any] | None:
    """Agreement of the missing-objects ranking with the FSD report's most-dropped classes."""
    if not fsd_json or not Path(fsd_json).is_file():
        return None
    import json

    report = json.loads(Path(fsd_json).read_text())
    rows = [r for r in report.get("per_class", []) if r.get("relative_delta") is not None]
    fsd_rank = [r["class"] for r in sorted(rows, key=lambda r: r["relative_delta"])]
    ours = [r["class"] for r in missing_rows]
    return {"fsd_report": str(fsd_json), "fsd_most_dropped": [r["class"] for r in report.get("most_dropped", [])],
            "reconstruction_most_missing": ours[:k], **rank_agreement(ours, fsd_rank, k)}


def build_generator(cfg: DictConfig):
    import hydra

    return hydra.utils.instantiate(cfg.model.generator)


def _root_message(e: BaseException) -> str:
    while e.__cause__ is not None:  # Hydra wraps errors raised while instantiating
        e = e.__cause__
    return str(e)


# how the segmenters this project trains itself are made
SEGMENTER_COMMANDS = {"scenes": "python train.py stage=segmenter data=scenes",
                      "scenes_segformer": "python train.py stage=segformer"}


def load_parts(cfg: DictConfig, need_models: bool) -> tuple[Any, Any]:
    """The segmenter and (when reconstructing here) the generator, after checking that every file
    the job needs exists: one error lists everything missing and the commands that make it."""
    import hydra

    from seeing.devices import resolve_device
    from seeing.stages.variants import find_direct_encoder, find_hybrid

    problems, segmenter, generator = [], None, None
    try:
        segmenter = hydra.utils.instantiate(cfg.segmenter).to(resolve_device(cfg.get("device", "auto"))).eval()
    except Exception as e:  # noqa: BLE001 - collected and re-raised below with the others
        hint = SEGMENTER_COMMANDS.get(str(cfg.segmenter.get("name", "")))
        problems.append(_root_message(e) + (f" (made by `{hint}`)" if hint else ""))
    if need_models:
        r = cfg.stage
        try:
            generator = build_generator(cfg)
        except Exception as e:  # noqa: BLE001
            problems.append(_root_message(e))
        init = r.variant.init
        try:
            if init == "hybrid":
                find_hybrid(cfg.paths.run_root, cfg.model.id, r.hybrid_file, cfg.model.args)
            elif init == "direct_encoder":
                find_direct_encoder(cfg.paths.run_root, cfg.model.id, r.direct_encoder_file, cfg.model.args)
        except FileNotFoundError as e:
            problems.append(str(e))
    if problems:
        raise FileNotFoundError(f"metric={cfg.metric.name} cannot run, files are missing:\n"
                                + "\n".join(f"  - {p}" for p in problems))
    return segmenter, generator


def reconstruct_here(cfg: DictConfig, out_dir: Path, generator: Any) -> dict[str, Any]:
    """Run the reconstruct stage (``cfg.stage``, ``cfg.trainer``) in this process and export it."""
    from seeing.config import instantiate
    from seeing.stages.trainer import build_trainer

    module = instantiate(cfg.stage, generator=generator)
    callbacks = [StepProgressBar()] if cfg.metric.get("progress", True) else []
    trainer = build_trainer(cfg, callbacks, loggers=False, module=module)
    trainer.fit(module)
    module.cpu()
    module.provenance = current()
    module.export(out_dir / "run")
    return load_result(out_dir / "run" / "reconstruction.pt")


def loss_terms(loss: Mapping[str, Any] | None, positions: Sequence[str]) -> str | None:
    """The optimised loss, term by term with its weights, as the stage's ``loss`` settings make it
    (None: not known, e.g. a result file reported later under other settings)."""
    if loss is None:
        return None
    terms = ["pixel L1"]
    if str(loss.get("perceptual", "none")) == "vgg":
        terms.append(f"{float(loss.get('perceptual_weight', 1.0)):g} x VGG relu4_2 L1")
    if float(loss.get("encoder_weight", 0.0)) > 0:
        terms.append(f"{float(loss['encoder_weight']):g} x MSE(E(x), E(G(z)))")
    layers = [p for p in positions if p != "z"]
    if layers and float(loss.get("delta_weight", 0.0)) > 0:
        terms.append(f"{float(loss['delta_weight']):g} x sum_l mean(delta_l^2)")
    if "z" in positions and float(loss.get("latent_delta_weight", 0.0)) > 0:
        terms.append(f"{float(loss['latent_delta_weight']):g} x mean(delta_z^2)")
    return " + ".join(terms)


def loss_figure(result: Mapping[str, Any], path: Path, terms: str | None, title: str = "") -> Path:
    """Mean loss against step with the terms it sums, and its pixel L1 term alone (thin lines:
    each image's loss)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    loss = result["loss_curves"].float().numpy()
    if loss.shape[1]:
        for row in loss:
            ax.plot(row, lw=0.4, alpha=0.3, color="tab:grey")
        ax.plot(np.nanmean(loss, axis=0), lw=2, color="black",
                label="mean loss" + (f" = {terms}" if terms else " (its terms were not recorded with this result)"))
        if "pixel_curves" in result and result["pixel_curves"].shape == result["loss_curves"].shape:
            ax.plot(np.nanmean(result["pixel_curves"].float().numpy(), axis=0), lw=1.5, color="tab:blue", ls="--",
                    label="its pixel L1 term, mean")
        ax.set_yscale("log")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), frameon=False)
    ax.set_xlabel("optimisation step")
    ax.set_ylabel("per-image loss")
    ax.set_title(title or "reconstruction loss", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def write_summary(summary: Mapping[str, Any], result: Mapping[str, Any], out_dir: Path, cfg: DictConfig,
                  wandb: WandbReport, prefix: str = "reconstruction", title: str = "",
                  terms: str | None = None) -> dict[str, Any]:
    m = cfg.metric
    spec = missing_settings(m)
    comparison = fsd_comparison(summary["most_missing"], m.get("fsd_report"), int(m.get("top_k", 5)))
    report = {**summary["metrics"], "missing_classes": summary["missing"],
              "most_missing": [r["class"] for r in summary["most_missing"]], "missing_objects": summary["objects"],
              "iou_per_class": summary["iou"], "fsd_comparison": comparison,
              "targets": result.get("target_source", ""), "meta": result.get("meta", {}), "loss_terms": terms,
              "provenance": current()}
    write_json(out_dir / f"{prefix}.json", report)
    write_csv(out_dir / "missing_classes.csv", summary["missing"])
    write_markdown_table(out_dir / "missing_classes.md", summary["missing"])
    write_csv(out_dir / "missing_objects.csv", summary["objects"])
    write_csv(out_dir / "iou_per_class.csv", summary["iou"])
    fig = missing_figure(result["targets"], result["final"], summary["target_labels"], summary["recon_labels"],
                         summary["class_names"], out_dir / "missing.png", spec["min_region"],
                         int(m.get("max_rows", 8)), title, spec["min_covered"])
    curves = loss_figure(result, out_dir / "loss_curves.png", terms, title)
    wandb.log_metrics({f"{prefix}/{k}": v for k, v in summary["metrics"].items() if isinstance(v, (int, float))})
    wandb.log_table(f"{prefix}/missing_classes", summary["missing"])
    wandb.log_table(f"{prefix}/missing_objects", summary["objects"])
    wandb.log_table(f"{prefix}/iou_per_class", summary["iou"])
    wandb.log_image(f"{prefix}/missing", fig)
    wandb.log_image(f"{prefix}/loss_curves", curves)
    if wandb.run is not None:  # every image: target | reconstruction | segmentations | missing, with its numbers
        names = summary["class_names"]
        panels = missing_panels(result["targets"], result["final"], summary["target_labels"],
                                summary["recon_labels"], len(names), spec["min_region"], spec["min_covered"])
        ids = result.get("ids")
        wandb.log_image_table(f"{prefix}/images", [
            {"id": int(ids[i]) if ids is not None else i, **dict(zip(PANELS, images)),
             "missing_objects": missing_caption(regions, names),
             "pixel_l1_initial": float(result["initial_pixel_l1"][i]),
             "pixel_l1_final": float(result["final_pixel_l1"][i])}
            for i, (images, regions) in enumerate(panels)])
    return report


def missing_summary_text(rows: Sequence[Mapping[str, Any]], top: int = 5) -> str:
    """``door 5/9 objects in 4 images, ...`` for the classes missing somewhere, or ``none``."""
    return ", ".join(f"{r['class']} {r['missing_regions']}/{r['regions']} objects in {r['images_missing']} "
                     f"image{'s' if r['images_missing'] != 1 else ''}" for r in rows[:top]) or "none"


def run(cfg: DictConfig) -> dict[str, Any]:
    m = cfg.metric
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # everything is checked before any optimisation starts
    spec = missing_settings(m)
    segmenter, generator = load_parts(cfg, need_models=not m.get("result"))
    here = not m.get("result")
    result = reconstruct_here(cfg, out_dir, generator) if here else load_result(m.result)
    summary = summarize(result, segmenter, spec["min_region"], spec["min_support"],
                        int(m.get("segment_batch_size", 32)), str(m.get("perceptual", "none")), m.get("vgg_path"),
                        spec["min_covered"])
    variant = summary["metrics"]["variant"]
    title = f"{cfg.model.name}, variant {variant}: {result.get('target_source', '')}"
    # the loss's terms are known when this run made the result; a result file does not record them
    terms = loss_terms(OmegaConf.to_container(cfg.stage.loss, resolve=True), result["positions"]) if here else None
    wandb = WandbReport(cfg, job_type="reconstruction")
    try:
        report = write_summary(summary, result, out_dir, cfg, wandb, title=title, terms=terms)
    finally:
        wandb.finish()
    top = missing_summary_text(summary["most_missing"])
    m_ = summary["metrics"]
    log.info("reconstruction (%s, %d images): pixel L1 %.4f -> %.4f; %d objects, %d missing; most missing: %s",
             variant, m_["images"], m_["pixel_l1_initial"], m_["pixel_l1_final"],
             round(m_["objects_per_image"] * m_["images"]), round(m_["missing_per_image"] * m_["images"]), top)
    print(f"[reconstruction] variant {variant}, {m_['images']} images: pixel L1 "
          f"{m_['pixel_l1_initial']:.4f} -> {m_['pixel_l1_final']:.4f}, "
          f"mIoU {m_['miou_initial']:.3f} -> {m_['miou_final']:.3f}; "
          f"most missing: {top}; wrote {out_dir}/missing.png")
    return report
