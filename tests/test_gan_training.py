"""The GAN stage (WGAN-GP on the scenes world), its export, the samples job and the shipped GAN."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import hydra
import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from conftest import Interrupted
from torch.utils.data import DataLoader, TensorDataset

from seeing.gans.critic import ProGANCritic, gradient_penalty
from seeing.gans.embedded import ASSET, embedded_generator
from seeing.gans.loading import load_generator
from seeing.gans.progan import ProGANGenerator
from seeing.stages.gan import NonFiniteLossError, WGANGP
from seeing.pipeline import evaluate, train

# an 8x8 ProGAN on 8x8 scenes: the real stage, at a size that runs in a second or two
TINY = [
    "logger=csv",
    "model.z_dim=8",
    "model.widths=[8,8]",
    "data.resolution=8",
    "data.batch_size=4",
    "data.train_length=64",
    "callbacks.progress=null",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "stage.num_samples=4",
    "stage.sample_every=2",
    "callbacks.checkpoint.every_n_train_steps=2",
]


def _metrics(run_dir: Path) -> list[dict[str, str]]:
    files = sorted(run_dir.glob("csv/version_*/metrics.csv"))
    assert files, f"no CSV metrics under {run_dir}"
    with open(files[-1]) as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------- critic
def test_gradient_penalty_of_a_linear_critic_is_known():
    # D(x) = <w, x> + b has gradient w everywhere, so GP = (||w|| - 1)^2 at any interpolate
    critic = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 1))
    with torch.no_grad():
        critic[1].weight.copy_(torch.randn(1, 48))
        critic[1].weight.mul_(3.0 / critic[1].weight.norm())
    real, fake = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    gp = gradient_penalty(critic, real, fake)
    assert gp.item() == pytest.approx(4.0, rel=1e-5)
    # the penalty is differentiable in the critic's weights: d/dw (||w|| - 1)^2 = 2 (||w|| - 1) w / ||w||
    gp.backward()
    w = critic[1].weight.detach()
    torch.testing.assert_close(critic[1].weight.grad, 2 * (w.norm() - 1) * w / w.norm(), rtol=1e-4, atol=1e-5)


def test_critic_scores_one_value_per_image_and_checks_resolution():
    critic = ProGANCritic([16, 8, 8])
    assert critic(torch.randn(4, 3, 16, 16)).shape == (4,)
    with pytest.raises(ValueError, match="16x16"):
        critic(torch.randn(4, 3, 32, 32))


# ----------------------------------------------------------------------------- the stage
def test_gan_stage_trains_exports_and_resumes(compose):
    cfg = compose("train", ["stage=gan", *TINY, "trainer.max_steps=4"])
    run_dir = Path(cfg.output_dir)
    pl.seed_everything(cfg.seed)
    initial = hydra.utils.instantiate(cfg.stage.generator).state_dict()
    train(cfg)

    rows = _metrics(run_dir)
    critic_losses = [float(r["critic/loss"]) for r in rows if r.get("critic/loss")]
    gen_losses = [float(r["generator/loss"]) for r in rows if r.get("generator/loss")]
    assert critic_losses and gen_losses
    assert all(math.isfinite(v) for v in critic_losses + gen_losses)
    assert sorted(p.name for p in (run_dir / "samples").glob("step_*.png")) == ["step_0000002.png"]

    # n_critic=1: 4 optimizer steps = 2 critic + 2 generator steps
    first = load_generator(run_dir / "generator.pt")
    assert first.checkpoint_meta["generator_steps"] == 2 and first.checkpoint_meta["critic_steps"] == 2
    assert first.checkpoint_meta["z_dim"] == 8 and first.checkpoint_meta["widths"] == [8, 8]
    # the exported (EMA) weights moved away from the initial ones
    moved = [k for k, v in first.state_dict().items() if not torch.equal(v, initial[k])]
    assert moved, "training did not change the generator"

    # resume: an 8-step run cut off after step 4 continues from its last checkpoint, counters and clock too
    eight = ["stage=gan", *TINY, "trainer.max_steps=8", "callbacks.checkpoint.every_n_train_steps=4"]
    with pytest.raises(Interrupted):
        train(compose("train", eight + ["+callbacks.interrupt={_target_: conftest.InterruptAt, step: 4}"]))
    cfg2 = compose("train", eight + ["ckpt_path=last"])
    assert Path(cfg2.output_dir) != run_dir  # 8 steps are another run than 4: its own folder
    train(cfg2)
    second = load_generator(Path(cfg2.output_dir) / "generator.pt")
    assert second.checkpoint_meta["generator_steps"] == 4 and second.checkpoint_meta["critic_steps"] == 4
    assert (Path(cfg2.output_dir) / "samples" / "step_0000004.png").is_file()
    # resuming the 4-step run's checkpoint with 6 steps would mix two settings: refused before any work
    with pytest.raises(ValueError, match=r"other settings: trainer\.max_steps \(checkpoint 4, now 6\)"):
        train(compose("train", ["stage=gan", *TINY, "trainer.max_steps=6",
                                f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"]))


def test_export_round_trips_through_load_generator(tmp_path):
    generator = ProGANGenerator(8, [8, 8])
    module = WGANGP(generator, meta={"name": "tiny"})
    with torch.no_grad():  # make the averaged weights differ from a fresh init
        for p in module.generator_ema.parameters():
            p.add_(0.1)
    path = module.export(tmp_path)
    loaded = load_generator(path)
    z = generator.sample_z(3, seed=5)
    torch.testing.assert_close(loaded(z), module.generator_ema(z))
    assert loaded.checkpoint_meta["name"] == "tiny" and loaded.checkpoint_meta["loss"] == "WGAN-GP"


def test_nan_losses_are_skipped_then_stop_training(tmp_path):
    module = WGANGP(ProGANGenerator(8, [8, 8]), sample_every=0, max_nonfinite_steps=3)
    bad = TensorDataset(torch.full((32, 3, 8, 8), float("nan")))
    trainer = pl.Trainer(max_steps=20, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    before = {k: v.clone() for k, v in module.critic.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match="3 steps in a row"):
        trainer.fit(module, DataLoader(bad, batch_size=4))
    assert int(module.skipped_steps) == 3 and int(module.critic_steps) == 0
    assert all(torch.equal(v, before[k]) for k, v in module.critic.state_dict().items())


# ------------------------------------------------------------------------- samples job
def test_samples_job_writes_n_files_and_skips_existing(compose, tmp_path):
    gen_path = WGANGP(ProGANGenerator(8, [8, 8])).export(tmp_path / "gen")
    overrides = ["metric=samples", "metric.n=6", "metric.batch_size=4", "logger=csv", f"model.checkpoint={gen_path}"]
    cfg = compose("evaluate", overrides)
    out = Path(cfg.metric.path)
    assert out == Path(cfg.output_dir) / "images"  # the PNGs alone: logs and records stay beside them
    result = evaluate(cfg)
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == [f"{k:06d}.png" for k in range(6)]
    assert result["written"] == 6 and result["existing"] == 0
    from PIL import Image

    assert Image.open(files[0]).size == (8, 8)

    # resume: existing files are kept as they are, missing ones re-made identically
    kept = files[0].stat().st_mtime_ns
    original = files[3].read_bytes()
    files[3].unlink()
    result = evaluate(compose("evaluate", overrides + ["force=true"]))  # complete before: run again
    assert result["written"] == 1 and result["existing"] == 5
    assert files[0].stat().st_mtime_ns == kept
    assert files[3].read_bytes() == original

    # another seed is another run, in its own folder; pointed at this one's images it is refused
    assert Path(compose("evaluate", overrides + ["seed=1"]).metric.path) != out
    with pytest.raises(ValueError, match="another generator or seed"):
        evaluate(compose("evaluate", overrides + ["seed=1", f"metric.path={out}"]))


# ------------------------------------------------------------------------ shipped GAN
def test_shipped_generator_loads_and_samples_images(compose):
    cfg = compose("evaluate", ["logger=csv"])
    assert ASSET.is_file(), f"{ASSET} is missing: run `python train.py stage=gan data=scenes model=scenes_progan`"
    generator = hydra.utils.instantiate(cfg.model.generator)
    assert generator.z_dim == cfg.model.z_dim and generator.widths == list(cfg.model.widths)
    assert set(cfg.model.inversion_layers) <= set(generator.layer_names)
    with torch.no_grad():
        images = generator(generator.sample_z(4, seed=0))
    assert images.shape == (4, 3, cfg.model.resolution, cfg.model.resolution)
    assert images.min() >= -1 and images.max() <= 1
    assert images.std() > 0.05, "the shipped generator draws flat images"
    meta = generator.checkpoint_meta
    assert meta["generator_steps"] > 0 and "command" in meta and meta["name"] == "scenes_progan"


def test_missing_generator_file_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="stage=gan data=scenes model=scenes_progan"):
        embedded_generator(tmp_path / "nope.pt")
