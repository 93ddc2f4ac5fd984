"""Per-image layer-wise reconstruction (stage=reconstruct) on tiny random generators: batch
independence, falling loss, delta=0 == the encoder's reconstruction, resume, the VGG wiring and
the errors for missing weights and encoders."""
from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from seeing.gans import ProGANGenerator
from seeing.models.hybrid import new_hybrid_encoder
from seeing.stages.reconstruct import Reconstructor, correction_positions
from seeing.reconstruct.init import RANDOM_START_SEED, initial_latents
from seeing.reconstruct.losses import VGG16_FILE, RELU4_2, ReconstructionLoss, VGGPerceptual
from seeing.stages.variants import build_reconstructor, find_direct_encoder, find_hybrid

from conftest import vgg_by_hand

LAYERS = ["layer1", "layer2", "layer3", "layer4"]


def quiet_trainer(**kwargs) -> pl.Trainer:
    opts = dict(max_steps=-1, max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, accelerator="cpu", devices=1)
    opts.update(kwargs)
    return pl.Trainer(**opts)


@pytest.fixture(scope="module")
def world():
    """A tiny random 16x16 ProGAN, a random hybrid encoder for it, and 8 targets that the
    generator can almost (not exactly) draw: its own samples, slightly perturbed."""
    torch.manual_seed(0)
    g = ProGANGenerator(z_dim=16, widths=[16, 16, 8]).eval()
    hybrid = new_hybrid_encoder(g, LAYERS).eval()
    with torch.no_grad():
        x = (g(g.sample_z(8, seed=3)) + 0.1 * torch.randn(8, 3, 16, 16)).clamp(-1, 1)
    z0 = initial_latents("hybrid", g, x, torch.arange(8), encoder=hybrid)
    return g, hybrid, x, z0


def make(world, images=None, z0=None, positions=None, steps=12, batch_size=8, **kw) -> Reconstructor:
    g, _, x, z = world
    images = x if images is None else images
    z0 = z if z0 is None else z0
    positions = correction_positions("deltas", LAYERS) if positions is None else positions
    return Reconstructor(g, images, z0, positions, steps=steps, batch_size=batch_size, **kw)


def test_corrections_go_at_layers_1_to_n_minus_1():
    assert correction_positions("deltas", LAYERS) == ["layer1", "layer2", "layer3"]
    assert correction_positions("deltas", LAYERS, latent=True) == ["z", "layer1", "layer2", "layer3"]
    assert correction_positions("z", LAYERS) == ["z"] and correction_positions("none", LAYERS) == []
    with pytest.raises(ValueError, match="none, z or deltas"):
        correction_positions("everything", LAYERS)


def test_zero_corrections_give_the_encoders_reconstruction(world):
    g, hybrid, x, z0 = world
    module = make(world, steps=0)
    result = module.result()
    with torch.no_grad():
        expected = hybrid.generate(g, hybrid(x))
    assert torch.allclose(result["initial"], expected, atol=1e-6)
    assert torch.allclose(result["final"], expected, atol=1e-6)
    # a non-zero correction changes the image, and only the image it belongs to
    with torch.no_grad():
        module.deltas[0]["layer2"][5].fill_(0.5)
    changed = (module.result()["final"] - expected).flatten(1).abs().amax(1)
    assert changed[5] > 1e-3 and torch.all(changed[torch.arange(8) != 5] == 0)


def test_an_image_result_does_not_depend_on_its_batch(world):
    """Image 5 alone, in a batch of 8 and in chunks of 3 reaches the same corrections and loss curve."""
    g, _, x, z0 = world
    batch = make(world, steps=10, batch_size=8)
    quiet_trainer().fit(batch)
    alone = make(world, images=x[5:6], z0=z0[5:6], steps=10, batch_size=1)
    quiet_trainer().fit(alone)
    chunked = make(world, steps=10, batch_size=3)  # image 5 sits in chunk 1 with images 3, 4
    quiet_trainer().fit(chunked)
    rb, ra, rc = batch.result(), alone.result(), chunked.result()
    assert rb["steps_done"] == ra["steps_done"] == rc["steps_done"] == 10
    for p in ["layer1", "layer2", "layer3"]:
        assert torch.allclose(batch.deltas[0][p][5], alone.deltas[0][p][0], atol=1e-4), p
        assert torch.allclose(chunked.deltas[1][p][2], alone.deltas[0][p][0], atol=1e-4), p
    assert torch.allclose(rb["final"][5], ra["final"][0], atol=1e-4)
    assert torch.allclose(rb["loss_curves"][5], ra["loss_curves"][0], atol=1e-5)
    assert torch.allclose(rc["loss_curves"], rb["loss_curves"], atol=1e-5)
    # the test can fail: other images really moved differently
    assert not torch.allclose(batch.deltas[0]["layer2"][4], batch.deltas[0]["layer2"][5], atol=1e-3)


def test_loss_falls_for_every_image(world):
    module = make(world, steps=40, milestones=[0.75])
    quiet_trainer().fit(module)
    r = module.result()
    curves = r["loss_curves"]
    assert torch.isfinite(curves).all()
    assert torch.all(curves[:, -1] < 0.8 * curves[:, 0]), curves[:, [0, -1]]
    assert torch.all(r["final_pixel_l1"] < r["initial_pixel_l1"])
    # the pixel term alone: at step 0 (no correction yet) it is the encoder's error; later the
    # loss also pays lambda * sum mean(delta^2), so it lies strictly above the pixel curve
    pixel = r["pixel_curves"]
    assert torch.allclose(pixel[:, 0], r["initial_pixel_l1"], atol=1e-6)
    assert torch.allclose(curves[:, 0], pixel[:, 0], atol=1e-7)
    assert torch.all(curves[:, 1:] > pixel[:, 1:])
    assert set(r["delta_rms"]) == {"layer1", "layer2", "layer3"} and r["delta_rms"]["layer2"].min() > 0


def test_z_optimisation_moves_only_the_latent(world):
    g, _, x, z0 = world
    module = make(world, positions=["z"], steps=15)
    quiet_trainer().fit(module)
    r = module.result()
    assert not torch.allclose(r["final_latents"], z0)
    with torch.no_grad():
        assert torch.allclose(r["final"], g(r["final_latents"]), atol=1e-5)
    assert float(r["loss_curves"][:, -1].mean()) < float(r["loss_curves"][:, 0].mean())
    # a latent that moves freely (no penalty): the loss is the pixel term
    assert torch.allclose(r["pixel_curves"], r["loss_curves"], atol=1e-7)


def test_resume_continues_exactly_where_it_stopped(world, tmp_path):
    straight = make(world, steps=8, batch_size=4)  # two chunks: 16 training steps
    quiet_trainer().fit(straight)

    ckpt_dir = tmp_path / "checkpoints"
    first = make(world, steps=8, batch_size=4)
    quiet_trainer(max_steps=6, enable_checkpointing=True, default_root_dir=tmp_path,
                  callbacks=[ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=3, save_last=True,
                                             save_top_k=0)]).fit(first)
    ckpt = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 6
    assert not any(k.startswith("generator.") for k in ckpt["state_dict"]), "frozen weights in the checkpoint"
    assert torch.isnan(ckpt["state_dict"]["loss_curves"][:, 3:]).all()

    resumed = make(world, steps=8, batch_size=4)
    quiet_trainer().fit(resumed, ckpt_path=str(ckpt_dir / "last.ckpt"))
    assert resumed.global_step == 16
    for c in range(2):
        for p in ["layer1", "layer2", "layer3"]:
            assert torch.allclose(resumed.deltas[c][p], straight.deltas[c][p], atol=1e-6), (c, p)
    assert torch.allclose(resumed.loss_curves, straight.loss_curves, atol=1e-6)
    assert torch.allclose(resumed.pixel_curves, straight.pixel_curves, atol=1e-6)

    # a checkpoint of other targets is refused
    g, _, x, z0 = world
    other = make(world, images=x.flip(0), steps=8, batch_size=4)
    with pytest.raises(ValueError, match="other targets"):
        quiet_trainer().fit(other, ckpt_path=str(ckpt_dir / "last.ckpt"))


def test_a_diverging_image_is_stopped_counted_and_loses_nothing(world, caplog):
    """Image 2's loss is non-finite: it keeps its last finite corrections, the others go on as if it were absent."""
    g, _, x, z0 = world
    bad = x.clone()
    bad[2, 0, 0, 0] = float("nan")
    with_bad = make(world, images=bad, steps=6, batch_size=4)
    quiet_trainer().fit(with_bad)
    r = with_bad.result()
    assert r["diverged"].tolist() == [i == 2 for i in range(8)] and r["steps_done"] == 6
    assert "images [2]" in caplog.text
    assert torch.isnan(r["loss_curves"][2]).all() and torch.isfinite(r["loss_curves"][[0, 1, 3]]).all()
    for p in ["layer1", "layer2", "layer3"]:  # never moved: diverged at its first step
        assert torch.equal(with_bad.deltas[0][p][2], torch.zeros_like(with_bad.deltas[0][p][2])), p
    keep = [0, 1, 3, 4, 5, 6, 7]
    without = make(world, images=x[keep], z0=z0[keep], steps=6, batch_size=4)
    quiet_trainer().fit(without)
    # its chunk-mates (0, 1, 3) and the other chunk reach what they reach without it
    assert torch.allclose(r["final"][keep], without.result()["final"], atol=1e-4)
    assert torch.allclose(r["loss_curves"][keep], without.result()["loss_curves"], atol=1e-5)

    # diverging mid-run (the target turns bad before step 3): back to the corrections that last gave a finite
    # loss, those after two updates, and the loss curve keeps its first three values
    class SpoilTarget(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == 3:
                module.targets[2, 0, 0, 0] = float("nan")

    late = make(world, steps=6, batch_size=8, milestones=[])
    quiet_trainer(callbacks=[SpoilTarget()]).fit(late)
    two = make(world, steps=2, batch_size=8, milestones=[])
    quiet_trainer().fit(two)
    for p in ["layer1", "layer2", "layer3"]:
        assert torch.allclose(late.deltas[0][p][2], two.deltas[0][p][2], atol=1e-6), p
        assert not torch.allclose(late.deltas[0][p][3], two.deltas[0][p][3], atol=1e-4), p  # others went on
    assert torch.isfinite(late.loss_curves[2, :3]).all() and torch.isnan(late.loss_curves[2, 3:]).all()

    # when every image diverges there is nothing left to do: a clear error
    with pytest.raises(FloatingPointError, match="no image is left"):
        quiet_trainer().fit(make(world, images=torch.full_like(x, float("nan")), steps=3))


def test_random_and_mean_starts_are_per_image_and_batch_free(world):
    g, _, x, _ = world
    ids = torch.tensor([7, 2, 9])
    z = initial_latents("random", g, x[:3], ids, seed=4)
    assert torch.equal(z[1], initial_latents("random", g, x[:1], torch.tensor([2]), seed=4)[0])
    assert torch.equal(z[0], g.sample_z(8, seed=RANDOM_START_SEED + 4)[7])
    # never the latent a generated target with the same small seed came from
    assert not torch.allclose(initial_latents("random", g, x[:3], ids, seed=0), g.sample_z(10, seed=0)[ids])
    mean = initial_latents("mean", g, x[:3], ids, mean_samples=2000)
    assert torch.equal(mean[0], mean[2]) and mean.abs().max() < 0.2  # the mean of N(0, I) draws
    with pytest.raises(ValueError, match="needs its encoder"):
        initial_latents("hybrid", g, x[:3], ids)


# ------------------------------------------------------------------ perceptual loss
def _random_vgg_file(path: Path) -> Path:
    """Random weights for torchvision VGG-16's trunk, saved under torchvision's key names."""
    from torchvision.models import vgg16

    with torch.device("meta"):
        trunk = vgg16(weights=None).features[:RELU4_2]
    trunk = trunk.to_empty(device="cpu")
    torch.manual_seed(1)
    for m in trunk.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight)
            torch.nn.init.normal_(m.bias, std=0.01)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({f"features.{k}": v for k, v in trunk.state_dict().items()}, path)
    return path


def test_vgg_perceptual_term_uses_relu4_2_features(tmp_path, monkeypatch):
    weights = _random_vgg_file(tmp_path / "torch" / "hub" / "checkpoints" / VGG16_FILE)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    vgg = VGGPerceptual()  # found in the hub cache
    assert vgg.source == str(weights)
    state = torch.load(weights, weights_only=True)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    # by hand: ImageNet normalisation, then torchvision's conv/relu/pool stack to relu4_2
    h = ((x + 1) / 2 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    h = vgg_by_hand(state, h)
    assert h.shape == (2, 512, 4, 4)
    assert torch.allclose(vgg(x), h, atol=1e-4)

    loss = ReconstructionLoss(perceptual="vgg", perceptual_weight=0.5, vgg_path=weights)
    image = x.clone().requires_grad_(True)
    target = torch.rand(2, 3, 32, 32) * 2 - 1
    terms = loss.terms(image, target)
    expected_perc = (vgg(x) - vgg(target)).abs().flatten(1).mean(1)
    assert torch.allclose(terms["perceptual"], expected_perc, atol=1e-5)
    assert torch.allclose(terms["loss"], terms["pixel"] + 0.5 * expected_perc, atol=1e-5)
    terms["loss"].sum().backward()
    assert image.grad is not None and image.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in loss.parameters())


def test_missing_vgg_weights_name_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}/empty/hub/checkpoints/{VGG16_FILE}"):
        ReconstructionLoss(perceptual="vgg")
    bogus = tmp_path / "bogus.pth"
    torch.save({"classifier.0.weight": torch.zeros(1)}, bogus)
    with pytest.raises(ValueError, match="not a torchvision VGG-16 state dict"):
        ReconstructionLoss(perceptual="vgg", vgg_path=bogus)
    assert ReconstructionLoss(perceptual="none").perceptual is None


def test_delta_penalty_is_per_image_mean_of_squares():
    loss = ReconstructionLoss(delta_weight=0.3, latent_delta_weight=0.0)
    img = torch.zeros(2, 3, 4, 4)
    d = {"layer1": torch.tensor([[1.0, 1.0], [0.0, 2.0]]), "z": torch.ones(2, 5)}
    terms = loss.terms(img, img, d)
    assert torch.allclose(terms["delta"], torch.tensor([0.3 * 1.0, 0.3 * 2.0]))
    assert torch.allclose(terms["loss"], terms["delta"])


def test_missing_encoders_name_the_command_that_makes_them(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"python train\.py model=nomodel \S+ stage=hybrid`"):
        find_hybrid(tmp_path, "nomodel")
    with pytest.raises(FileNotFoundError, match=r"python train\.py model=nomodel \S+ stage=direct_encoder`"):
        find_direct_encoder(tmp_path, "nomodel")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_hybrid(tmp_path, "nomodel", explicit=tmp_path / "nope.pt")


def test_builder_generated_targets_keep_their_true_latents(world):
    g, hybrid, _, _ = world
    module = build_reconstructor(g, LAYERS, {"name": "f", "init": "hybrid", "optimize": "deltas"},
                                 {"kind": "generated", "count": 3, "seed": 5, "offset": 2}, steps=0, hybrid=hybrid)
    r = module.result()
    assert torch.equal(r["true_latents"], g.sample_z(5, seed=5)[2:])
    with torch.no_grad():
        assert torch.allclose(r["targets"], g(r["true_latents"]).clamp(-1, 1))
        truth = g.features(r["true_latents"], LAYERS)
    assert set(r["true_features"]) == {"z", *LAYERS}
    assert torch.allclose(r["true_features"]["layer3"], truth["layer3"])
    assert r["recovered_features"]["layer4"].shape == truth["layer4"].shape
