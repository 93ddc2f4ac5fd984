"""Tally throughput and where the time goes (CPU): ``pytest bench/bench_tally.py --benchmark-only -s``.

The goal: the work a tally adds around the segmenter (class tallies, the metric's
float64 sums, batching, the progress bar) stays under 3 % of the time of the
segmenter's own forward pass. Measured on images already in memory, so decoding or
rendering does not hide it; a second benchmark includes rendering the scenes world,
to show what a cheap source costs next to the segmenter.
"""
from __future__ import annotations

import statistics

import pytest
import torch

from seeing.data.scenes import CLASS_NAMES, ScenesDataset
from seeing.data.sources import ScenesSource, TensorSource
from seeing.reports.tallies import tally_source
from seeing.metrics import FrechetSegmentationDistance

N, BATCH, RES = 400, 50, 64


@pytest.fixture(scope="module")
def segmenter():
    """The shipped scenes segmenter when present, else the same architecture untrained (same cost)."""
    from seeing.segmenters.scenes import SceneSegmenterNet, ScenesSegmenter, load_scenes_segmenter

    torch.set_num_threads(1)  # a shared machine: one core gives repeatable numbers
    try:
        return load_scenes_segmenter(device="cpu")
    except FileNotFoundError:
        torch.manual_seed(0)
        return ScenesSegmenter(SceneSegmenterNet(len(CLASS_NAMES)), CLASS_NAMES)


@pytest.fixture(scope="module")
def images():
    ds = ScenesDataset(N, resolution=RES, seed=0)
    return torch.stack([ds[i][0] for i in range(N)])


def _report(benchmark, label, runs):
    totals = [s.total_s for s in runs]
    forwards = [s.forward_s for s in runs]
    outside = statistics.median((t - f) / t for t, f in zip(totals, forwards))
    rate = statistics.median(s.images / s.total_s for s in runs)
    benchmark.extra_info.update(
        {"images_per_s": round(rate, 1), "share_outside_forward": round(outside, 4),
         "forward_images_per_s": round(statistics.median(s.images / s.forward_s for s in runs), 1)}
    )
    print(f"\n{label}: {rate:.1f} images/s, {outside:.2%} of the time outside the segmenter forward "
          f"(median of {len(runs)} runs of {runs[0].images} images, batch {BATCH}, {RES}px, "
          f"{torch.get_num_threads()} thread)")
    return outside


def test_tally_overhead_in_memory(benchmark, segmenter, images):
    source, runs = TensorSource(images), []

    def tally():
        runs.append(tally_source(source, segmenter, segmenter.num_classes, N, BATCH, RES, progress=True).stats)

    benchmark.pedantic(tally, rounds=5, iterations=1, warmup_rounds=1)
    _report(benchmark, "tally, images in memory", runs[1:])


@pytest.mark.parametrize("workers", [0, 1], ids=["render-inline", "render-in-1-worker"])
def test_tally_scenes_world_including_rendering(benchmark, segmenter, workers):
    """Rendering inline adds to the loop; a DataLoader worker overlaps it with the forward
    (``real.num_workers=...``), given a free core."""
    source, runs = ScenesSource(seed=0, num_workers=workers), []

    def tally():
        runs.append(tally_source(source, segmenter, segmenter.num_classes, N, BATCH, RES, progress=True).stats)

    benchmark.pedantic(tally, rounds=3, iterations=1, warmup_rounds=0)
    _report(benchmark, f"tally, scenes world rendered on the fly ({workers} workers)", runs)


def test_metric_update_336_classes(benchmark):
    """The metric's per-batch cost at the paper's class count (UPP, 336 classes)."""
    tallies = torch.softmax(torch.randn(BATCH, 336, generator=torch.Generator().manual_seed(0)), 1)
    metric = FrechetSegmentationDistance(336)
    benchmark(metric.update_tally, tallies, True)
    print(f"\nmetric update, 336 classes: {BATCH / benchmark.stats.stats.median:.0f} images/s")
