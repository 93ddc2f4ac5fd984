"""The "what is missing" report: a class present in the targets but absent from the reconstructions
ranks first; IoU, figure and ranking agreement."""
from __future__ import annotations

import pytest
import torch

from seeing.data.scenes import CLASS_NAMES, render_scene
from seeing.data.sources import ScenesSource
from seeing.metrics.missing import MissingClasses, class_presence, iou_per_class
from seeing.reports.missing_objects import missing_figure, rank_agreement, rank_missing
from seeing.data.targets import real_targets


def planted_case(n: int = 10, res: int = 32):
    """Held-out scenes showing persons, and the same scenes with every person removed: exactly
    what a generator that cannot draw persons would give back."""
    targets = real_targets(ScenesSource(seed=0, offset=500_000), n, res, with_classes=["person"], min_fraction=0.005)
    without = torch.stack([torch.from_numpy(render_scene(0, int(i), res, ("person",), 1.0)[1]) for i in targets.ids])
    return targets, without


def test_with_classes_keeps_only_scenes_showing_them():
    targets, _ = planted_case(6)
    person = CLASS_NAMES.index("person")
    assert targets.labels.shape == (6, 32, 32)
    assert torch.all((targets.labels == person).flatten(1).float().mean(1) >= 0.005)
    assert targets.ids.min() >= 500_000 and targets.ids.unique().numel() == 6
    with pytest.raises(ValueError, match="unknown classes"):
        real_targets(ScenesSource(seed=0), 2, 32, with_classes=["unicorn"])


def test_a_planted_missing_class_ranks_first():
    targets, without = planted_case()
    k = len(CLASS_NAMES)
    metric = MissingClasses(k, min_fraction=0.005)
    metric.update(targets.labels[:4], without[:4])  # accumulates over batches
    metric.update(targets.labels[4:], without[4:])
    stats = metric.compute()
    ranking = rank_missing(stats, CLASS_NAMES, min_support=2)
    assert ranking[0]["class"] == "person" and ranking[0]["rank"] == 1
    assert ranking[0]["missing_rate"] == 1.0 and ranking[0]["present"] == ranking[0]["missing"] == 10
    assert ranking[0]["lost_pixel_fraction"] == 1.0
    # the sky is never lost; the report does not invent missing objects
    sky = next(r for r in ranking if r["class"] == "sky")
    assert sky["missing"] == 0 and sky["missing_rate"] == 0.0
    # a reconstruction identical to the target misses nothing
    same = MissingClasses(k, min_fraction=0.005)
    same.update(targets.labels, targets.labels)
    assert int(same.compute()["missing"].sum()) == 0

    iou = iou_per_class(targets.labels, without, k)
    assert iou[CLASS_NAMES.index("person")] == 0.0 and iou[CLASS_NAMES.index("sky")] > 0.9


def test_presence_threshold_is_a_fraction_of_the_image():
    labels = torch.zeros(1, 10, 10, dtype=torch.long)
    labels[0, 0, :3] = 2  # 3% of the image
    assert class_presence(labels, 4, 0.03)[0].tolist() == [True, False, True, False]
    assert class_presence(labels, 4, 0.04)[0].tolist() == [True, False, False, False]


def test_missing_figure_is_written(tmp_path):
    targets, without = planted_case(3)
    recon = targets.images.clone()  # any image will do: the figure shows what the labels say
    path = missing_figure(targets.images, recon, targets.labels, without, CLASS_NAMES, tmp_path / "m.png",
                          min_fraction=0.005)
    assert path.is_file() and path.stat().st_size > 5000


def test_rank_agreement_between_two_rankings():
    a = ["person", "car", "tree", "sky", "road"]
    assert rank_agreement(a, a, k=2)["top_k_overlap"] == 2
    assert rank_agreement(a, a)["spearman_shared"] == pytest.approx(1.0)
    rev = rank_agreement(a, list(reversed(a)), k=2)
    assert rev["top_k_overlap"] == 0 and rev["spearman_shared"] == pytest.approx(-1.0)


def test_a_class_drawn_elsewhere_is_still_missing():
    """Stray pixels of a class somewhere else in the reconstruction do not count as drawing it."""
    target = torch.zeros(1, 10, 10, dtype=torch.long)
    target[0, :3, :3] = 1  # a 9-pixel object top left
    recon = torch.zeros_like(target)
    recon[0, 7:, 7:] = 1  # the same class, bottom right
    located = MissingClasses(2, min_fraction=0.05, min_recall=0.2)
    located.update(target, recon)
    anywhere = MissingClasses(2, min_fraction=0.05, min_recall=None)
    anywhere.update(target, recon)
    assert located.compute()["missing"].tolist() == [0, 1]
    assert anywhere.compute()["missing"].tolist() == [0, 0]
    recon[0, :2, :2] = 1  # 4 of its 9 pixels drawn in place: not missing any more
    again = MissingClasses(2, min_fraction=0.05, min_recall=0.2)
    again.update(target, recon)
    assert again.compute()["missing"].tolist() == [0, 0]
