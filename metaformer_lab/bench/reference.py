"""The straightforward baseline the speed benchmarks compare against: the official PoolFormer's way of computing
the same model (`nn.GroupNorm`, `nn.AvgPool2d(...) - x`, the channel MLP as 1x1 convolutions, NCHW, eager).

Only the MLP is computed differently by this project's model (as matrix products over channels-last pixels), so
the baseline is the same model, weights included, with its MLPs computed as convolutions.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from metaformer_lab.models.metaformer import Mlp


class ConvMlp(Mlp):
    """The official channel MLP: `fc2(act(fc1(x)))` with `fc1`, `fc2` 1x1 convolutions."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def straightforward(model: nn.Module) -> nn.Module:
    """A copy of `model` (weights included) that computes as the official code: MLPs as 1x1 convolutions, NCHW."""
    baseline = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    for module in baseline.modules():
        if type(module) is Mlp:
            module.__class__ = ConvMlp  # same parameters and submodules, the official forward
    return baseline
