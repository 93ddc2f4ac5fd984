"""The paper's recipe (conf/recipe/paper.yaml): the public models' stages resolve to the reference
code's settings, the embedded world keeps its own, the command line still wins; the pieces it
needs (step-milestone schedules, frozen hybrid sub-modules, VGG on the raw image, the encoder
term, L-BFGS over z one image at a time, the FSD sizes, the missing-photos error) on tiny and
full-size random networks."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import hydra
import pytest
import pytorch_lightning as pl
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from PIL import Image

from seeing.config import instantiate
from seeing.gans import ProGANGenerator
from seeing.models.hybrid import load_hybrid_encoder, new_hybrid_encoder
from seeing.pipeline import train
from seeing.reconstruct.lbfgs import PerImageLBFGS
from seeing.reconstruct.losses import ReconstructionLoss, VGGPerceptual
from seeing.stages.reconstruct import load_result
from seeing.stages.variants import build_reconstructor

from conftest import FIXTURES, QUICK_TRAIN, vgg_by_hand
from test_reconstruct import _random_vgg_file

LAYERS = ["layer1", "layer2", "layer3", "layer4"]
# a public-layout ProGAN-256 file with tiny widths (GAN Dissection's key layout)
PROGAN_256 = FIXTURES / "checkpoints" / "ganseeing_proggan_256.pt"
PUBLIC = ["progan", "wgangp", "stylegan", "stylegan2"]


def resolved(cfg, key):
    value = OmegaConf.select(cfg, key, throw_on_missing=True)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def settings(cfg, keys):
    return {k: resolved(cfg, k) for k in keys}


SCHEDULE = ["stage.lr", "stage.lr_decay", "stage.milestones", "stage.gamma", "stage.batch_size", "trainer.max_steps"]

# the reference code's values (train_onelayer_inv.py, train_multilayer_inv.py, train_hybrid_inv.py,
# optimize_residuals.py, optimize_z_lbfgs.py)
PAPER = {
    "layer1": {"stage.architecture": "ganseeing", "stage.lr": 1e-4, "stage.lr_decay": "multistep",
               "stage.milestones": [2000, 6000], "stage.gamma": 0.1, "stage.batch_size": 32,
               "trainer.max_steps": 10000},
    "encoder": {"stage.architecture": "ganseeing", "stage.lr": 1e-2, "stage.lr_decay": "none",
                "stage.batch_size": 32, "trainer.max_steps": 10000},
    "hybrid": {"stage.lr": 1e-5, "stage.lr_decay": "multistep", "stage.milestones": [5000, 15000, 35000],
               "stage.gamma": 0.5, "stage.batch_size": 32, "trainer.max_steps": 100000,
               "stage.freeze": ["inverters.*.net.conv3"]},
    "reconstruct_f": {"stage.optimizer": "adam", "stage.lr": 0.01, "stage.milestones": [800, 1200, 1800],
                      "stage.gamma": 0.5, "stage.steps": 3000, "stage.loss.perceptual": "vgg",
                      "stage.loss.perceptual_input": "raw", "stage.loss.perceptual_weight": 1.0,
                      "stage.loss.delta_weight": 1.0, "stage.loss.encoder_weight": 0.0},
    "reconstruct_e": {"stage.optimizer": "lbfgs", "stage.lr": 1.0, "stage.milestones": [], "stage.steps": 3000,
                      "stage.loss.perceptual": "none", "stage.loss.encoder_weight": 0.25,
                      "stage.loss.latent_delta_weight": 0.0},
}
PAPER["layer2"] = {**PAPER["layer1"], "stage.milestones": [6000, 8000]}
PAPER["layer3"] = PAPER["layer4"] = PAPER["layer1"]

# the embedded world's (unchanged by the recipes)
EMBEDDED = {
    "layer1": {"stage.architecture": "seeing", "stage.lr": 1e-3, "stage.lr_decay": "cosine", "stage.batch_size": 32,
               "trainer.max_steps": 3000},
    "encoder": {"stage.architecture": "seeing", "stage.lr": 1e-3, "stage.lr_decay": "cosine",
                "trainer.max_steps": 5000},
    "hybrid": {"stage.lr": 5e-4, "stage.lr_decay": "cosine", "stage.freeze": [], "trainer.max_steps": 3000},
    "reconstruct_f": {"stage.optimizer": "adam", "stage.lr": 0.01, "stage.milestones": [0.5, 0.75],
                      "stage.gamma": 0.1, "stage.steps": 3000, "stage.batch_size": 32,
                      "stage.loss.perceptual": "none", "stage.loss.perceptual_input": "imagenet",
                      "stage.loss.delta_weight": 0.01, "stage.loss.encoder_weight": 0.0},
}
EMBEDDED["layer2"] = EMBEDDED["layer3"] = EMBEDDED["layer4"] = EMBEDDED["layer1"]
EMBEDDED["reconstruct_e"] = EMBEDDED["reconstruct_f"]


def stage_overrides(name: str) -> list[str]:
    if name.startswith("reconstruct_"):
        return ["stage=reconstruct", f"variant={name[-1]}", "stage.targets.kind=generated"]
    return [f"stage={name}"]


# ------------------------------------------------------------------ configuration
@pytest.mark.parametrize("model", PUBLIC)
def test_public_models_resolve_every_stage_to_the_reference_values(compose, model):
    for name, expected in PAPER.items():
        cfg = compose("train", [*stage_overrides(name), f"model={model}", "model.checkpoint=/w/any.pth"])
        assert cfg.recipe.name == "paper"
        assert settings(cfg, expected) == expected, (model, name)
    # the paper's FSD sizes come with the same models
    fsd = compose("evaluate", ["metric=fsd", f"model={model}", "model.checkpoint=/w/any.pth"])
    assert fsd.metric.n == 10000 and fsd.metric.resolution == "auto"


def test_the_command_line_still_wins_and_unknown_keys_still_fail(compose):
    model = ["model=progan", "model.checkpoint=/w/any.pth"]
    cfg = compose("train", ["stage=layer2", *model, "stage.lr=3e-4", "stage.milestones=[10,20]",
                            "trainer.max_steps=40", "stage.architecture=seeing"])
    assert settings(cfg, ["stage.lr", "stage.milestones", "trainer.max_steps", "stage.architecture",
                          "stage.gamma"]) == {"stage.lr": 3e-4, "stage.milestones": [10, 20],
                                              "trainer.max_steps": 40, "stage.architecture": "seeing",
                                              "stage.gamma": 0.1}
    e = compose("train", ["stage=reconstruct", "variant=e", *model, "stage.targets.kind=generated",
                          "stage.optimizer=adam", "stage.lr=0.05", "stage.loss.encoder_weight=0"])
    assert settings(e, ["stage.optimizer", "stage.lr", "stage.loss.encoder_weight"]) == {
        "stage.optimizer": "adam", "stage.lr": 0.05, "stage.loss.encoder_weight": 0}
    # a recipe value, or the whole recipe, can be chosen too
    assert compose("train", ["stage=hybrid", *model, "recipe.hybrid.lr=2e-5"]).stage.lr == 2e-5
    assert settings(compose("train", ["stage=layer1", "recipe=paper"]), PAPER["layer1"]) == PAPER["layer1"]
    assert settings(compose("train", ["stage=layer1", *model, "recipe=embedded"]),
                    EMBEDDED["layer1"]) == EMBEDDED["layer1"]
    for bad in ["stage.lrr=1", "stage.loss.encoder_wieght=1", "recipe.layer.lrr=1"]:
        with pytest.raises(ConfigCompositionException, match=bad.split("=")[0].rsplit(".", 1)[-1]):
            compose("train", ["stage=reconstruct" if "loss" in bad else "stage=layer1", *model, bad])
    with pytest.raises(ConfigCompositionException, match="recipe/nope"):
        compose("train", ["stage=layer1", "recipe=nope"])


def test_the_embedded_world_keeps_its_tuned_recipe(compose):
    for name, expected in EMBEDDED.items():
        cfg = compose("train", stage_overrides(name))
        assert cfg.recipe.name == "embedded"
        assert settings(cfg, expected) == expected, name
    # its reconstructions default to the held-out scenes, and FSD to 1000 a side
    cfg = compose("train", ["stage=reconstruct"])
    assert cfg.stage.targets.source.name == "scenes_heldout" and cfg.stage.name == "reconstruct_real_f"
    assert compose("evaluate", ["metric=fsd"]).metric.n == 1000
    assert compose("evaluate", ["metric=reconstruction"]).stage.targets.source.name == "scenes_heldout"


def test_fsd_between_public_sources_is_the_papers_256_px_and_10000_a_side(compose):
    from seeing.reports.fsd_report import fsd_resolution

    cfg = compose("evaluate", ["metric=fsd", "model=progan", f"model.checkpoint={PROGAN_256}",
                               "real=folder", "real.path=/data/churches"])
    real, fake = hydra.utils.instantiate(cfg.real), hydra.utils.instantiate(cfg.fake)
    assert fsd_resolution(cfg.metric.resolution, real, fake) == 256 and cfg.metric.n == 10000
    assert compose("evaluate", ["metric=samples", "model=stylegan2", "model.checkpoint=/w/x.pth"]).metric.n == 10000


def test_a_public_models_reconstruction_needs_named_photos(compose, tmp_path):
    runs = tmp_path / "runs"
    base = ["stage=reconstruct", "model=progan", f"model.checkpoint={PROGAN_256}", *QUICK_TRAIN]
    with pytest.raises(ValueError) as err:
        train(compose("train", base))
    for words in ["real=folder real.path=", "real=lsun", "stage.targets.kind=generated",
                  f"model=progan model.checkpoint={PROGAN_256}"]:
        assert words in str(err.value), words
    assert not runs.exists()  # before any work: no folder, no generator loaded
    # each way out composes
    assert compose("train", [*base, "real=folder", "real.path=/p"]).stage.targets.source.path == "/p"
    assert compose("train", [*base, "stage.targets.kind=generated"]).stage.targets.source is None


# ------------------------------------------------------------------ the modules
def test_layer_and_encoder_stages_build_the_released_modules(compose, tmp_path):
    model = ["model=progan", f"model.checkpoint={PROGAN_256}"]
    layer2 = instantiate(compose("train", ["stage=layer2", *model]).stage)
    spec = layer2.inverter.spec
    assert spec.architecture == "ganseeing" and not spec.final_conv  # like the released inv2
    assert [n for n, _ in layer2.inverter.net.named_children()] == ["pnorm", "conv1", "bn1", "relu1", "conv2",
                                                                     "bn2", "relu2"]
    layer1 = instantiate(compose("train", ["stage=layer1", *model]).stage)
    assert [n for n, _ in layer1.inverter.net.named_children()] == ["pnorm", "conv1", "bn1", "relu1", "conv2"]
    assert layer1.inverter.net.conv1.kernel_size == (4, 4) and layer1.inverter.net.conv1.bias is not None
    encoder = instantiate(compose("train", ["stage=encoder", *model]).stage)
    assert encoder.encoder.spec.architecture == "ganseeing" and len(encoder.encoder.head) == 2
    # its trunk starts from PyTorch's default init, as the reference's (uniform within 1/sqrt(fan_in))
    conv1 = encoder.encoder.trunk[0].weight
    assert conv1.abs().max() <= 1 / math.sqrt(3 * 7 * 7) + 1e-6
    # the step-milestone schedule: x0.1 after 2000 and 6000 steps
    sched = layer1.configure_optimizers()["lr_scheduler"]["scheduler"]
    lrs = []
    for step in range(6001):
        lrs.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    assert lrs[1999] == pytest.approx(1e-4) and lrs[2000] == pytest.approx(1e-5)
    assert lrs[5999] == pytest.approx(1e-5) and lrs[6000] == pytest.approx(1e-6)
    with pytest.raises(ValueError, match="absolute step numbers"):
        instantiate(compose("train", ["stage=layer3", *model, "stage.milestones=[0.5]"]).stage)
    # a file of the other architecture is not continued silently
    from seeing.models.hybrid import save_inversion_file
    from seeing.models.inverters import build_layer_inverter

    path = save_inversion_file(tmp_path / "layer3.pt", "inverter",
                               inverters={"layer3": build_layer_inverter(layer1.generator, "layer3")})
    with pytest.raises(ValueError, match="stage.architecture=seeing"):
        instantiate(compose("train", ["stage=layer3", *model, f"stage.inverter_file={path}"]).stage)
    assert instantiate(compose("train", ["stage=layer3", *model, f"stage.inverter_file={path}",
                                         "stage.architecture=seeing"]).stage).inverter.spec.architecture == "seeing"


def test_hybrid_freezes_the_final_convs_of_inverters_3_and_4(compose, tmp_path):
    from seeing.gans import load_generator
    from seeing.models.hybrid import HybridEncoder
    from seeing.models.image_encoder import ImageEncoder, encoder_spec
    from seeing.models.inverters import LayerInverter, inverter_spec, probe_shapes

    g = load_generator(PROGAN_256)
    inverters = {n: LayerInverter(inverter_spec(g, n, architecture="ganseeing")) for n in LAYERS}
    shape = probe_shapes(g, ["layer4"])["layer4"]
    encoder = ImageEncoder(encoder_spec(256, shape, "layer4", architecture="ganseeing"))
    hybrid_file = tmp_path / "hybrid.pt"
    torch.save(HybridEncoder(encoder, inverters).to_file_dict(), hybrid_file)
    over = ["stage=hybrid", "model=progan", f"model.checkpoint={PROGAN_256}", f"stage.hybrid_file={hybrid_file}",
            "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.num_sanity_val_steps=0",
            "stage.batch_size=2", "stage.val_size=2", "stage.val_batch_size=2", "stage.lr=1e-3", *QUICK_TRAIN]
    cfg = compose("train", over)
    module = instantiate(cfg.stage)
    assert module.frozen_modules == ["inverters.layer3.net.conv3", "inverters.layer4.net.conv3"]
    before = {k: v.clone() for k, v in module.encoder.state_dict().items()}
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", limit_val_batches=0)
    trainer.fit(module)
    after = module.encoder.state_dict()
    for key in before:
        if ".conv3." in key:
            assert torch.equal(before[key], after[key]), key
    assert not torch.equal(before["inverters.layer3.net.conv1.weight"], after["inverters.layer3.net.conv1.weight"])
    assert not torch.equal(before["inverters.layer2.net.conv2.weight"], after["inverters.layer2.net.conv2.weight"])
    with pytest.raises(ValueError, match="names no module.*inverters.layer1.net.conv1"):
        instantiate(compose("train", [*over, "stage.freeze=['inverters.*.net.to_previous']"]).stage)


def test_vgg_sees_the_raw_image_and_target_features_are_reused(tmp_path):
    weights = _random_vgg_file(tmp_path / "vgg16.pth")
    state = torch.load(weights, weights_only=True)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    h = x  # by hand: no normalisation, torchvision's conv/relu/pool stack to relu4_2
    h = vgg_by_hand(state, h)
    raw = VGGPerceptual(weights, input="raw")
    assert torch.allclose(raw(x), h, atol=1e-4)
    assert not torch.allclose(VGGPerceptual(weights)(x), h, atol=1e-2)  # the ImageNet-normalised input differs
    with pytest.raises(ValueError, match="perceptual_input"):
        ReconstructionLoss(perceptual="vgg", perceptual_input="bgr", vgg_path=weights)
    loss = ReconstructionLoss(perceptual="vgg", perceptual_input="raw", delta_weight=1.0, vgg_path=weights)
    target = torch.rand(2, 3, 32, 32) * 2 - 1
    delta = {"layer1": torch.randn(2, 4, 2, 2)}
    terms = loss.terms(x, target, delta)
    expected = (raw(x) - raw(target)).abs().flatten(1).mean(1)
    assert torch.allclose(terms["perceptual"], expected, atol=1e-5)
    assert torch.allclose(terms["loss"], terms["pixel"] + expected + delta["layer1"].pow(2).flatten(1).mean(1),
                          atol=1e-5)
    calls = []
    loss.perceptual.register_forward_hook(lambda *a: calls.append(1))
    loss.terms(x, target)
    loss.terms(x, target)
    assert len(calls) == 2  # the image twice, the target once (reused from the first call above)
    target.add_(0.1)  # changed in place: computed afresh
    assert torch.allclose(loss.terms(x, target)["perceptual"], (raw(x) - raw(target)).abs().flatten(1).mean(1),
                          atol=1e-5)


# ------------------------------------------------------------------ L-BFGS, variant e
def test_per_image_lbfgs_solves_each_problem_as_if_alone():
    """Quadratics of very different curvature per image: each converges; one image alone follows
    the same iterates; a step takes at most 10 line-search evaluations."""
    torch.manual_seed(0)
    n, dim = 5, 6
    scale = torch.logspace(-2, 2, n)[:, None] * torch.rand(n, dim).add(0.5)
    centre = torch.randn(n, dim)

    def run(rows, steps=15):
        x = torch.zeros(len(rows), dim, requires_grad=True)
        opt = PerImageLBFGS([x])
        evals = []

        def closure():
            evals.append(1)
            opt.zero_grad()
            loss = (scale[rows] * (x - centre[rows]) ** 2).sum(1)
            loss.sum().backward()
            return loss, {"twice": 2 * loss}

        curve = []
        for _ in range(steps):
            evals.clear()
            start, extras = opt.step(closure)
            assert torch.allclose(extras["twice"], 2 * start)
            assert len(evals) <= 10 + (1 if not curve else 0)
            curve.append(start)
        return x.detach(), torch.stack(curve, 1)

    x, curve = run(list(range(n)))
    assert torch.allclose(x, centre, atol=1e-3) and (curve[:, -1] < 1e-5).all()
    x3, curve3 = run([3])
    assert torch.allclose(curve3[0], curve[3], rtol=1e-4, atol=1e-7) and torch.allclose(x3[0], x[3], atol=1e-5)


@pytest.fixture(scope="module")
def world():
    torch.manual_seed(0)
    g = ProGANGenerator(z_dim=16, widths=[16, 16, 8]).eval()
    return g, new_hybrid_encoder(g, LAYERS).eval()


def variant_e(world, count=6, batch_size=6, steps=12, **kw):
    g, hybrid = world
    return build_reconstructor(g, LAYERS, {"name": "e", "init": "hybrid", "optimize": "z"},
                               {"kind": "generated", "count": count, "seed": 3}, steps=steps, lr=1.0,
                               milestones=[], batch_size=batch_size, optimizer="lbfgs",
                               loss={"encoder_weight": 0.25}, hybrid=hybrid, **kw)


def quiet_fit(module):
    pl.Trainer(max_steps=-1, max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, accelerator="cpu", devices=1).fit(module)
    return module.result()


def test_variant_e_runs_lbfgs_with_the_encoder_term_and_lowers_its_loss(world):
    g, hybrid = world
    module = variant_e(world, steps=20)
    assert isinstance(module.configure_optimizers()[0][0], PerImageLBFGS)
    r = quiet_fit(module)
    curves, pixel = r["loss_curves"], r["pixel_curves"]
    assert torch.isfinite(curves).all() and r["steps_done"] == 20
    assert (curves[:, -1] < 0.5 * curves[:, 0]).all(), curves[:, [0, -1]]
    assert (r["final_pixel_l1"] < r["initial_pixel_l1"]).all()
    # the loss is pixel L1 + 0.25 x MSE(E(x), E(G(z))): above the pixel term where E(G(z)) != E(x)
    with torch.no_grad():
        x, z0 = r["targets"], r["init_latents"]
        enc = (hybrid(g(z0)) - hybrid(x)).pow(2).mean(1)
    assert torch.allclose(curves[:, 0], pixel[:, 0] + 0.25 * enc, atol=1e-5) and (enc > 0).all()
    # only z moved, and G of it is the final image
    assert module.positions == ["z"]
    with torch.no_grad():
        assert torch.allclose(r["final"], g(r["final_latents"]), atol=1e-5)
    # each image its own problem: alone, it follows the same curve (up to float noise, amplified late)
    alone = quiet_fit(variant_e(world, count=4, batch_size=1, steps=6))
    batch = quiet_fit(variant_e(world, count=4, batch_size=4, steps=6))
    assert torch.allclose(alone["loss_curves"], batch["loss_curves"], atol=1e-4)
    assert torch.allclose(alone["final"], batch["final"], atol=1e-3)


def test_variant_e_resumes_its_lbfgs_state(world, tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint

    straight = quiet_fit(variant_e(world, count=2, batch_size=2, steps=6))
    ckpt_dir = tmp_path / "checkpoints"
    first = variant_e(world, count=2, batch_size=2, steps=6)
    pl.Trainer(max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
               default_root_dir=tmp_path, callbacks=[ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=3,
                                                                     save_last=True, save_top_k=0)]).fit(first)
    resumed = variant_e(world, count=2, batch_size=2, steps=6)
    pl.Trainer(max_steps=-1, logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
               enable_checkpointing=False).fit(resumed, ckpt_path=str(ckpt_dir / "last.ckpt"))
    assert torch.allclose(resumed.result()["loss_curves"], straight["loss_curves"], atol=1e-6)


# ------------------------------------------------------------------ full size, end to end
@pytest.fixture(scope="module")
def full_size(tmp_path_factory):
    """A ProGAN-256 at full size with random weights (public key layout), a released-layout hybrid
    encoder with random weights, random VGG-16 weights in torchvision's layout, and one photo."""
    from test_released_encoder import FIXTURE, regenerate

    root = tmp_path_factory.mktemp("full")
    keys = json.loads((FIXTURES / "checkpoints" / "formats.json").read_text())["ganseeing_proggan_256"]["keys"]
    g = torch.Generator().manual_seed(0)
    progan = root / "proggan_random-00000000.pth"
    torch.save({k: torch.randn(shape, generator=g) * 0.5 for k, shape in keys.items()}, progan)
    released = torch.load(FIXTURE, weights_only=False)
    hybrid = root / "random_invert_hybrid_cse.pth"
    torch.save(regenerate(released["keys"], released["seed"]), hybrid)
    vgg = _random_vgg_file(root / "vgg16-397923af.pth")
    photos = root / "photos"
    photos.mkdir()
    pixels = (torch.rand(300, 340, 3) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(photos / "church.png")
    return {"progan": progan, "hybrid": hybrid, "vgg": vgg, "photos": photos}


@pytest.mark.parametrize("variant", ["f", "e"])
def test_paper_recipe_end_to_end_at_full_size(compose, full_size, variant, tmp_path):
    start = time.perf_counter()
    over = ["stage=reconstruct", f"variant={variant}", "model=progan", f"model.checkpoint={full_size['progan']}",
            "real=folder", f"real.path={full_size['photos']}", f"stage.hybrid_file={full_size['hybrid']}",
            f"stage.loss.vgg_path={full_size['vgg']}", "stage.targets.count=1", "stage.steps=2", *QUICK_TRAIN]
    cfg = compose("train", over)
    train(cfg)
    r = load_result(Path(cfg.output_dir) / "reconstruction.pt")
    assert r["targets"].shape == r["final"].shape == (1, 3, 256, 256)
    assert r["meta"]["optimizer"] == ("lbfgs" if variant == "e" else "adam")
    assert r["positions"] == (["z"] if variant == "e" else ["layer1", "layer2", "layer3"])
    assert torch.isfinite(r["loss_curves"]).all() and r["steps_done"] == 2
    if variant == "f":  # pixel + VGG + deltas: the loss lies above the pixel term once deltas move
        assert r["loss_curves"][0, 0] > r["pixel_curves"][0, 0]
    else:  # L-BFGS only accepts steps that lower the loss
        assert r["loss_curves"][0, 1] <= r["loss_curves"][0, 0]
    print(f"full-size variant {variant}: {time.perf_counter() - start:.1f} s")
