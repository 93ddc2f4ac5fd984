"""The config surface as a user meets it: what is set on the command line takes effect or fails
loudly, before any work. Composed with Hydra's compose API; the multirun cases run the real
entry point in a subprocess."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from seeing.config import check_config, unset_keys
from seeing.progress import StepProgressBar, step_budget
from seeing.stages.trainer import batches_per_epoch, build_trainer

from conftest import REPO, run_entry, run_folder

STAGES = ["segmenter", "gan", "layer1", "layer2", "layer3", "layer4", "encoder", "hybrid", "direct_encoder",
          "reconstruct"]


@pytest.mark.parametrize("stage", STAGES)
def test_trainer_overrides_reach_the_trainer_of_every_stage(compose, stage):
    cfg = compose("train", [f"stage={stage}", "trainer.max_steps=2", "trainer.precision=bf16-mixed",
                            "trainer.accelerator=cpu", "logger=csv"])
    trainer = build_trainer(cfg, [], False)
    assert trainer.max_steps == 2
    assert "bf16" in str(trainer.precision)
    # and without the override, the stage's own preset applies (a number, or the model's recipe's)
    default = compose("train", [f"stage={stage}"])
    own, layer = (OmegaConf.to_container(OmegaConf.load(REPO / "conf" / path))
                  for path in (f"stage/{stage}.yaml", "_base/layer_stage.yaml"))
    raw = own.get("trainer", {}).get("max_steps", layer["trainer"]["max_steps"])
    if isinstance(raw, str) and raw.startswith("${recipe."):
        raw = OmegaConf.select(default, raw[2:-1])
    assert default.trainer.max_steps == raw


def test_stage_keys_live_at_one_depth_and_unknown_keys_fail(compose):
    cfg = compose("train", ["stage=reconstruct", "stage.steps=7", "stage.lr=0.5", "stage.targets.count=3"])
    assert (cfg.stage.steps, cfg.stage.lr, cfg.stage.targets.count) == (7, 0.5, 3)
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="stage.stepz"):
        compose("train", ["stage=reconstruct", "stage.stepz=7"])
    # a key added with + that the stage module does not take is refused when it is built
    cfg = compose("train", ["stage=layer1", "+stage.unread=1"])
    from seeing.config import instantiate

    with pytest.raises(Exception, match="unread"):
        instantiate(cfg.stage)


def test_groups_only_exist_where_they_are_read(compose):
    from hydra.errors import ConfigCompositionException

    # variant only means something to the reconstruct stage, data only to gan and segmenter
    with pytest.raises(ConfigCompositionException, match="variant"):
        compose("train", ["stage=layer1", "variant=a"])
    with pytest.raises(ConfigCompositionException, match="data"):
        compose("train", ["stage=hybrid", "data=scenes"])
    assert "variant" not in compose("train", ["stage=layer1"]) and "data" not in compose("train", ["stage=layer1"])


def test_output_folders_are_keyed_by_checkpoint_and_by_what_was_compared(compose, tmp_path):
    runs = tmp_path / "runs"
    a = compose("train", ["stage=layer3", "model=progan", "model.checkpoint=/w/proggan_churchoutdoor-7e701dd5.pth"])
    b = compose("train", ["stage=layer3", "model=progan", "model.checkpoint=/w/proggan_bedroom-d8a89ff1.pth"])
    assert Path(a.output_dir) == runs / "progan-proggan_churchoutdoor-7e701dd5" / "layer3"
    assert a.output_dir != b.output_dir
    assert Path(compose("train", ["stage=layer3"]).output_dir) == runs / "scenes_progan" / "layer3"
    fsd = [compose("evaluate", ["metric=fsd", f"fake={f}"]).output_dir for f in ("scenes", "scenes_drop", "generator")]
    assert len(set(fsd)) == 3 and Path(fsd[2]) == runs / "eval" / "fsd" / "scenes_vs_scenes_progan"
    folder = compose("evaluate", ["metric=fsd", "real=folder", "real.path=/data/churches"])
    assert Path(folder.output_dir).name == "folder_churches_vs_scenes_progan"


def test_one_source_definition_serves_both_sides(compose):
    cfg = compose("evaluate", ["metric=fsd", "real=scenes", "fake=scenes"])
    # the same world on both sides: two independent draws, not the same images twice
    assert cfg.real.offset == 0 and cfg.fake.offset == 1_000_000
    assert OmegaConf.to_container(cfg.real, resolve=True) != OmegaConf.to_container(cfg.fake, resolve=True)
    assert (REPO / "conf" / "real").resolve() == (REPO / "conf" / "fake").resolve() == REPO / "conf" / "source"


def test_evaluations_ask_only_for_what_they_read(compose, tmp_path):
    # the ablation reads result files: naming its runs folder is enough, no checkpoint needed
    cfg = compose("evaluate", ["metric=ablation", "model=progan", f"metric.runs_dir={tmp_path}/my_runs"])
    assert unset_keys(cfg, [k for k in cfg if k != "model"]) == []
    assert Path(cfg.output_dir).name == "my_runs"
    # training a stage of a public model without its checkpoint names the override to add
    cfg = compose("train", ["stage=layer2", "model=progan", "model.checkpoint=/w/x.pth"])
    cfg.model.checkpoint = "???"
    with pytest.raises(ValueError, match=r"model\.checkpoint=/path/to/weights\.pth"):
        check_config(cfg, [k for k in cfg if k != "model"])
    # FSD needs the segmenter, the two sources and (for generator samples) the model; nothing else
    fsd = compose("evaluate", ["metric=fsd"])
    assert {"stage", "variant", "trainer", "data"}.isdisjoint(fsd.keys())


def test_fsd_resolution_is_its_own_setting(compose):
    from seeing.data.sources import ImageFolderSource, ScenesSource
    from seeing.reports.fsd_report import fsd_resolution

    assert compose("evaluate", ["metric=fsd"]).metric.resolution == "auto"
    from seeing.data.sources import GeneratorSource

    scenes = ScenesSource()
    assert fsd_resolution("auto", scenes, ScenesSource(offset=5)) == 64
    # the shipped GAN's file says it was trained on the scenes world
    shipped = GeneratorSource({"_target_": "seeing.gans.embedded.embedded_generator", "checkpoint": None})
    assert fsd_resolution("auto", scenes, shipped) == 64
    folder = ImageFolderSource(path="/nonexistent")
    assert fsd_resolution("auto", folder, scenes) == 256  # the paper's Resize(256) + CenterCrop(256)
    assert fsd_resolution(128, folder, scenes) == 128
    for bad in (0, -3, "big", True):
        with pytest.raises(ValueError, match="metric.resolution"):
            fsd_resolution(bad, folder, scenes)


def test_progress_bar_counts_steps_of_the_budget(compose):
    cfg = compose("train", ["stage=layer1", "trainer.max_steps=40"])
    callbacks = [c for c in __import__("seeing.pipeline", fromlist=["instantiate_group"]).instantiate_group(
        cfg.callbacks)]
    assert any(isinstance(c, StepProgressBar) for c in callbacks)
    trainer = build_trainer(cfg, callbacks, False)
    assert step_budget(trainer, torch.nn.Module()) == 40
    # turned off on the command line: the bar is left out instead of colliding with the trainer flag
    off = compose("train", ["stage=layer1", "trainer.enable_progress_bar=false"])
    trainer = build_trainer(off, __import__("seeing.pipeline", fromlist=["x"]).instantiate_group(off.callbacks), False)
    assert not any(isinstance(c, StepProgressBar) for c in trainer.callbacks)

    class Planned(torch.nn.Module):
        total_steps = 12

    uncapped = build_trainer(compose("train", ["stage=reconstruct"]), [], False)
    assert step_budget(uncapped, Planned()) == 12


def test_logging_interval_fits_the_run_and_the_epoch(compose):
    """Lightning warns when an epoch has fewer batches than the logging interval: a smoke run on a few
    scenes logs once an epoch instead (per process under DDP); a full epoch keeps the configured interval."""
    import hydra

    cfg = compose("train", ["stage=segmenter", "data.train_length=16", "data.batch_size=4", "trainer.max_steps=6"])
    data = hydra.utils.instantiate(cfg.data)
    assert build_trainer(cfg, [], False, torch.nn.Module(), data).log_every_n_steps == 4
    two = compose("train", ["stage=segmenter", "data.train_length=16", "data.batch_size=4", "trainer.devices=2"])
    assert batches_per_epoch(two, hydra.utils.instantiate(two.data)) == 2
    full = compose("train", ["stage=segmenter"])
    assert build_trainer(full, [], False, torch.nn.Module(), hydra.utils.instantiate(full.data)).log_every_n_steps == \
        full.trainer.log_every_n_steps


def test_unknown_variant_fails_listing_the_variants_and_writes_nothing(tmp_path):
    runs = tmp_path / "runs"
    done = run_entry("train", ["stage=reconstruct", "variant=z", f"paths.run_root={runs}"], tmp_path, check=False)
    assert done.returncode != 0
    assert "Could not find 'variant/z'. Available options in 'variant': a, b, c, d, e, f" in done.stderr
    assert not runs.exists()
    # in a sweep, the bad value fails before the good one runs
    done = run_entry("train", ["-m", "stage=reconstruct", "variant=b,zz", f"paths.run_root={runs}"], tmp_path,
                     check=False)
    assert done.returncode != 0 and "variant/zz" in done.stderr
    assert not list(runs.rglob("reconstruct_*"))


def wandb_records(path: Path):
    """The protobuf records of an offline W&B run file (``run-*.wandb``: W&B's leveldb-style log of
    32 KiB blocks, each record a 7-byte header (checksum, length, kind) and its bytes)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, pending = path.read_bytes(), 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (2, 3):  # first / middle piece of a record split across blocks
            pending = (b"" if kind == 2 else pending) + chunk
            continue
        if kind not in (1, 4):
            continue
        record = pb.Record()
        record.ParseFromString(pending + chunk if kind == 4 else chunk)
        pending = b""
        yield record


def wandb_run_summary(folder: Path) -> dict:
    """group, job_type, name, config keys and logged metric names of the one offline run under ``folder``."""
    import json

    (path,) = folder.glob("wandb/offline-run-*/run-*.wandb")
    out = {"config": {}, "metrics": set()}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out.update(group=record.run.run_group, job_type=record.run.job_type, name=record.run.display_name)
            out["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in record.config.update if i.key})
        elif kind == "history":
            out["metrics"] |= {i.key or "/".join(i.nested_key) for i in record.history.item}
    return out


def test_a_variant_sweep_writes_one_folder_per_variant_with_the_overrides_applied(tiny_gan_files, tmp_path):
    gen, hybrid = tiny_gan_files
    runs = tmp_path / "runs"
    done = run_entry("train", ["-m", "stage=reconstruct", "variant=a,d", f"paths.run_root={runs}",
                 f"model.checkpoint={gen}", f"stage.hybrid_file={hybrid}", "stage.steps=2", "stage.targets.count=2",
                 "stage.batch_size=2", "trainer.max_steps=3", "logger=wandb", "trainer.enable_progress_bar=false",
                 "trainer.enable_model_summary=false"], tmp_path)
    # both runs change settings from the preset (steps, targets...): each its own folder named for the change
    folders = {v: run_folder(runs / "scenes_progan-tiny_progan", f"reconstruct_real_{v}") for v in "ad"}
    assert all("+steps:2" in f.name and "+targets.count:2" in f.name for f in folders.values()), folders
    for v, folder in folders.items():
        assert (folder / "reconstruction.pt").is_file(), v
        saved = OmegaConf.load(folder / "config.yaml")
        assert saved.variant.name == v and saved.trainer.max_steps == 3 and saved.stage.steps == 2
        assert f"outputs in {folder}" in done.stdout
    from seeing.stages.reconstruct import load_result

    a, d = (load_result(folders[v] / "reconstruction.pt") for v in "ad")
    assert a["positions"] == ["z"] and d["positions"] == []
    # W&B (offline): the resolved config with the variant, one group for the grid, the stage as job type, and
    # metrics for both, also for d, which takes no optimisation step
    runs_seen = {v: wandb_run_summary(folders[v]) for v in "ad"}
    for v, run in runs_seen.items():
        assert run["config"]["variant"]["name"] == v and run["config"]["trainer"]["max_steps"] == 3
        assert run["job_type"] == f"reconstruct_real_{v}" and run["name"].endswith(folders[v].name)
        assert "final/pixel_l1" in run["metrics"], run["metrics"]
        # its provenance: the identity digest of its folder and every file it read, with sha256
        record = json.loads((folders[v] / "identity.json").read_text())
        assert run["config"]["provenance"]["identity"] == record["identity"]
        read = {Path(i["path"]).name: i["sha256"] for i in run["config"]["provenance"]["inputs"]}
        assert read[Path(gen).name] == hashlib.sha256(Path(gen).read_bytes()).hexdigest(), read
        # the per-image table and the image table (target | start | reconstruction) reach W&B too
        for table in ("reconstruct/per_image", "reconstruct/images"):  # W&B records a table as its fields
            assert f"{table}/_type" in run["metrics"] and f"{table}/nrows" in run["metrics"], run["metrics"]
    assert runs_seen["a"]["group"] == runs_seen["d"]["group"] and runs_seen["a"]["group"].startswith("grid-")
