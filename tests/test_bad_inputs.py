"""Bad inputs and hostile file systems (issue 14): stale and foreign tally caches, unreadable
torch files, reconstructions that end worse than they started, a cache folder that cannot be
written or a full disk, and the modes of the files the project writes. One test per case; each
checks the behaviour and that the message names the file or key and what to do."""
from __future__ import annotations

import csv
import errno
import io
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from seeing.data.scenes import CLASS_NAMES
from seeing.data.sources import ImageFolderSource, LSUNSource, ScenesSource
from seeing.reports.tallies import cache_file, cached_tally, tally_source
from seeing.gans import ProGANGenerator

LAYERS = ["layer1", "layer2", "layer3", "layer4"]


def _png(path: Path, seed: int, size: int = 12) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


class _Threshold:
    """A two-class 'segmenter' that sees every pixel: class 1 where the red channel is positive."""

    def segment(self, images: torch.Tensor) -> torch.Tensor:
        return (images[:, 0] > 0).long()


@pytest.fixture(scope="module")
def tiny():
    """A tiny random 16x16 ProGAN, a random hybrid encoder for it, 4 targets and their hybrid latents."""
    from seeing.models.hybrid import new_hybrid_encoder
    from seeing.reconstruct.init import initial_latents

    torch.manual_seed(0)
    g = ProGANGenerator(z_dim=16, widths=[16, 16, 8]).eval()
    hybrid = new_hybrid_encoder(g, LAYERS).eval()
    with torch.no_grad():
        x = (g(g.sample_z(4, seed=3)) + 0.1 * torch.randn(4, 3, 16, 16)).clamp(-1, 1)
    return g, hybrid, x, initial_latents("hybrid", g, x, torch.arange(4), encoder=hybrid)


def _fit(module) -> None:
    import pytorch_lightning as pl

    pl.Trainer(max_steps=-1, max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, accelerator="cpu", devices=1).fit(module)


# ------------------------------------------------------------------ 1. stale folder / LSUN caches


def test_replaced_renamed_or_rewritten_images_are_a_tally_cache_miss(tmp_path):
    root = tmp_path / "photos"
    for i in range(4):
        _png(root / "sub" / f"{i}.png", seed=i)
    old = _png(tmp_path / "elsewhere" / "old.png", seed=99)
    os.utime(old, ns=(1_000_000_000, 1_000_000_000))  # older than every file in the folder
    args = dict(segmenter=_Threshold(), segmenter_id={"red": "> 0"}, num_classes=2, n=4, batch_size=4,
                resolution=12, device="cpu", cache_dir=tmp_path / "cache", progress=False)
    key = lambda: cache_file(tmp_path / "cache", ImageFolderSource(root), args["segmenter_id"], 4, 12, 0)  # noqa: E731

    first = cached_tally(ImageFolderSource(root), **args)
    assert first.cache == "miss" and cached_tally(ImageFolderSource(root), **args).cache == "hit"
    before = key()

    # `cp -p` / `rsync -a` of an OLDER image over one of them: count and newest mtime are unchanged
    shutil.copy2(old, root / "sub" / "2.png")
    assert key() != before
    again = cached_tally(ImageFolderSource(root), **args)
    fresh = tally_source(ImageFolderSource(root), _Threshold(), 2, 4, 4, 12, progress=False)
    assert again.cache == "miss" and again.path == key()
    np.testing.assert_array_equal(again.tallies, fresh.tallies)
    assert not np.array_equal(again.tallies, first.tallies)

    # a rename (same contents, same mtimes) is a new key too
    before = key()
    (root / "sub" / "3.png").rename(root / "sub" / "9.png")
    assert key() != before and cached_tally(ImageFolderSource(root), **args).cache == "miss"
    assert ImageFolderSource(root).identity()["files"] == 4

    # LSUN: a write to the database (even one keeping its size) changes its identity
    import lmdb

    db = tmp_path / "church_outdoor_train_lmdb"
    env = lmdb.open(str(db), map_size=1 << 22)
    with env.begin(write=True) as txn:
        txn.put(b"a" * 40, (root / "sub" / "0.png").read_bytes())
    env.close()
    lsun_before = LSUNSource(db).identity()
    env = lmdb.open(str(db), map_size=1 << 22)
    with env.begin(write=True) as txn:
        txn.put(b"a" * 40, (root / "sub" / "1.png").read_bytes())  # same key, new image: same entry count
    env.close()
    lsun_after = LSUNSource(db).identity()
    assert lsun_after["entries"] == lsun_before["entries"] == 1
    assert lsun_after["last_txnid"] > lsun_before["last_txnid"] and lsun_after != lsun_before


# ------------------------------------------------------------------ 2. unreadable torch files


def test_truncated_or_text_files_name_the_path_and_the_fix(tmp_path, tiny):
    from seeing.gans.loading import load_generator, save_generator
    from seeing.models.hybrid import read_inversion_file, read_layer_inverter
    from seeing.stages.reconstruct import Reconstructor, correction_positions, load_result
    from seeing.models.direct_encoder import DirectEncoder, load_direct_encoder
    from seeing.reporting import torch_save_atomic

    g, hybrid, x, z0 = tiny
    module = Reconstructor(g, x, z0, correction_positions("deltas", LAYERS), steps=0, batch_size=4)
    valid = {
        "generator": save_generator(g, tmp_path / "generator.pt"),
        "hybrid": torch_save_atomic(hybrid.to_file_dict(), tmp_path / "hybrid.pt"),
        "direct": torch_save_atomic(DirectEncoder(16, (16,)).to_file_dict(), tmp_path / "direct.pt"),
        "result": torch_save_atomic(module.result(), tmp_path / "reconstruction.pt"),
    }
    loaders = {  # loader, what the message must tell the user to do
        "generator": (load_generator, "point model.checkpoint at the right generator checkpoint"),
        "hybrid": (lambda p: read_inversion_file(p, "hybrid"), "stage=hybrid"),
        "inverter": (lambda p: read_layer_inverter(p, "layer2"), "stage=layerN"),
        "direct": (load_direct_encoder, "stage=direct_encoder"),
        "result": (load_result, "point metric.result at the right reconstruction.pt"),
    }
    for name, (load, fix) in loaders.items():
        data = valid.get(name, valid["hybrid"]).read_bytes()
        cut = tmp_path / f"{name}-truncated.pt"
        cut.write_bytes(data[: len(data) // 2])
        text = tmp_path / f"{name}-text.pt"
        text.write_text("model weights are at https://example.org/weights.pth\n")
        for bad in (cut, text):
            with pytest.raises(ValueError) as err:
                load(bad)
            message = str(err.value)
            assert str(bad) in message and "is not a readable PyTorch checkpoint" in message, message
            assert "Re-copy" in message and fix in message, message
    # the intact files still load
    assert load_generator(valid["generator"]).resolution == 16
    assert read_inversion_file(valid["hybrid"], "hybrid")["kind"] == "hybrid"
    assert load_result(valid["result"])["targets"].shape == x.shape


# ------------------------------------------------------------------ 3. foreign tally caches


def test_a_foreign_or_miscounted_tally_cache_is_a_logged_counted_miss(tmp_path, caplog):
    from seeing.reports.tallies import load_cached

    k = len(CLASS_NAMES)
    args = dict(segmenter=None, segmenter_id={"oracle": True}, num_classes=k, n=6, batch_size=3, resolution=16,
                device="cpu", cache_dir=tmp_path / "cache", progress=False)
    good = cached_tally(ScenesSource(seed=1), **args)
    path = good.path
    other = cached_tally(ScenesSource(seed=2), **args)  # another source's cache file
    caplog.set_level(logging.WARNING)

    def planted_then_tallied(write) -> str:
        write()
        caplog.clear()
        tally = cached_tally(ScenesSource(seed=1), **args)
        assert tally.cache == "miss" and tally.cache_rejected and tally.path == path
        np.testing.assert_array_equal(tally.tallies, good.tallies)  # recomputed ...
        assert load_cached(path, k, None)[0] is not None  # ... and the file overwritten with a good one
        assert f"not using tally cache {path}" in caplog.text and "tallying again and overwriting it" in caplog.text
        return tally.cache_rejected

    # a well-formed file of 5 rows, as an older version (or someone else) wrote it: no key stored
    buf = io.BytesIO()
    np.savez(buf, tallies=np.full((5, k), 1.0 / k), skipped=np.array([], dtype=str))
    why = planted_then_tallied(lambda: path.write_bytes(buf.getvalue()))
    assert "stores no key" in why
    # another source's cache file copied under this name
    why = planted_then_tallied(lambda: shutil.copyfile(other.path, path))
    assert why == "it was written for another key (differs in: source.seed)"
    # the right key, but 5 rows where the file records 6
    with np.load(path) as f:
        arrays = dict(f)
    arrays["tallies"] = arrays["tallies"][:5]
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    why = planted_then_tallied(lambda: path.write_bytes(buf.getvalue()))
    assert why == "it holds 5 tallies and 0 skipped images but records rows=6, items=6 for n=6"
    # ... or 5 rows that agree with their record, where the key (scenes, n=6) reads 6 images
    arrays["rows"], arrays["items"] = np.array(5), np.array(5)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    why = planted_then_tallied(lambda: path.write_bytes(buf.getvalue()))
    assert why == "it holds 5 images (tallied or skipped) where this key reads 6"
    assert cached_tally(ScenesSource(seed=1), **args).cache == "hit"


# ------------------------------------------------------------------ 4. worse than the start


def test_images_that_end_worse_than_they_started_are_flagged_counted_and_warned(tmp_path, tiny, caplog):
    from seeing.reports.reconstruction import summarize
    from seeing.stages.reconstruct import Reconstructor, correction_positions
    from seeing.segmenters.scenes import SceneSegmenterNet, ScenesSegmenter

    g, _, x, z0 = tiny
    module = Reconstructor(g, x, z0, correction_positions("deltas", LAYERS), steps=3, lr=1e6, milestones=(),
                           batch_size=4)
    _fit(module)
    caplog.set_level(logging.WARNING)
    module.export(tmp_path / "run")
    result = module.result()
    worse = result["worse_than_start"]
    assert worse.dtype == torch.bool and worse.shape == (4,)
    assert torch.equal(worse, result["final_pixel_l1"] > result["initial_pixel_l1"]) and int(worse.sum()) >= 1
    with open(tmp_path / "run" / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["worse_than_start"] == "True" for r in rows] == worse.tolist()
    assert [r["diverged"] == "True" for r in rows] == result["diverged"].tolist()
    assert (f"{int(worse.sum())} of 4 images ended worse than they started" in caplog.text
            and "lower stage.lr (now 1e+06)" in caplog.text and str(tmp_path / "run" / "per_image.csv") in caplog.text)
    torch.manual_seed(0)
    segmenter = ScenesSegmenter(SceneSegmenterNet(len(CLASS_NAMES), (4, 8)), CLASS_NAMES).eval()
    assert summarize(result, segmenter)["metrics"]["worse_than_start"] == int(worse.sum())


# ------------------------------------------------------------------ 5. unwritable cache, full disk


def test_unwritable_cache_or_full_disk_still_gives_the_fsd(tmp_path, monkeypatch, caplog):
    from seeing.reports import fsd_report
    from seeing.reporting import write_json

    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a regular file where the cache folder's parent should be")
    cache_dir = blocker / "cache"  # mkdir fails even for root, whom chmod 0o500 would not stop
    if os.geteuid() != 0:
        ro = tmp_path / "read_only"
        ro.mkdir()
        ro.chmod(0o500)
        cache_dir = ro / "cache"
    cfg = OmegaConf.create({
        "output_dir": str(tmp_path / "out"), "device": "cpu", "paths": {"cache_dir": str(cache_dir)},
        "metric": {"n": 6, "batch_size": 3, "resolution": 16, "oracle": True, "progress": False},
        "real": {"_target_": "seeing.data.sources.ScenesSource", "seed": 1},
        "fake": {"_target_": "seeing.data.sources.ScenesSource", "seed": 2, "drop": ["person"]},
    })
    caplog.set_level(logging.WARNING)
    report = fsd_report.run(cfg)
    assert report["fsd"] > 0 and (tmp_path / "out" / "fsd.json").is_file()
    assert report["real"]["cache"] == report["fake"]["cache"] == "unwritable"
    warnings = [r.getMessage() for r in caplog.records if "cannot be written" in r.getMessage()]
    assert len(warnings) == 1, warnings  # once, though three tallies (real, fake, real baseline) were made
    assert str(cache_dir / "fsd_tallies") in warnings[0] and "set paths.cache_dir to a writable folder" in warnings[0]

    # a full disk: the probe passes, the final cache write fails; the tally is kept, the file named
    real_replace = os.replace

    def full_disk(src, dst):
        if str(dst).endswith(".npz"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", full_disk)
    caplog.clear()
    args = dict(segmenter=None, segmenter_id={"oracle": True}, num_classes=len(CLASS_NAMES), n=6, batch_size=3,
                resolution=16, device="cpu", cache_dir=tmp_path / "full", progress=False)
    tally = cached_tally(ScenesSource(seed=1), **args)
    expected = cache_file(tmp_path / "full", ScenesSource(seed=1), {"oracle": True}, 6, 16, 0)
    assert tally.cache == "unwritable" and len(tally.tallies) == 6
    assert f"cannot write {expected}: No space left on device (no space left: free space" in caplog.text
    assert not list((tmp_path / "full").rglob("*.tmp"))  # no temporary file left behind
    # and any atomic write names its file
    monkeypatch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space")))
    with pytest.raises(OSError, match=f"cannot write {tmp_path / 'r.json'}: No space .*free space") as err:
        write_json(tmp_path / "r.json", {"a": 1})
    assert err.value.errno == errno.ENOSPC


# ------------------------------------------------------------------ 6. modes of written files


def test_written_files_respect_the_umask(tmp_path):
    from seeing.reporting import current_umask, torch_save_atomic, write_json

    before = os.umask(0o022)
    try:
        assert current_umask() == 0o022
        assert (write_json(tmp_path / "a.json", {}).stat().st_mode & 0o777) == 0o644
        tally = cached_tally(ScenesSource(seed=1), None, {"oracle": True}, len(CLASS_NAMES), 2, 2, 16, "cpu",
                             tmp_path / "cache", progress=False)
        assert (tally.path.stat().st_mode & 0o777) == 0o644
        os.umask(0o002)  # a group-shared cache
        assert (torch_save_atomic({}, tmp_path / "b.pt").stat().st_mode & 0o777) == 0o664
    finally:
        os.umask(before)


def test_user_numbers_are_refused_before_any_work_naming_the_key(compose):
    from seeing.pipeline import evaluate, train

    for override, key in (("metric.n=0", "metric.n=0"), ("metric.n=-4", "metric.n=-4"),
                          ("metric.resolution=0", "metric.resolution=0")):
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            evaluate(compose("evaluate", ["metric=fsd", "metric.oracle=true", "fake=scenes", override, "logger=csv"]))
    for override in ("stage.steps=-5", "stage.batch_size=0", "stage.targets.count=0", "stage.lr=-1"):
        with pytest.raises(ValueError, match=override.split("=")[0].replace(".", r"\.") + "="):
            train(compose("train", ["stage=reconstruct", override, "logger=csv", "trainer.enable_progress_bar=false"]))


def test_a_truncated_last_checkpoint_names_the_file_and_how_to_go_on(compose, tmp_path):
    from seeing.pipeline import resolve_ckpt_path

    cfg = compose("train", ["stage=layer1", "ckpt_path=last"])
    folder = Path(cfg.output_dir) / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "last.ckpt").write_bytes(b"PK\x03\x04" + b"\0" * 100)  # a zip cut short
    (folder / "step=400.ckpt").write_bytes(b"")
    with pytest.raises(ValueError) as err:
        resolve_ckpt_path(cfg)
    msg = str(err.value)
    assert str(folder / "last.ckpt") in msg and "ckpt_path=<file>" in msg and "step=400.ckpt" in msg
    assert "start fresh" in msg


def test_turning_the_progress_bar_off_does_not_collide_with_its_callback(compose):
    from seeing.pipeline import instantiate_group
    from seeing.stages.trainer import build_trainer

    cfg = compose("train", ["stage=layer1", "trainer.enable_progress_bar=false"])
    trainer = build_trainer(cfg, instantiate_group(cfg.callbacks), False)  # Lightning raised here before
    assert trainer.progress_bar_callback is None


def test_an_unknown_variant_or_stage_fails_listing_the_valid_names(compose):
    from hydra.errors import ConfigCompositionException

    for override, group in (("variant=z", "variant"), ("stage=layer9", "stage"), ("real=flickr", "real")):
        with pytest.raises(ConfigCompositionException) as err:
            compose("train" if group != "real" else "evaluate", ["stage=reconstruct", override] if group == "variant"
                    else [override])
        assert f"Could not find '{group}/" in str(err.value) and "Available options" in str(err.value)


def test_an_unwritable_run_root_is_named_before_hydra_writes_there(tmp_path):
    from conftest import run_entry

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")  # as root, chmod does not stop writes: a file in the path does
    for script, args in (("train", ["stage=layer1"]), ("evaluate", ["-m", "metric=fsd", "fake=scenes,scenes_drop"])):
        done = run_entry(script, [*args, f"paths.run_root={blocker}/runs"], tmp_path, check=False)
        assert done.returncode != 0
        assert f"paths.run_root={blocker}/runs cannot be written" in done.stderr and "point paths.run_root" in \
            done.stderr, done.stderr[-2000:]
        assert "Traceback" not in done.stderr
