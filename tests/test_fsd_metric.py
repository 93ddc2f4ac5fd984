"""FSD: the golden values, batching and cross-process invariance, class tallies, bad input."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from seeing.metrics import FrechetSegmentationDistance, class_tally, per_class_table, rank_classes
from seeing.metrics.functional import fsd_terms


def frechet_segmentation_distance(real, fake):
    """The functional form's three numbers as floats, for comparison with the goldens."""
    t = fsd_terms(real, fake)
    return float(t["fsd"]), float(t["mean_term"]), float(t["cov_term"])

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "fsd")
REL = 1e-6


@pytest.fixture(scope="module")
def golden():
    tallies = np.load(os.path.join(FIXTURE, "fsd_tallies.npz"))
    with open(os.path.join(FIXTURE, "fsd_expected.json")) as f:
        expected = json.load(f)
    return tallies["real"], tallies["fake"], expected


def _close(actual: float, expected: float, rel: float = REL) -> bool:
    return abs(actual - expected) <= rel * abs(expected)


def test_function_matches_published_reference(golden):
    real, fake, expected = golden
    fsd, mean_term, cov_term = frechet_segmentation_distance(real, fake)
    assert _close(fsd, expected["fsd"]), (fsd, expected["fsd"])
    assert _close(mean_term, expected["mean_term"])
    assert _close(cov_term, expected["cov_term"])
    halves, _, _ = frechet_segmentation_distance(real[:200], real[200:])
    assert _close(halves, expected["fsd_real_halves"]), (halves, expected["fsd_real_halves"])


def test_metric_matches_reference_in_one_batch_or_many(golden):
    real, fake, expected = golden
    whole = FrechetSegmentationDistance(real.shape[1])
    whole.update_tally(torch.from_numpy(real), real=True)
    whole.update_tally(torch.from_numpy(fake), real=False)
    one = {k: float(v) for k, v in whole.terms().items()}
    assert float(whole.compute()) == one["fsd"]  # compute() is the scalar FSD

    # uneven batches, real and fake interleaved, some through update() and some through update_tally()
    split = FrechetSegmentationDistance(real.shape[1])
    r_edges, f_edges = [0, 1, 38, 39, 211, 400], [0, 97, 98, 250, 300]
    for i in range(max(len(r_edges), len(f_edges)) - 1):
        if i + 1 < len(r_edges):
            split.update(torch.from_numpy(real[r_edges[i] : r_edges[i + 1]]), real=True)
        if i + 1 < len(f_edges):
            split.update_tally(torch.from_numpy(fake[f_edges[i] : f_edges[i + 1]]), real=False)
    many = {k: float(v) for k, v in split.terms().items()}

    for key in ("fsd", "mean_term", "cov_term"):
        assert _close(one[key], expected[key]), (key, one[key], expected[key])
        assert _close(many[key], one[key], 1e-10), (key, many[key], one[key])
    assert split.counts() == {"real": 400, "fake": 300}


def test_state_is_float64_and_independent_of_image_count(golden):
    real, _, _ = golden
    metric = FrechetSegmentationDistance(real.shape[1])
    sizes = {name: getattr(metric, name).numel() for name in metric._defaults}
    metric.update_tally(torch.from_numpy(real), real=True)
    metric.update_tally(torch.from_numpy(real).float(), real=True)  # float32 input is promoted
    assert {name: getattr(metric, name).numel() for name in metric._defaults} == sizes
    assert all(getattr(metric, name).dtype == torch.float64 for name in metric._defaults)
    assert int(metric.real_count) == 800


def test_label_maps_and_tallies_give_the_same_metric():
    gen = torch.Generator().manual_seed(0)
    k = 7
    # class 6 appears only in the real maps; smaller ids more frequent on one side
    real_maps = torch.randint(0, k, (20, 9, 11), generator=gen)
    fake_maps = torch.randint(0, k - 1, (15, 9, 11), generator=gen) // torch.randint(1, 3, (15, 9, 11), generator=gen)
    from_maps = FrechetSegmentationDistance(k)
    from_maps.update(real_maps, real=True)
    from_maps.update(fake_maps, real=False)
    from_tallies = FrechetSegmentationDistance(k)
    from_tallies.update_tally(class_tally(real_maps, k), real=True)
    from_tallies.update_tally(class_tally(fake_maps, k), real=False)
    a, b = from_maps.terms(), from_tallies.terms()
    assert float(a["fsd"]) > 0.1
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-12, atol=0)
    fsd, _, _ = frechet_segmentation_distance(class_tally(real_maps, k), class_tally(fake_maps, k))
    assert _close(fsd, float(a["fsd"]), 1e-10)


def test_class_tally_counts_pixels_per_image():
    labels = torch.tensor([[[0, 0], [2, 2]], [[1, 1], [1, 3]]])
    t = class_tally(labels, 5)
    expected = torch.tensor([[0.5, 0, 0.5, 0, 0], [0, 0.75, 0, 0.25, 0]], dtype=torch.float64)
    assert torch.equal(t, expected)
    # against a per-image loop on random maps
    maps = torch.randint(0, 6, (8, 13, 5), generator=torch.Generator().manual_seed(1))
    loop = torch.stack([torch.bincount(m.flatten(), minlength=6).double() / m.numel() for m in maps])
    assert torch.allclose(class_tally(maps, 6), loop)


def test_identical_sets_have_zero_distance_and_the_distance_is_symmetric(golden):
    real, fake, _ = golden
    same, mean_term, _ = frechet_segmentation_distance(real, real)
    assert abs(same) < 1e-6 and mean_term == 0
    ab, _, _ = frechet_segmentation_distance(real, fake)
    ba, _, _ = frechet_segmentation_distance(fake, real)
    assert _close(ab, ba, 1e-8)


def test_class_count_mismatch_and_too_few_images_are_clear_errors(golden):
    real, fake, _ = golden
    metric = FrechetSegmentationDistance(12)
    with pytest.raises(ValueError, match="class-count mismatch: tallies have 336 classes, the metric expects 12"):
        metric.update_tally(torch.from_numpy(real), real=True)
    with pytest.raises(ValueError, match="class-count mismatch: label 12 is outside"):
        metric.update(torch.full((2, 4, 4), 12), real=True)
    with pytest.raises(ValueError, match="class-count mismatch"):
        frechet_segmentation_distance(real, fake[:, :300])
    with pytest.raises(TypeError, match="float class fractions"):
        metric.update_tally(torch.zeros(3, 12, dtype=torch.long), real=True)
    one = FrechetSegmentationDistance(3)
    one.update_tally(torch.tensor([[1.0, 0, 0]]), real=True)
    one.update_tally(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]), real=False)
    with pytest.raises(ValueError, match="at least 2 images"):
        one.compute()


def test_per_class_table_and_ranking():
    names = ["sky", "person", "car", "tree", "ghost"]
    real = [0.5, 0.2, 0.1, 0.2, 0.0]
    fake = [0.55, 0.0, 0.05, 0.3, 0.1]
    rows = per_class_table(real, fake, names)
    assert [r["class"] for r in rows] == names
    assert rows[1]["relative_delta"] == pytest.approx(-1.0)
    assert rows[3]["relative_delta"] == pytest.approx(0.5)
    assert rows[4]["relative_delta"] is None  # never in the real set: cannot be ranked
    ranks = rank_classes(rows, top=3)
    assert [r["class"] for r in ranks["most_dropped"]] == ["person", "car"]
    assert [r["class"] for r in ranks["most_overgenerated"]] == ["tree", "sky"]
    assert [r["class"] for r in rank_classes(rows, min_real_area=0.15)["most_dropped"]] == ["person"]
    # with intervals, only changes beyond them are ranked (sky's +10 % is within [-5 %, +20 %])
    low, high = np.array([-0.05, -1.0, -0.7, 0.2, 0.0]), np.array([0.2, -0.9, -0.2, 0.9, 0.0])
    rows = per_class_table(real, fake, names, (low, high))
    assert [r["beyond_noise"] for r in rows] == [False, True, True, True, False]
    ranks = rank_classes(rows)
    assert [r["class"] for r in ranks["most_dropped"]] == ["person", "car"]
    assert [r["class"] for r in ranks["most_overgenerated"]] == ["tree"]
    with pytest.raises(ValueError, match="class-count mismatch"):
        per_class_table(real, fake, names[:4])


def _dirichlet_tallies(n: int, seed: int, drop: int | None = None) -> np.ndarray:
    """Per-image class fractions of 8 classes, large and small; ``drop``: a class never drawn."""
    rng = np.random.default_rng(seed)
    t = rng.dirichlet([8, 4, 2, 1, 1, 0.5, 0.5, 0.3], size=n)
    if drop is not None:
        t[:, drop] = 0
        t /= t.sum(1, keepdims=True)
    return t


def test_a_planted_drop_ranks_first_beyond_noise_and_real_vs_real_lists_nothing():
    from seeing.metrics.per_class import bootstrap_relative_change

    names = [f"class{k}" for k in range(8)]
    real = _dirichlet_tallies(1000, 0)
    dropped = _dirichlet_tallies(1000, 1, drop=4)
    interval = bootstrap_relative_change(real, dropped, resamples=500)
    rows = per_class_table(real.mean(0), dropped.mean(0), names, interval)
    first = rank_classes(rows)["most_dropped"][0]
    assert first["class"] == "class4" and first["relative_delta"] == -1.0
    assert first["ci_low"] == first["ci_high"] == -1.0 and first["beyond_noise"]
    # two samples of one source: the lists are empty, pair after pair (a simultaneous 95 % band)
    listed = []
    for seed in range(2, 7):
        other = _dirichlet_tallies(1000, seed)
        rows = per_class_table(real.mean(0), other.mean(0), names, bootstrap_relative_change(real, other, 500))
        ranks = rank_classes(rows)
        listed += [r["class"] for r in ranks["most_dropped"] + ranks["most_overgenerated"]]
        assert all(r["ci_low"] < r["relative_delta"] < r["ci_high"] for r in rows)
    assert len(listed) <= 1, listed
    # per class (not simultaneous), each interval is narrower
    low_s, high_s = bootstrap_relative_change(real, other, 500)
    low_p, high_p = bootstrap_relative_change(real, other, 500, simultaneous=False)
    assert np.all(high_p - low_p < high_s - low_s)


def _distributed_worker(rank: int, world: int, store: str, real: np.ndarray, fake: np.ndarray, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        metric = FrechetSegmentationDistance(real.shape[1])
        # each process sees its own, differently sized share of the images
        metric.update_tally(torch.from_numpy(np.array_split(real, world)[rank]), real=True)
        for chunk in np.array_split(np.array_split(fake, world)[rank], 3):
            metric.update_tally(torch.from_numpy(chunk), real=False)
        local = {"real": int(metric.real_count), "fake": int(metric.fake_count)}  # this process's own state
        synced = metric.counts()  # counts and class means are read from the synced states, like compute()
        means = [m.tolist() for m in metric.class_means()]
        result = {k: float(v) for k, v in metric.terms().items()}  # syncs (sum) across processes
        result["compute"] = float(metric.compute())  # the scalar, synced the same way
        after = {"real": int(metric.real_count), "fake": int(metric.fake_count)}
        torch.save({"result": result, "local": local, "synced": synced, "means": means, "after": after},
                   f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_process_sum_reduction_matches_single_process(golden, tmp_path):
    import torch.multiprocessing as mp

    real, fake, expected = golden
    real, fake = real[:301], fake[:257]  # odd sizes: the shares differ between the processes
    single = FrechetSegmentationDistance(real.shape[1])
    single.update_tally(torch.from_numpy(real), real=True)
    single.update_tally(torch.from_numpy(fake), real=False)
    want = {k: float(v) for k, v in single.terms().items()}
    want["compute"] = want["fsd"]

    out = str(tmp_path / "result")
    # fork: the workers inherit the imported modules instead of re-importing torch (CPU-only, gloo)
    mp.start_processes(_distributed_worker, args=(2, str(tmp_path / "store"), real, fake, out), nprocs=2,
                       join=True, start_method="fork")
    for rank in range(2):
        got = torch.load(f"{out}.{rank}", weights_only=False)
        assert got["local"]["real"] == len(np.array_split(real, 2)[rank])  # really only half the data
        assert got["after"] == got["local"]  # compute() restores the local state after syncing
        assert got["synced"] == single.counts() == {"real": 301, "fake": 257}
        for mine, whole in zip(got["means"], single.class_means()):
            assert np.allclose(mine, whole.numpy(), rtol=1e-12, atol=1e-15)
        for key in want:
            assert _close(got["result"][key], want[key], 1e-10), (rank, key, got["result"][key], want[key])
