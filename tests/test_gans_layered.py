"""LayeredGenerator behaviour on every generator family: latents, batching, splitting."""
from __future__ import annotations

import pytest
import torch

from seeing.gans import (LayeredGenerator, ProGANGenerator, StyledState, StyleGAN2Generator, StyleGANGenerator,
                         WGANGPGenerator)


def _small(cls, **sizes) -> LayeredGenerator:
    """A randomly initialised generator of that architecture at 32x32 (fast on a CPU)."""
    torch.manual_seed(0)
    return cls(**sizes).eval()


def _tiny_wgangp() -> WGANGPGenerator:
    g = _small(WGANGPGenerator, z_dim=8, widths=[16, 8, 8, 4])
    for module in g.modules():  # non-trivial BatchNorm statistics
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.01, 0.1)
            module.weight.data.normal_()
            module.bias.data.normal_(0, 0.1)
    return g


GENERATORS = {
    "progan": lambda: _small(ProGANGenerator, z_dim=16, widths=[16, 16, 8, 8]),
    "stylegan": lambda: _small(StyleGANGenerator, z_dim=16, w_dim=16, widths=[16, 16, 8, 8]),
    "stylegan2": lambda: _small(StyleGAN2Generator, z_dim=16, w_dim=16, widths=[16, 16, 8, 8]),
    "wgangp": _tiny_wgangp,
}


@pytest.fixture(params=sorted(GENERATORS), scope="module")
def generator(request) -> LayeredGenerator:
    return GENERATORS[request.param]()


def _tensor(value):
    """The tensor part of a layer output (the feature map, or w+ after a mapping)."""
    if isinstance(value, StyledState):
        return value.x if value.x is not None else value.ws
    return value


def test_sample_z_is_reproducible_and_independent_of_batch_size(generator):
    z8 = generator.sample_z(8, seed=3)
    assert z8.shape == (8, generator.z_dim)
    assert torch.equal(generator.sample_z(8, seed=3), z8)
    assert torch.equal(generator.sample_z(3, seed=3), z8[:3])
    assert not torch.allclose(generator.sample_z(8, seed=4), z8)
    assert abs(float(generator.sample_z(2000, seed=0).std()) - 1.0) < 0.05


@torch.no_grad()
def test_batch_equals_image_by_image(generator):
    z = generator.sample_z(3, seed=1)
    batch = generator(z)
    assert batch.shape == (3, 3, generator.resolution, generator.resolution)
    assert float(batch.min()) >= -1.0 and float(batch.max()) <= 1.0
    singles = torch.cat([generator(z[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batch, singles, atol=1e-4, rtol=0)
    # different latents give different images (the test above is not about a constant)
    assert (batch[0] - batch[1]).abs().max() > 1e-3


@torch.no_grad()
def test_run_split_at_every_layer_composes_to_forward(generator):
    z = generator.sample_z(2, seed=2)
    full = generator(z)
    for name in generator.layer_names[:-1]:
        middle = generator.run(z, stop=name)
        torch.testing.assert_close(generator.run(middle, start=name), full, atol=1e-4, rtol=0)
        torch.testing.assert_close(generator.sub_generator(name)(middle), full, atol=1e-4, rtol=0)


@torch.no_grad()
def test_features_in_one_pass_equal_separate_runs(generator):
    z = generator.sample_z(2, seed=5)
    names = generator.layer_names[:4] + [generator.layer_names[-1]]
    feats = generator.features(z, ["z", *names])
    assert list(feats) == ["z", *names]
    assert torch.equal(feats["z"], z)
    for name in names:
        torch.testing.assert_close(_tensor(feats[name]), _tensor(generator.run(z, stop=name)), atol=1e-6, rtol=0)
    # starting from an intermediate layer gives the same later features
    start = names[1]
    later = generator.features(feats[start], names[2:], start=start)
    for name in names[2:]:
        torch.testing.assert_close(_tensor(later[name]), _tensor(feats[name]), atol=1e-5, rtol=0)


def test_unknown_layer_names_are_errors(generator):
    z = generator.sample_z(1)
    with pytest.raises(KeyError, match="no_such_layer"):
        generator.run(z, stop="no_such_layer")
    with pytest.raises(KeyError, match="no_such_layer"):
        generator.features(z, ["no_such_layer"])
    with pytest.raises(KeyError):
        generator.sub_generator("no_such_layer")
    last, first = generator.layer_names[-1], generator.layer_names[0]
    with pytest.raises(ValueError):
        generator.run(z, start=last, stop=first)


def test_style_models_pass_styled_states_and_start_from_w_plus():
    g = GENERATORS["stylegan2"]()
    z = g.sample_z(2, seed=0)
    with torch.no_grad():
        state = g.run(z, stop="mapping")
        assert isinstance(state, StyledState) and state.x is None
        assert state.ws.shape == (2, g.num_ws, g.w_dim)
        after = g.run(state, start="mapping", stop="layer2")
        assert after.x.shape[-1] == 8 and after.image.shape[-1] == 8
        # a w+ whose rows differ renders differently from the plain w (rows are used per layer)
        mixed = state.ws.clone()
        mixed[:, 7:] = mixed.flip(0)[:, 7:] + 0.5
        assert (g.run(state._replace(ws=mixed), start="mapping") - g(z)).abs().max() > 1e-3


def test_wgangp_batchnorm_uses_running_statistics_in_train_mode():
    g = _tiny_wgangp()
    z = g.sample_z(4, seed=0)
    with torch.no_grad():
        evaluated = g(z)
        g.train()
        trained_mode = g(z)
        single = g(z[:1])
    torch.testing.assert_close(trained_mode, evaluated)
    torch.testing.assert_close(single, evaluated[:1], atol=1e-4, rtol=0)


def test_gradients_reach_the_latent_and_every_intermediate_value(generator):
    """Inversion optimises latents and features through the frozen generator."""
    generator.requires_grad_(False)
    z = generator.sample_z(2, seed=0).requires_grad_(True)
    generator(z).square().mean().backward()
    assert z.grad is not None and float(z.grad.abs().max()) > 0
    middle = generator.run(generator.sample_z(2, seed=0), stop=generator.layer_names[1])
    leaf = _tensor(middle).detach().requires_grad_(True)
    if isinstance(middle, StyledState):
        middle = middle._replace(x=leaf) if middle.x is not None else middle._replace(ws=leaf)
    else:
        middle = leaf
    generator.run(middle, start=generator.layer_names[1]).square().mean().backward()
    assert float(leaf.grad.abs().max()) > 0


def test_every_generator_computes_the_same_in_train_and_eval_mode(generator):
    """What lets a stage freeze a generator without eval mode (seeing.frozen): its mode changes nothing."""
    from seeing.frozen import freeze

    z = generator.sample_z(3, seed=1)
    with torch.no_grad():
        evaluated = generator.eval()(z)
        frozen = freeze(generator)
        assert all(m.training for m in frozen.modules()) and not any(p.requires_grad for p in frozen.parameters())
        torch.testing.assert_close(frozen(z), evaluated, atol=0, rtol=0)
