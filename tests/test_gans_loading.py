"""load_generator against the golden vectors of every public layout, the full-size key sets,
bad input, the project's own checkpoint format and the Hydra model configs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from seeing.gans import (LAYOUTS, LayeredGenerator, ProGANGenerator, StyledState, WGANGPGenerator, detect_layout,
                         load_generator, save_generator)

CHECKPOINTS = Path(__file__).resolve().parent / "fixtures" / "checkpoints"
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
GOLDEN = ["ganseeing_proggan", "genforce_pggan", "genforce_stylegan", "genforce_stylegan2"]
FORMATS = json.loads((CHECKPOINTS / "formats.json").read_text())
TOL = 1e-4


def golden(name: str) -> dict:
    return torch.load(CHECKPOINTS / f"{name}_256.pt", weights_only=True)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# ----------------------------------------------------------------------------- golden files
@pytest.mark.parametrize("name", GOLDEN)
def test_golden_layout_is_detected(name):
    assert detect_layout(golden(name)["state_dict"]) == name


@pytest.mark.parametrize("name", ["ganseeing_proggan", "genforce_pggan"])
@torch.no_grad()
def test_progan_golden_image_and_layer_features(name):
    ref = golden(name)
    g = load_generator(ref["state_dict"])
    assert isinstance(g, ProGANGenerator)
    assert g.layer_names == [f"layer{i}" for i in range(1, 15)] + ["output_256x256"]
    assert g.z_dim == ref["z"].shape[1] and g.resolution == 256
    image = g(ref["z"])
    assert max_diff(image, ref["image"]) < TOL
    if "features" in ref:
        feats = g.features(ref["z"], list(ref["features"]))
        for layer, expected in ref["features"].items():
            assert max_diff(feats[layer], expected) < TOL, layer


@pytest.mark.parametrize("name", ["genforce_stylegan", "genforce_stylegan2"])
@torch.no_grad()
def test_style_golden_image_w_and_truncated_image(name):
    ref = golden(name)
    raw = load_generator(ref["state_dict"], clamp_output=False)
    state = raw.run(ref["z"], stop="mapping")
    assert isinstance(state, StyledState) and state.ws.shape[1] == raw.num_ws == 14
    assert max_diff(state.ws[:, 0], ref["w"]) < 1e-6
    assert max_diff(raw(ref["z"]), ref["image"]) < TOL
    # the default generator clamps to [-1, 1]
    assert max_diff(load_generator(ref["state_dict"])(ref["z"]), ref["image"].clamp(-1, 1)) < TOL

    truncated = load_generator(ref["state_dict"], clamp_output=False, truncation_psi=0.7, truncation_layers=8)
    image_trunc = truncated(ref["z"])
    assert max_diff(image_trunc, ref["image_trunc"]) < TOL
    assert max_diff(ref["image_trunc"], ref["image"]) > 100 * TOL  # truncation really changes the image
    # truncation is part of the mapping layer: rendering its w+ reproduces the truncated image
    ws = truncated.run(ref["z"], stop="mapping")
    assert max_diff(raw.run(ws, start="mapping"), ref["image_trunc"]) < TOL


# ----------------------------------------------------------------------------- full-size layouts
EXPECTED_FULL_SIZE = {
    "ganseeing_proggan_256": ("ProGANGenerator", 512, 256, 15),
    "genforce_pggan_256": ("ProGANGenerator", 512, 256, 15),
    "genforce_stylegan_256": ("StyleGANGenerator", 512, 256, 16),
    "genforce_stylegan2_256": ("StyleGAN2Generator", 512, 256, 15),
    "ganseeing_wgangp_128": ("WGANGPGenerator", 128, 128, 13),
    "rosinality_stylegan2_1024": ("RosinalityStyleGAN2Generator", 512, 1024, 19),
}


def test_formats_cover_every_known_layout():
    assert set(EXPECTED_FULL_SIZE) == set(FORMATS)
    assert {name.rsplit("_", 1)[0] for name in FORMATS} == set(LAYOUTS)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_full_size_layout_builds_on_meta(name):
    spec = FORMATS[name]
    state_dict = {k: torch.empty(shape, device="meta") for k, shape in spec["keys"].items()}
    assert detect_layout(state_dict) == name.rsplit("_", 1)[0]
    g = load_generator(state_dict)
    cls, z_dim, resolution, n_layers = EXPECTED_FULL_SIZE[name]
    assert type(g).__name__ == cls
    assert (g.z_dim, g.resolution, len(g.layer_names)) == (z_dim, resolution, n_layers)
    assert all(t.is_meta for t in [*g.parameters(), *g.buffers()])
    # every tensor of the file was used, with its full shape
    n_params = sum(t.numel() for t in [*g.parameters(), *g.buffers()])
    assert n_params > 10_000_000 if "wgangp" not in name else n_params > 5_000_000
    # shapes flow through every layer at full size (meta tensors compute no values)
    image = g(torch.empty(2, z_dim, device="meta"))
    assert image.shape == (2, 3, resolution, resolution)


# ----------------------------------------------------------------------------- wgangp
def _random_wgangp_state_dict() -> dict[str, torch.Tensor]:
    """A state dict with the public key names at tiny widths, every tensor random."""
    torch.manual_seed(1)
    source = WGANGPGenerator(z_dim=16, widths=[16, 8, 8, 4])
    state_dict = source.layout_state_dict()
    full_keys = FORMATS["ganseeing_wgangp_128"]["keys"]
    for key, value in state_dict.items():
        if key.endswith("running_var"):
            value.uniform_(0.5, 2.0)
        elif value.is_floating_point():
            value.normal_(0, 0.5)
    # the same naming as the real file, only fewer blocks
    assert set(state_dict) <= set(full_keys)
    return state_dict


@torch.no_grad()
def test_wgangp_tiny_random_weights_load_and_run():
    state_dict = _random_wgangp_state_dict()
    assert detect_layout(state_dict) == "ganseeing_wgangp"
    g = load_generator(state_dict)
    assert isinstance(g, WGANGPGenerator)
    assert g.layer_names == [f"layer{i}" for i in range(1, 9)] + ["output_32x32"]
    assert g.z_dim == 16 and g.resolution == 32
    z = g.sample_z(4, seed=0)
    image = g(z)
    assert image.shape == (4, 3, 32, 32)
    assert float(image.min()) >= -1 and float(image.max()) <= 1 and float(image.std()) > 0.01
    # the loaded tensors are the given ones: running BN on layer1 by hand agrees
    x = torch.nn.functional.conv2d(z.view(4, 16, 1, 1), state_dict["features.0.conv.weight"], padding=3)
    bn = torch.nn.functional.batch_norm(x, state_dict["features.0.norm.running_mean"],
                                        state_dict["features.0.norm.running_var"],
                                        state_dict["features.0.norm.weight"], state_dict["features.0.norm.bias"])
    torch.testing.assert_close(g.run(z, stop="layer1"), torch.relu(bn))


# ----------------------------------------------------------------------------- bad input
def test_unknown_layout_lists_known_layouts_and_unexpected_keys():
    state_dict = dict(golden("ganseeing_proggan")["state_dict"])
    state_dict["extra_head.weight"] = torch.zeros(3)
    state_dict["layer3.conv.bias"] = torch.zeros(3)
    with pytest.raises(ValueError) as err:
        load_generator(state_dict)
    message = str(err.value)
    for layout in LAYOUTS:
        assert layout in message
    assert "extra_head.weight" in message and "layer3.conv.bias" in message
    assert "layer1.conv.weight" not in message.split("Closest")[1]  # only the unexpected keys


def test_missing_and_misshaped_keys_are_reported():
    state_dict = dict(golden("genforce_stylegan2")["state_dict"])
    del state_dict["synthesis.layer5.noise"]
    state_dict["synthesis.layer3.bias"] = torch.zeros(5)
    # named as the checkpoint spells them (genforce's keys), not as the loader renamed them
    with pytest.raises(ValueError, match=r"missing keys: synthesis\.layer5\.noise; shape mismatches: "
                                         r"synthesis\.layer3\.bias: file \(5,\)"):
        load_generator(state_dict)


def test_missing_file_names_the_path_and_the_expected_public_file(tmp_path):
    path = tmp_path / "nowhere" / "proggan.pth"
    with pytest.raises(FileNotFoundError) as err:
        load_generator(path, layout="progan")
    assert str(path) in str(err.value)
    assert "proggan_churchoutdoor-7e701dd5.pth" in str(err.value) and "pggan_churchoutdoor256.pth" in str(err.value)
    with pytest.raises(FileNotFoundError, match="stylegan2_church256.pth"):
        load_generator(str(path), layout="stylegan2")


def test_lod_other_than_zero_is_rejected():
    state_dict = dict(golden("genforce_pggan")["state_dict"])
    state_dict["lod"] = torch.tensor(1.5)
    with pytest.raises(ValueError, match="lod"):
        load_generator(state_dict)


def test_wrong_model_and_unknown_options_are_errors():
    stylegan_sd = golden("genforce_stylegan")["state_dict"]
    with pytest.raises(ValueError, match="genforce_stylegan"):
        load_generator(stylegan_sd, layout="progan")
    with pytest.raises(TypeError, match="truncation_psi"):
        load_generator(golden("ganseeing_proggan")["state_dict"], truncation_psi=0.5)
    with pytest.raises(ValueError, match="unknown layout"):
        load_generator(stylegan_sd, layout="biggan")


# ----------------------------------------------------------------------------- checkpoint forms
@torch.no_grad()
def test_checkpoint_dicts_are_unwrapped_preferring_the_smoothed_generator(tmp_path):
    ref = golden("genforce_pggan")
    perturbed = {k: v + 0.5 if k.endswith("weight") else v for k, v in ref["state_dict"].items()}
    checkpoint = {"generator": perturbed, "generator_smooth": ref["state_dict"], "discriminator": {}}
    path = tmp_path / "pggan_churchoutdoor256.pth"
    torch.save(checkpoint, path)
    z, image = ref["z"][:1], ref["image"][:1]  # one image is enough to tell weights apart
    for source in (checkpoint, path, str(path)):
        assert max_diff(load_generator(source)(z), image) < TOL
    only_raw = load_generator({"generator": perturbed})(z)
    assert max_diff(only_raw, image) > 1e-2
    ganseeing = golden("ganseeing_proggan")
    assert max_diff(load_generator({"state_dict": ganseeing["state_dict"]})(ganseeing["z"]), ganseeing["image"]) < TOL


def test_loaded_generators_are_frozen_and_in_eval_mode():
    g = load_generator(golden("ganseeing_proggan")["state_dict"])
    assert not g.training and not any(p.requires_grad for p in g.parameters())
    trainable = load_generator(golden("ganseeing_proggan")["state_dict"], requires_grad=True)
    assert all(p.requires_grad for p in trainable.parameters())


@pytest.mark.parametrize("name", ["ganseeing_proggan", "genforce_pggan"])
@torch.no_grad()
def test_save_load_round_trip(tmp_path, name):
    ref = golden(name)
    g = load_generator(ref["state_dict"])
    path = save_generator(g, tmp_path / "out" / "generator.pt", meta={"steps": 7, "dataset": "scenes"})
    stored = torch.load(path, weights_only=True)
    assert stored["layout"] == "ganseeing_proggan" and stored["meta"] == {"steps": 7, "dataset": "scenes"}
    assert set(stored["state_dict"]) == set(FORMATS["ganseeing_proggan_256"]["keys"])
    back = load_generator(path)
    assert back.checkpoint_meta == {"steps": 7, "dataset": "scenes"}
    assert max_diff(back(ref["z"]), ref["image"]) < TOL
    with pytest.raises(ValueError, match="ganseeing_proggan"):
        load_generator(path, layout="stylegan")


@torch.no_grad()
def test_save_load_round_trip_of_a_trained_wgangp_and_unsupported_save(tmp_path):
    g = load_generator(_random_wgangp_state_dict())
    z = g.sample_z(2)
    back = load_generator(save_generator(g, tmp_path / "w.pt"))
    torch.testing.assert_close(back(z), g(z), atol=0, rtol=0)
    with pytest.raises(TypeError, match="StyleGANGenerator"):
        save_generator(load_generator(golden("genforce_stylegan")["state_dict"]), tmp_path / "s.pt")
    # meta is stored as plain values, readable by a weights-only load
    path = save_generator(g, tmp_path / "m.pt", meta={"run": tmp_path, "widths": (16, 8)})
    assert load_generator(path).checkpoint_meta == {"run": str(tmp_path), "widths": [16, 8]}
    with pytest.raises(TypeError, match=r"meta\['bad'\]"):
        save_generator(g, tmp_path / "bad.pt", meta={"bad": object()})


# ----------------------------------------------------------------------------- Hydra configs
def _compose_model(model: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=None, overrides=[f"+model={model}", *overrides])


@pytest.mark.parametrize("model, fixture", [("progan", "ganseeing_proggan"), ("progan", "genforce_pggan"),
                                            ("stylegan", "genforce_stylegan"), ("stylegan2", "genforce_stylegan2")])
@torch.no_grad()
def test_hydra_model_config_instantiates_the_generator(model, fixture):
    from hydra.utils import instantiate

    path = CHECKPOINTS / f"{fixture}_256.pt"
    cfg = _compose_model(model, [f"model.checkpoint={path}"])
    assert cfg.model.name == model
    g = instantiate(cfg.model.generator)
    assert isinstance(g, LayeredGenerator)
    ref = golden(fixture)
    assert max_diff(g(ref["z"][:1]), ref["image"][:1].clamp(-1, 1)) < TOL
    layers = list(cfg.model.inversion_layers)
    start = g.layer_names.index(layers[0])
    assert g.layer_names[start:start + len(layers)] == layers  # consecutive, real layer names


def test_hydra_truncation_options_reach_the_generator():
    from hydra.utils import instantiate

    path = CHECKPOINTS / "genforce_stylegan2_256.pt"
    # genforce's generators truncate the first 8 rows (the config's null is every row)
    cfg = _compose_model("stylegan2", [f"model.checkpoint={path}", "model.truncation_psi=0.7",
                                       "model.truncation_layers=8"])
    g = instantiate(cfg.model.generator)
    ref = golden("genforce_stylegan2")
    with torch.no_grad():
        assert max_diff(g(ref["z"]), ref["image_trunc"].clamp(-1, 1)) < TOL


@pytest.mark.parametrize("model", ["progan", "wgangp", "stylegan", "stylegan2"])
def test_hydra_model_config_requires_a_checkpoint(model, tmp_path):
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    cfg = _compose_model(model, [])
    assert OmegaConf.is_missing(cfg.model, "checkpoint")
    with pytest.raises(MissingMandatoryValue, match="model.generator.source"):
        instantiate(cfg.model.generator)
    cfg = _compose_model(model, [f"model.checkpoint={tmp_path / 'absent.pth'}"])
    expected = LAYOUTS[next(n for n in LAYOUTS if LAYOUTS[n].model == model)].public_files[0]
    # Hydra wraps what the target raises
    with pytest.raises(InstantiationException, match=f"FileNotFoundError.*{expected}"):
        instantiate(cfg.model.generator)
