"""SegFormer and Mask2Former from transformers' save_pretrained folders.

Tiny random models are built here (a few layers, small widths) and written with save_pretrained,
so the loaders read real folders. The golden checks compare the class map with transformers' own
pipeline on the same 8-bit images: image processor -> model -> post_process_semantic_segmentation.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")  # the dev extra installs it (seeing[hf])

from seeing.data.scenes import ScenesDataset  # noqa: E402
from seeing.segmenters import load_segmenter  # noqa: E402
from seeing.segmenters.label_spaces import ade20k_150_names, label_space  # noqa: E402
from seeing.segmenters.hf import torch_image_processor  # noqa: E402

transformers.utils.logging.disable_progress_bar()


@pytest.fixture(autouse=True)
def flush_denormals():
    """Random weights produce denormal floats, which run many times slower on CPUs."""
    before = torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False) if before else None


def segformer_folder(path: Path, labels: list[str], size: dict, init: float = 0.2, seed: int = 0,
                     resample: int = 2) -> Path:
    """A tiny random SegFormer; ``init`` (the weights' std) large enough that the logits are decisive
    (at transformers' default 0.02 they differ by 1e-4, and any rounding flips the argmax)."""
    config = transformers.SegformerConfig(
        depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32], num_attention_heads=[1, 1, 2, 2], decoder_hidden_size=32,
        num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
        initializer_range=init)
    torch.manual_seed(seed)
    transformers.SegformerForSemanticSegmentation(config).save_pretrained(path)
    torch_image_processor(transformers, "SegformerImageProcessor")(size=size, resample=resample).save_pretrained(path)
    return path


def mask2former_folder(path: Path, labels: list[str], size: dict, seed: int = 0) -> Path:
    """A tiny random Mask2Former (Swin backbone); a wide init so its semantic map has several classes."""
    backbone = transformers.SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4,
                                       out_features=["stage1", "stage2", "stage3", "stage4"])
    config = transformers.Mask2FormerConfig(
        backbone_config=backbone, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)}, feature_size=32, mask_feature_size=32, hidden_dim=32,
        encoder_feedforward_dim=64, dim_feedforward=64, encoder_layers=1, decoder_layers=2, num_queries=12,
        num_attention_heads=2, init_std=1.0)
    torch.manual_seed(seed)
    model = transformers.Mask2FormerForUniversalSegmentation(config)
    with torch.no_grad():  # decisive class scores per query
        model.class_predictor.weight.mul_(20)
    model.save_pretrained(path)
    torch_image_processor(transformers, "Mask2FormerImageProcessor")(size=size, size_divisor=32).save_pretrained(path)
    return path


def scenes_uint8(n: int, resolution: int, seed: int = 3) -> torch.Tensor:
    """Street scenes as 8-bit images (what a processor reads from files), N x 3 x H x W."""
    ds = ScenesDataset(n, resolution=resolution, seed=seed)
    images = torch.stack([ds[i][0] for i in range(n)])
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def transformers_pipeline(folder: Path, model_cls, processor_cls, images: torch.Tensor) -> torch.Tensor:
    processor = processor_cls.from_pretrained(folder, local_files_only=True)
    model = model_cls.from_pretrained(folder, local_files_only=True).eval()
    with torch.no_grad():
        outputs = model(**processor(images=list(images), return_tensors="pt"))
    sizes = [tuple(images.shape[-2:])] * len(images)
    return torch.stack(processor.post_process_semantic_segmentation(outputs, target_sizes=sizes))


LABELS = ["sky", "building", "road", "tree", "person", "car", "window"]


# ----------------------------------------------------------------------------- golden


@pytest.mark.parametrize("size, resample", [({"height": 96, "width": 96}, 2), ({"height": 96, "width": 96}, 3),
                                            ({"height": 64, "width": 64}, 2)],
                         ids=["bilinear", "bicubic", "same-size"])
def test_segformer_class_map_equals_transformers_pipeline(tmp_path, size, resample):
    folder = segformer_folder(tmp_path / "segformer", LABELS, size, resample=resample)
    images = scenes_uint8(6, 64)
    expected = transformers_pipeline(folder, transformers.SegformerForSemanticSegmentation,
                                     torch_image_processor(transformers, "SegformerImageProcessor"), images)
    seg = load_segmenter("segformer", path=folder, device="cpu")
    got = seg.segment(images.float() / 127.5 - 1)
    assert expected.unique().numel() >= 3  # a map worth comparing, not one class everywhere
    agreement = (got == expected).float().mean().item()
    print(f"agreement with transformers: {agreement:.5f}")
    assert agreement >= 0.999, agreement
    assert seg.class_names == LABELS and seg.segmenter_id == "segformer"


@pytest.mark.parametrize("size", [{"shortest_edge": 80, "longest_edge": 320}, {"shortest_edge": 64, "longest_edge": 256}],
                         ids=["resized-to-divisor", "same-size"])
def test_mask2former_class_map_equals_transformers_pipeline(tmp_path, size):
    """80 px rounds up to 96 (size_divisor 32): the processor's own size rule is the one applied."""
    folder = mask2former_folder(tmp_path / "m2f", LABELS, size)
    images = scenes_uint8(4, 64)
    expected = transformers_pipeline(folder, transformers.Mask2FormerForUniversalSegmentation,
                                     torch_image_processor(transformers, "Mask2FormerImageProcessor"), images)
    seg = load_segmenter("mask2former", path=folder, device="cpu")
    got = seg.segment(images.float() / 127.5 - 1)
    assert expected.unique().numel() >= 2
    agreement = (got == expected).float().mean().item()
    print(f"agreement with transformers: {agreement:.5f}")
    assert agreement >= 0.999, agreement
    assert seg.class_names == LABELS and seg.segmenter_id == "mask2former"


# ----------------------------------------------------------------------------- folders and errors


def test_missing_folder_and_files_are_named_with_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere does not exist.*hf download nvidia/segformer"):
        load_segmenter("segformer", path=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="needs segmenter.path"):
        load_segmenter("mask2former", path=None)
    folder = segformer_folder(tmp_path / "s", LABELS, {"height": 32, "width": 32})
    (folder / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"preprocessor_config.json is missing.*hf download"):
        load_segmenter("segformer", path=folder)
    folder = segformer_folder(tmp_path / "w", LABELS, {"height": 32, "width": 32})
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights in"):
        load_segmenter("segformer", path=folder)
    folder = segformer_folder(tmp_path / "t", LABELS, {"height": 32, "width": 32})
    with pytest.raises(ValueError, match="describes a 'segformer' model, not 'mask2former'"):
        load_segmenter("mask2former", path=folder)


def test_without_transformers_the_error_names_the_extra(tmp_path, monkeypatch):
    folder = segformer_folder(tmp_path / "s", LABELS, {"height": 32, "width": 32})
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now fails
    with pytest.raises(ImportError, match=r"segmenter=segformer needs Hugging Face transformers.*\.\[hf\]"):
        load_segmenter("segformer", path=folder)


def test_ade_checkpoint_names_are_the_ade_label_space(tmp_path):
    """Public ADE checkpoints write "bed " (trailing space); the label space is still ADE20K-150."""
    names = ade20k_150_names()
    names[7] = "bed "
    seg = load_segmenter("segformer", path=segformer_folder(tmp_path / "ade", names, {"height": 32, "width": 32}),
                         device="cpu")
    assert seg.class_names[7] == "bed" and label_space(seg.class_names).id == "ade20k-150"
    assert seg.segment(torch.zeros(1, 3, 40, 40)).shape == (1, 40, 40)


def test_weights_are_never_code(tmp_path):
    """A folder's config cannot make the loader run code from it (auto_map + trust_remote_code)."""
    folder = segformer_folder(tmp_path / "s", LABELS, {"height": 32, "width": 32})
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForSemanticSegmentation": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text("raise SystemExit('code from the folder ran')\n")
    seg = load_segmenter("segformer", path=folder, device="cpu")
    assert type(seg.model).__name__ == "SegformerForSemanticSegmentation"


def test_hydra_presets_build_the_loaders(compose, tmp_path):
    from seeing.data.sources import instantiate_unwrapped
    from seeing.pipeline import evaluate

    folder = segformer_folder(tmp_path / "s", LABELS, {"height": 32, "width": 32})
    cfg = compose("evaluate", ["metric=fsd", "segmenter=segformer", f"segmenter.path={folder}", "device=cpu"])
    seg = instantiate_unwrapped(cfg.segmenter)
    assert seg.segmenter_id == "segformer" and seg.class_names == LABELS
    with pytest.raises(Exception, match="missing required settings: segmenter.path"):
        evaluate(compose("evaluate", ["metric=fsd", "segmenter=mask2former", "logger=csv"]))


# ----------------------------------------------------------------------------- FSD: label spaces


def test_fsd_records_the_label_space_and_computes_on_shared_classes(compose, tmp_path):
    """An ADE-150 SegFormer: metric.classes=shared gives the 149 classes UPP shares, from the same cached
    (unprojected) tallies as metric.classes=all; the report names the segmenter, its weights and label space."""
    from seeing.pipeline import evaluate
    from seeing.segmenters.label_spaces import shared_classes

    folder = segformer_folder(tmp_path / "ade", ade20k_150_names(), {"height": 32, "width": 32})
    common = ["metric=fsd", "segmenter=segformer", f"segmenter.path={folder}", "real=scenes", "fake=scenes_drop",
              "metric.n=6", "metric.batch_size=6", "metric.resolution=32", "metric.progress=false", "logger=csv",
              "device=cpu"]
    shared = evaluate(compose("evaluate", common + ["metric.classes=shared"]))
    assert shared["classes"] == "shared" and shared["num_classes"] == 149
    assert [r["class"] for r in shared["per_class"]] == list(shared_classes())
    identity = shared["segmenter_identity"]
    assert identity["id"] == "segformer" and identity["label_space"] == "ade20k-150"
    assert identity["num_classes"] == 150 and len(identity["class_list_sha256"]) == 64
    assert len(identity["weights_sha256"]) == 64
    with np.load(shared["real"]["cache_file"]) as cached:
        key = json.loads(str(cached["key"]))
        assert cached["tallies"].shape == (6, 150)  # cached over the segmenter's own classes
    assert key["segmenter"]["class_list_sha256"] == identity["class_list_sha256"]
    assert key["segmenter"]["label_space"] == "ade20k-150"

    full = evaluate(compose("evaluate", common + ["metric.classes=all"]))
    assert (full["real"]["cache"], full["fake"]["cache"]) == ("hit", "hit") and full["num_classes"] == 150
    by_name = {r["class"]: r for r in full["per_class"]}
    for row in shared["per_class"]:  # ADE's own classes: shared is a selection, the areas are the same
        assert row["real_area"] == pytest.approx(by_name[row["class"]]["real_area"])


def test_tally_keys_differ_between_label_spaces(tmp_path):
    from seeing.data.sources import ScenesSource
    from seeing.reports.tallies import cache_key, segmenter_identity

    a = load_segmenter("segformer", path=segformer_folder(tmp_path / "a", LABELS, {"height": 32, "width": 32}))
    names = LABELS[::-1]  # same weights, another label list
    b = load_segmenter("segformer", path=segformer_folder(tmp_path / "b", names, {"height": 32, "width": 32}))
    ida, idb = segmenter_identity(a, a.class_names), segmenter_identity(b, b.class_names)
    assert ida["weights_sha256"] == idb["weights_sha256"] and ida["class_list_sha256"] != idb["class_list_sha256"]
    source = ScenesSource(seed=0)
    assert cache_key(source, ida, 8, 32, 0) != cache_key(source, idb, 8, 32, 0)


def test_shared_classes_refuse_other_label_spaces(compose):
    from seeing.pipeline import evaluate

    cfg = compose("evaluate", ["metric=fsd", "metric.classes=shared", "metric.n=4", "logger=csv", "device=cpu"])
    with pytest.raises(ValueError, match="metric.classes=shared compares the UPP"):
        evaluate(cfg)


# ----------------------------------------------------------------------------- training a SegFormer


def test_segformer_stage_trains_and_exports_a_folder_the_loader_reads(compose):
    from seeing.data.scenes import CLASS_NAMES
    from seeing.pipeline import train

    cfg = compose("train", [
        "stage=segformer", "logger=csv", "~callbacks.progress", "+trainer.fast_dev_run=2",
        "data.train_length=16", "data.val_length=4", "data.test_length=4", "data.batch_size=4",
        "stage.figure_images=2",
    ])
    # Its settings differ from the preset, so it gets its own folder, never the preset's.
    assert Path(cfg.output_dir).name.startswith("segformer+")
    metrics = train(cfg)
    assert 0 <= metrics["val/miou"] <= 1
    folder = Path(cfg.output_dir) / "scenes_segformer"
    training = json.loads((folder / "training.json").read_text())
    assert training["global_step"] == 2 and training["heldout"]["images"] == 4
    seg = load_segmenter("segformer", path=folder, device="cpu")
    assert seg.class_names == list(CLASS_NAMES) and seg.preprocessing.describe()["resize"] == {"height": 64, "width": 64}
    # the preset's architecture (conf/stage/segformer.yaml) is what the folder holds: full-resolution logits
    assert seg.model.config.strides == [1, 4, 2, 2] and seg.model.config.patch_sizes == [7, 5, 3, 3]
    images = torch.stack([ScenesDataset(4, resolution=64, seed=9)[i][0] for i in range(4)])
    labels = seg.segment(images)
    assert labels.shape == (4, 64, 64) and labels.max() < len(CLASS_NAMES)


def test_segformer_stage_settings_fail_loudly():
    from seeing.stages.segmenter import SegmenterTraining

    with pytest.raises(ValueError, match="SegformerConfig has no hiden_sizes"):
        SegmenterTraining(12, widths=None, architecture="segformer", segformer={"hiden_sizes": [8, 16, 24, 32]})
    with pytest.raises(ValueError, match="no stage.widths"):
        SegmenterTraining(12, widths=[8, 16], architecture="segformer", segformer={"input_size": 64})
    with pytest.raises(ValueError, match="stage.architecture='vit'"):
        SegmenterTraining(12, architecture="vit")


# ----------------------------------------------------------------------------- the shipped SegFormer

def test_shipped_scenes_segformer_is_calibrated_against_the_scenes_net(compose):
    """The SegFormer shipped for the scenes world (README, "Calibration on the scenes world"): it ranks
    the planted person drop first among the dropped classes, and on the shipped GAN every class the
    scenes net puts beyond noise has the same sign with it. 400 images a side here (the README's
    numbers are at 1000), the simultaneous 95 % band."""
    from seeing.pipeline import evaluate
    from seeing.segmenters.segformer import SCENES_FOLDER

    seg = load_segmenter("scenes_segformer", device="cpu")
    assert seg.folder == SCENES_FOLDER and seg.class_names == list(load_segmenter("scenes").class_names)
    training = json.loads((SCENES_FOLDER / "training.json").read_text())
    assert training["command"] == "python train.py stage=segformer" and training["heldout"]["miou"] > 0.96

    common = ["metric=fsd", "metric.n=400", "metric.batch_size=100", "metric.progress=false", "logger=csv",
              "device=cpu"]
    drop = evaluate(compose("evaluate", common + ["fake=scenes_drop", "segmenter=scenes_segformer"]))
    assert drop["most_dropped"][0]["class"] == "person" and drop["most_dropped"][0]["relative_delta"] < -0.9
    assert drop["segmenter_identity"]["id"] == "segformer"

    reference = {r["class"]: r for r in evaluate(compose("evaluate", common))["per_class"]}
    segformer = {r["class"]: r for r in evaluate(compose("evaluate", common + ["segmenter=scenes_segformer"]))["per_class"]}
    beyond = [c for c, r in reference.items() if r["beyond_noise"]]
    assert len(beyond) >= 4, beyond  # this sample: mountain, tree, signboard, door, fence
    for c in beyond:
        assert reference[c]["relative_delta"] * segformer[c]["relative_delta"] > 0, (
            c, reference[c]["relative_delta"], segformer[c]["relative_delta"])
