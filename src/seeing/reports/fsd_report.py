"""``python evaluate.py metric=fsd``: FSD between two image sources, with its per-class report.

Both sources (``real=``, ``fake=``) are segmented and summarised as per-image class
tallies; the tallies are cached (keyed by source, segmenter, N, seed, resolution), so
re-running a report, or comparing a new generator against the same real set, only
segments what is new; an interrupted tally resumes from its last saved progress
(:mod:`seeing.reports.tallies`). Outputs in the run directory:

- ``fsd.json``: FSD, its mean and covariance terms, the real-vs-real baseline, the
  most-dropped and most over-generated classes (only those whose change lies beyond its
  bootstrap interval), the full per-class table;
- ``fsd_per_class.csv``: per class, mean area real vs generated, the relative change
  (gen - real) / real with its interval (``metric.interval``), and the same change between two
  real samples (the noise floor);
- ``fsd_histogram.png``: the paper's figure (top: mean area per class in the real set,
  log scale, generated as a line; bottom: the relative change with its interval and the
  real-vs-real interval behind it).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from lightning_fabric import Fabric
from omegaconf import DictConfig, OmegaConf

from seeing.data.sources import GeneratorSource, ImageSource
from seeing.metrics.fsd import FrechetSegmentationDistance
from seeing.metrics.per_class import bootstrap_relative_change, per_class_table, rank_classes, relative_change
from seeing.provenance import current
from seeing.reporting import WandbReport, save_figure, write_csv, write_json

from seeing.reports.tallies import Tally, cached_tally, segmenter_identity
from seeing.segmenters.label_spaces import class_selection

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------ figure


def histogram_figure(rows: Sequence[dict[str, Any]], max_classes: int = 40, title: str = "",
                     real_name: str = "real", fake_name: str = "fake", confidence: float | None = None):
    """The paper's per-class histogram: classes in decreasing real area; top, mean area (log
    scale) of the real images as bars and of the compared images as a line; bottom, the relative
    change with its interval (error bars; a class whose interval holds 0 is drawn pale) and, where
    the rows carry it, the real-vs-real interval as a grey box: the change sampling noise alone gives.
    ``real_name`` / ``fake_name``: the sources as the run names them (``real=…``, ``fake=…``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    shown = sorted((r for r in rows if r["real_area"] > 0), key=lambda r: -r["real_area"])[:max_classes]
    names = [r["class"] for r in shown]
    x = np.arange(len(shown))
    real = np.array([r["real_area"] for r in shown])
    gen = np.array([r["generated_area"] for r in shown])
    delta = np.array([r["relative_delta"] for r in shown], dtype=float)

    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(max(6.5, 0.3 * len(shown) + 2.5) + 3.2, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 2.4]}
    )
    top.bar(x, real, color="#4c72b0", label=f"real={real_name}")
    floor = real.min() / 10 if len(real) else 1e-6
    top.plot(x, np.maximum(gen, floor), color="#dd8452", marker="o", ms=3, lw=1.5, label=f"fake={fake_name}")
    top.set_yscale("log")
    top.set_ylabel("mean fraction of pixels")
    top.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7.5, frameon=False)
    if title:
        top.set_title(title, fontsize=10)

    hi = float(np.nanmax(delta)) if len(delta) else 1.0
    cap = min(max(1.0, hi * 1.1), 4.0)  # a class 30x over-generated should not flatten every other bar
    level = f"{confidence:.0%} " if confidence else ""
    handles = []
    if shown and "real_vs_real_ci_low" in shown[0]:
        for i, r in enumerate(shown):
            lo, up = r["real_vs_real_ci_low"], r["real_vs_real_ci_high"]
            if lo is not None or up is not None:
                lo, up = max(-1.0, lo if lo is not None else -1.0), min(cap, up if up is not None else cap)
                bottom.add_patch(plt.Rectangle((i - 0.45, lo), 0.9, up - lo, color="#bbbbbb", alpha=0.6, lw=0,
                                               zorder=1))
        handles.append(Patch(color="#bbbbbb", alpha=0.6,
                             label=f"real={real_name} vs a 2nd sample of it:\n{level}interval (noise floor)"))
    beyond = np.array([r.get("beyond_noise", True) for r in shown], dtype=bool)
    from matplotlib.colors import to_rgba

    colors = [to_rgba("#c44e52" if d < 0 else "#55a868", 1.0 if b else 0.35) for d, b in zip(delta, beyond)]
    clipped = np.clip(delta, -1.0, cap)
    bottom.bar(x, clipped, color=colors, zorder=2)
    handles += [Patch(color="#c44e52", label=f"fake={fake_name} draws less"),
                Patch(color="#55a868", label=f"fake={fake_name} draws more")]
    if shown and "ci_low" in shown[0]:
        lows = np.array([r["ci_low"] if r["ci_low"] is not None else -1.0 for r in shown], dtype=float)
        highs = np.array([r["ci_high"] if r["ci_high"] is not None else cap for r in shown], dtype=float)
        lows, highs = np.clip(lows, -1.0, cap), np.clip(highs, -1.0, cap)
        bottom.errorbar(x, clipped, yerr=[np.maximum(clipped - lows, 0), np.maximum(highs - clipped, 0)], fmt="none",
                        ecolor="black", elinewidth=0.9, capsize=2, zorder=3)
        handles.append(plt.Line2D([], [], color="black", lw=0.9,
                                  label=f"{level}bootstrap interval over images\n(pale bar: the interval holds 0)"))
    bottom.axhline(0, color="black", lw=0.6)
    bottom.set_ylim(-1.05, cap)
    bottom.set_ylabel("relative change\n(fake - real) / real")
    bottom.set_xlabel(f"class, by mean area in real={real_name}")
    bottom.set_xticks(x)
    bottom.set_xticklabels(names, rotation=90, fontsize=7)
    # beside the axes, never over the bars
    bottom.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------ entry point


def _build_segmenter(cfg: DictConfig, device: torch.device):
    from seeing.data.sources import instantiate_unwrapped

    segmenter = instantiate_unwrapped(cfg.segmenter)
    for attr in ("segment", "class_names"):
        if not hasattr(segmenter, attr):
            raise TypeError(f"segmenter config built {type(segmenter).__name__}, which has no {attr!r}")
    return segmenter.to(device).eval()


def _segmenter_label(cfg: DictConfig, segmenter) -> str:
    name = cfg.segmenter.get("name") if isinstance(cfg.segmenter, DictConfig) else None
    return f"{type(segmenter).__name__}" + (f" ({name})" if name else "")


def _side_report(source: ImageSource, tally: Tally) -> dict[str, Any]:
    return {
        "source": source.describe(),
        "identity": source.identity(),
        "images": int(len(tally.tallies)),
        "skipped": len(tally.skipped),
        "skipped_files": [{"item": s[0], "reason": s[1] if len(s) > 1 else ""} for s in tally.skipped[:100]],
        "cache": tally.cache,
        "cache_file": str(tally.path) if tally.path else None,
        "cache_rejected": tally.cache_rejected,  # why a cache file under the key was not trusted
    }


def accumulate(*targets: tuple[FrechetSegmentationDistance, bool]):
    """A tally callback that adds each batch of rows to every ``(metric, real)`` in ``targets``."""
    def on_rows(rows: np.ndarray) -> None:
        batch = torch.from_numpy(rows)
        for metric, real in targets:
            metric.update_tally(batch, real=real)
    return on_rows


def _scores(metric: FrechetSegmentationDistance) -> dict[str, float]:
    return {k: float(v) for k, v in metric.terms().items()}


INTERVAL_KEYS = ("confidence", "resamples", "seed", "simultaneous")


def interval_settings(m: DictConfig) -> dict[str, Any]:
    """``metric.interval``: the per-class bootstrap's confidence, resamples, seed and whether the
    band is simultaneous over the ranked classes, checked."""
    spec = {"confidence": 0.95, "resamples": 1000, "seed": 0, "simultaneous": True,
            **(OmegaConf.to_container(m.interval, resolve=True) if m.get("interval") is not None else {})}
    unknown = sorted(set(spec) - set(INTERVAL_KEYS))
    if unknown:
        raise ValueError(f"metric.interval.{unknown[0]}: unknown key (the interval takes "
                         f"{', '.join(INTERVAL_KEYS)})")
    c, b = spec["confidence"], spec["resamples"]
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c < 1:
        raise ValueError(f"metric.interval.confidence={c!r}: give a level between 0 and 1, e.g. 0.95")
    if isinstance(b, bool) or not isinstance(b, int) or b < 100:
        raise ValueError(f"metric.interval.resamples={b!r}: give a whole number of bootstrap resamples >= 100")
    if not isinstance(spec["simultaneous"], bool):
        raise ValueError(f"metric.interval.simultaneous={spec['simultaneous']!r}: give true or false")
    return {"confidence": float(c), "resamples": b, "seed": int(spec["seed"]), "simultaneous": spec["simultaneous"]}


def class_intervals(real: np.ndarray, fake: np.ndarray, spec: dict[str, Any], family: np.ndarray):
    """Each class's interval; ``family``: the classes the ranking may list (the simultaneous band's)."""
    return bootstrap_relative_change(real, fake, spec["resamples"], spec["confidence"], spec["seed"],
                                     spec["simultaneous"], family)


# FSD's image size: the paper resizes (shorter side, bilinear) and centre-crops to 256 px; the
# embedded scenes world is drawn at 64 px and its segmenter trained there
PAPER_RESOLUTION = 256
SCENES_RESOLUTION = 64


def source_world(source: ImageSource) -> str | None:
    """"scenes" for the embedded world and for generators trained on it, else None."""
    if source.kind == "scenes":
        return "scenes"
    if isinstance(source, GeneratorSource):  # the data a generator file says it was trained on
        return (getattr(source.generator(), "checkpoint_meta", None) or {}).get("data")
    return None


def fsd_resolution(setting: Any, real: ImageSource, fake: ImageSource) -> int:
    """``metric.resolution``: a positive size, or ``auto``: 64 px when both sides are the scenes
    world (or its GAN), else the paper's 256 px."""
    if setting == "auto":
        both_scenes = source_world(real) == source_world(fake) == "scenes"
        return SCENES_RESOLUTION if both_scenes else PAPER_RESOLUTION
    if isinstance(setting, bool) or not isinstance(setting, int) or setting <= 0:
        raise ValueError(f"metric.resolution={setting!r}: give a positive image size in pixels (the paper's is "
                         f"{PAPER_RESOLUTION}) or auto")
    return setting


def check_numbers(m: DictConfig) -> dict[str, Any]:
    """The report's own numbers (images a side, batch, size, interval), checked; the interval settings."""
    for key in ("n", "batch_size"):
        value = m.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"metric.{key}={value!r}: must be a whole number >= 1 (images per side / per batch)")
    if m.resolution != "auto":
        fsd_resolution(m.resolution, None, None)
    return interval_settings(m)


def open_sources(cfg: DictConfig) -> tuple[ImageSource, ImageSource]:
    """``real=`` and ``fake=`` built and both opened (:meth:`ImageSource.check`) before either is
    tallied: a bad folder or database on one side is named at once, not after the other side's
    thousands of images were segmented."""
    from seeing.config import instantiate
    from seeing.errors import UsageError

    sources: list[ImageSource] = []
    for side in ("real", "fake"):
        try:
            source = instantiate(cfg[side])
            source.check()
        except (ValueError, OSError) as err:
            fix = f"; point {side}.path at the images" if "path" in cfg[side] else ""
            message = f"{_choice(cfg, side)}: {err}{fix}"
            if len(err.args) == 1 and isinstance(err.args[0], str):  # the same error, saying which side
                err.args = (message,)
                raise
            raise UsageError(message) from err
        sources.append(source)
    return sources[0], sources[1]


def _choice(cfg: DictConfig, side: str) -> str:
    """``real=folder``: the side as it was chosen on the command line (or its config's class)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        choice = HydraConfig.get().runtime.choices.get(side)
    except ValueError:
        choice = None
    return f"{side}={choice or str(cfg[side].get('_target_', '?')).rsplit('.', 1)[-1]}"


def check(cfg: DictConfig) -> None:
    """Before the run claims its folder (:func:`seeing.pipeline.evaluate`): the numbers, and both
    image sources opened."""
    check_numbers(cfg.metric)
    open_sources(cfg)


def run(cfg: DictConfig) -> dict[str, Any]:
    from seeing.devices import resolve_device

    m = cfg.metric
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    oracle = bool(m.get("oracle", False))
    interval = check_numbers(m)  # user numbers are checked before anything is built
    real, fake = open_sources(cfg)  # both sides opened before either is tallied
    # one process, or several (metric.fabric.devices=2 ...): each tallies a share of the images,
    # the Metric syncs, process 0 writes the cache and the report
    fabric = Fabric(**{"devices": 1, **(OmegaConf.to_container(m.fabric, resolve=True) if "fabric" in m else {})})
    fabric.launch()
    device = fabric.device if fabric.world_size > 1 else resolve_device(cfg.get("device", "auto"))
    main = fabric.global_rank == 0

    if oracle:
        from seeing.data.scenes import CLASS_NAMES

        segmenter, class_names = None, list(CLASS_NAMES)
    else:
        segmenter = _build_segmenter(cfg, device)
        class_names = list(segmenter.class_names)
    num_classes = len(class_names)
    if m.get("num_classes") is not None and int(m.num_classes) != num_classes:
        raise ValueError(
            f"class-count mismatch: metric.num_classes={m.num_classes} but the segmenter "
            f"({'oracle' if oracle else _segmenter_label(cfg, segmenter)}) has {num_classes} classes"
        )

    resolution = fsd_resolution(m.resolution, real, fake)
    log.info("FSD at %d px, %d images a side", resolution, int(m.n))
    seg_id = segmenter_identity(segmenter, class_names)
    # metric.classes=shared: FSD over the classes UPP and ADE-150 share (tallies are cached unprojected)
    selection = class_selection(m.get("classes", "all"), class_names)
    common = dict(
        segmenter=segmenter,
        segmenter_id=seg_id,
        num_classes=num_classes,
        n=int(m.n),
        batch_size=int(m.batch_size),
        resolution=resolution,
        device=device,
        cache_dir=cfg.paths.cache_dir if m.get("cache", True) else None,
        progress=bool(m.get("progress", True)),
        checkpoint_every=int(m.get("checkpoint_every", 500)),
    )
    # the Metrics accumulate batch by batch as the tallies are made (or read from the cache)
    metric = FrechetSegmentationDistance(len(selection.names))
    noise = FrechetSegmentationDistance(len(selection.names))  # real vs a second real sample
    real_tally = cached_tally(real, description=f"real: {real.describe()}",
                              on_rows=selection.feeding(accumulate((metric, True), (noise, True))), **common)
    fake_tally = cached_tally(fake, description=f"fake: {fake.describe()}",
                              on_rows=selection.feeding(accumulate((metric, False))), **common)
    result = _scores(metric)
    baseline = None
    if m.get("real_baseline", True):
        # a second real sample of the same size, disjoint from the first: the FSD that
        # sampling noise alone produces, the floor a generator's FSD should be read against
        try:
            other = cached_tally(real, extra_offset=int(m.n), description=f"real (2nd sample): {real.describe()}",
                                 on_rows=selection.feeding(accumulate((noise, False))), **common)
            baseline = _scores(noise)
            baseline["images"] = int(len(other.tallies))
        except ValueError as e:  # the source holds no second sample (EmptySourceError), or a single image
            log.warning("no real-vs-real baseline: %s", e)

    real_mean, fake_mean = metric.class_means()
    min_real_area, skip = float(m.get("min_real_area", 0.0)), set(m.get("rank_skip", []))
    family = (real_mean.numpy() > min_real_area) & np.array([c not in skip for c in selection.names])
    # every process holds every side's rows (gathered by the tally), so the intervals agree;
    # the rows are over the segmenter's classes, the intervals over the selected ones
    real_rows, fake_rows = selection(real_tally.tallies), selection(fake_tally.tallies)
    noise_floor = None
    if baseline is not None:
        other_rows = selection(other.tallies)
        low, high = class_intervals(real_rows, other_rows, interval, family)
        noise_floor = {"delta": relative_change(real_rows.mean(0), other_rows.mean(0)), "low": low, "high": high}
    rows = per_class_table(real_mean, fake_mean, selection.names,
                           class_intervals(real_rows, fake_rows, interval, family), noise_floor)
    ranks = rank_classes(rows, top=int(m.get("top_k", 10)), min_real_area=min_real_area, skip=sorted(skip))

    report = {
        "fsd": result["fsd"],
        "mean_term": result["mean_term"],
        "cov_term": result["cov_term"],
        "fsd_real_vs_real": baseline,
        "num_classes": len(selection.names),
        "classes": selection.setting,
        "segmenter": "oracle (ground-truth labels)" if oracle else _segmenter_label(cfg, segmenter),
        "segmenter_identity": {k: v for k, v in seg_id.items() if k != "classes"},
        "resolution": resolution,
        "n": int(m.n),
        "real": _side_report(real, real_tally),
        "fake": _side_report(fake, fake_tally),
        # classes whose change lies beyond its interval, most changed first
        "interval": {"method": ("simultaneous bootstrap band (max-t) over the ranked classes" if interval["simultaneous"]
                                else "percentile bootstrap per class") + ", images of each side resampled",
                     **interval},
        "most_dropped": ranks["most_dropped"],
        "most_overgenerated": ranks["most_overgenerated"],
        "per_class": rows,
        "processes": fabric.world_size,
        "provenance": current(),
    }
    if not main:  # the other processes tallied their shares and took part in the sync: done
        return report
    write_json(out_dir / "fsd.json", report)
    write_csv(out_dir / "fsd_per_class.csv", rows)
    title = f"{real.describe()} vs {fake.describe()}: FSD {result['fsd']:.2f}"
    fig = histogram_figure(rows, int(m.get("histogram_classes", 40)), title, real_name=real.name,
                           fake_name=fake.name, confidence=interval["confidence"])
    save_figure(fig, out_dir / "fsd_histogram.png")

    _log_summary(report)
    wandb = WandbReport(cfg, job_type="fsd")
    try:
        if wandb.run is not None:
            wandb.run.config.update({"segmenter_identity": report["segmenter_identity"], "classes": selection.setting})
        metrics = {f"fsd/{k}": v for k, v in result.items()}
        if baseline:
            metrics["fsd/real_vs_real"] = baseline["fsd"]
        wandb.log_metrics(metrics)
        wandb.log_table("fsd/per_class", rows)
        wandb.log_image("fsd/histogram", out_dir / "fsd_histogram.png")
    finally:
        wandb.finish()
    return report


def _log_summary(report: dict[str, Any]) -> None:
    base = report["fsd_real_vs_real"]
    log.info(
        "FSD %.4f (mean term %.4f, covariance term %.4f) over %d real / %d fake images%s",
        report["fsd"], report["mean_term"], report["cov_term"], report["real"]["images"], report["fake"]["images"],
        f"; real vs real {base['fsd']:.4f}" if base else "",
    )
    spec = report["interval"]
    level = f"{'simultaneous ' if spec['simultaneous'] else ''}{spec['confidence']:.0%}"
    for key, label in (("most_dropped", "most dropped"), ("most_overgenerated", "most over-generated")):
        top = ", ".join(f"{r['class']} {r['relative_delta']:+.1%} [{_pct(r['ci_low'])}, {_pct(r['ci_high'])}]"
                        for r in report[key][:5])
        log.info("%s (%s interval beyond 0): %s", label, level, top or "none")
    for side in ("real", "fake"):
        if report[side]["skipped"]:
            log.warning("%s: %d unreadable images skipped", side, report[side]["skipped"])


def _pct(value: float | None) -> str:
    return "open" if value is None else f"{value:+.1%}"
