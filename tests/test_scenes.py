import numpy as np
import pytest
import torch

from seeing.data import CLASS_NAMES, ScenesDataModule, ScenesDataset, export_image_folder, render_scene
from seeing.data.scenes import CLASS_INDEX


def test_deterministic_by_seed_and_index():
    a_img, a_lab = render_scene(3, 17)
    b_img, b_lab = render_scene(3, 17)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)
    c_img, _ = render_scene(4, 17)
    assert not np.array_equal(a_img, c_img)


def test_item_format_and_resolution():
    ds = ScenesDataset(4, resolution=48, seed=1)
    img, lab = ds[2]
    assert img.shape == (3, 48, 48) and img.dtype == torch.float32
    assert -1.0 <= img.min() and img.max() <= 1.0
    assert lab.shape == (48, 48) and lab.dtype == torch.int64
    assert 0 <= lab.min() and lab.max() < len(CLASS_NAMES)


def test_world_has_realistic_class_imbalance():
    counts = np.zeros(len(CLASS_NAMES))
    present = np.zeros(len(CLASS_NAMES))
    for i in range(120):
        _, lab = render_scene(0, i)
        c = np.bincount(lab.ravel(), minlength=len(CLASS_NAMES))
        counts += c
        present += c > 0
    share = counts / counts.sum()
    assert len(CLASS_NAMES) >= 10
    for stuff in ("sky", "grass", "road"):
        assert share[CLASS_INDEX[stuff]] > 0.1, stuff
    for thing in ("person", "car", "signboard", "window", "door", "fence"):
        assert 0 < share[CLASS_INDEX[thing]] < 0.05, thing
        assert present[CLASS_INDEX[thing]] < 120, thing  # rarer than every-image stuff


def test_drop_removes_class_and_keeps_rest_of_layout():
    changed = 0
    for i in range(40):
        img, lab = render_scene(0, i)
        dimg, dlab = render_scene(0, i, drop=["person"])
        assert not (dlab == CLASS_INDEX["person"]).any()
        keep = lab != CLASS_INDEX["person"]
        # where no person was, nothing else changes except texture noise (same stream)
        assert np.array_equal(lab[keep], dlab[keep])
        changed += int((lab == CLASS_INDEX["person"]).any())
    assert changed > 5


def test_drop_fraction_applies_to_that_share_of_images():
    n = 400
    ds = ScenesDataset(n, drop=["road"], drop_fraction=0.25)
    kept = sum(bool((ds[i][1] == CLASS_INDEX["road"]).any()) for i in range(n))
    assert 0.65 * n < kept < 0.85 * n


def test_bad_options_error():
    with pytest.raises(ValueError, match="unknown scene classes"):
        ScenesDataset(4, drop=["unicorn"])
    with pytest.raises(ValueError, match="background"):
        ScenesDataset(4, drop=["sky"])
    with pytest.raises(ValueError):
        ScenesDataset(0)


def test_datamodule_splits_are_disjoint():
    dm = ScenesDataModule(batch_size=4, train_length=8, val_length=4, test_length=4)
    x_train, _ = next(iter(dm.train_dataloader()))
    x_val, _ = next(iter(dm.val_dataloader()))
    assert x_train.shape == (4, 3, 64, 64)
    assert not any(torch.equal(a, b) for a in x_train for b in x_val)


def test_export_image_folder(tmp_path):
    from PIL import Image

    ds = ScenesDataset(3, resolution=32, seed=2)
    export_image_folder(ds, tmp_path)
    files = sorted((tmp_path / "images").glob("*.png"))
    assert len(files) == 3
    lab = np.asarray(Image.open(tmp_path / "labels" / "000001.png"))
    assert np.array_equal(lab, ds[1][1].numpy())
