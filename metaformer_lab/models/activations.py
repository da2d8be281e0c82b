"""Activation axis (used inside the channel MLP). Every class is built with no arguments."""

from __future__ import annotations

import torch
from torch import nn

from metaformer_lab.registry import Registry

ACTIVATIONS: Registry[type[nn.Module]] = Registry("act")

ACTIVATIONS.register("gelu")(nn.GELU)  # exact erf GELU, as the official code
ACTIVATIONS.register("relu")(nn.ReLU)
ACTIVATIONS.register("silu")(nn.SiLU)


@ACTIVATIONS.register("squared_relu")
class SquaredReLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x).square()


@ACTIVATIONS.register("starrelu")
class StarReLU(nn.Module):
    """`s * relu(x)^2 + b` with one learnable scalar s and b shared by all channels (MetaFormer Baselines)."""

    def __init__(self, scale: float = 1.0, bias: float = 0.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([scale]))
        self.bias = nn.Parameter(torch.tensor([bias]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.relu(x).square() + self.bias
