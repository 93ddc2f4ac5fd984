"""`python evaluate.py metric=fsd` end to end, and the image sources it reads."""
from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from seeing.data.scenes import CLASS_NAMES, ScenesDataset, export_image_folder
from seeing.data.sources import EmptySourceError, GeneratorSource, ImageFolderSource, LSUNSource, ScenesSource
from seeing.reports.tallies import tally_source
from seeing.pipeline import evaluate


@pytest.fixture
def tiny_segmenter(tmp_path) -> Path:
    """A real (untrained, small) scenes segmenter weights file, in the format the loader reads."""
    from seeing.segmenters.scenes import SceneSegmenterNet, make_weights_file

    torch.manual_seed(0)
    path = tmp_path / "tiny_segmenter.pt"
    torch.save(make_weights_file(SceneSegmenterNet(len(CLASS_NAMES), (4, 8)), CLASS_NAMES), path)
    return path


def _png_bytes(seed: int, size=(20, 14)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _folder_with_bad_files(root: Path, good: int) -> Path:
    export_image_folder(ScenesDataset(good, resolution=32, seed=3), root, with_labels=False)
    nested = root / "images" / "more"
    nested.mkdir()
    (nested / "garbage.png").write_bytes(b"this is not an image at all")
    (nested / "empty.jpg").write_bytes(b"")
    jpeg = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(jpeg, format="JPEG")
    (nested / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (root / "notes.txt").write_text("not an image file: never listed")
    return root


# ------------------------------------------------------------------------------------ the demo


def test_planted_person_drop_ranks_first_and_beats_real_vs_real(compose):
    """Oracle (exact) labels, so the only difference between the sides is the planted drop."""
    cfg = compose(
        "evaluate",
        ["metric=fsd", "real=scenes", "fake=scenes_drop", "metric.oracle=true", "metric.n=1000",
         "metric.resolution=32", "metric.batch_size=250", "metric.progress=false", "logger=csv"],
    )
    report = evaluate(cfg)
    baseline = report["fsd_real_vs_real"]
    print(f"planted drop FSD {report['fsd']:.4f} vs real-vs-real {baseline['fsd']:.4f} (n=1000 each)")
    first = report["most_dropped"][0]
    assert first["class"] == "person" and first["relative_delta"] == -1.0
    assert first["ci_high"] == -1.0 and first["beyond_noise"]  # never drawn in any resample of the drop
    # every listed class lies beyond its interval; the noise floor is reported beside it
    assert all(r["ci_high"] < 0 for r in report["most_dropped"])
    assert all(r["ci_low"] > 0 for r in report["most_overgenerated"])
    person = next(r for r in report["per_class"] if r["class"] == "person")
    assert person["real_vs_real_ci_low"] < person["real_vs_real_delta"] < person["real_vs_real_ci_high"]
    assert report["interval"]["confidence"] == 0.95 and report["interval"]["simultaneous"]
    assert baseline["images"] == report["real"]["images"] == report["fake"]["images"] == 1000
    assert report["fsd"] > 4 * baseline["fsd"], (report["fsd"], baseline["fsd"])
    assert report["fsd"] == pytest.approx(report["mean_term"] + report["cov_term"])


def test_evaluate_writes_report_files_and_reuses_the_tally_cache(compose, tiny_segmenter, tmp_path, caplog, capsys):
    real_dir = _folder_with_bad_files(tmp_path / "real_images", good=10)
    overrides = [
        "metric=fsd", "real=folder", f"real.path={real_dir}", "fake=scenes_drop", f"segmenter.path={tiny_segmenter}",
        "metric.n=16", "metric.resolution=32", "metric.batch_size=5", "logger=wandb",
    ]
    caplog.set_level(logging.INFO)
    cfg = compose("evaluate", overrides)
    out = Path(cfg.output_dir)
    report = evaluate(cfg)

    assert report["real"]["images"] == 10 and report["real"]["skipped"] == 3
    assert sorted(Path(s["item"]).name for s in report["real"]["skipped_files"]) == [
        "empty.jpg", "garbage.png", "truncated.jpg"]
    assert report["fake"]["images"] == 16 and report["fake"]["skipped"] == 0
    assert report["fsd_real_vs_real"] is None  # the folder has no second sample of 16 images
    assert {report["real"]["cache"], report["fake"]["cache"]} == {"miss"}

    saved = json.loads((out / "fsd.json").read_text())
    assert saved["fsd"] == pytest.approx(report["fsd"]) and saved["fsd"] >= 0
    assert len(saved["per_class"]) == len(CLASS_NAMES)
    with open(out / "fsd_per_class.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == list(CLASS_NAMES)
    assert set(rows[0]) == {"index", "class", "real_area", "generated_area", "relative_delta", "ci_low", "ci_high",
                            "beyond_noise"}  # no real-vs-real columns: the folder has no second sample
    assert sum(float(r["real_area"]) for r in rows) == pytest.approx(1.0)
    with Image.open(out / "fsd_histogram.png") as img:
        assert img.format == "PNG" and img.size[0] > 200
    assert list(out.rglob("wandb/offline-run-*")), "the report was not logged to W&B (offline)"
    from test_config import wandb_run_summary

    logged = wandb_run_summary(out)["config"]  # the W&B config carries the report's provenance
    assert logged["provenance"]["identity"] == json.loads((out / "identity.json").read_text())["identity"]
    assert any(Path(i["path"]) == Path(tiny_segmenter).resolve() for i in logged["provenance"]["inputs"])
    assert "3 images could not be read and were skipped" in caplog.text

    caplog.clear()
    # the same settings again: complete already, nothing is done
    assert evaluate(compose("evaluate", overrides))["fsd"] == pytest.approx(report["fsd"])
    assert "already complete" in capsys.readouterr().out
    caplog.clear()
    again = evaluate(compose("evaluate", overrides + ["force=true"]))  # run again: the tally cache serves it
    assert (again["real"]["cache"], again["fake"]["cache"]) == ("hit", "hit")
    assert "read 10 cached tallies" in caplog.text and "read 16 cached tallies" in caplog.text
    assert "tallied" not in caplog.text and "could not be read" not in caplog.text  # nothing decoded again
    assert again["real"]["skipped"] == 3  # skip counts survive the cache
    assert again["fsd"] == report["fsd"]

    # a different N is a different key: tallied afresh
    third = evaluate(compose("evaluate", overrides[:-3] + ["metric.n=8", "metric.resolution=32", "logger=csv"]))
    assert third["fake"]["cache"] == "miss" and third["fake"]["images"] == 8

    # new segmenter weights under the same file name are a different key too
    from seeing.segmenters.scenes import SceneSegmenterNet, make_weights_file

    torch.manual_seed(1)
    torch.save(make_weights_file(SceneSegmenterNet(len(CLASS_NAMES), (4, 8)), CLASS_NAMES), tiny_segmenter)
    fourth = evaluate(compose("evaluate", overrides))
    assert (fourth["real"]["cache"], fourth["fake"]["cache"]) == ("miss", "miss")


def test_histogram_names_both_sources_and_draws_intervals_and_the_floor():
    from seeing.metrics.per_class import per_class_table
    from seeing.reports.fsd_report import histogram_figure

    names = ["sky", "person", "car"]
    noise = {"delta": np.array([0.01, -0.05, 0.02]), "low": np.array([-0.02, -0.2, -0.1]),
             "high": np.array([0.03, 0.1, 0.15])}
    rows = per_class_table([0.6, 0.1, 0.3], [0.62, 0.0, 0.38], names,
                           (np.array([-0.01, -1.0, 0.1]), np.array([0.07, -1.0, 0.4])), noise)
    fig = histogram_figure(rows, real_name="scenes", fake_name="scenes_drop", confidence=0.95)
    top, bottom = fig.axes
    legend = [t.get_text() for ax in (top, bottom) for t in ax.get_legend().get_texts()]
    assert "real=scenes" in legend and "fake=scenes_drop" in legend
    assert any("2nd sample" in t and "noise floor" in t for t in legend)
    assert any("95% bootstrap interval" in t for t in legend)
    assert bottom.get_xlabel() == "class, by mean area in real=scenes" and "relative change" in bottom.get_ylabel()
    assert top.get_ylabel() == "mean fraction of pixels"
    assert len(bottom.patches) >= 2 * len(names)  # a bar and a noise-floor box per class
    # the legends sit beside the axes, not over the bars
    fig.canvas.draw()
    for ax in (top, bottom):
        assert ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1


def test_generator_source_from_the_model_config(compose, tiny_segmenter):
    """fake=generator samples ${model.generator}; here a small, randomly initialised ProGAN."""
    cfg = compose(
        "evaluate",
        ["metric=fsd", "real=scenes", "fake=generator", f"segmenter.path={tiny_segmenter}", "metric.n=6",
         "metric.resolution=32", "metric.batch_size=4", "metric.real_baseline=false", "logger=csv",
         "~model.generator", "+model.generator={_target_:seeing.gans.progan.ProGANGenerator,z_dim:8,widths:[8,8,8]}"],
    )
    report = evaluate(cfg)
    assert report["fake"]["images"] == 6 and report["fake"]["identity"]["kind"] == "generator"
    assert report["fake"]["identity"]["generator"]["_target_"] == "seeing.gans.progan.ProGANGenerator"
    assert len(report["fake"]["identity"]["weights_sha256"]) == 64
    with np.load(report["fake"]["cache_file"]) as cached:
        tallies = cached["tallies"]
    assert tallies.shape == (6, len(CLASS_NAMES)) and np.allclose(tallies.sum(1), 1.0)
    assert np.isfinite(report["fsd"]) and report["fsd"] >= 0


# ------------------------------------------------------------------------------- bad input


def test_class_count_mismatch_is_a_clear_error(compose, tiny_segmenter):
    cfg = compose("evaluate", ["metric=fsd", f"segmenter.path={tiny_segmenter}", "metric.num_classes=336",
                               "metric.n=4", "logger=csv"])
    with pytest.raises(ValueError, match="class-count mismatch: metric.num_classes=336 but the segmenter .* has 12"):
        evaluate(cfg)


def test_missing_weights_files_are_named(compose, tmp_path, tiny_segmenter):
    missing = tmp_path / "nowhere" / "segmenter.pt"
    cfg = compose("evaluate", ["metric=fsd", f"segmenter.path={missing}", "metric.n=4", "logger=csv"])
    with pytest.raises(FileNotFoundError, match=str(missing)):
        evaluate(cfg)
    no_gan = tmp_path / "nowhere" / "generator.pt"
    cfg = compose("evaluate", ["metric=fsd", "fake=generator", "model=scenes_progan", f"model.checkpoint={no_gan}",
                               f"segmenter.path={tiny_segmenter}", "metric.n=4", "metric.resolution=16",
                               "logger=csv"])
    with pytest.raises(FileNotFoundError, match=str(no_gan)):
        evaluate(cfg)


def test_empty_source_through_evaluate_is_a_clear_error(compose, tmp_path, tiny_segmenter):
    (tmp_path / "no_images").mkdir()
    cfg = compose("evaluate", ["metric=fsd", "real=folder", f"real.path={tmp_path / 'no_images'}",
                               f"segmenter.path={tiny_segmenter}", "metric.n=4", "logger=csv"])
    with pytest.raises(EmptySourceError, match="no image files"):
        evaluate(cfg)


class _KilledAfter:
    """Wraps a source: the run dies (KeyboardInterrupt) after ``batches`` batches, like a killed job."""

    def __init__(self, source, batches: int):
        self.source, self.left = source, batches

    def __getattr__(self, name):
        return getattr(self.source, name)

    def batches(self, *args, **kwargs):
        for batch in self.source.batches(*args, **kwargs):
            if self.left == 0:
                raise KeyboardInterrupt
            self.left -= 1
            yield batch


def test_interrupted_tally_resumes_from_its_saved_progress(tmp_path):
    from seeing.reports.tallies import cached_tally, load_partial, partial_file

    # a folder with unreadable files in it: the skip count must survive the interruption too
    root = _folder_with_bad_files(tmp_path / "imgs", good=9)
    from seeing.segmenters.scenes import SceneSegmenterNet, ScenesSegmenter

    torch.manual_seed(0)
    segmenter = ScenesSegmenter(SceneSegmenterNet(len(CLASS_NAMES), (4, 8)), CLASS_NAMES).eval()
    args = dict(segmenter=segmenter, num_classes=len(CLASS_NAMES), n=12, batch_size=4, resolution=32,
                progress=False)
    full = tally_source(ImageFolderSource(root, seed=1), **args)
    assert len(full.tallies) == 9 and len(full.skipped) == 3

    partial = tmp_path / "progress.partial.npz"
    with pytest.raises(KeyboardInterrupt):
        tally_source(_KilledAfter(ImageFolderSource(root, seed=1), 2), **args, partial=partial, checkpoint_every=4)
    saved = load_partial(partial, len(CLASS_NAMES))
    assert saved.position == 8 and len(saved.tallies) + len(saved.skipped) == 8
    resumed = tally_source(ImageFolderSource(root, seed=1), **args, partial=partial, checkpoint_every=4)
    assert resumed.stats.batches == 1  # only the last 4 items were read again
    np.testing.assert_allclose(resumed.tallies, full.tallies, atol=1e-6)
    assert sorted(resumed.skipped) == sorted(full.skipped)

    # through the cache: progress lives next to the cache file and is removed once the tally is cached
    common = dict(segmenter=None, segmenter_id={"oracle": True}, num_classes=len(CLASS_NAMES), n=20, batch_size=5,
                  resolution=32, device="cpu", cache_dir=tmp_path / "cache", progress=False, checkpoint_every=5)
    whole = tally_source(ScenesSource(seed=4), None, len(CLASS_NAMES), 20, 5, 32, progress=False)
    with pytest.raises(KeyboardInterrupt):
        cached_tally(_KilledAfter(ScenesSource(seed=4), 3), **common)
    partials = list((tmp_path / "cache").rglob("*.partial.npz"))
    assert len(partials) == 1 and load_partial(partials[0], len(CLASS_NAMES)).position == 15
    done = cached_tally(ScenesSource(seed=4), **common)
    assert done.stats.images == 5 and done.cache == "miss"
    np.testing.assert_array_equal(done.tallies, whole.tallies)
    assert not partials[0].exists() and partial_file(done.path) == partials[0] and done.path.is_file()


def test_oracle_needs_a_source_with_labels(tmp_path):
    folder = ImageFolderSource(_folder_with_bad_files(tmp_path / "f", good=2))
    with pytest.raises(ValueError, match="oracle segmentation needs ground-truth labels"):
        tally_source(folder, None, 12, 2, 2, 32, progress=False)


def test_corrupt_files_are_skipped_counted_and_logged(tmp_path, caplog):
    root = _folder_with_bad_files(tmp_path / "imgs", good=4)
    source = ImageFolderSource(root, shuffle=False)
    caplog.set_level(logging.WARNING)
    batches = list(source.batches(n=100, batch_size=3, resolution=24))
    images = torch.cat([b.images for b in batches])
    assert images.shape == (4, 3, 24, 24) and images.min() >= -1 and images.max() <= 1
    assert sorted(Path(item).name for item, _ in source.skipped) == ["empty.jpg", "garbage.png", "truncated.jpg"]
    assert all(reason for _, reason in source.skipped)
    assert sum(": skipped " in r.getMessage() for r in caplog.records) == 3
    # a folder exported from the scenes world decodes to the scenes' own pixels (PNG is lossless)
    first = ScenesDataset(1, resolution=32, seed=3)[0][0]
    again = next(ImageFolderSource(root, shuffle=False).batches(1, 1, 32)).images[0]
    assert torch.allclose(again, first, atol=1e-6)


def test_empty_and_unreadable_sources_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmptySourceError, match="no image files .* under .*empty"):
        list(ImageFolderSource(tmp_path / "empty").batches(4, 2, 16))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(ImageFolderSource(tmp_path / "absent").batches(4, 2, 16))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"nope")
    (bad / "b.webp").write_bytes(b"")
    from seeing.segmenters.scenes import SceneSegmenterNet, ScenesSegmenter

    segmenter = ScenesSegmenter(SceneSegmenterNet(len(CLASS_NAMES), (4, 8)), CLASS_NAMES)
    with pytest.raises(EmptySourceError, match="gave no readable images .*2 unreadable"):
        tally_source(ImageFolderSource(bad), segmenter, len(CLASS_NAMES), 4, 2, 16, progress=False)


def test_lsun_lmdb_source_reads_torchvision_layout(tmp_path):
    import lmdb

    db = tmp_path / "church_outdoor_train_lmdb"
    env = lmdb.open(str(db), map_size=1 << 24)
    encoded = {f"{i:040x}".encode(): _png_bytes(i) for i in range(5)}
    with env.begin(write=True) as txn:
        for key, value in encoded.items():
            txn.put(key, value)
        txn.put(b"f" * 40, b"\x00\x01 corrupt")
    env.close()

    source = LSUNSource(db, shuffle=False)
    images = torch.cat([b.images for b in source.batches(n=10, batch_size=4, resolution=14)])
    assert images.shape == (5, 3, 14, 14)
    assert len(source.skipped) == 1 and source.skipped[0][0] == repr(b"f" * 40)
    # same pixels as decoding the stored bytes directly (shorter side 14, centre crop)
    first = np.asarray(Image.open(io.BytesIO(encoded[sorted(encoded)[0]])).convert("RGB"))[:, 3:17]
    assert torch.allclose(images[0], torch.from_numpy(first.copy()).permute(2, 0, 1).float() / 127.5 - 1, atol=1e-6)
    # seeded subsets: disjoint for disjoint offsets
    a = torch.cat([b.images for b in LSUNSource(db, seed=1).batches(2, 2, 14)])
    b = torch.cat([b.images for b in LSUNSource(db, seed=1, offset=2).batches(2, 2, 14)])
    assert not any(torch.equal(x, y) for x in a for y in b)
    with pytest.raises(FileNotFoundError, match="data.mdb"):
        LSUNSource(tmp_path / "nothing").keys()


def test_sources_draw_disjoint_reproducible_samples():
    from seeing.gans.progan import ProGANGenerator

    torch.manual_seed(0)
    gen = ProGANGenerator(z_dim=8, widths=[8, 8, 8])
    source = GeneratorSource(gen, seed=5)
    six = torch.cat([b.images for b in source.batches(6, 4, resolution=8)])
    tail = torch.cat([b.images for b in source.batches(2, 4, resolution=8, extra_offset=4)])
    assert six.shape == (6, 3, 8, 8)
    assert torch.allclose(six[4:], tail, atol=1e-6)  # the baseline sample continues the same stream

    scenes = ScenesSource(seed=2, drop=["person"])
    x = next(scenes.batches(3, 3, 16))
    y = next(scenes.batches(3, 3, 16, extra_offset=3))
    assert not (x.labels == CLASS_NAMES.index("person")).any()
    assert not torch.equal(x.images, y.images)
    assert torch.equal(x.images, next(ScenesSource(seed=2, drop=["person"]).batches(3, 3, 16)).images)
