"""StyleGAN3 from NVlabs snapshots: every golden tensor of NVlabs' own code (configs T and R,
unconditional and conditional), the w+ conventions, bad input, the model config, and every stage on
the fixture at tiny step counts."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from seeing.gans import StyledState, StyleGAN3Generator, load_generator
from seeing.gans.nvlabs_pickle import read_snapshot_generator
from seeing.gans.stylegan3 import from_record, to_internal
from seeing.models.direct_encoder import load_direct_encoder
from seeing.pipeline import evaluate, train

from conftest import QUICK_TRAIN, run_folder

NATIVE = Path(__file__).parent / "fixtures" / "stylegan_native"
T64 = NATIVE / "sg3_t_64.pkl"  # config T, unconditional, 64 px, conv_clamp 256
R32 = NATIVE / "sg3_r_cond_32.pkl"  # config R (radial filters, 1x1 convs), 4 classes, 32 px, conv_clamp 4
TOL = 1e-4


def golden(path: Path) -> dict:
    return torch.load(path.with_name(path.stem + "_golden.pt"), weights_only=True)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


def class_option(ref: dict) -> dict:
    return {"class_index": int(ref["class_index"])} if "class_index" in ref else {}


# ----------------------------------------------------------------------------------- goldens
@pytest.mark.parametrize("path", [T64, R32], ids=["T-64", "R-conditional-32"])
@torch.no_grad()
def test_every_golden_tensor_of_nvlabs_code(path):
    ref = golden(path)
    options = class_option(ref)
    diffs = {}
    for psi, key in [(1.0, "psi1"), (0.7, "psi0p7")]:
        g = load_generator(path, truncation_psi=psi, **options)
        state = g.run(ref["z"], stop="mapping")
        assert isinstance(state, StyledState) and state.x is None
        diffs[f"ws_{key}"] = max_diff(state.ws, ref[f"ws_{key}"])
        diffs[f"img_{key}"] = max_diff(g(ref["z"]), ref[f"img_{key}"])
        # rendering upstream's ws is upstream's G.synthesis(ws), whatever truncation g applies
        diffs[f"img_synthesis_{key}"] = max_diff(g.render_latent(ref[f"ws_{key}"]), ref[f"img_synthesis_{key}"])
    assert max_diff(ref["img_psi0p7"], ref["img_psi1"]) > 100 * TOL  # truncation really changes the image
    g = load_generator(path, **options)
    diffs["w_avg"] = max_diff(g.mapping.w_avg, ref["w_avg"])
    diffs["w_psi1"] = max_diff(g.latent_of(ref["z"])[:, 0], ref["ws_psi1"][:, 0])
    # one w per row of w+: a wrong row-to-layer assignment misses this one
    num_ws, z_dim = g.num_ws, g.z_dim
    ws_mixed = g.latent_of(ref["z_mixed"].reshape(-1, z_dim))[:, 0].reshape(len(ref["z"]), num_ws, -1)
    diffs["ws_mixed"] = max_diff(ws_mixed, ref["ws_mixed"])
    diffs["img_mixed"] = max_diff(g.render_latent(ref["ws_mixed"]), ref["img_mixed"])
    # every layer's output (upstream's names), sample 0 at psi 1
    inverse = {upstream: name for name, upstream in g.upstream_names.items()}
    features = g.features(ref["z"][:1], [inverse[k] for k in ref["intermediates_psi1"]])
    for upstream, expected in ref["intermediates_psi1"].items():
        diffs[upstream] = max_diff(features[inverse[upstream]].x, expected)
    if "ws_psi0p5_cutoff3" in ref:  # upstream's truncation_cutoff: only rows 0..2 move
        cut = load_generator(path, truncation_psi=0.5, truncation_cutoff=3, **options)
        diffs["ws_psi0p5_cutoff3"] = max_diff(cut.latent_of(ref["z"]), ref["ws_psi0p5_cutoff3"])
        diffs["img_psi0p5_cutoff3"] = max_diff(cut(ref["z"]), ref["img_psi0p5_cutoff3"])
    print(f"\n{path.name} max abs differences: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    assert max(diffs.values()) < TOL, {k: v for k, v in diffs.items() if v >= TOL}
    assert len(diffs) >= 10 + len(ref["intermediates_psi1"])


def test_every_stored_tensor_is_loaded_as_stored():
    record = read_snapshot_generator(T64)
    g = from_record(record)
    stored = to_internal(record.state_dict())
    own = g.state_dict()
    assert set(own) == set(stored)
    assert all(torch.equal(own[k], stored[k]) for k in stored)
    # the perturbed constants are among them
    for key in ("layers.input.freqs", "layers.input.phases", "layers.input.transform", "layers.L4.up_filter",
                "layers.L4.down_filter", "layers.L13.magnitude_ema", "layers.mapping.w_avg"):
        assert key in own
    assert "layers.L14.up_filter" not in own  # ToRGB has identity filters (None upstream)


def test_config_r_keeps_its_radial_filters_and_1x1_convs():
    g = load_generator(R32, class_index=0)
    assert g.layers["L0"].down_filter.ndim == 2 and g.layers["L0"].up_filter.ndim == 1
    assert g.layers["L0"].weight.shape[-1] == 1
    assert g.layers["L13"].down_filter.ndim == 1  # critically sampled: separable


# -------------------------------------------------------------------------------- conventions
@torch.no_grad()
def test_layers_latent_and_truncation_follow_upstream():
    g = load_generator(T64)
    assert isinstance(g, StyleGAN3Generator) and not g.training
    assert all(not p.requires_grad for p in g.parameters())
    assert g.layer_names == ["mapping", "input", *[f"L{k}" for k in range(15)], "output"]
    assert g.upstream_names["L0"] == "synthesis.L0_36_16" and g.upstream_names["L14"] == "synthesis.L14_64_3"
    assert (g.z_dim, g.num_ws, g.w_dim, g.resolution) == (64, 16, 64, 64)
    assert g.latent_name == "mapping" and g.latent_shape_searched() == (16, 64)
    # psi 0.7 with no cutoff moves every row of w+ toward w_avg (upstream's truncation_cutoff=None)
    z = g.sample_z(3, seed=1)
    ws = g.latent_of(z)
    truncated = load_generator(T64, truncation_psi=0.7).latent_of(z)
    torch.testing.assert_close(truncated, g.mapping.w_avg + 0.7 * (ws - g.mapping.w_avg))
    # the output is the last layer's image times output_scale, raw (upstream's) unless asked to clamp
    image = g(z)
    last = g.features(z, ["L14"])["L14"]
    torch.testing.assert_close(image, last.x * 0.25)
    loud = last._replace(x=last.x * 20)  # the fixture's images stay within [-1, 1]: make them leave it
    assert float(g.run(loud, start="L14").abs().max()) > 2
    clamped = load_generator(T64, clamp_output=True)
    torch.testing.assert_close(clamped.run(loud, start="L14"), g.run(loud, start="L14").clamp(-1, 1))
    # a sample does not depend on the rest of its batch
    torch.testing.assert_close(g(z[:1]), image[:1], atol=1e-6, rtol=0)
    # features flow as styled states: every synthesis layer's map, w+ carried along
    features = g.features(z, ["input", "L3", "L13"])
    assert features["input"].x.shape == (3, 16, 36, 36) and features["L13"].x.shape == (3, 8, 64, 64)
    torch.testing.assert_close(g.run(features["L3"], start="L3"), image)


def test_conditional_snapshot_needs_its_class():
    with pytest.raises(ValueError, match=r"sg3_r_cond_32\.pkl: this StyleGAN3 is conditional with 4 classes: "
                                         r"choose one with class_index=K \(model\.class_index=K\)"):
        load_generator(R32)
    with pytest.raises(ValueError, match=r"class_index=4 is not one of this StyleGAN3's 4 classes"):
        load_generator(R32, class_index=4)
    with pytest.raises(ValueError, match=r"unconditional \(c_dim 0\); class_index=1 cannot be honoured"):
        load_generator(T64, class_index=1)
    z = torch.randn(2, 64)
    with torch.no_grad():
        assert max_diff(load_generator(R32, class_index=1)(z), load_generator(R32, class_index=2)(z)) > 1e-3


def test_bad_stylegan3_input_is_refused_clearly(tmp_path):
    with pytest.raises(TypeError, match=r"nvlabs_stylegan3 takes no option\(s\) \['truncation_layers'\]"):
        load_generator(T64, truncation_layers=8)
    missing = tmp_path / "stylegan3-t-ffhqu-256x256.pkl"
    with pytest.raises(FileNotFoundError, match=r"stylegan3-t-ffhqu-256x256\.pkl\. Expected a local copy of one of: "
                                                r"stylegan3-t-ffhqu-256x256\.pkl.*never downloaded"):
        load_generator(missing, layout="stylegan3")
    with pytest.raises(ValueError, match=r"rosinality_64\.pt has layout rosinality_stylegan2 \(model=stylegan2\) but "
                                         r"layout='stylegan3'.*choose model=stylegan2"):
        load_generator(NATIVE / "rosinality_64.pt", layout="stylegan3")
    with pytest.raises(ValueError, match=r"sg3_t_64\.pkl has layout nvlabs_stylegan3 \(model=stylegan3\) but "
                                         r"layout='stylegan2'"):
        load_generator(T64, layout="stylegan2")
    with pytest.raises(ValueError, match="truncation_cutoff"):
        load_generator(T64, truncation_cutoff=-1)


# ------------------------------------------------------------------------------ model config
def test_model_config_builds_the_golden_generator(compose):
    ref = golden(R32)
    cfg = compose("train", ["stage=layer1", "model=stylegan3", f"model.checkpoint={R32}", "model.truncation_psi=0.7",
                            f"model.class_index={int(ref['class_index'])}"])
    assert cfg.model.id == "stylegan3-sg3_r_cond_32" and list(cfg.model.inversion_layers) == ["input", "L0", "L1"]
    assert cfg.recipe.name == "paper" and cfg.stage.architecture == "ganseeing"  # a public model's recipe
    with torch.no_grad():
        assert max_diff(instantiate(cfg.model.generator)(ref["z"]), ref["img_psi0p7"]) < TOL
    cfg = compose("train", ["stage=layer1", "model=stylegan3", f"model.checkpoint={R32}"])
    with pytest.raises(Exception, match=r"conditional with 4 classes.*model\.class_index=K"):
        instantiate(cfg.model.generator)


def test_model_config_needs_a_checkpoint_and_real_layer_names(compose):
    with pytest.raises(ValueError, match=r"model\.checkpoint="):
        train(compose("train", ["model=stylegan3", "stage=layer1", *QUICK_TRAIN]))
    cfg = compose("train", ["model=stylegan3", f"model.checkpoint={T64}", "stage=layer1",
                            "model.inversion_layers=[input,L0_36_16]", *QUICK_TRAIN])
    with pytest.raises(Exception, match=r"unknown layer 'L0_36_16'.*'input', 'L0', 'L1'"):
        train(cfg)


# --------------------------------------------------------------------------- every stage
STEPS = ["trainer.max_steps=1", "trainer.val_check_interval=1", "trainer.num_sanity_val_steps=0",
         "stage.batch_size=2", "stage.val_size=2", "stage.val_batch_size=2", "stage.grid_size=2"]


def test_every_stage_runs_on_the_stylegan3_fixture(compose, tmp_path):
    """layer1..3, encoder, hybrid, direct encoder, the reconstruction variants a-f, the ablation and FSD
    on samples, at tiny step counts, along model.inversion_layers' preset chain."""
    model = ["model=stylegan3", f"model.checkpoint={T64}", *QUICK_TRAIN]
    runs = tmp_path / "runs" / "stylegan3-sg3_t_64"
    files = []  # the hybrid is given the files (the lookup by identity is tested elsewhere, and slow)
    for stage in ["layer1", "layer2", "layer3", "encoder", "hybrid", "direct_encoder"]:
        extra = files if stage == "hybrid" else []
        metrics = train(compose("train", [f"stage={stage}", *model, *STEPS, *extra]))
        assert all(math.isfinite(v) for k, v in metrics.items() if k.startswith("val/")), metrics
        files.append(f"+stage.stage_files.{stage}={run_folder(runs, stage) / f'{stage}.pt'}")
    assert "val/corr_z" in metrics  # the direct encoder's latent: w+ here
    direct = load_direct_encoder(run_folder(runs, "direct_encoder") / "direct_encoder.pt", load_generator(T64))
    assert direct(torch.zeros(1, 3, 64, 64)).shape == (1, 16, 64)
    hybrid = torch.load(run_folder(runs, "hybrid") / "hybrid.pt", weights_only=True)
    assert list(hybrid["inverters"]) == ["input", "L0", "L1"]

    encoders = [f"stage.hybrid_file={run_folder(runs, 'hybrid') / 'hybrid.pt'}",
                f"stage.direct_encoder_file={run_folder(runs, 'direct_encoder') / 'direct_encoder.pt'}"]
    recon = ["stage=reconstruct", "stage.targets.kind=generated", "stage.targets.count=2", "stage.steps=2",
             "stage.loss.perceptual=none", *encoders]
    for variant in "abcdef":
        cfg = compose("train", [*recon, f"variant={variant}", *model])
        train(cfg)
        result = torch.load(Path(cfg.output_dir) / "reconstruction.pt", weights_only=True)
        if variant == "f":  # corrections at the outputs of the inversion layers before the last
            assert result["positions"] == ["input", "L0"]
        assert torch.isfinite(result["final"]).all() and result["final"].shape == (2, 3, 64, 64)
    rows = evaluate(compose("evaluate", ["metric=ablation", "model=stylegan3", f"model.checkpoint={T64}",
                                         "metric.mix=true", "logger=csv"]))
    assert {r["variant"] for r in rows} == set("abcdef")

    cfg = compose("evaluate", ["metric=fsd", "fake=generator", "model=stylegan3", f"model.checkpoint={R32}",
                               "model.class_index=2", "metric.n=4", "metric.batch_size=2", "metric.progress=false",
                               "logger=csv"])
    evaluate(cfg)
    report = json.loads((Path(cfg.output_dir) / "fsd.json").read_text())
    assert report["n"] == 4 and math.isfinite(report["fsd"])


def test_the_first_inverter_of_a_full_width_stylegan3_pools_its_map_before_the_latent_conv():
    from seeing.models.inverters import InverterSpec, LayerInverter

    # a published StyleGAN3's first inversion layer: 512 x 36 x 36 back to w+ (16 x 512)
    spec = InverterSpec(layer="input", target="mapping", in_shape=(512, 36, 36), out_shape=(16, 512),
                        hidden_channels=32)
    inverter = LayerInverter(spec)
    assert inverter.net.to_latent.weight.shape == (16 * 512, 32, 4, 4)
    assert inverter(torch.randn(2, 512, 36, 36)).shape == (2, 16, 512)
