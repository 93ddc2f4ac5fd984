"""Frozen networks (seeing.frozen): fixed weights, the same output in train and eval mode, the same
state dict, and nothing for Lightning's eval-mode check to report."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from seeing.frozen import FrozenBatchNorm, freeze


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                        nn.Sequential(nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2)))
    for m in net.modules():  # statistics of a trained network, not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return net


def test_a_frozen_network_computes_in_train_mode_what_it_computed_in_eval_mode():
    net, x = _net(), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = net.eval()(x)
        state = {k: v.clone() for k, v in net.state_dict().items()}
        frozen = freeze(net)
        assert all(m.training for m in frozen.modules())  # what Lightning checks at the start of training
        assert not any(p.requires_grad for p in frozen.parameters())
        assert sum(isinstance(m, FrozenBatchNorm) for m in frozen.modules()) == 2
        torch.testing.assert_close(frozen(x), expected, atol=0, rtol=0)
        torch.testing.assert_close(frozen(x[:1]), expected[:1])  # an image does not depend on its batch
        frozen(torch.randn(4, 3, 8, 8) * 10)  # and running statistics never move
    assert list(frozen.state_dict()) == list(state)
    assert all(torch.equal(frozen.state_dict()[k], v) for k, v in state.items())
    assert freeze(frozen) is frozen and sum(isinstance(m, FrozenBatchNorm) for m in frozen.modules()) == 2


def test_a_layer_that_cannot_be_frozen_is_named():
    with pytest.raises(TypeError, match=r"its layer 1 \(BatchNorm1d\)"):
        freeze(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)))


def test_the_hybrid_encoder_frozen_inside_a_loss_keeps_its_estimates():
    from seeing.gans import ProGANGenerator
    from seeing.models.hybrid import new_hybrid_encoder
    from seeing.reconstruct.losses import ReconstructionLoss

    torch.manual_seed(0)
    g = ProGANGenerator(z_dim=16, widths=[16, 16, 8])
    encoder = new_hybrid_encoder(g, ["layer1", "layer2", "layer3", "layer4"])
    for m in encoder.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = g(g.sample_z(2, seed=0)).detach()
    with torch.no_grad():
        expected = encoder.eval()(x)
        loss = ReconstructionLoss(encoder_weight=0.25, encoder=encoder).train()
        assert all(m.training for m in loss.modules())
        got = loss.encoder(x)
    for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(expected)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
