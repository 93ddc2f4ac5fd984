"""The "what is missing" report: objects (connected regions of one class) of the targets that the
reconstructions do not draw; a class absent from the reconstructions ranks first; IoU, figure
and ranking agreement."""
from __future__ import annotations

import pytest
import torch

from seeing.data.scenes import CLASS_NAMES, render_scene
from seeing.data.sources import ScenesSource
from seeing.metrics.missing import MissingObjects, iou_per_class, object_regions
from seeing.reports.missing_objects import (missing_caption, missing_figure, missing_panels, most_missing,
                                            rank_agreement, rank_missing)
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
    metric = MissingObjects(k, min_region=0.002)
    metric.update(targets.labels[:4], without[:4])  # accumulates over batches
    metric.update(targets.labels[4:], without[4:])
    stats = metric.compute()
    ranking = rank_missing(stats, CLASS_NAMES, min_support=2)
    first = ranking[0]
    assert first["class"] == "person" and first["rank"] == 1
    assert first["missing_rate"] == 1.0 and first["missing_regions"] == first["regions"] >= 10
    # (a target whose persons are each under min_region has no person object: 9 of the 10)
    assert first["images_present"] == first["images_missing"] == first["images_whole_class_missing"] >= 9
    assert first["lost_pixel_fraction"] == 1.0
    # the sky is never lost; the report does not invent missing objects, nor list them as missing
    sky = next(r for r in ranking if r["class"] == "sky")
    assert sky["missing_regions"] == 0 and sky["missing_rate"] == 0.0
    assert "sky" not in [r["class"] for r in most_missing(ranking)]
    assert all(r["missing_regions"] > 0 for r in most_missing(ranking))
    # a reconstruction identical to the target misses nothing
    same = MissingObjects(k, min_region=0.002)
    same.update(targets.labels, targets.labels)
    assert int(same.compute()["missing_regions"].sum()) == 0
    assert most_missing(rank_missing(same.compute(), CLASS_NAMES)) == []

    iou = iou_per_class(targets.labels, without, k)
    assert iou[CLASS_NAMES.index("person")] == 0.0 and iou[CLASS_NAMES.index("sky")] > 0.9


def test_a_missing_house_next_to_a_redrawn_one_is_found_where_the_whole_class_view_sees_nothing():
    """Built by hand: two buildings and a door; the reconstruction redraws the right building,
    drops the left one and keeps a sliver of the door."""
    sky, building, door = 0, 1, 2
    target = torch.zeros(1, 20, 20, dtype=torch.long)
    target[0, 4:12, 1:8] = building  # the house on the left: 56 px
    target[0, 4:14, 11:19] = building  # the building on the right: 80 px
    target[0, 14:20, 14:16] = door  # 12 px
    recon = target.clone()
    recon[0, 4:12, 1:8] = sky  # the house is gone
    recon[0, 15:20, 14:16] = sky  # 2 of the door's 12 pixels survive: 17 % < 20 %
    metric = MissingObjects(3, min_region=0.01, min_covered=0.2)
    metric.update(target, recon)
    stats = metric.compute()
    assert stats["regions"].tolist() == [1, 2, 1]
    assert stats["missing_regions"].tolist() == [0, 1, 1]  # the house and the door, object by object
    assert stats["images_missing"].tolist() == [0, 1, 1]
    # the whole-class view misses the house: the class is still in the reconstruction (the other building)
    assert stats["images_whole_class_missing"].tolist() == [0, 0, 1]  # (the door: 2 px left, under min_region)
    assert float(stats["lost_pixel_fraction"][building]) == pytest.approx(56 / 136)
    regions = object_regions(target[0], recon[0], 3, 0.01, 0.2)
    missing = [g for g in regions if g.missing]
    assert [(g.class_index, g.pixels) for g in missing] == [(building, 56), (door, 12)]
    assert missing[0].mask.sum() == 56 and bool(missing[0].mask[4, 1]) and not missing[0].mask[4, 11]
    assert missing[1].covered == pytest.approx(2 / 12)
    assert missing_caption(regions, ["sky", "building", "door"]) == "building, door"
    # an object smaller than min_region is not an object
    assert sorted(g.class_index for g in object_regions(target[0], recon[0], 3, 0.05, 0.2)) == [sky, building, building]
    # a 4 % object (a person at the paper's resolution) counts under the defaults
    person = torch.zeros(1, 256, 256, dtype=torch.long)
    person[0, 100:180, 100:133] = 1
    assert [g.missing for g in object_regions(person[0], torch.zeros(256, 256, dtype=torch.long), 2)] == [False, True]


def test_missing_figure_outlines_the_missing_objects(tmp_path):
    targets, without = planted_case(3)
    recon = targets.images.clone()  # any image will do: the figure shows what the labels say
    path = missing_figure(targets.images, recon, targets.labels, without, CLASS_NAMES, tmp_path / "m.png")
    assert path.is_file() and path.stat().st_size > 5000
    panels = missing_panels(targets.images, recon, targets.labels, without, len(CLASS_NAMES))
    person = CLASS_NAMES.index("person")
    for (images, regions), labels in zip(panels, targets.labels):
        outline = (images[-1] == [255, 230, 0]).all(-1)
        assert outline.any() and bool((labels.numpy()[outline] == person).all())  # outlines only the persons
        assert "person" in missing_caption(regions, CLASS_NAMES)


def test_rank_agreement_between_two_rankings():
    a = ["person", "car", "tree", "sky", "road"]
    assert rank_agreement(a, a, k=2)["top_k_overlap"] == 2
    assert rank_agreement(a, a)["spearman_shared"] == pytest.approx(1.0)
    rev = rank_agreement(a, list(reversed(a)), k=2)
    assert rev["top_k_overlap"] == 0 and rev["spearman_shared"] == pytest.approx(-1.0)
