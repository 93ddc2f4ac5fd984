"""Frozen networks: fixed weights, and the same computation in train and eval mode.

A stage trains one network against fixed ones: the generator that makes its targets, the
encoder or VGG trunk inside a loss. Kept in eval mode, such a network is what Lightning warns
about when training starts (a module in eval mode may be a mistake). Here a frozen network has
nothing that depends on the mode instead: its BatchNorm layers normalise with their stored
statistics whatever the mode (:class:`FrozenBatchNorm`), and its dropout is the identity, as
eval mode would make them. It then simply follows the mode of the module that holds it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# layers that would still behave differently in train mode
_MODE_DEPENDENT = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
                   nn.modules.dropout._DropoutNd, nn.AlphaDropout, nn.FeatureAlphaDropout)


class FrozenBatchNorm(nn.BatchNorm2d):
    """BatchNorm that normalises with its running statistics in train and eval mode alike (its
    state dict is BatchNorm2d's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, eps=self.eps)


def _frozen_norm(norm: nn.BatchNorm2d) -> FrozenBatchNorm:
    frozen = FrozenBatchNorm(norm.num_features, eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
                             track_running_stats=True, device=norm.running_mean.device,
                             dtype=norm.running_mean.dtype)
    frozen.load_state_dict(norm.state_dict())
    return frozen


def freeze(module: nn.Module) -> nn.Module:
    """``module`` with no gradients and no mode-dependent layers (in place; returned in train
    mode, as a new module starts, since its mode no longer matters): every BatchNorm2d becomes a
    :class:`FrozenBatchNorm` with the same state, every dropout the identity. A layer that cannot
    be made mode-independent (another norm that tracks statistics) is an error naming it."""
    for name, child in list(module.named_modules()):
        for key, sub in list(child.named_children()):
            if isinstance(sub, FrozenBatchNorm):
                continue
            if type(sub) is nn.BatchNorm2d and sub.track_running_stats:
                setattr(child, key, _frozen_norm(sub))
            elif isinstance(sub, (nn.modules.dropout._DropoutNd, nn.AlphaDropout, nn.FeatureAlphaDropout)):
                setattr(child, key, nn.Identity())
            elif isinstance(sub, _MODE_DEPENDENT) and getattr(sub, "track_running_stats", True):
                raise TypeError(f"cannot freeze {type(module).__name__}: its layer "
                                f"{'.'.join(p for p in (name, key) if p)} ({type(sub).__name__}) behaves differently "
                                f"in train mode")
    return module.requires_grad_(False).train()
