"""``python evaluate.py metric=reconstruction``: reconstruct images and report what is missing.

By default (``metric.result=null``) it reconstructs a handful of held-out real scenes
itself with the configured variant (f: hybrid encoder + layer corrections) and the
model's shipped weights, then reports; ``metric.result=<.../reconstruction.pt>``
reports an existing ``stage=reconstruct`` output instead.

Writes under ``output_dir``: ``reconstruction.json`` (all numbers), ``missing_classes.{csv,md}``
(classes present in targets but absent from reconstructions, ranked), ``iou_per_class.csv``,
``missing.png`` (rows of target | reconstruction | both segmentations | missing objects),
``loss_curves.png``, and the same to W&B.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import torch
from omegaconf import DictConfig, OmegaConf

from seeing.metrics.missing import MissingClasses, iou_per_class
from seeing.provenance import current
from seeing.reporting import WandbReport, write_csv, write_json, write_markdown_table
from seeing.reports.missing_objects import (PANELS, latent_correlations, missing_figure, missing_panels,
                                            rank_agreement, rank_missing)
from seeing.stages.progress import StepProgressBar
from seeing.stages.reconstruct import load_result
from seeing.stages.reconstruct_files import loss_curve_figure

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


def summarize(result: Mapping[str, Any], segmenter: Any, min_fraction: float = 0.01, min_support: int = 2,
              batch_size: int = 32, perceptual: str = "none", vgg_path: str | None = None,
              min_recall: float | None = 0.2) -> dict[str, Any]:
    """Every number of one reconstruction run, plus the label maps the figure needs."""
    from seeing.stages.reconstruct_files import worse_than_start

    class_names = list(segmenter.class_names)
    k = len(class_names)
    target_labels = segment_all(segmenter, result["targets"], batch_size)
    recon_labels = segment_all(segmenter, result["final"].clamp(-1, 1), batch_size)
    initial_labels = segment_all(segmenter, result["initial"].clamp(-1, 1), batch_size)
    missing = MissingClasses(k, min_fraction, min_recall)
    missing.update(target_labels, recon_labels)
    stats = missing.compute()
    ranking = rank_missing(stats, class_names, min_support)
    ious = iou_per_class(target_labels, recon_labels, k)
    iou_initial = iou_per_class(target_labels, initial_labels, k)
    present = torch.nonzero(stats["present"] > 0).flatten().tolist()
    metrics: dict[str, Any] = {
        "images": int(result["targets"].shape[0]),
        "target_kind": result.get("target_kind", ""),
        "variant": (result.get("meta") or {}).get("variant", {}).get("name", ""),
        "steps": int(result.get("steps", 0)),
        "pixel_l1_initial": float(result["initial_pixel_l1"].mean()),
        "pixel_l1_final": float(result["final_pixel_l1"].mean()),
        "miou_initial": float(iou_initial[present].nanmean()) if present else float("nan"),
        "miou_final": float(ious[present].nanmean()) if present else float("nan"),
        "missing_per_image": float(stats["missing"].sum()) / max(1, int(result["targets"].shape[0])),
        # images whose loss turned non-finite: they kept their last finite corrections
        "diverged": int(result["diverged"].sum()) if "diverged" in result else 0,
        # images the optimisation left with a larger pixel L1 than they started with (step size too large)
        "worse_than_start": int(worse_than_start(result).sum()),
    }
    if perceptual == "vgg":
        metrics.update(perceptual_errors(result, vgg_path))
    metrics.update(latent_correlations(result))
    iou_rows = [{"class": class_names[c], "present_in_targets": int(stats["present"][c]),
                 "iou": float(ious[c]), "iou_initial": float(iou_initial[c])} for c in present]
    return {"metrics": metrics, "missing": ranking, "iou": iou_rows, "class_names": class_names,
            "target_labels": target_labels, "recon_labels": recon_labels}


def _min_recall(m: Mapping[str, Any]) -> float | None:
    value = m.get("min_recall", 0.2)
    return None if value is None else float(value)


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
SEGMENTER_COMMANDS = {"scenes": "python train.py stage=segmenter data=scenes"}


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
    trainer = build_trainer(cfg, callbacks, loggers=False)
    trainer.fit(module)
    module.cpu()
    module.provenance = current()
    module.export(out_dir / "run")
    return load_result(out_dir / "run" / "reconstruction.pt")


def write_summary(summary: Mapping[str, Any], result: Mapping[str, Any], out_dir: Path, cfg: DictConfig,
                  wandb: WandbReport, prefix: str = "reconstruction", title: str = "") -> dict[str, Any]:
    m = cfg.metric
    comparison = fsd_comparison(summary["missing"], m.get("fsd_report"), int(m.get("top_k", 5)))
    report = {**summary["metrics"], "missing_classes": summary["missing"], "iou_per_class": summary["iou"],
              "fsd_comparison": comparison, "targets": result.get("target_source", ""),
              "meta": result.get("meta", {}), "provenance": current()}
    write_json(out_dir / f"{prefix}.json", report)
    write_csv(out_dir / "missing_classes.csv", summary["missing"])
    write_markdown_table(out_dir / "missing_classes.md", summary["missing"])
    write_csv(out_dir / "iou_per_class.csv", summary["iou"])
    fig = missing_figure(result["targets"], result["final"], summary["target_labels"], summary["recon_labels"],
                         summary["class_names"], out_dir / "missing.png", float(m.min_fraction),
                         int(m.get("max_rows", 8)), title, _min_recall(m))
    curves = loss_curve_figure(result["loss_curves"], out_dir / "loss_curves.png", title)
    wandb.log_metrics({f"{prefix}/{k}": v for k, v in summary["metrics"].items() if isinstance(v, (int, float))})
    wandb.log_table(f"{prefix}/missing_classes", summary["missing"])
    wandb.log_table(f"{prefix}/iou_per_class", summary["iou"])
    wandb.log_image(f"{prefix}/missing", fig)
    wandb.log_image(f"{prefix}/loss_curves", curves)
    if wandb.run is not None:  # every image: target | reconstruction | segmentations | missing, with its numbers
        names = summary["class_names"]
        panels = missing_panels(result["targets"], result["final"], summary["target_labels"],
                                summary["recon_labels"], len(names), float(m.min_fraction), _min_recall(m))
        ids = result.get("ids")
        wandb.log_image_table(f"{prefix}/images", [
            {"id": int(ids[i]) if ids is not None else i, **dict(zip(PANELS, images)),
             "missing_classes": ", ".join(names[c] for c in missing),
             "pixel_l1_initial": float(result["initial_pixel_l1"][i]),
             "pixel_l1_final": float(result["final_pixel_l1"][i])}
            for i, (images, missing) in enumerate(panels)])
    return report


def run(cfg: DictConfig) -> dict[str, Any]:
    m = cfg.metric
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # everything is checked before any optimisation starts
    segmenter, generator = load_parts(cfg, need_models=not m.get("result"))
    result = load_result(m.result) if m.get("result") else reconstruct_here(cfg, out_dir, generator)
    summary = summarize(result, segmenter, float(m.min_fraction), int(m.min_support),
                        int(m.get("segment_batch_size", 32)), str(m.get("perceptual", "none")), m.get("vgg_path"),
                        _min_recall(m))
    variant = summary["metrics"]["variant"]
    title = f"{cfg.model.name}, variant {variant}: {result.get('target_source', '')}"
    wandb = WandbReport(cfg, job_type="reconstruction")
    try:
        report = write_summary(summary, result, out_dir, cfg, wandb, title=title)
    finally:
        wandb.finish()
    top = ", ".join(f"{r['class']} ({r['missing']}/{r['present']})" for r in summary["missing"][:5])
    log.info("reconstruction (%s, %d images): pixel L1 %.4f -> %.4f; most missing: %s", variant,
             summary["metrics"]["images"], summary["metrics"]["pixel_l1_initial"],
             summary["metrics"]["pixel_l1_final"], top)
    print(f"[reconstruction] variant {variant}, {summary['metrics']['images']} images: pixel L1 "
          f"{summary['metrics']['pixel_l1_initial']:.4f} -> {summary['metrics']['pixel_l1_final']:.4f}, "
          f"mIoU {summary['metrics']['miou_initial']:.3f} -> {summary['metrics']['miou_final']:.3f}; "
          f"most missing: {top}; wrote {out_dir}/missing.png")
    return report
