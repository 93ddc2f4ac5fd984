"""The paper's FSD end to end on CPU with full-size random weights, through ``evaluate.py`` as a user
runs it: a folder of photos of odd sizes against samples of a full-size ProGAN-256 (GAN Dissection's
key layout, formats.json) segmented by a full-size unified parsing network (ResNet-50 deep stem +
UPerNet with the scene, part and material heads, the 336 object classes) read from its release
folder layout (encoder_epoch_40.pth, decoder_epoch_40.pth, labels.json)."""
from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FIXTURES, run_entry
from test_segmenters import UPP_LABELS, UPP_OBJECTS, random_state, upp_decoder_layout, upp_encoder_layout


@pytest.fixture(scope="module")
def paper_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper_e2e")
    # ProGAN-256 at full size, random weights, saved as the public .pth (a bare state dict)
    keys = json.loads((FIXTURES / "checkpoints" / "formats.json").read_text())["ganseeing_proggan_256"]["keys"]
    g = torch.Generator().manual_seed(0)
    progan = root / "proggan_random-00000000.pth"
    torch.save({k: torch.randn(shape, generator=g) * 0.5 for k, shape in keys.items()}, progan)
    # the upp release folder, full size, random weights
    upp = root / "upp-resnet50-upernet"
    upp.mkdir()
    (upp / "labels.json").write_text(json.dumps(UPP_LABELS))
    torch.save(random_state(upp_encoder_layout(), seed=1), upp / "encoder_epoch_40.pth")
    torch.save(random_state(upp_decoder_layout(len(UPP_OBJECTS), 7, 7, 5), seed=2), upp / "decoder_epoch_40.pth")
    # six photos of odd sizes (resized on the shorter side and centre-cropped to 256)
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(300, 260), (260, 300), (333, 257), (401, 280), (280, 280), (512, 300)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(photos / f"photo_{i}.png")
    return {"progan": progan, "upp": upp, "photos": photos, "root": root}


def test_fsd_at_256_px_with_full_size_upp_and_progan_through_evaluate(paper_files, tmp_path):
    assert len(UPP_OBJECTS) == 336
    start = time.perf_counter()
    run_entry("evaluate", [
        "metric=fsd", "real=folder", f"real.path={paper_files['photos']}",
        "fake=generator", "model=progan", f"model.checkpoint={paper_files['progan']}",
        "segmenter=upp", f"segmenter.path={paper_files['upp']}",
        "metric.n=4", "metric.batch_size=2", "metric.progress=false", "device=cpu",
        "logger=csv", f"paths.run_root={tmp_path / 'runs'}", f"paths.cache_dir={tmp_path / 'cache'}",
    ], cwd=tmp_path)
    seconds = time.perf_counter() - start
    reports = list((tmp_path / "runs").rglob("fsd.json"))
    assert len(reports) == 1, reports
    report = json.loads(reports[0].read_text())
    assert report["resolution"] == 256 and report["n"] == 4
    assert math.isfinite(report["fsd"]) and report["fsd"] >= 0
    print(f"\nFSD 256 px, upp + ProGAN-256 full size, n=4: {report['fsd']:.4f} in {seconds:.1f} s")
