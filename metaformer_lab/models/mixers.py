"""Token-mixer axis. Each mixer maps NCHW -> NCHW and is built for one stage by `from_spec`.

Class attributes tell the backbone what a mixer needs:
- `size_bound`: its weights depend on the token count, so the model only accepts its build-time input size;
- `needs_position_embedding`: the official hybrids add a learnable position embedding before the first such stage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metaformer_lab.models.activations import ACTIVATIONS
from metaformer_lab.models.spec import StageSpec
from metaformer_lab.registry import ConfigError, Registry


class TokenMixer(nn.Module):
    size_bound = False
    needs_position_embedding = False

    @classmethod
    def from_spec(cls, spec: StageSpec) -> TokenMixer:
        raise NotImplementedError


MIXERS: Registry[type[TokenMixer]] = Registry("mixer")


def _check_odd(key: str, size: int) -> None:
    if not isinstance(size, int) or size < 1 or size % 2 == 0:
        raise ConfigError(key, size, "an odd positive integer, so that the output keeps the input's size")


@MIXERS.register("pooling")
class PoolingMixer(TokenMixer):
    """PoolFormer: `avgpool(x) - x`; the block adds x back. Border windows average valid pixels only."""

    def __init__(self, pool_size: int = 3) -> None:
        super().__init__()
        _check_odd("pool_size", pool_size)
        self.pool = nn.AvgPool2d(pool_size, stride=1, padding=pool_size // 2, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x) - x

    @classmethod
    def from_spec(cls, spec: StageSpec) -> PoolingMixer:
        return cls(spec.pool_size)


@MIXERS.register("identity")
class IdentityMixer(TokenMixer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @classmethod
    def from_spec(cls, spec: StageSpec) -> IdentityMixer:
        return cls()


@MIXERS.register("random")
class RandomMixer(TokenMixer):
    """Global random matrix: one frozen N x N row-softmax of U[0, 1) per block, `X' = W X` over the N tokens."""

    size_bound = True

    def __init__(self, num_tokens: int) -> None:
        super().__init__()
        matrix = torch.softmax(torch.rand(num_tokens, num_tokens), dim=-1)
        self.random_matrix = nn.Parameter(matrix, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.flatten(2), self.random_matrix).view_as(x)

    @classmethod
    def from_spec(cls, spec: StageSpec) -> RandomMixer:
        return cls(spec.grid[0] * spec.grid[1])


@MIXERS.register("dwconv")
class DepthwiseConvMixer(TokenMixer):
    """Depthwise convolution with bias (the paper's row does not state the kernel; 3x3 matches its 11.9M)."""

    def __init__(self, dim: int, kernel_size: int = 3) -> None:
        super().__init__()
        _check_odd("kernel_size", kernel_size)
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)

    @classmethod
    def from_spec(cls, spec: StageSpec) -> DepthwiseConvMixer:
        return cls(spec.dim, spec.kernel_size)


@MIXERS.register("sepconv")
class SepConvMixer(TokenMixer):
    """ConvFormer's inverted separable convolution (MobileNetV2): pointwise to 2x channels, StarReLU, depthwise
    kxk (ConvFormer: 7x7), pointwise back; no biases. The pointwise layers are Linear, as the official code."""

    def __init__(self, dim: int, kernel_size: int = 7, expansion: int = 2) -> None:
        super().__init__()
        _check_odd("kernel_size", kernel_size)
        hidden = expansion * dim
        self.pwconv1 = nn.Linear(dim, hidden, bias=False)
        self.act1 = ACTIVATIONS.get("starrelu")()
        self.dwconv = nn.Conv2d(hidden, hidden, kernel_size, padding=kernel_size // 2, groups=hidden, bias=False)
        self.pwconv2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.pwconv1(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return self.pwconv2(self.dwconv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    @classmethod
    def from_spec(cls, spec: StageSpec) -> SepConvMixer:
        return cls(spec.dim, spec.kernel_size)


@MIXERS.register("attention")
class AttentionMixer(TokenMixer):
    """Multi-head self-attention over all tokens (official hybrids: qkv without bias, proj with bias)."""

    needs_position_embedding = True

    proj_bias = True

    def __init__(self, dim: int, head_dim: int = 32) -> None:
        super().__init__()
        if head_dim < 1 or dim % head_dim:
            raise ConfigError("head_dim", head_dim, f"a positive divisor of the stage's {dim} channels")
        self.num_heads = dim // head_dim
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim, bias=self.proj_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, N, C)
        q, k, v = self.qkv(tokens).view(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        # softmax(q k^T / sqrt(d)) v, fused where the backend has a kernel for it
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h * w, c)
        return self.proj(out).transpose(1, 2).reshape(b, c, h, w)

    @classmethod
    def from_spec(cls, spec: StageSpec) -> AttentionMixer:
        return cls(spec.dim, spec.head_dim)


@MIXERS.register("attention_nobias")
class AttentionNoBiasMixer(AttentionMixer):
    """CAFormer's attention: as `attention`, but the output projection has no bias and no position embedding is
    added (the MetaFormer Baselines rely on their convolutional stages for position)."""

    needs_position_embedding = False
    proj_bias = False


@MIXERS.register("spatial_fc")
class SpatialFCMixer(TokenMixer):
    """One Linear(N, N, bias=False) over the tokens of each channel, shared by all channels (ResMLP style)."""

    size_bound = True

    def __init__(self, num_tokens: int) -> None:
        super().__init__()
        self.fc = nn.Linear(num_tokens, num_tokens, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(2)).view_as(x)

    @classmethod
    def from_spec(cls, spec: StageSpec) -> SpatialFCMixer:
        return cls(spec.grid[0] * spec.grid[1])
