"""Normalization axis. Every class takes the channel count and works on NCHW tensors.

`macs_per_element` is what fvcore (the paper's MAC counter) charges for the official module, so that our counts
match the paper's: 5 for GroupNorm, 2 for eval-mode affine BatchNorm, 0 for the official channel LayerNorm
(written as elementwise ops, which fvcore skips) and for no norm. The MetaFormer Baselines' norms (no bias, eps
1e-6) are charged 0: the MACs their README and paper.md give count convolutions and matrix products only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metaformer_lab.registry import Registry

NORMS: Registry[type[nn.Module]] = Registry("norm")


@NORMS.register("modified_layernorm")
class ModifiedLayerNorm(nn.GroupNorm):
    """The paper's default: statistics over (C, H, W) per sample, affine per channel (GroupNorm with 1 group)."""

    macs_per_element = 5

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__(1, dim, eps=eps)


@NORMS.register("layernorm")
class ChannelLayerNorm(nn.Module):
    """LayerNorm over channels only, at every position (the official `LayerNormChannel`, eps 1e-5)."""

    macs_per_element = 0

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.layer_norm normalizes trailing dims, so move channels last and back; same maths as the official code.
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.weight.shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


@NORMS.register("batchnorm")
class BatchNorm(nn.BatchNorm2d):
    macs_per_element = 2

    def __init__(self, dim: int) -> None:
        super().__init__(dim)


@NORMS.register("none")
class NoNorm(nn.Identity):
    macs_per_element = 0

    def __init__(self, dim: int) -> None:
        super().__init__()


@NORMS.register("modified_layernorm_nobias")
class ModifiedLayerNormNoBias(ModifiedLayerNorm):
    """MetaFormer Baselines (IdentityFormer, RandFormer, PoolFormerV2): the modified LayerNorm without bias, eps 1e-6
    (the official `LayerNormGeneral(normalized_dim=(1, 2, 3), bias=False)`)."""

    macs_per_element = 0

    def __init__(self, dim: int) -> None:
        super().__init__(dim, eps=1e-6)
        self.bias = None  # GroupNorm's forward takes None for no bias


@NORMS.register("layernorm_nobias")
class ChannelLayerNormNoBias(ChannelLayerNorm):
    """MetaFormer Baselines (ConvFormer, CAFormer, and every baseline's stem and downsampling): LayerNorm over
    channels without bias, eps 1e-6 (the official `LayerNormWithoutBias`)."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim, eps=1e-6)
        self.bias = None
