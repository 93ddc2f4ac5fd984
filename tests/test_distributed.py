"""Distributed means tested distributed: stages run with 2 CPU processes (Lightning DDP, gloo)
through the real entry point and give what one process gives."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import run_entry, run_folder
from seeing.stages.inversion import LatentStream

DDP2 = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "logger=csv",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def test_each_process_streams_latents_of_its_own_and_together_they_are_one_stream():
    from seeing.gans import ProGANGenerator

    g = ProGANGenerator(z_dim=8, widths=[8, 8])
    take = lambda stream, k: [z for z, _ in zip(iter(stream), range(k))]  # noqa: E731
    one = take(LatentStream(g, 4, first_seed=100), 6)
    ranks = [take(LatentStream(g, 4, first_seed=100, rank=r, world=2), 3) for r in range(2)]
    assert not torch.equal(ranks[0][0], ranks[1][0])  # distinct latents per process
    # step k of process r is batch 2k + r of the one-process stream: nothing repeated, nothing lost
    for k in range(3):
        for r in range(2):
            assert torch.equal(ranks[r][k], one[2 * k + r])
    # resumable: a stream started at step 2 continues where one started at 0 is at step 2
    assert torch.equal(take(LatentStream(g, 4, 100, start=2, rank=1, world=2), 1)[0], ranks[1][2])


def test_an_inversion_stage_trains_on_two_processes_and_exports_scores_one_process_reproduces(tiny_gan_files,
                                                                                              tmp_path):
    gen, _ = tiny_gan_files
    common = ["stage=layer1", f"model.checkpoint={gen}", "stage.batch_size=4", "stage.val_size=8",
              "stage.val_batch_size=4"]
    run_entry("train", [*common, f"paths.run_root={tmp_path / 'ddp'}", "trainer.max_steps=4", "trainer.val_check_interval=2",
            *DDP2], tmp_path)
    out = run_folder(tmp_path / "ddp" / "scenes_progan-tiny_progan", "layer1")
    assert (out / "layer1.pt").is_file()  # written once, by process 0, without a deadlock
    record = json.loads((out / "heldout.json").read_text())
    scores = record["heldout"]
    assert record["steps"] == 4
    # the same weights scored by one process
    run_entry("train", [*common, f"paths.run_root={tmp_path / 'one'}", f"stage.inverter_file={out / 'layer1.pt'}",
            "trainer.max_steps=0", "logger=csv", "trainer.enable_progress_bar=false"], tmp_path)
    again = json.loads((run_folder(tmp_path / "one" / "scenes_progan-tiny_progan", "layer1") / "heldout.json").read_text())[
        "heldout"]
    keys = [k for k in scores if k.startswith(("corr_", "chance_", "mse_"))]
    assert keys and all(scores[k] == pytest.approx(again[k], abs=1e-6) for k in keys), (scores, again)


def test_reconstruction_shards_images_across_processes_and_equals_one_process(tiny_gan_files, tmp_path):
    from seeing.stages.reconstruct import load_result

    gen, hybrid = tiny_gan_files
    common = ["stage=reconstruct", f"model.checkpoint={gen}", f"stage.hybrid_file={hybrid}", "stage.steps=4",
              "stage.targets.count=5", "stage.batch_size=1"]  # 5 chunks: one process owns 3, the other 2
    run_entry("train", [*common, f"paths.run_root={tmp_path / 'ddp'}", *DDP2], tmp_path)
    run_entry("train", [*common, f"paths.run_root={tmp_path / 'one'}", "logger=csv", "trainer.enable_progress_bar=false"],
           tmp_path)
    two, one = (load_result(run_folder(tmp_path / r / "scenes_progan-tiny_progan", "reconstruct_real_f") / "reconstruction.pt")
                for r in ("ddp", "one"))
    assert torch.equal(two["optimised_steps"], torch.full((5,), 4))  # every image optimised once, not twice
    assert torch.equal(one["optimised_steps"], two["optimised_steps"])
    assert torch.allclose(two["final"], one["final"], atol=1e-6)
    assert torch.allclose(two["final_pixel_l1"], one["final_pixel_l1"], atol=1e-7)
    assert torch.allclose(two["loss_curves"], one["loss_curves"], atol=1e-6, equal_nan=True)
    assert bool((two["final_pixel_l1"] < two["initial_pixel_l1"]).all())


def test_fsd_over_two_processes_equals_one_process_and_writes_the_cache_once(tmp_path):
    common = ["metric=fsd", "metric.oracle=true", "fake=scenes_drop", "metric.n=45", "metric.batch_size=10",
              "logger=csv", "metric.progress=false", "metric.fabric.accelerator=cpu"]
    two = [f"paths.run_root={tmp_path / 'two'}", f"paths.cache_dir={tmp_path / 'cache2'}", "metric.fabric.devices=2",
           "metric.fabric.strategy=ddp"]
    run_entry("evaluate", [*common, *two], tmp_path)
    run_entry("evaluate", [*common, f"paths.run_root={tmp_path / 'one'}", f"paths.cache_dir={tmp_path / 'cache1'}"], tmp_path)
    report = {r: json.loads((run_folder(tmp_path / r / "eval" / "fsd", "scenes_vs_scenes_drop") / "fsd.json").read_text())
              for r in ("two", "one")}
    assert report["two"]["processes"] == 2 and report["one"]["processes"] == 1
    for key in ("fsd", "mean_term", "cov_term"):
        assert abs(report["two"][key] - report["one"][key]) <= 1e-9 * max(1.0, abs(report["one"][key])), key
    assert abs(report["two"]["fsd_real_vs_real"]["fsd"] - report["one"]["fsd_real_vs_real"]["fsd"]) <= 1e-9
    for mine, whole in zip(report["two"]["per_class"], report["one"]["per_class"], strict=True):
        assert mine["class"] == whole["class"]
        assert mine["real_area"] == pytest.approx(whole["real_area"], abs=1e-12)
        assert mine["generated_area"] == pytest.approx(whole["generated_area"], abs=1e-12)
    assert report["two"]["real"]["images"] == 45 and report["two"]["real"]["cache"] == "miss"
    # the same cache entries, written once (by process 0): one process reads them back as hits
    names = {p.name for p in (tmp_path / "cache2" / "fsd_tallies").iterdir()}
    assert names == {p.name for p in (tmp_path / "cache1" / "fsd_tallies").iterdir()} and len(names) == 3
    run_entry("evaluate", [*common, f"paths.run_root={tmp_path / 'again'}", f"paths.cache_dir={tmp_path / 'cache2'}"], tmp_path)
    again = json.loads((run_folder(tmp_path / "again" / "eval" / "fsd", "scenes_vs_scenes_drop") / "fsd.json").read_text())
    assert again["real"]["cache"] == again["fake"]["cache"] == "hit" and again["fsd"] == pytest.approx(
        report["one"]["fsd"], abs=1e-9)


def test_the_segmenter_stage_trains_on_two_processes_and_process_zero_scores_the_whole_test_split(tmp_path):
    """Process 0 exports and scores the held-out split alone (no metric sync waiting on the others):
    the file's mIoU is what one process computes for the exported weights on the same scenes."""
    from torchmetrics.classification import MulticlassJaccardIndex

    from seeing.data.scenes import NUM_CLASSES, ScenesDataset
    from seeing.segmenters import load_scenes_segmenter

    done = run_entry("train", ["stage=segmenter", "data.train_length=32", "data.val_length=4", "data.test_length=8",
                               "data.batch_size=4", "data.resolution=16", "stage.widths=[4,8]", "stage.figure_images=0",
                               "trainer.max_steps=4", f"paths.run_root={tmp_path / 'ddp'}", *DDP2], tmp_path)
    assert "sync_dist" not in done.stderr  # the validation logs say they are synced
    out = run_folder(tmp_path / "ddp" / "scenes_progan", "segmenter")
    seg = load_scenes_segmenter(out / "scenes_segmenter.pt", device="cpu")
    held = seg.meta["heldout"]
    assert held["images"] == 8 and seg.meta["global_step"] == 4
    test = ScenesDataset(8, resolution=16, seed=0, offset=32 + 4)
    images, labels = map(torch.stack, zip(*(test[i] for i in range(8))))
    iou = MulticlassJaccardIndex(NUM_CLASSES, average="none")(seg.segment(images), labels)
    assert held["miou"] == pytest.approx(float(iou.mean()), abs=1e-6)
