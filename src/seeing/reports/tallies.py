"""Per-image class tallies of an image source, and their cache.

A tally is the N x K matrix of per-image class fractions that FSD and the per-class report
are computed from. Tallies are cached on disk keyed by source, segmenter (its weights'
fingerprint), N, resolution and offset, written atomically; an unfinished tally keeps its
progress in a ``.partial.npz`` next to the cache file and resumes from it.

The segmenter part of the key (:func:`segmenter_identity`) names its kind, a digest of its weights
and its label space (class list, its sha256 and count).

A cache file stores the key it was written for (the JSON text whose digest names it) and
its row counts; a file whose key or counts do not match (copied from elsewhere, damaged,
from an older version) is a logged cache miss, tallied again and overwritten, never used.
A cache folder that cannot be written is a warning (once per folder): the tally is still
computed and returned, just not cached.

Inside an initialised process group (``evaluate.py metric=fsd`` with ``metric.fabric.devices=2``)
each process tallies a contiguous share of the N images, every process receives all rows in
order (what one process would have tallied), and process 0 alone writes the cache.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from seeing.data.sources import EmptySourceError, ImageSource
from seeing.state_dicts import fingerprint
from seeing.metrics.fsd import class_tally
from seeing.reporting import write_bytes_atomic

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # 2: the file stores its key and row counts


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
    cache: str = "off"  # "hit", "miss", "off" or "unwritable" (tallied, but the cache folder refused it)
    path: Path | None = None
    cache_rejected: str | None = None  # why a cache file found under the key was not used (a miss)
    stats: TallyStats = field(default_factory=TallyStats)


# ------------------------------------------------------------------------------ tallying


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def feed(on_rows: Callable[[np.ndarray], None] | None, tallies: np.ndarray, batch_size: int) -> None:
    """Hand ``tallies`` to ``on_rows`` in batches (cached and resumed rows go the same way as new ones)."""
    if on_rows is not None:
        for i in range(0, len(tallies), max(1, batch_size)):
            on_rows(tallies[i:i + batch_size])


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
    key: str | None = None,
    on_rows: Callable[[np.ndarray], None] | None = None,
) -> Tally:
    """Segment ``n`` images of ``source`` and return their class tallies.

    ``segmenter=None`` uses the source's ground-truth label maps (the oracle segmentation
    of the scenes world). Unreadable images are skipped and counted, never fatal. With
    ``partial``, the tallies so far are saved there (atomically) every ``checkpoint_every``
    images, and a tally that finds that file continues after the images it holds: an
    interrupted 10,000-image tally resumes instead of starting over. ``key`` (see
    :func:`cache_key`) is stored in that file, and a file saved under another key is ignored.
    ``on_rows`` receives every batch of tallies as it is made (resumed ones first): the FSD
    Metric accumulates there, batch by batch.
    A progress file that cannot be written (full disk) is a warning, and the tally goes on.
    """
    from seeing.progress import progress as progress_bar

    device = torch.device(device)
    if segmenter is None and not source.has_labels:
        raise ValueError(
            f"oracle segmentation needs ground-truth labels, and source {source.describe()!r} has none; "
            "use a segmenter (metric.oracle=false)"
        )
    resumed = load_partial(partial, num_classes, key) if partial is not None else None
    # position: how many of the n source items are done (tallied or skipped)
    rows, skipped, position = ([resumed.tallies], list(resumed.skipped), resumed.position) if resumed else ([], [], 0)
    if resumed:
        log.info("%s: resuming after %d of %d images from %s", description or source.describe(), position, n, partial)
        feed(on_rows, resumed.tallies, batch_size)
    stats, since_save = TallyStats(), 0
    skipped_before = len(source.skipped)
    start = time.perf_counter()
    with progress_bar(n, description or f"tally {source.describe()}", initial=position, enabled=progress) as bar:
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
                feed(on_rows, rows[-1], batch_size)
                stats.images += len(batch.images)
            stats.batches += 1
            position += len(batch.images) + len(batch.skipped)
            skipped.extend(batch.skipped)
            since_save += len(batch.images) + len(batch.skipped)
            bar.update(len(batch.images) + len(batch.skipped))
            if partial is not None and since_save >= checkpoint_every and position < n:
                rows = [np.concatenate(rows)]  # concatenated once per save, not again from scratch
                since_save = 0
                try:
                    save_partial(partial, rows[0], skipped, position, key)
                except OSError as e:  # progress is a convenience: losing it must not lose the tally
                    log.warning("cannot save tally progress (%s): going on without it", e)
                    partial = None
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
    """Part of the tally cache key, and of every FSD report: which segmenter (its kind, class and a
    fingerprint of its weights: ``path: null`` means the shipped file, which a newer package may
    replace) and which label space (its classes, their list's sha256 and count), so tallies of
    different weights or label spaces are never mixed."""
    from seeing.segmenters.label_spaces import label_space

    space = label_space(class_names).as_dict()
    if segmenter is None:
        return {"oracle": True, "id": "oracle", "classes": list(class_names), **space}
    return {"id": getattr(segmenter, "segmenter_id", type(segmenter).__name__), "type": type(segmenter).__qualname__,
            "classes": list(class_names), "weights_sha256": fingerprint(segmenter), **space}


def cache_key(source: ImageSource, segmenter_id: dict, n: int, resolution: int, extra_offset: int) -> str:
    """The JSON text a tally cache file is keyed by: its name holds a digest of it, the file the text."""
    key = {
        "format": CACHE_FORMAT,
        "source": source.identity(),
        "segmenter": segmenter_id,
        "n": int(n),
        "resolution": int(resolution),
        "extra_offset": int(extra_offset),
    }
    return json.dumps(key, sort_keys=True, default=str)


def cache_path(cache_dir: str | Path, kind: str, key: str) -> Path:
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return Path(cache_dir) / "fsd_tallies" / f"{kind}-{digest}.npz"


def cache_file(cache_dir: str | Path, source: ImageSource, segmenter_id: dict, n: int, resolution: int,
               extra_offset: int) -> Path:
    return cache_path(cache_dir, source.kind, cache_key(source, segmenter_id, n, resolution, extra_offset))


def _key_difference(stored: str, expected: str) -> str:
    """Which fields of two cache keys differ, e.g. ``source.listing_sha256, n``."""
    try:
        a, b = json.loads(stored), json.loads(expected)
    except ValueError:
        return "unparseable stored key"
    fields = []
    for name in sorted(set(a) | set(b)):
        x, y = a.get(name), b.get(name)
        if isinstance(x, dict) and isinstance(y, dict):
            fields += [f"{name}.{k}" for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)]
        elif x != y:
            fields.append(name)
    return ", ".join(fields) or "formatting only"


def _expected_items(key: str) -> int | None:
    """How many source items (tallied or skipped) the tally of ``key`` reads: n, or fewer where the
    key shows the source holds fewer (a folder's ``files``, an lmdb's ``entries``); None when the
    key does not tell (images in memory)."""
    k = json.loads(key)
    source, n = k["source"], int(k["n"])
    count = source.get("files", source.get("entries"))
    if count is not None:
        return max(0, min(n, int(count) - int(source.get("offset", 0)) - int(k["extra_offset"])))
    return n if source.get("kind") in ("scenes", "generator") else None


def _read_npz(path: Path, what: str) -> dict[str, Any] | str | None:
    """The arrays of a file :func:`_write_npz` wrote (``tallies`` float64, ``skipped`` as tuples,
    the rest as plain values); None when absent, the reason when unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            out = {name: f[name] for name in f.files}
        out["tallies"] = out["tallies"].astype(np.float64)
        out["skipped"] = [tuple(s.split("\t", 1)) for s in out["skipped"].tolist()]
        for name in ("key", "position", "rows", "items"):
            if name in out:
                out[name] = out[name].item()
        return out
    except Exception as e:  # noqa: BLE001 - a damaged file is recomputed, not trusted
        return f"unreadable {what} ({type(e).__name__}: {e})"


def load_cached(path: Path, num_classes: int, key: str | None = None, n: int | None = None
                ) -> tuple[Tally | None, str | None]:
    """``(tally, None)`` for a cache file that holds the tallies of ``key``; ``(None, why)`` for a
    file that is there but must not be trusted (no key or another key stored, row counts that
    disagree with the file's own record or with the number of images the key reads, at most
    ``n``); ``(None, None)`` when there is none. ``key=None`` skips the key checks (reading a
    cache file by hand)."""
    read = _read_npz(path, "tally cache")
    if read is None or isinstance(read, str):
        return None, read
    tallies, skipped = read["tallies"], read["skipped"]
    if key is not None and "key" not in read:
        return None, "it stores no key (written by an older version, or not by this project)"
    if key is not None and read["key"] != key:
        return None, f"it was written for another key (differs in: {_key_difference(read['key'], key)})"
    if tallies.ndim != 2 or tallies.shape[1] != num_classes:
        return None, f"its tallies have shape {tallies.shape}, expected N x {num_classes}"
    rows, items = read.get("rows"), read.get("items")
    if rows != len(tallies) or items != len(tallies) + len(skipped) or (n is not None and items > n):
        return None, (f"it holds {len(tallies)} tallies and {len(skipped)} skipped images but records "
                      f"rows={rows}, items={items}" + (f" for n={n}" if n is not None else ""))
    expected = _expected_items(key) if key is not None else None
    if expected is not None and items != expected:
        return None, f"it holds {items} images (tallied or skipped) where this key reads {expected}"
    return Tally(tallies, skipped, cache="hit", path=path), None


def _write_npz(path: Path, tallies: np.ndarray, skipped: Sequence[tuple[str, str]], key: str | None,
               **extra: Any) -> None:
    buf = io.BytesIO()
    arrays = {"key": np.array(key)} if key is not None else {}
    np.savez(buf, tallies=tallies, skipped=np.array(["\t".join(s) for s in skipped], dtype=str), **arrays, **extra)
    write_bytes_atomic(path, buf.getvalue())  # a killed run never leaves half a file


def save_cached(path: Path, tally: Tally, key: str) -> None:
    rows = len(tally.tallies)
    _write_npz(path, tally.tallies, tally.skipped, key, rows=np.array(rows), items=np.array(rows + len(tally.skipped)))


@dataclass
class PartialTally:
    tallies: np.ndarray
    skipped: list[tuple[str, str]]
    position: int  # source items done (tallied or skipped)


def partial_file(path: Path) -> Path:
    """Where an unfinished tally keeps its progress, next to the cache file it will become."""
    return path.with_name(path.stem + ".partial.npz")


def save_partial(path: Path, tallies: np.ndarray, skipped: Sequence[tuple[str, str]], position: int,
                 key: str | None = None) -> None:
    _write_npz(path, tallies, skipped, key, position=np.array(position))


def load_partial(path: Path, num_classes: int, key: str | None = None) -> PartialTally | None:
    """Saved progress, or None (absent, unreadable, inconsistent, or saved under another ``key``:
    the tally starts over)."""
    read = _read_npz(path, "partial tally")
    if read is None:
        return None
    if isinstance(read, str):
        log.warning("ignoring %s: %s", path, read)
        return None
    tallies, skipped, position = read["tallies"], read["skipped"], read.get("position")
    if key is not None and read.get("key") != key:
        log.warning("ignoring partial tally %s: saved for another key (%s)", path,
                    _key_difference(read["key"], key) if "key" in read else "it stores none")
        return None
    if (position is None or tallies.ndim != 2 or tallies.shape[1] != num_classes
            or len(tallies) + len(skipped) != position):
        log.warning("ignoring partial tally %s: %s tallies, %d skipped, position %s", path, tallies.shape,
                    len(skipped), position)
        return None
    return PartialTally(tallies, skipped, position)


_WARNED_UNWRITABLE: set[str] = set()


def cache_dir_problem(folder: Path) -> str | None:
    """Why files cannot be written in ``folder`` (created if missing), or None when they can: a
    temporary file is created and removed, before any long work depends on it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-probe.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    return None


def _warn_unwritable(folder: Path, why: str) -> None:
    if str(folder) not in _WARNED_UNWRITABLE:
        _WARNED_UNWRITABLE.add(str(folder))
        log.warning("tally cache folder %s cannot be written (%s): tallies are computed but not cached; "
                    "make it writable or set paths.cache_dir to a writable folder (metric.cache=false "
                    "turns the cache off)", folder, why)


def _process_group() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _share(n: int, rank: int, world: int) -> tuple[int, int]:
    """Process ``rank``'s contiguous part ``[a, b)`` of ``n`` positions."""
    return n * rank // world, n * (rank + 1) // world


def _tally_shares(source: ImageSource, segmenter, num_classes: int, n: int, batch_size: int, resolution: int,
                  device, extra_offset: int, description: str | None, progress: bool,
                  on_rows: Callable[[np.ndarray], None] | None, rank: int, world: int) -> Tally:
    """This process tallies its share; all rows, skips and stats are gathered to every process."""
    import torch.distributed as dist

    a, b = _share(n, rank, world)
    if b > a:
        mine = tally_source(source, segmenter, num_classes, b - a, batch_size, resolution, device,
                            extra_offset + a, f"{description or source.describe()} [{rank + 1}/{world}]",
                            progress and rank == 0, on_rows=on_rows)
    else:
        mine = Tally(np.zeros((0, num_classes)))
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, (mine.tallies, mine.skipped, mine.stats))
    stats = TallyStats(images=sum(p[2].images for p in parts), batches=sum(p[2].batches for p in parts),
                       forward_s=max(p[2].forward_s for p in parts), total_s=max(p[2].total_s for p in parts))
    tallies = np.concatenate([p[0] for p in parts])
    if not len(tallies):
        raise EmptySourceError(f"{source.describe()}: no readable images among {n}")
    return Tally(tallies, [s for p in parts for s in p[1]], stats=stats)


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
    on_rows: Callable[[np.ndarray], None] | None = None,
) -> Tally:
    """:func:`tally_source` through the cache (see the module docstring); ``on_rows`` sees every
    row once, whether tallied now, resumed or read from the cache."""
    if not cache_dir:
        return tally_source(source, segmenter, num_classes, n, batch_size, resolution, device, extra_offset,
                            description, progress, checkpoint_every=checkpoint_every, on_rows=on_rows)
    what = description or source.describe()
    key = cache_key(source, segmenter_id, n, resolution, extra_offset)
    path = cache_path(cache_dir, source.kind, key)
    hit, rejected = load_cached(path, num_classes, key, n)
    rank, world = _process_group()
    if hit is not None:
        log.info("%s: read %d cached tallies from %s", what, len(hit.tallies), path)
        feed(on_rows, hit.tallies[slice(*_share(len(hit.tallies), rank, world))], batch_size)
        return hit
    if world > 1:
        return _cache_shares(source, segmenter, num_classes, n, batch_size, resolution, device, extra_offset,
                             description, progress, on_rows, rank, world, path, key, rejected)
    if rejected:
        log.warning("%s: not using tally cache %s: %s; tallying again and overwriting it", what, path, rejected)
    problem = cache_dir_problem(path.parent)
    if problem is not None:  # found before the long work, which then runs uncached
        _warn_unwritable(path.parent, problem)
        tally = tally_source(source, segmenter, num_classes, n, batch_size, resolution, device, extra_offset,
                             description, progress, checkpoint_every=checkpoint_every, on_rows=on_rows)
        tally.cache, tally.cache_rejected = "unwritable", rejected
        return tally
    partial = partial_file(path)
    tally = tally_source(source, segmenter, num_classes, n, batch_size, resolution, device, extra_offset,
                         description, progress, partial=partial, checkpoint_every=checkpoint_every, key=key,
                         on_rows=on_rows)
    tally.cache_rejected = rejected
    try:
        save_cached(path, tally, key)
    except OSError as e:  # e.g. the disk filled up during the tally: keep the result, report the file
        log.warning("%s: tallied %d images but could not cache them: %s", what, len(tally.tallies), e)
        tally.cache = "unwritable"
        return tally
    partial.unlink(missing_ok=True)
    tally.cache, tally.path = "miss", path
    log.info("%s: tallied %d images, cached in %s", what, len(tally.tallies), path)
    return tally


def _cache_shares(source, segmenter, num_classes, n, batch_size, resolution, device, extra_offset, description,
                  progress, on_rows, rank: int, world: int, path: Path, key: str, rejected: str | None) -> Tally:
    """The distributed miss: shares tallied and gathered, the cache written once (by process 0)."""
    import torch.distributed as dist

    if rejected and rank == 0:
        log.warning("%s: not using tally cache %s: %s; tallying again and overwriting it",
                    description or source.describe(), path, rejected)
    tally = _tally_shares(source, segmenter, num_classes, n, batch_size, resolution, device, extra_offset,
                          description, progress, on_rows, rank, world)
    tally.cache_rejected = rejected
    tally.cache, tally.path = "miss", path
    if rank == 0:
        problem = cache_dir_problem(path.parent)
        try:
            if problem is not None:
                raise OSError(problem)
            save_cached(path, tally, key)
        except OSError as e:
            _warn_unwritable(path.parent, str(e))
            tally.cache, tally.path = "unwritable", None
    outcome = [tally.cache]
    dist.broadcast_object_list(outcome, src=0)  # every process reports what process 0 did
    tally.cache = outcome[0]
    tally.path = path if tally.cache == "miss" else None
    return tally
