"""First contact: `python train.py ...` / `python evaluate.py ...` run as a person runs them, and what
they see. An expected mistake (a bad choice, key, number or file) is one line, `Error: ...`, naming
the fix, exit status 2, no traceback, found before any work, and leaves no run folder behind;
`--help` is the project's own; `~logger` runs."""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FIXTURES, REPO, run_entry

ASSETS = REPO / "src" / "seeing" / "assets"


def refused(script: str, args: list[str], tmp_path: Path, fix: str) -> str:
    """Run the entry point; assert what a person sees for a mistake and return the error line."""
    runs, cache = tmp_path / "runs", tmp_path / "cache"
    done = run_entry(script, [*args, f"paths.run_root={runs}", f"paths.cache_dir={cache}"], tmp_path, check=False)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert 1 <= len(err) <= 2 and err[-1].startswith("Error: "), err
    assert fix in err[-1], err[-1]
    written = [str(p) for root in (runs, cache) if root.exists() for p in root.rglob("*") if p.is_file()]
    assert not written, written  # no run folder, no tally: nothing was done
    return err[-1]


# ------------------------------------------------------------------ mistakes found while composing
# each fails before torch is imported: about a second
COMPOSE_MISTAKES = {
    "public model without its file": ("train", ["model=progan", "stage=layer1"], "add model.checkpoint="),
    "ddp without a device count": ("train", ["trainer=ddp", "stage=layer1"], "add trainer.devices=N"),
    "upp without its folder": ("evaluate", ["metric=fsd", "segmenter=upp"], "add segmenter.path="),
    "a base file is no stage": ("train", ["stage=layer"], "Available options in 'stage': direct_encoder"),
    "a base file is no trainer": ("train", ["trainer=base"], "Available options in 'trainer': cpu, ddp"),
    "a key nothing has": ("train", ["stage=reconstruct", "stage.stepz=3"], "+stage.stepz=3"),
    "a negative batch size": ("train", ["stage=layer1", "stage.batch_size=-1"],
                              "stage.batch_size=-1: must be a whole number >= 1"),
    "a zero learning rate": ("train", ["stage=hybrid", "stage.lr=0"], "stage.lr=0: must be a positive number"),
    "photos with generated targets": ("train", ["stage=reconstruct", "real=folder", "real.path=/photos",
                                                "stage.targets.kind=generated"], "Drop real=folder"),
    "photos for a stage that reads none": ("train", ["stage=layer1", "+real=scenes"],
                                           "stage=layer1 reads no photos"),
    "no images a side": ("evaluate", ["metric=fsd", "metric.n=0"], "metric.n=0: must be a whole number >= 1"),
    "a bad number in a sweep's second job": ("train", ["-m", "stage=reconstruct", "stage.steps=2,-1"],
                                             "job 2 of 2 (stage.steps=-1): stage.steps=-1"),
}


@pytest.mark.parametrize("case", COMPOSE_MISTAKES)
def test_a_mistake_in_the_command_line_is_one_line_before_any_work(case, tmp_path):
    script, args, fix = COMPOSE_MISTAKES[case]
    refused(script, args, tmp_path, fix)


def test_a_target_nothing_names_is_one_line_and_a_broken_module_keeps_its_traceback(tmp_path, monkeypatch):
    refused("train", ["stage=layer1", "stage._target_=seeing.stages.nope.Thing"], tmp_path,
            "stage._target_=seeing.stages.nope.Thing: no such class or function can be imported")
    import hydra

    from seeing.errors import mistake_message

    (tmp_path / "broken_stage.py").write_text("raise RuntimeError('a bug while importing')\nclass Stage: ...\n")
    (tmp_path / "fine_stage.py").write_text("class Stage: ...\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for target, expected in [("broken_stage.Stage", None), ("fine_stage.Nope", "_target_=fine_stage.Nope: no such")]:
        with pytest.raises(Exception) as caught:
            hydra.utils.instantiate({"_target_": target})
        message = mistake_message(caught.value)
        assert message == expected if expected is None else message.startswith(expected), message


def test_the_debug_switch_shows_the_traceback(tmp_path):
    os.environ["SEEING_DEBUG"] = "1"
    try:
        done = run_entry("train", ["trainer=ddp", "stage=layer1", f"paths.run_root={tmp_path}/runs"], tmp_path,
                         check=False)
    finally:
        os.environ.pop("SEEING_DEBUG")
    assert done.returncode != 0 and "Traceback" in done.stderr and "trainer.devices" in done.stderr
    assert not (tmp_path / "runs" / "scenes_progan" / "layer1").exists()  # still no folder left behind


# ------------------------------------------------------------------ bad files (and settings), named before long work
def _genforce_without(tmp_path: Path, key: str) -> Path:
    state = dict(torch.load(FIXTURES / "checkpoints" / "genforce_pggan_256.pt", weights_only=True)["state_dict"])
    del state[key]
    torch.save(state, tmp_path / "pggan_church256.pth")
    return tmp_path / "pggan_church256.pth"


def _hybrid_without(tmp_path: Path) -> Path:
    obj = torch.load(ASSETS / "scenes_progan_hybrid.pt", weights_only=True)
    del obj["inverters"]["layer2"]["state_dict"]["net.conv1.weight"]
    torch.save(obj, tmp_path / "hybrid.pt")
    return tmp_path / "hybrid.pt"


def _layer2_misshaped(tmp_path: Path) -> Path:
    obj = torch.load(ASSETS / "scenes_progan_layer2.pt", weights_only=True)
    state = obj["inverters"]["layer2"]["state_dict"]
    state["net.conv1.weight"] = state["net.conv1.weight"][:-1]
    torch.save(obj, tmp_path / "layer2.pt")
    return tmp_path / "layer2.pt"


def _damaged(tmp_path: Path) -> Path:
    (tmp_path / "vgg16-397923af.pth").write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)
    return tmp_path / "vgg16-397923af.pth"


def _not_lmdb(tmp_path: Path) -> Path:
    (tmp_path / "church_lmdb").mkdir()
    (tmp_path / "church_lmdb" / "data.mdb").write_bytes(b"not an lmdb database " * 200)
    return tmp_path / "church_lmdb"


FILE_MISTAKES = {  # make the bad input, the arguments, what the one line must say
    "a fake folder that is not there": (
        lambda t: t / "nowhere", lambda p: ["metric=fsd", "fake=folder", f"fake.path={p}"],
        lambda p: f"fake=folder: image folder {p} does not exist"),
    "an invalid lmdb": (
        _not_lmdb, lambda p: ["metric=fsd", "fake=lsun", f"fake.path={p}"],
        lambda p: f"fake=lsun: {p} is not a readable lmdb database"),
    "a genforce file without a tensor": (
        lambda t: _genforce_without(t, "layer3.weight"),
        lambda p: ["model=progan", f"model.checkpoint={p}", "stage=layer1"],
        lambda p: f"model.checkpoint={p}: cannot load genforce_pggan generator"),
    "a hybrid file without a tensor": (
        _hybrid_without, lambda p: ["stage=reconstruct", f"stage.hybrid_file={p}"],
        lambda p: f"{p}: inverters.layer2.state_dict: state dict does not match the expected layout"),
    "an inverter file with a wrong shape": (
        _layer2_misshaped, lambda p: ["stage=layer2", f"stage.inverter_file={p}"],
        lambda p: f"{p}: inverters.layer2.state_dict: state dict does not match"),
    "a damaged VGG file": (
        _damaged, lambda p: ["stage=reconstruct", "stage.loss.perceptual=vgg", f"stage.loss.vgg_path={p}"],
        lambda p: f"{p} (1028 bytes) is not a readable PyTorch checkpoint"),
    "a trainer setting Lightning refuses": (
        lambda t: t, lambda p: ["stage=layer1", "trainer.precision=64-wrong"],
        lambda p: "a trainer.* setting is refused by Lightning: Precision '64-wrong' is invalid"),
}
FILE_DETAILS = {  # more of what the line says: the key as the file spells it, the expected layout
    "a genforce file without a tensor": ("missing keys: layer3.weight;", "genforce model zoo ProGAN"),
    "a hybrid file without a tensor": ("missing keys: net.conv1.weight", "seeing.inversion/v1"),
    "an inverter file with a wrong shape": ("net.conv1.weight: file (255, 128, 3, 3) vs model (256, 128, 3, 3)",),
    "a damaged VGG file": ("torchvision's ImageNet VGG-16 state dict", "stage.loss.vgg_path"),
    "an invalid lmdb": ("a folder holding data.mdb",),
}


@pytest.mark.parametrize("case", FILE_MISTAKES)
def test_a_bad_file_is_named_in_one_line_before_any_work(case, tmp_path):
    make, args, fix = FILE_MISTAKES[case]
    path = make(tmp_path)
    script = "evaluate" if args(path)[0].startswith("metric=") else "train"
    line = refused(script, [*args(path), "logger=csv"], tmp_path, fix(path))
    for detail in FILE_DETAILS.get(case, ()):
        assert detail in line, line


# ------------------------------------------------------------------ help and logging off
@pytest.mark.parametrize("script, groups", [("train", ("stage", "model")), ("evaluate", ("metric", "model"))])
def test_help_is_the_projects_own(script, groups, tmp_path):
    done = run_entry(script, ["--help"], tmp_path)
    lines = done.stdout.strip().splitlines()
    assert len(lines) <= 40, len(lines)
    assert "--hydra-help" in done.stdout and "SEEING_DEBUG=1" in done.stdout
    assert "== Config ==" not in done.stdout and "Powered by Hydra" not in done.stdout
    for group in groups:  # every preset of each group is on a line of its own
        for preset in sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml")):
            shown = rf"\s+{preset}\s" if not re.fullmatch(r"layer\d", preset) else r"\s+layer1\.\.layer4\s"
            assert any(re.match(shown, ln) for ln in lines), f"{script}.py --help does not list {group}={preset}"
    assert not any(re.match(r"\s+(layer|base)\s", ln) for ln in lines)  # base files are no choices


def test_logging_can_be_turned_off(tmp_path):
    """`~logger` (lightning-hydra-template's way): the run trains and exports without the learning-rate
    monitor, which needs a logger."""
    runs = tmp_path / "runs"
    done = run_entry("train", ["stage=layer1", "~logger", "trainer.max_steps=2", "stage.batch_size=2",
                               "stage.val_size=4", "stage.val_batch_size=4", "trainer.enable_progress_bar=false",
                               "trainer.enable_model_summary=false", f"paths.run_root={runs}"], tmp_path)
    assert list(runs.glob("scenes_progan/layer1*/layer1.pt")), done.stdout[-2000:]
    assert not list(runs.rglob("wandb")) and not list(runs.rglob("csv"))


# ------------------------------------------------------------------ in-process details
def test_sixteen_bit_and_float_images_keep_their_scale(tmp_path):
    from PIL import Image

    from seeing.data.sources import ImageFolderSource

    grey16 = np.linspace(0, 40000, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "a16.png")  # PIL mode I;16
    grey8 = np.round(grey16 / 257).astype(np.uint8)
    Image.fromarray(grey8).save(tmp_path / "b8.png")
    Image.fromarray((grey16 / 65535).astype(np.float32)).save(tmp_path / "c_float.tiff")  # mode F, 0..1
    Image.fromarray(np.full((32, 32), 70000, np.int32)).save(tmp_path / "d_wide.tiff")  # mode I, too wide
    source = ImageFolderSource(tmp_path, shuffle=False)
    (batch,) = list(source.batches(4, 4, 32))
    assert batch.images.shape[0] == 3  # the image whose scale cannot be told is skipped, with its reason
    assert len(source.skipped) == 1 and "d_wide.tiff" in source.skipped[0][0] and "not 8- or 16-bit" in \
        source.skipped[0][1]
    sixteen, eight, floating = batch.images
    assert torch.allclose(sixteen, eight, atol=1e-6)  # I;16 / 257 is the 8-bit image: not clipped to white
    assert float(sixteen.mean()) < 0  # mostly dark, as the 16-bit values say
    assert torch.allclose(floating, eight, atol=2 / 255)


def test_only_deliberate_errors_are_shown_as_one_line():
    from seeing.errors import UsageError, mistake_message
    from seeing.validation import check_numbers

    with pytest.raises(ValueError) as ours:
        check_numbers({"batch_size": 0}, "stage")
    assert mistake_message(ours.value) == "stage.batch_size=0: must be a whole number >= 1"
    assert mistake_message(UsageError("a\nb")) == "a b"
    with pytest.raises(RuntimeError) as torch_error:
        torch.zeros(2, 3).reshape(4, 4)
    assert mistake_message(torch_error.value) is None  # a bug keeps its traceback
    with pytest.raises(ValueError) as elsewhere:
        int("four")
    assert mistake_message(elsewhere.value) is None  # raised outside the package: not a checked setting
