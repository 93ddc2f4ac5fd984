"""Per-image class tallies of an image source, and their cache.

A tally is the N x K matrix of per-image class fractions that FSD and the per-class report
are computed from. Tallies are cached on disk keyed by source, segmenter (its weights'
fingerprint), N, resolution and offset, written atomically; an unfinished tally keeps its
progress in a ``.partial.npz`` next to the cache file and resumes from it.
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

from seeing.data.sources import EmptySourceError, ImageSource, module_fingerprint
from seeing.metrics.fsd import class_tally
from seeing.reporting import write_bytes_atomic

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
