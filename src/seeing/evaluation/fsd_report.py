"""``python evaluate.py metric=fsd``: FSD between two image sources, with its per-class report.

Both sources (``real=``, ``fake=``) are segmented and summarised as per-image class
tallies; the tallies are cached (keyed by source, segmenter, N, seed, resolution), so
re-running a report, or comparing a new generator against the same real set, only
segments what is new; an interrupted tally resumes from its last saved progress. Outputs in the run directory:

- ``fsd.json``: FSD, its mean and covariance terms, the real-vs-real baseline, the
  ranked most-dropped and most over-generated classes, the full per-class table;
- ``fsd_per_class.csv``: mean area real vs generated and the relative delta per class;
- ``fsd_histogram.png``: the paper's figure (top: mean area per class in the real set,
  log scale, generated as a line; bottom: relative delta (gen - real) / real).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from omegaconf import DictConfig

from seeing.data.sources import EmptySourceError, ImageSource, module_fingerprint
from seeing.metrics.fsd import FrechetSegmentationDistance, class_tally, per_class_table, rank_classes
from seeing.reporting import WandbReport, write_bytes_atomic, save_figure, write_csv, write_json

log = logging.getLogger(__name__)

CACHE_FORMAT = 1


@dataclass
class TallyStats:
    """Where the time of a tally went; the benchmark reads these."""

    images: int = 0
    batches: int = 0
    forward_s: float = 0.0  # inside the segmenter's forward pass
    total_s: float = 0.0  # the whole loop, source included


@dataclass
class Tally:
    tallies: np.ndarray  # N x K per-image class fractions (float64)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    cache: str = "off"  # "hit", "miss" or "off"
    path: Path | None = None
    stats: TallyStats = field(default_factory=TallyStats)


# ------------------------------------------------------------------------------ tallying


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tally_source(
    source: ImageSource,
    segmenter: torch.nn.Module | None,
    num_classes: int,
    n: int,
    batch_size: int,
    resolution: int,
    device: torch.device | str = "cpu",
    extra_offset: int = 0,
    description: str | None = None,
    progress: bool = True,
    partial: Path | None = None,
    checkpoint_every: int = 500,
) -> Tally:
    """Segment ``n`` images of ``source`` and return their class tallies.

    ``segmenter=None`` uses the source's ground-truth label maps (the oracle segmentation
    of the scenes world). Unreadable images are skipped and counted, never fatal. With
    ``partial``, the tallies so far are saved there (atomically) every ``checkpoint_every``
    images, and a tally that finds that file continues after the images it holds: an
    interrupted 10,000-image tally resumes instead of starting over.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    device = torch.device(device)
    if segmenter is None and not source.has_labels:
        raise ValueError(
            f"oracle segmentation needs ground-truth labels, and source {source.describe()!r} has none; "
            "use a segmenter (metric.oracle=false)"
        )
    resumed = load_partial(partial, num_classes) if partial is not None else None
    # position: how many of the n source items are done (tallied or skipped)
    rows, skipped, position = ([resumed.tallies], list(resumed.skipped), resumed.position) if resumed else ([], [], 0)
    if resumed:
        log.info("%s: resuming after %d of %d images from %s", description or source.describe(), position, n, partial)
    stats, since_save = TallyStats(), 0
    skipped_before = len(source.skipped)
    start = time.perf_counter()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task(description or f"tally {source.describe()}", total=n, completed=position)
        batches = (source.batches(n - position, batch_size, resolution, extra_offset=extra_offset + position,
                                  device=device) if position < n else ())
        for batch in batches:
            if len(batch.images):
                if segmenter is None:
                    labels = batch.labels
                else:
                    _sync(device)
                    t0 = time.perf_counter()
                    labels = segmenter.segment(batch.images)
                    _sync(device)
                    stats.forward_s += time.perf_counter() - t0
                rows.append(class_tally(labels, num_classes).cpu().numpy().astype(np.float64))
                stats.images += len(batch.images)
            stats.batches += 1
            position += len(batch.images) + len(batch.skipped)
            skipped.extend(batch.skipped)
            since_save += len(batch.images) + len(batch.skipped)
            bar.advance(task, len(batch.images) + len(batch.skipped))
            if partial is not None and since_save >= checkpoint_every and position < n:
                rows = [np.concatenate(rows)]  # concatenated once per save, not again from scratch
                save_partial(partial, rows[0], skipped, position)
                since_save = 0
    stats.total_s = time.perf_counter() - start
    tallies = np.concatenate(rows) if rows else np.zeros((0, num_classes))
    if len(source.skipped) > skipped_before:
        log.warning("%s: %d of %d images could not be read and were skipped", source.describe(),
                    len(source.skipped) - skipped_before, stats.images + len(source.skipped) - skipped_before)
    if len(tallies) == 0:
        raise EmptySourceError(
            f"source {source.describe()!r} gave no readable images"
            + (f" ({len(skipped)} unreadable, first: {skipped[0][0]}: {skipped[0][1]})" if skipped else "")
        )
    return Tally(tallies, skipped, stats=stats)


# ------------------------------------------------------------------------------ cache


def segmenter_identity(segmenter: torch.nn.Module | None, class_names: Sequence[str]) -> dict[str, Any]:
    """Part of the tally cache key: the segmenter's class, classes and a fingerprint of its
    weights (``path: null`` means the shipped file, which a newer package may replace)."""
    if segmenter is None:
        return {"oracle": True, "classes": list(class_names)}
    return {"type": type(segmenter).__qualname__, "classes": list(class_names),
            "weights_sha256": module_fingerprint(segmenter)}


def cache_file(cache_dir: str | Path, source: ImageSource, segmenter_id: dict, n: int, resolution: int,
               extra_offset: int) -> Path:
    key = {
        "format": CACHE_FORMAT,
        "source": source.identity(),
        "segmenter": segmenter_id,
        "n": int(n),
        "resolution": int(resolution),
        "extra_offset": int(extra_offset),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return Path(cache_dir) / "fsd_tallies" / f"{source.kind}-{digest}.npz"


def _read_npz(path: Path, what: str) -> tuple[np.ndarray, list[tuple[str, str]], int | None] | None:
    """``(tallies, skipped, position or None)`` from a file :func:`_write_npz` wrote; None when it
    is absent or unreadable (a damaged file is recomputed, not trusted)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            position = int(f["position"]) if "position" in f.files else None
            return (f["tallies"].astype(np.float64), [tuple(s.split("\t", 1)) for s in f["skipped"].tolist()],
                    position)
    except Exception as e:
        log.warning("ignoring unreadable %s %s (%s)", what, path, e)
        return None


def load_cached(path: Path, num_classes: int) -> Tally | None:
    read = _read_npz(path, "tally cache")
    if read is None:
        return None
    tallies, skipped, _ = read
    if tallies.ndim != 2 or tallies.shape[1] != num_classes:
        log.warning("ignoring tally cache %s: shape %s, expected N x %d", path, tallies.shape, num_classes)
        return None
    return Tally(tallies, skipped, cache="hit", path=path)


def _write_npz(path: Path, tallies: np.ndarray, skipped: Sequence[tuple[str, str]], **extra: Any) -> None:
    buf = io.BytesIO()
    np.savez(buf, tallies=tallies, skipped=np.array(["\t".join(s) for s in skipped], dtype=str), **extra)
    write_bytes_atomic(path, buf.getvalue())  # a killed run never leaves half a file


def save_cached(path: Path, tally: Tally) -> None:
    _write_npz(path, tally.tallies, tally.skipped)


@dataclass
class PartialTally:
    tallies: np.ndarray
    skipped: list[tuple[str, str]]
    position: int  # source items done (tallied or skipped)


def partial_file(path: Path) -> Path:
    """Where an unfinished tally keeps its progress, next to the cache file it will become."""
    return path.with_name(path.stem + ".partial.npz")


def save_partial(path: Path, tallies: np.ndarray, skipped: Sequence[tuple[str, str]], position: int) -> None:
    _write_npz(path, tallies, skipped, position=np.array(position))


def load_partial(path: Path, num_classes: int) -> PartialTally | None:
    read = _read_npz(path, "partial tally")  # unreadable: the tally starts over
    if read is None:
        return None
    tallies, skipped, position = read
    if (position is None or tallies.ndim != 2 or tallies.shape[1] != num_classes
            or len(tallies) + len(skipped) != position):
        log.warning("ignoring partial tally %s: %s tallies, %d skipped, position %s", path, tallies.shape,
                    len(skipped), position)
        return None
    return PartialTally(tallies, skipped, position)


def cached_tally(
    source: ImageSource,
    segmenter: torch.nn.Module | None,
    segmenter_id: dict,
    num_classes: int,
    n: int,
    batch_size: int,
    resolution: int,
    device: torch.device,
    cache_dir: str | Path | None,
    extra_offset: int = 0,
    description: str | None = None,
    progress: bool = True,
    checkpoint_every: int = 500,
) -> Tally:
    path = cache_file(cache_dir, source, segmenter_id, n, resolution, extra_offset) if cache_dir else None
    if path is not None:
        hit = load_cached(path, num_classes)
        if hit is not None:
            log.info("%s: read %d cached tallies from %s", description or source.describe(), len(hit.tallies), path)
            return hit
    partial = partial_file(path) if path is not None else None
    tally = tally_source(source, segmenter, num_classes, n, batch_size, resolution, device, extra_offset,
                         description, progress, partial=partial, checkpoint_every=checkpoint_every)
    if path is not None:
        save_cached(path, tally)
        partial.unlink(missing_ok=True)
        tally.cache, tally.path = "miss", path
        log.info("%s: tallied %d images, cached in %s", description or source.describe(), len(tally.tallies), path)
    return tally


# ------------------------------------------------------------------------------ figure


def histogram_figure(rows: Sequence[dict[str, Any]], max_classes: int = 40, title: str = ""):
    """The paper's per-class histogram: classes in decreasing real area; top, mean area
    (log scale) real as bars and generated as a line; bottom, relative delta."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = sorted((r for r in rows if r["real_area"] > 0), key=lambda r: -r["real_area"])[:max_classes]
    names = [r["class"] for r in shown]
    x = np.arange(len(shown))
    real = np.array([r["real_area"] for r in shown])
    gen = np.array([r["generated_area"] for r in shown])
    delta = np.array([r["relative_delta"] for r in shown], dtype=float)

    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(max(6.0, 0.28 * len(shown) + 2), 6.0), sharex=True, gridspec_kw={"height_ratios": [3, 2]}
    )
    top.bar(x, real, color="#4c72b0", label="real (training) images")
    floor = real.min() / 10 if len(real) else 1e-6
    top.plot(x, np.maximum(gen, floor), color="#dd8452", marker="o", ms=3, lw=1.5, label="generated images")
    top.set_yscale("log")
    top.set_ylabel("mean fraction of pixels")
    top.legend(loc="upper right", fontsize=8)
    if title:
        top.set_title(title, fontsize=10)
    colors = np.where(delta < 0, "#c44e52", "#55a868")
    hi = float(np.nanmax(delta)) if len(delta) else 1.0
    cap = min(max(1.0, hi * 1.1), 4.0)  # a class 30x over-generated should not flatten every other bar
    bottom.bar(x, np.clip(delta, -1.0, cap), color=colors)
    bottom.axhline(0, color="black", lw=0.6)
    bottom.set_ylim(-1.05, cap)
    bottom.set_ylabel("(gen - real) / real")
    bottom.set_xticks(x)
    bottom.set_xticklabels(names, rotation=90, fontsize=7)
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
    }


def _fsd(num_classes: int, real: np.ndarray, fake: np.ndarray) -> tuple[FrechetSegmentationDistance, dict]:
    metric = FrechetSegmentationDistance(num_classes)
    metric.update_tally(torch.from_numpy(real), real=True)
    metric.update_tally(torch.from_numpy(fake), real=False)
    return metric, {k: float(v) for k, v in metric.compute().items()}


def run(cfg: DictConfig) -> dict[str, Any]:
    from seeing.pipeline import resolve_device

    import hydra

    m = cfg.metric
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.get("device", "auto"))
    oracle = bool(m.get("oracle", False))

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

    real: ImageSource = hydra.utils.instantiate(cfg.real)
    fake: ImageSource = hydra.utils.instantiate(cfg.fake)
    seg_id = segmenter_identity(segmenter, class_names)
    common = dict(
        segmenter=segmenter,
        segmenter_id=seg_id,
        num_classes=num_classes,
        n=int(m.n),
        batch_size=int(m.batch_size),
        resolution=int(m.resolution),
        device=device,
        cache_dir=cfg.paths.cache_dir if m.get("cache", True) else None,
        progress=bool(m.get("progress", True)),
        checkpoint_every=int(m.get("checkpoint_every", 500)),
    )
    real_tally = cached_tally(real, description=f"real: {real.describe()}", **common)
    fake_tally = cached_tally(fake, description=f"fake: {fake.describe()}", **common)

    metric, result = _fsd(num_classes, real_tally.tallies, fake_tally.tallies)
    baseline = None
    if m.get("real_baseline", True):
        # a second real sample of the same size, disjoint from the first: the FSD that
        # sampling noise alone produces, the floor a generator's FSD should be read against
        try:
            other = cached_tally(real, extra_offset=int(m.n), description=f"real (2nd sample): {real.describe()}",
                                 **common)
            _, baseline = _fsd(num_classes, real_tally.tallies, other.tallies)
            baseline["images"] = int(len(other.tallies))
        except ValueError as e:  # the source holds no second sample (EmptySourceError), or a single image
            log.warning("no real-vs-real baseline: %s", e)

    real_mean, fake_mean = metric.class_means()
    rows = per_class_table(real_mean, fake_mean, class_names)
    ranks = rank_classes(rows, top=int(m.get("top_k", 10)), min_real_area=float(m.get("min_real_area", 0.0)),
                         skip=list(m.get("rank_skip", [])))

    report = {
        "fsd": result["fsd"],
        "mean_term": result["mean_term"],
        "cov_term": result["cov_term"],
        "fsd_real_vs_real": baseline,
        "num_classes": num_classes,
        "segmenter": "oracle (ground-truth labels)" if oracle else _segmenter_label(cfg, segmenter),
        "resolution": int(m.resolution),
        "n": int(m.n),
        "real": _side_report(real, real_tally),
        "fake": _side_report(fake, fake_tally),
        "most_dropped": ranks["most_dropped"],
        "most_overgenerated": ranks["most_overgenerated"],
        "per_class": rows,
    }
    write_json(out_dir / "fsd.json", report)
    write_csv(out_dir / "fsd_per_class.csv", rows)
    title = f"{real.describe()} vs {fake.describe()}: FSD {result['fsd']:.2f}"
    fig = histogram_figure(rows, int(m.get("histogram_classes", 40)), title)
    save_figure(fig, out_dir / "fsd_histogram.png")

    _log_summary(report)
    wandb = WandbReport(cfg, job_type="fsd")
    try:
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
    for key, label in (("most_dropped", "most dropped"), ("most_overgenerated", "most over-generated")):
        top = ", ".join(f"{r['class']} ({r['relative_delta']:+.0%})" for r in report[key][:5])
        log.info("%s: %s", label, top or "none")
    for side in ("real", "fake"):
        if report[side]["skipped"]:
            log.warning("%s: %d unreadable images skipped", side, report[side]["skipped"])
