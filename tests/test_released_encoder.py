"""The paper's released hybrid encoders (ProGAN-256 church/bedroom) load into this project's
HybridEncoder and reproduce the reference implementation's stage outputs.

The fixture (tests/fixtures/encoders/ganseeing_hybrid_encoder_256.pt) does not hold the
120 MB of weights: it lists every key and shape of the released layout, a recipe that
regenerates the weights from a seed, an input batch and the reference encoder's output
after every stage (eval mode)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from seeing.gans import load_generator
from seeing.models.image_encoder import ImageEncoder, encoder_spec
from seeing.models.ganseeing_layout import LAYOUT, released_specs
from seeing.models.hybrid import load_hybrid_encoder
from seeing.models.inverters import LayerInverter, inverter_spec

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FIXTURE = FIXTURES / "encoders" / "ganseeing_hybrid_encoder_256.pt"
FORMATS = json.loads((FIXTURES / "checkpoints" / "formats.json").read_text())
# the reference's stages, and what each estimates in this project's naming
STAGES = {"resnet": "layer4", "inv4": "layer3", "inv3": "layer2", "inv2": "layer1", "inv1": "z"}
TOL = 1e-4


@pytest.fixture(scope="module")
def fixture() -> dict:
    return torch.load(FIXTURE, weights_only=False)


def regenerate(keys: list, seed: int) -> dict[str, torch.Tensor]:
    """The fixture's recipe: one CPU generator, the keys in order, a draw per kind of tensor."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in keys:
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(0)
        elif name.endswith("running_var"):
            state[name] = torch.rand(shape, generator=g) + 0.5
        elif len(shape) == 4:  # conv weights, He-scaled
            state[name] = torch.randn(shape, generator=g) * math.sqrt(2 / (shape[1] * shape[2] * shape[3]))
        elif len(shape) == 1 and name.endswith(".weight"):  # batch-norm scales
            state[name] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:  # biases, running means
            state[name] = 0.1 * torch.randn(shape, generator=g)
    return state


@pytest.fixture(scope="module")
def released_files(fixture, tmp_path_factory) -> dict[str, Path]:
    """The regenerated weights saved in both key forms of the published files."""
    state = regenerate(fixture["keys"], fixture["seed"])
    assert [(k, list(v.shape)) for k, v in state.items()] == [(k, list(s)) for k, s in fixture["keys"]]
    root = tmp_path_factory.mktemp("released")
    files = {"bare": root / "bare.pth", "wrapped": root / "wrapped.pth"}
    torch.save(state, files["bare"])
    torch.save({"epoch": 1000, "state_dict": {f"model.{k}": v for k, v in state.items()}}, files["wrapped"])
    return files


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.reshape(ref.shape) - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("form", ["bare", "wrapped"])
@torch.no_grad()
def test_released_encoder_reproduces_every_reference_stage(fixture, released_files, form):
    encoder = load_hybrid_encoder(released_files[form])
    assert not encoder.training
    assert encoder.meta["layout"] == LAYOUT
    assert encoder.layers == ["layer1", "layer2", "layer3", "layer4"] and encoder.latent_name == "z"
    est = encoder.invert(fixture["image"])
    errors = {stage: relative_error(est[name], fixture["outputs"][stage]) for stage, name in STAGES.items()}
    assert all(e < TOL for e in errors.values()), errors
    # z comes back flat, as this project's ProGAN takes it, and pixel-normalised (norm sqrt(512))
    assert est["z"].shape == (fixture["image"].shape[0], 512)
    assert torch.allclose(est["z"].norm(dim=1), torch.full((est["z"].shape[0],), math.sqrt(512)), rtol=1e-4)


@torch.no_grad()
def test_released_encoder_round_trips_through_this_projects_file_format(fixture, released_files, tmp_path):
    released = load_hybrid_encoder(released_files["bare"])
    path = tmp_path / "hybrid.pt"
    torch.save(released.to_file_dict(), path)
    again = load_hybrid_encoder(path)
    assert again.image_encoder.spec.architecture == "ganseeing"
    assert {inv.spec.architecture for inv in again.inverters.values()} == {"ganseeing"}
    image = fixture["image"][:1]
    a, b = released.invert(image), again.invert(image)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_reference_architecture_is_this_projects_ganseeing_architecture(fixture):
    """A hybrid built by this project with architecture="ganseeing" for a 512-wide ProGAN-256
    has exactly the released layout's specs (so the released file's tensors fit it)."""
    state = {k: torch.empty(s, device="meta") for k, s in fixture["keys"]}
    enc_spec, inv_specs = released_specs(state)
    assert enc_spec == encoder_spec(256, (512, 8, 8), "layer4", stages=4, architecture="ganseeing")
    assert [s.final_conv for s in inv_specs.values()] == [True, False, True, True]  # inv1..inv4: inv2 has none
    # every released inverter key is a parameter or buffer of the module its spec builds
    with torch.device("meta"):
        modules = {layer: LayerInverter(spec) for layer, spec in inv_specs.items()}
        image_encoder = ImageEncoder(enc_spec)
    for n in range(1, 5):
        released = [(k.split(".", 1)[1], s) for k, s in fixture["keys"] if k.startswith(f"inv{n}.")]
        ours = [(k.removeprefix("net."), list(v.shape)) for k, v in modules[f"layer{n}"].state_dict().items()]
        assert ours == released
    n_encoder = sum(1 for k, _ in fixture["keys"] if k.startswith("resnet."))
    assert len(image_encoder.state_dict()) == n_encoder


@pytest.fixture(scope="module")
def full_size_progan():
    """A ProGAN-256 at full size with random weights, in the public key layout (formats.json)."""
    keys = FORMATS["ganseeing_proggan_256"]["keys"]
    g = torch.Generator().manual_seed(0)
    return load_generator({k: torch.randn(shape, generator=g) for k, shape in keys.items()})


@torch.no_grad()
def test_released_layout_loads_against_a_full_size_progan_and_regenerates(released_files, full_size_progan):
    generator = full_size_progan
    encoder = load_hybrid_encoder(released_files["wrapped"], generator)
    # the modules this project would build for that generator with the reference architecture
    for layer, inverter in encoder.inverters.items():
        assert inverter.spec == inverter_spec(generator, layer, architecture="ganseeing")
    image = generator(generator.sample_z(1, seed=3))
    z = encoder(image)
    assert z.shape == (1, generator.z_dim)
    assert encoder.generate(generator, z).shape == image.shape == (1, 3, 256, 256)


def test_released_layout_refuses_a_generator_of_other_shapes(released_files):
    small = load_generator(FIXTURES / "checkpoints" / "ganseeing_proggan_256.pt")  # 256px, tiny widths
    with pytest.raises(ValueError, match="trained for another model"):
        load_hybrid_encoder(released_files["bare"], small)


def test_unrecognised_file_names_the_file_and_the_accepted_layouts(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"state_dict": {"features.0.weight": torch.zeros(2)}}, path)
    with pytest.raises(ValueError, match="other.pth") as err:
        load_hybrid_encoder(path)
    assert "seeing.inversion/v1" in str(err.value) and "inv4" in str(err.value)
    # a released-looking file with a tensor missing says which
    state = {"resnet.conv1.weight": torch.zeros(64, 3, 7, 7), "inv1.conv1.weight": torch.zeros(512, 512, 4, 4)}
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"other\.pth.*resnet\.layer5\.conv5\.weight"):
        load_hybrid_encoder(path)
