"""The upp segmenter's UPerNet decoder against a golden output of the reference decoder.

``fixtures/segmenters/upp_decoder_golden.pt`` holds the reference UPerNet (CSAIL unified parsing)
at reduced widths with random weights, random stride-4..32 features, and its object
probabilities; plus the reference's pyramid pooling (precise RoI pooling) on its own.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import FIXTURES
from seeing.segmenters import upp
from seeing.segmenters.precise_pool import PrecisePool2d, precise_pool_weights, precise_roi_pool
from seeing.segmenters.upp import OTHER_HEADS, UPerNetObjectDecoder, _head_out_channels, head_sizes
from seeing.state_dicts import load_exact

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def golden() -> dict:
    return torch.load(FIXTURES / "segmenters" / "upp_decoder_golden.pt", weights_only=False)


def object_probs(golden: dict) -> torch.Tensor:
    """Build the decoder from ``decoder_args``, load the state dict as ``load_upp_segmenter`` does
    (other heads checked against the labels, then dropped) and run it as the reference's inference."""
    state = golden["state_dict"]
    for head, n in head_sizes(golden["labels"]).items():
        assert _head_out_channels(state, head) == n
    assert any(k.split(".")[0] in OTHER_HEADS for k in state)  # the file keeps them, like the public one
    decoder = UPerNetObjectDecoder(**golden["decoder_args"]).eval()
    load_exact(decoder, {k: v for k, v in state.items() if k.split(".")[0] not in OTHER_HEADS}, "golden decoder")
    with torch.no_grad():
        logits = decoder([f.float() for f in golden["features"]])
        return F.interpolate(logits, list(golden["seg_size"]), mode="bilinear", align_corners=False).softmax(1)


@pytest.mark.parametrize("s", [1, 2, 3, 6])
def test_precise_pool_matches_reference(golden, s):
    x, expected = golden["pyramid_pool_input"], golden["pyramid_pool_output"][s]
    out = precise_roi_pool(x, s)
    assert out.shape == expected.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(precise_roi_pool(x.double(), s), expected.double(), rtol=0, atol=1e-5)
    torch.testing.assert_close(PrecisePool2d(s)(x), out, rtol=0, atol=0)
    # the golden is not average pooling (the sizes are chosen so that the two differ)
    assert (F.adaptive_avg_pool2d(x, s) - expected).abs().max() > 1e-2


def test_decoder_matches_reference_object_probs(golden):
    probs = object_probs(golden)
    expected = golden["object_probs"]
    assert probs.shape == expected.shape == (2, golden["decoder_args"]["num_objects"], *golden["seg_size"])
    torch.testing.assert_close(probs, expected, rtol=0, atol=1e-4)


def test_decoder_with_average_pooling_would_miss_the_golden(golden, monkeypatch):
    # The golden pins the pooling: the former adaptive_avg_pool2d pyramid is off by far more than 1e-4.
    monkeypatch.setattr(upp, "precise_roi_pool", F.adaptive_avg_pool2d)
    assert (object_probs(golden) - golden["object_probs"]).abs().max() > 1e-3


@pytest.mark.parametrize("h,w", [(1, 1), (3, 2), (5, 7), (8, 8)])
def test_precise_pool_of_constant_is_covered_fraction(h, w):
    # f = c on [0, W-1] x [0, H-1], fading linearly to 0 over the last unit of each axis, so per axis the
    # mean over a bin [a, b] is the length of [a, b] within [0, n-1] plus the integral of the fade
    # (1 - (x - (n-1))) over [a, b] within [n-1, n], divided by b - a.
    c = 2.5
    out = precise_roi_pool(torch.full((2, 3, h, w), c, dtype=torch.float64), (4, 6))

    def covered(n: int, bins: int) -> torch.Tensor:
        edges = torch.linspace(0, n, bins + 1, dtype=torch.float64)
        a, b = edges[:-1], edges[1:]
        flat = (b.clamp(max=n - 1) - a.clamp(max=n - 1)).clamp(min=0)
        fade = lambda t: t - (t - (n - 1)) ** 2 / 2  # antiderivative of 1 - (x - (n-1)) on [n-1, n]
        lo, hi = a.clamp(min=n - 1), b.clamp(min=n - 1)
        return (flat + fade(hi) - fade(lo)) / (b - a)

    expected = c * covered(h, 4)[:, None] * covered(w, 6)[None, :]
    torch.testing.assert_close(out, expected.expand_as(out), rtol=0, atol=1e-12)
    # size 1: c (1 - 1/(2H)) (1 - 1/(2W)), where average pooling would give c
    one = precise_roi_pool(torch.full((1, 1, h, w), c, dtype=torch.float64), 1)
    assert one.item() == pytest.approx(c * (1 - 1 / (2 * h)) * (1 - 1 / (2 * w)), abs=1e-12)


def test_precise_pool_size_one_weights_first_pixel_half():
    # At size 1 every sample's hat lies inside [0, n] except the first one's left half:
    # mean = (x_0 / 2 + x_1 + ... + x_{n-1}) / n per axis, not the plain mean.
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    wy = torch.tensor([0.5, 1, 1, 1, 1], dtype=torch.float64) / 5
    wx = torch.tensor([0.5, 1, 1, 1], dtype=torch.float64) / 4
    expected = torch.einsum("bchw,h,w->bc", x, wy, wx)[..., None, None]
    torch.testing.assert_close(precise_roi_pool(x, 1), expected, rtol=0, atol=1e-12)
    assert (precise_roi_pool(x, 1) - x.mean((-2, -1), keepdim=True)).abs().max() > 1e-2
    # weight matrices: each sample's total hat mass within [0, n] is 1 (1/2 for the first)
    assert precise_pool_weights(7, 3, torch.float64).sum().item() == pytest.approx(3 * 6.5 / 7, abs=1e-12)


def test_precise_pool_is_differentiable_and_batched():
    x = torch.randn(2, 3, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: precise_roi_pool(t, (2, 5)), (x,))
    # leading dims are a batch: any number of them, each pooled on its own
    y = torch.randn(2, 3, 4, 3)
    torch.testing.assert_close(precise_roi_pool(y, 3)[1, 2], precise_roi_pool(y[1, 2], 3), rtol=1e-6, atol=1e-6)


def test_precise_pool_docstring_examples():
    import doctest

    from seeing.segmenters import precise_pool

    result = doctest.testmod(precise_pool, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 3 and result.failed == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_precise_pool_on_cuda_matches_cpu(golden):
    x = golden["pyramid_pool_input"]
    for s, expected in golden["pyramid_pool_output"].items():
        out = precise_roi_pool(x.cuda(), s)
        assert out.is_cuda
        torch.testing.assert_close(out.cpu(), expected, rtol=0, atol=1e-5)
