"""Segmenters: one interface (images in [-1, 1] -> class index per pixel), three back ends.

The public upp and deeplab weights are not available here, so those tests write randomly
initialised state dicts of the published layouts to tmp files. The upp layout is spelled out
below key by key from the unified parsing release's module names, independently of
``seeing.segmenters.upp``, so a naming slip in the implementation fails the load.
"""
from __future__ import annotations

import csv
import json
import math
import urllib.request
from pathlib import Path

import pytest
import torch

from conftest import FIXTURES
from seeing.data.scenes import CLASS_NAMES, ScenesDataset
from seeing.segmenters import Segmenter, load_segmenter
from seeing.segmenters.deeplab import HUB_FILE, VOC_CLASSES
from seeing.segmenters.scenes import shipped_weights_path
from seeing.stages.segmenter import SegmenterTraining, augment

UPP_OBJECTS = [row["name"] for row in csv.DictReader(open(FIXTURES / "segmenters" / "upp_object_labels.csv"))]


# ----------------------------------------------------------------------------- layouts

def _bn(prefix: str, c: int, tracked: bool) -> dict[str, tuple]:
    keys = {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,)}
    if tracked:
        keys[f"{prefix}.num_batches_tracked"] = ()
    return keys


def upp_encoder_layout(tracked: bool = False) -> dict[str, tuple]:
    """ResNet-50, deep stem (conv1..conv3 3x3: 3->64 s2, 64->64, 64->128), bottleneck stages."""
    keys = {"conv1.weight": (64, 3, 3, 3), **_bn("bn1", 64, tracked), "conv2.weight": (64, 64, 3, 3),
            **_bn("bn2", 64, tracked), "conv3.weight": (128, 64, 3, 3), **_bn("bn3", 128, tracked)}
    inplanes = 128
    for stage, (planes, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)], start=1):
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            keys.update({f"{p}.conv1.weight": (planes, inplanes, 1, 1), **_bn(f"{p}.bn1", planes, tracked),
                         f"{p}.conv2.weight": (planes, planes, 3, 3), **_bn(f"{p}.bn2", planes, tracked),
                         f"{p}.conv3.weight": (planes * 4, planes, 1, 1), **_bn(f"{p}.bn3", planes * 4, tracked)})
            if b == 0:
                keys.update({f"{p}.downsample.0.weight": (planes * 4, inplanes, 1, 1),
                             **_bn(f"{p}.downsample.1", planes * 4, tracked)})
            inplanes = planes * 4
    return keys


def upp_decoder_layout(n_object: int, n_scene: int, n_part: int, n_material: int, fpn: int = 512,
                       tracked: bool = True) -> dict[str, tuple]:
    """UPerNet multi-task decoder ('upernet': fpn_dim 512) with PPM, FPN, fusion and four heads."""
    keys: dict[str, tuple] = {}
    for i in range(4):
        keys.update({f"ppm_conv.{i}.0.weight": (512, 2048, 1, 1), **_bn(f"ppm_conv.{i}.1", 512, tracked)})
    keys.update({"ppm_last_conv.0.weight": (fpn, 2048 + 4 * 512, 3, 3), **_bn("ppm_last_conv.1", fpn, tracked)})
    for i, c in enumerate([256, 512, 1024]):
        keys.update({f"fpn_in.{i}.0.weight": (fpn, c, 1, 1), **_bn(f"fpn_in.{i}.1", fpn, tracked)})
        keys.update({f"fpn_out.{i}.0.0.weight": (fpn, fpn, 3, 3), **_bn(f"fpn_out.{i}.0.1", fpn, tracked)})
    keys.update({"conv_fusion.0.weight": (fpn, 4 * fpn, 3, 3), **_bn("conv_fusion.1", fpn, tracked)})
    keys.update({"scene_head.0.0.weight": (fpn, fpn, 3, 3), **_bn("scene_head.0.1", fpn, tracked),
                 "scene_head.2.weight": (n_scene, fpn, 1, 1), "scene_head.2.bias": (n_scene,)})
    for head, n in [("object_head", n_object), ("part_head", n_part), ("material_head", n_material)]:
        keys.update({f"{head}.0.0.weight": (fpn, fpn, 3, 3), **_bn(f"{head}.0.1", fpn, tracked),
                     f"{head}.1.weight": (n, fpn, 1, 1), f"{head}.1.bias": (n,)})
    return keys


def random_state(layout: dict[str, tuple], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors of the given shapes, scaled so activations stay finite through 50 layers."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, shape in layout.items():
        if k.endswith("num_batches_tracked"):
            t = torch.tensor(1000, dtype=torch.long)
        elif k.endswith("running_var"):
            t = torch.rand(shape, generator=g) + 0.5
        elif k.endswith(("running_mean", "bias")):
            t = torch.randn(shape, generator=g) * 0.01
        elif len(shape) == 1:  # batch-norm scale
            t = torch.rand(shape, generator=g) * 0.5 + 0.25
        else:
            t = torch.randn(shape, generator=g) * math.sqrt(1.0 / math.prod(shape[1:]))
        state[k] = t
    return state


UPP_LABELS = {
    "object": UPP_OBJECTS,
    "scene": [f"scene_{i}" for i in range(7)],
    "material": ["-", "wood", "brick", "glass", "metal"],
    "object_part": {"person": ["head", "torso", "leg"], "building": ["roof", "window", "door", "-"]},
}


@pytest.fixture(scope="module")
def upp_dir(tmp_path_factory) -> Path:
    """A full-size random checkpoint folder in the public upp-resnet50-upernet layout."""
    folder = tmp_path_factory.mktemp("upp-resnet50-upernet")
    (folder / "labels.json").write_text(json.dumps(UPP_LABELS))
    torch.save(random_state(upp_encoder_layout(), seed=1), folder / "encoder_epoch_40.pth")
    torch.save(random_state(upp_decoder_layout(len(UPP_OBJECTS), 7, 7, 5), seed=2), folder / "decoder_epoch_40.pth")
    return folder


@pytest.fixture(scope="module")
def deeplab_file(tmp_path_factory) -> Path:
    """A random state dict in torchvision's DeepLabV3-ResNet50 (COCO-VOC, with aux head) layout."""
    from torchvision.models.segmentation import deeplabv3_resnet50

    with torch.device("meta"):
        layout = {k: tuple(v.shape) for k, v in deeplabv3_resnet50(weights=None, weights_backbone=None,
                                                                    num_classes=21, aux_loss=True).state_dict().items()}
    path = tmp_path_factory.mktemp("hub") / HUB_FILE
    torch.save(random_state(layout, seed=3), path)
    return path


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """Any attempt to fetch weights from the network fails the test loudly."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"segmenters must never download (tried {args[:1]})")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(urllib.request, "urlretrieve", refuse)


def scenes_batch(n: int, seed: int = 4242, resolution: int = 64):
    ds = ScenesDataset(n, resolution=resolution, seed=seed)
    images, labels = zip(*(ds[i] for i in range(n)))
    return torch.stack(images), torch.stack(labels)


# ----------------------------------------------------------------------------- the interface

def check_contract(seg: Segmenter, n_classes: int, height: int = 64, width: int = 64) -> torch.Tensor:
    assert isinstance(seg, Segmenter)
    assert seg.num_classes == len(seg.class_names) == n_classes
    images = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.enable_grad():
        out = seg.segment(images.requires_grad_())
    assert out.shape == (2, height, width) and out.dtype == torch.long and not out.requires_grad
    assert 0 <= int(out.min()) and int(out.max()) < n_classes
    scores = seg.class_scores(images.detach())
    assert scores.shape == (2, n_classes, height, width) and torch.isfinite(scores).all()
    assert torch.equal(scores.argmax(1), out)  # segment = argmax of the scores; deterministic in eval mode
    return out


def test_scenes_segmenter_contract():
    seg = load_segmenter("scenes", device="cpu")
    assert seg.class_names == list(CLASS_NAMES)
    check_contract(seg, len(CLASS_NAMES))
    check_contract(seg, len(CLASS_NAMES), 48, 80)  # any size divisible by the U-Net's 8


def test_upp_loads_release_layout_and_segments(upp_dir, caplog):
    with caplog.at_level("INFO", logger="seeing.segmenters.upp"):
        seg = load_segmenter("upp", path=str(upp_dir), sizes=[64, 32], device="cpu")
    assert "object head only" in caplog.text and "part_head" in caplog.text  # the skip is logged
    assert seg.class_names == UPP_OBJECTS and len(seg.class_names) == 336 and seg.class_names[0] == "-"
    assert not any(t.is_meta for t in list(seg.parameters()) + list(seg.buffers()))
    out = check_contract(seg, 336, 64, 48)
    assert out.unique().numel() > 1  # random weights still give a spatially varying map
    # the weights really came from the file: the object classifier's bias is the saved one
    saved = torch.load(upp_dir / "decoder_epoch_40.pth", weights_only=True)
    assert torch.equal(seg.decoder.object_head[1].bias, saved["object_head.1.bias"])


def test_deeplab_loads_hub_cache_file(deeplab_file, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(deeplab_file.parent.parent))
    (deeplab_file.parent.parent / "hub" / "checkpoints").mkdir(parents=True, exist_ok=True)
    cached = deeplab_file.parent.parent / "hub" / "checkpoints" / HUB_FILE
    cached.write_bytes(deeplab_file.read_bytes())
    seg = load_segmenter("deeplab", device="cpu")  # no path: the torch hub cache
    assert seg.class_names == VOC_CLASSES and seg.class_names[15] == "person"
    assert not any(t.is_meta for t in list(seg.parameters()) + list(seg.buffers()))
    check_contract(seg, 21)
    seg2 = load_segmenter("deeplab", path=str(deeplab_file), device="cpu")
    assert torch.equal(seg2.net.classifier[4].weight, seg.net.classifier[4].weight)


def test_hydra_segmenter_configs_instantiate(compose, upp_dir):
    import hydra

    cfg = compose("evaluate", ["segmenter=scenes", "device=cpu"])
    seg = hydra.utils.instantiate(cfg.segmenter)
    assert seg.class_names == list(CLASS_NAMES)
    cfg = compose("evaluate", ["segmenter=upp", f"segmenter.path={upp_dir}", "device=cpu"])
    assert hydra.utils.instantiate(cfg.segmenter).num_classes == 336
    from omegaconf.errors import MissingMandatoryValue

    with pytest.raises(MissingMandatoryValue):
        hydra.utils.instantiate(compose("evaluate", ["segmenter=upp"]).segmenter)


# ----------------------------------------------------------------------------- bad input

def test_missing_weight_files_are_named(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_segmenter("upp", path=str(tmp_path / "nowhere"))
    (tmp_path / "labels.json").write_text(json.dumps(UPP_LABELS))
    with pytest.raises(FileNotFoundError, match="encoder_epoch_40.pth"):
        load_segmenter("upp", path=str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "torch" / "hub" / "checkpoints" / HUB_FILE)):
        load_segmenter("deeplab")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_segmenter("scenes", path=str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="unknown segmenter"):
        load_segmenter("sam")


def test_upp_wrong_layout_is_refused(upp_dir, tmp_path):
    from torchvision.models import resnet50

    folder = tmp_path / "upp"
    folder.mkdir()
    for name in ("labels.json", "decoder_epoch_40.pth"):
        (folder / name).symlink_to(upp_dir / name)
    # an ImageNet ResNet-50 (7x7 stem) is not the deep-stem encoder
    with torch.device("meta"):
        plain = {k: tuple(v.shape) for k, v in resnet50().state_dict().items()}
    torch.save(random_state(plain), folder / "encoder_epoch_40.pth")
    with pytest.raises(ValueError, match="upp segmenter encoder") as err:
        load_segmenter("upp", path=str(folder))
    assert "missing keys: conv2.weight" in str(err.value)
    assert "conv1.weight: file (64, 3, 7, 7) vs model (64, 3, 3, 3)" in str(err.value)
    # a decoder with a pyramid-pooling branch missing
    (folder / "encoder_epoch_40.pth").unlink()
    (folder / "encoder_epoch_40.pth").symlink_to(upp_dir / "encoder_epoch_40.pth")
    (folder / "decoder_epoch_40.pth").unlink()
    dec = torch.load(upp_dir / "decoder_epoch_40.pth", weights_only=True)
    del dec["ppm_conv.3.0.weight"]
    torch.save(dec, folder / "decoder_epoch_40.pth")
    with pytest.raises(ValueError, match=r"missing keys: ppm_conv\.3\.0\.weight"):
        load_segmenter("upp", path=str(folder))


def test_upp_class_count_must_match_labels(upp_dir, tmp_path):
    folder = tmp_path / "upp"
    folder.mkdir()
    for name in ("encoder_epoch_40.pth", "decoder_epoch_40.pth"):
        (folder / name).symlink_to(upp_dir / name)
    (folder / "labels.json").write_text(json.dumps({**UPP_LABELS, "object": UPP_OBJECTS[:150]}))
    with pytest.raises(ValueError, match="150 outputs for object_head but decoder_epoch_40.pth has 336"):
        load_segmenter("upp", path=str(folder))
    (folder / "labels.json").write_text(json.dumps({"objects": UPP_OBJECTS}))
    with pytest.raises(ValueError, match="no 'object' list"):
        load_segmenter("upp", path=str(folder))


def test_deeplab_wrong_layout_is_refused(tmp_path):
    torch.save({"backbone.conv1.weight": torch.zeros(64, 3, 7, 7)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="missing keys: backbone.bn1.weight"):
        load_segmenter("deeplab", path=str(tmp_path / "bad.pth"))


def test_segment_rejects_wrong_images():
    seg = load_segmenter("scenes", device="cpu")
    with pytest.raises(ValueError, match=r"expects images in \[-1, 1\]"):
        seg.segment(torch.full((1, 3, 16, 16), 200.0))
    with pytest.raises(ValueError, match="N x 3 x H x W"):
        seg.segment(torch.zeros(3, 16, 16))
    with pytest.raises(TypeError, match="float"):
        seg.segment(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))


def test_segmenter_never_leaves_eval_mode():
    seg = load_segmenter("scenes", device="cpu")
    before = {k: v.clone() for k, v in seg.state_dict().items()}
    seg.train()
    assert not seg.training and not any(m.training for m in seg.modules())
    seg.segment(torch.rand(4, 3, 32, 32) * 2 - 1)
    assert all(torch.equal(before[k], v) for k, v in seg.state_dict().items())


# ----------------------------------------------------------------------------- the shipped weights

def test_shipped_scenes_segmenter_is_accurate_on_fresh_scenes():
    """A property of the trained weights in the package: 16 scenes of a world seed never used in training."""
    seg = load_segmenter("scenes", device="cpu")
    images, labels = scenes_batch(16, seed=4242)
    pred = seg.segment(images)
    accuracy = (pred == labels).float().mean().item()
    assert accuracy > 0.9, accuracy
    meta = torch.load(shipped_weights_path(), weights_only=True)["meta"]
    assert meta["command"].startswith("python train.py") and "stage=segmenter" in meta["command"]
    assert meta["seed"] is not None and meta["heldout"]["miou"] >= 0.9
    assert shipped_weights_path().stat().st_size < 2_000_000


# ----------------------------------------------------------------------------- training

def test_augment_keeps_labels_aligned():
    images, labels = scenes_batch(8, seed=7, resolution=32)
    aug, aug_labels = augment(images, labels, 1.0, torch.Generator().manual_seed(0))
    assert aug.shape == images.shape and aug.min() >= -1 and aug.max() <= 1
    flipped = [torch.equal(aug_labels[i], labels[i].flip(-1)) and not torch.equal(labels[i], labels[i].flip(-1))
               for i in range(8)]
    for i in range(8):
        assert torch.equal(aug_labels[i], labels[i].flip(-1) if flipped[i] else labels[i])
    assert not torch.allclose(aug, images)


def test_nan_loss_is_detected():
    module = SegmenterTraining(num_classes=len(CLASS_NAMES), widths=[4, 8])
    images, labels = scenes_batch(2, resolution=16)
    images[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="loss is nan"):
        module.training_step((images, labels), 0)


def test_segmenter_stage_trains_and_exports(compose, tmp_path):
    from seeing.pipeline import train
    from seeing.segmenters import load_scenes_segmenter

    cfg = compose("train", [
        "stage=segmenter", "data=scenes", "logger=csv", "~callbacks.progress", "+trainer.fast_dev_run=2",
        "data.train_length=32", "data.val_length=8", "data.test_length=8", "data.batch_size=4",
        "stage.widths=[8,16]",
    ])
    metrics = train(cfg)
    out = Path(cfg.output_dir)
    assert "val/miou" in metrics and 0 <= metrics["val/miou"] <= 1
    held = json.loads((out / "heldout_metrics.json").read_text())
    assert held["images"] == 8 and set(held["per_class_iou"]) == set(CLASS_NAMES)
    assert (out / "heldout_examples.png").stat().st_size > 0
    seg = load_scenes_segmenter(out / "scenes_segmenter.pt", device="cpu")
    assert seg.meta["heldout"]["miou"] == held["miou"] and seg.meta["global_step"] == 2
    check_contract(seg, len(CLASS_NAMES), 32, 32)


def test_resumed_segmenter_run_sees_the_scenes_an_uninterrupted_one_does(compose):
    """Cut off mid-epoch and resumed, the run continues the epoch's shuffled order and the next
    epoch's (the loader's state is in the checkpoint), so it ends with the uninterrupted run's
    weights exactly; Lightning has no "not resumable" warning to give."""
    import shutil
    import warnings

    from conftest import Interrupted
    from seeing.pipeline import train

    # 16 scenes in batches of 4: 4 steps an epoch, so 6 steps cross into the second epoch
    common = ["stage=segmenter", "data=scenes", "logger=csv", "~callbacks.progress",
              "callbacks.checkpoint.every_n_train_steps=1", "data.train_length=16", "data.val_length=4",
              "data.test_length=4", "data.batch_size=4", "stage.widths=[4,8]", "stage.figure_images=0",
              "stage.augment_strength=0", "trainer.max_steps=6"]
    whole = compose("train", common)
    out = Path(whole.output_dir)
    train(whole)
    expected = torch.load(out / "scenes_segmenter.pt", weights_only=True)["state_dict"]
    shutil.rmtree(out)

    with pytest.raises(Interrupted):
        train(compose("train", common + ["+callbacks.interrupt={_target_: conftest.InterruptAt, step: 2}"]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(compose("train", common + ["ckpt_path=last"]))
    assert not [w for w in caught if "not resumable" in str(w.message)]
    resumed = torch.load(out / "scenes_segmenter.pt", weights_only=True)["state_dict"]
    assert resumed.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(resumed[k], expected[k], rtol=0, atol=0, msg=k)


def test_segmenter_stage_resumes_from_last_checkpoint(compose):
    """A run cut off after its first step, rerun with ckpt_path=last, continues from the checkpoint
    instead of starting over; a checkpoint of other settings (another seed) is not resumed."""
    from conftest import Interrupted
    from seeing.pipeline import train
    from seeing.segmenters import load_scenes_segmenter

    common = ["stage=segmenter", "data=scenes", "logger=csv", "~callbacks.progress",
              "callbacks.checkpoint.every_n_train_steps=1", "data.train_length=16", "data.val_length=4",
              "data.test_length=4", "data.batch_size=4", "stage.widths=[4,8]", "stage.figure_images=0",
              "trainer.max_steps=2", "seed=0"]
    cfg = compose("train", common + ["+callbacks.interrupt={_target_: conftest.InterruptAt, step: 1}"])
    with pytest.raises(Interrupted):
        train(cfg)
    out = Path(cfg.output_dir)
    assert (out / "checkpoints" / "last.ckpt").exists() and not (out / "scenes_segmenter.pt").exists()
    again = compose("train", common + ["ckpt_path=last"])
    assert Path(again.output_dir) == out  # the same settings: the same run, in the same folder
    train(again)
    resumed = load_scenes_segmenter(out / "scenes_segmenter.pt", device="cpu")
    assert resumed.meta["global_step"] == 2 and resumed.meta["train_seconds"] > 0
    with pytest.raises(ValueError, match=r"other settings: data\.shuffle_seed \(checkpoint 0, now 1\), seed \(checkpoint 0, now 1\)"):
        train(compose("train", [*common[:-1], "seed=1", f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}"]))
