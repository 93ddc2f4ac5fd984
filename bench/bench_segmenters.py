"""Tally throughput of every segmenter at 256 px, side by side:
``pytest bench/bench_segmenters.py --benchmark-only -s -p no:randomly``.

FSD's time is the segmenter's time, so this is the largest lever on FSD speed. Each segmenter
has its published architecture with random weights (nothing is downloaded; the speed does not
depend on the values once denormal floats are flushed: random weights produce them, and they run
2-40x slower), 2 CPU threads, images already in memory. The transformers models get an image
processor that keeps 256 px (the ADE checkpoints' own configs resize to 512: ``segformer-b0@512``
shows what that costs).
"""
from __future__ import annotations

import pytest
import torch

from seeing.data.scenes import CLASS_NAMES, ScenesDataset
from seeing.data.sources import TensorSource
from seeing.reports.tallies import tally_source
from seeing.segmenters.hf import torch_image_processor

RES, N, BATCH, THREADS = 256, 8, 4, 2
ADE_CLASSES = [f"ade_{i}" for i in range(150)]

SEGFORMER = {  # the published b0 / b2 / b5 encoders (SegFormer paper, Table 1) and their decoders
    "b0": dict(hidden_sizes=[32, 64, 160, 256], depths=[2, 2, 2, 2], decoder_hidden_size=256),
    "b2": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 4, 6, 3], decoder_hidden_size=768),
    "b5": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 6, 40, 3], decoder_hidden_size=768),
}


def segformer(variant: str, size: int = RES):
    import transformers

    from seeing.segmenters.hf import Preprocessing
    from seeing.segmenters.segformer import SegformerSegmenter

    config = transformers.SegformerConfig(num_labels=150, num_attention_heads=[1, 2, 5, 8], **SEGFORMER[variant])
    processor_class = torch_image_processor(transformers, "SegformerImageProcessor")
    processor = processor_class(size={"height": size, "width": size})
    return SegformerSegmenter(transformers.SegformerForSemanticSegmentation(config), Preprocessing(processor),
                              ADE_CLASSES)


def mask2former_swin_tiny():
    import transformers

    from seeing.segmenters.hf import Preprocessing
    from seeing.segmenters.mask2former import Mask2FormerSegmenter

    swin_t = transformers.SwinConfig(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7,
                                     out_features=["stage1", "stage2", "stage3", "stage4"])
    config = transformers.Mask2FormerConfig(backbone_config=swin_t, num_labels=150)
    processor_class = torch_image_processor(transformers, "Mask2FormerImageProcessor")
    processor = processor_class(size={"shortest_edge": RES, "longest_edge": 4 * RES})
    return Mask2FormerSegmenter(transformers.Mask2FormerForUniversalSegmentation(config), Preprocessing(processor),
                                ADE_CLASSES)


def upp():
    from seeing.segmenters.upp import DeepStemResNet50, UnifiedParsingSegmenter, UPerNetObjectDecoder

    return UnifiedParsingSegmenter(DeepStemResNet50(), UPerNetObjectDecoder(336), [f"upp_{i}" for i in range(336)])


def deeplab():
    from torchvision.models.segmentation import deeplabv3_resnet50

    from seeing.segmenters.deeplab import DeepLabSegmenter

    return DeepLabSegmenter(deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=21, aux_loss=False))


def scenes():
    from seeing.segmenters.scenes import SceneSegmenterNet, ScenesSegmenter

    return ScenesSegmenter(SceneSegmenterNet(len(CLASS_NAMES)), CLASS_NAMES)


BUILDERS = {
    "upp": upp, "deeplab": deeplab, "scenes": scenes,
    "segformer-b0": lambda: segformer("b0"), "segformer-b2": lambda: segformer("b2"),
    "segformer-b5": lambda: segformer("b5"), "segformer-b0@512": lambda: segformer("b0", 512),
    "mask2former-swin-t": mask2former_swin_tiny,
}


@pytest.fixture(scope="module", autouse=True)
def cpu_settings():
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    flushed = torch.set_flush_denormal(True)
    yield
    torch.set_num_threads(threads)
    torch.set_flush_denormal(False) if flushed else None


@pytest.fixture(scope="module")
def images():
    ds = ScenesDataset(N, resolution=64, seed=0)
    small = torch.stack([ds[i][0] for i in range(N)])
    return torch.nn.functional.interpolate(small, size=(RES, RES), mode="bilinear", align_corners=False)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_tally_throughput(benchmark, images, name):
    if name.startswith(("segformer", "mask2former")):
        pytest.importorskip("transformers")
    torch.manual_seed(0)
    seg = BUILDERS[name]().eval()
    source, runs = TensorSource(images), []

    def tally():
        runs.append(tally_source(source, seg, seg.num_classes, N, BATCH, RES, progress=False).stats)

    benchmark.pedantic(tally, rounds=2, iterations=1, warmup_rounds=1)
    per_image = min(s.total_s / s.images for s in runs)
    benchmark.extra_info.update({"s_per_image": round(per_image, 4), "images_per_s": round(1 / per_image, 2),
                                 "params_M": round(sum(p.numel() for p in seg.parameters()) / 1e6, 1)})
    print(f"\n{name}: {per_image:.3f} s per image ({1 / per_image:.2f} images/s), "
          f"{benchmark.extra_info['params_M']}M parameters, {RES} px, {THREADS} threads")
