"""The MetaFormer backbone (NCHW, as the official PoolFormer), with every ablation axis a constructor argument.

State-dict keys follow the official code (`patch_embed.proj`, `network.<i>`, `norm`, `head`) so released
checkpoints load with `strict=True`; construction order and initialisation follow it too, so a seeded build
reproduces the official weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from metaformer_lab.models.activations import ACTIVATIONS
from metaformer_lab.models.heads import HEADS
from metaformer_lab.models.mixers import MIXERS
from metaformer_lab.models.norms import NORMS
from metaformer_lab.models.spec import StageSpec, per_stage
from metaformer_lab.registry import ConfigError

# the layers each `weight_init` gives trunc_normal(.02) weights and zero biases once the model is built: the official
# PoolFormer's `cls_init_weights` takes every nn.Linear (head, attention, spatial FC; its channel MLP is initialised on
# construction), the MetaFormer Baselines' `_init_weights` every convolution too
WEIGHT_INITS: dict[str, tuple[type[nn.Module], ...]] = {
    "poolformer": (nn.Linear,),
    "trunc_normal": (nn.Linear, nn.Conv2d),
}


def trunc_normal_(tensor: torch.Tensor, std: float = 0.02, a: float = -2.0, b: float = 2.0) -> torch.Tensor:
    """timm's inverse-CDF truncated normal (mean 0). torch's own samples differently, so seeds would not match."""
    lo, hi = ((1.0 + math.erf(bound / std / math.sqrt(2.0))) / 2.0 for bound in (a, b))
    with torch.no_grad():
        return tensor.uniform_(2 * lo - 1, 2 * hi - 1).erfinv_().mul_(std * math.sqrt(2.0)).clamp_(a, b)


class DropPath(nn.Module):
    """Stochastic depth: drops the whole branch per sample; a fresh mask on every call."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate:.4g}"


class PatchEmbed(nn.Module):
    """Stem (the paper's: 7x7 stride 4) and downsampling (3x3 stride 2) convolution; default PyTorch init as the
    official PoolFormer. The MetaFormer Baselines add a norm after the stem's convolution and before each
    downsampling one (`post_norm`, `pre_norm`: a name in `NORMS`, or None for none)."""

    def __init__(
        self, in_chans: int, dim: int, kernel_size: int, stride: int, padding: int,
        pre_norm: str | None = None, post_norm: str | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.pre_norm = NORMS.get(pre_norm, "downsampling_norm")(in_chans) if pre_norm else None
        self.proj = nn.Conv2d(in_chans, dim, kernel_size, stride, padding)
        self.post_norm = NORMS.get(post_norm, "stem_norm")(dim) if post_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        x = self.proj(x)
        return x if self.post_norm is None else self.post_norm(x)


class PositionEmbedding(nn.Module):
    """Learnable absolute position embedding (zeros init), added before the first attention stage.

    The official module only works at its build size; here other input sizes get it resized bicubically.
    """

    def __init__(self, dim: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, dim, *grid))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = self.pos_embed
        if pos.shape[-2:] != x.shape[-2:]:
            pos = F.interpolate(pos, size=x.shape[-2:], mode="bicubic", align_corners=False)
        return x + pos


class Mlp(nn.Module):
    """Channel MLP of 1x1 convolutions; trunc_normal(.02) weights and zero biases, initialised on construction.

    The convolutions keep their modules and (out, in, 1, 1) weights, so the official keys load, but run as matrix
    products over channels-last pixels: the same maths, and on CPU about 1.6x faster than oneDNN's 1x1 convolution
    (forward and backward). On a channels_last input the permutes are free views.
    """

    def __init__(self, dim: int, hidden: int, act: str, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1, bias=bias)
        self.act = ACTIVATIONS.get(act)()
        self.fc2 = nn.Conv2d(hidden, dim, 1, bias=bias)
        for fc in (self.fc1, self.fc2):
            trunc_normal_(fc.weight)
            if bias:
                nn.init.zeros_(fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        hidden = self.act(F.linear(pixels, self.fc1.weight.flatten(1), self.fc1.bias))
        return F.linear(hidden, self.fc2.weight.flatten(1), self.fc2.bias).permute(0, 3, 1, 2)


class MetaFormerBlock(nn.Module):
    """`x = rs1 * x + drop_path(ls1 * mixer(norm1(x)))`; `x = rs2 * x + drop_path(ls2 * mlp(norm2(x)))`.

    LayerScale `ls` (PoolFormer) and ResScale `rs` (the MetaFormer Baselines' stages 3-4) are per-channel learnable
    scales, each present only when its init value is set. `residual=False` drops the shortcut of both sub-blocks;
    `mlp=False` removes mlp, norm2 and the scales of that sub-block entirely.
    """

    def __init__(self, spec: StageSpec, drop_path: float) -> None:
        super().__init__()
        self.residual = spec.residual
        self.norm1 = NORMS.get(spec.norm)(spec.dim)
        self.token_mixer = MIXERS.get(spec.mixer).from_spec(spec)
        self.norm2 = self.mlp = None
        if spec.mlp:
            self.norm2 = NORMS.get(spec.norm)(spec.dim)
            self.mlp = Mlp(spec.dim, int(spec.dim * spec.mlp_ratio), spec.act, spec.mlp_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if spec.res_scale_init_value is not None and not spec.residual:
            raise ConfigError("res_scale_init_value", spec.res_scale_init_value,
                              "null in stages without residual connections (it scales the shortcut)")  # fmt: skip
        self.layer_scale_1 = _scale(spec.dim, spec.layer_scale_init_value)
        self.res_scale_1 = _scale(spec.dim, spec.res_scale_init_value)
        self.layer_scale_2 = _scale(spec.dim, spec.layer_scale_init_value) if spec.mlp else None
        self.res_scale_2 = _scale(spec.dim, spec.res_scale_init_value) if spec.mlp else None

    def _branch(
        self, x: torch.Tensor, norm: nn.Module, fn: nn.Module, scale: torch.Tensor | None,
        shortcut_scale: torch.Tensor | None,
    ) -> torch.Tensor:  # fmt: skip
        y = fn(norm(x))
        if scale is not None:
            y = scale[:, None, None] * y
        y = self.drop_path(y)
        if not self.residual:
            return y
        return (x if shortcut_scale is None else shortcut_scale[:, None, None] * x) + y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._branch(x, self.norm1, self.token_mixer, self.layer_scale_1, self.res_scale_1)
        if self.mlp is not None:
            x = self._branch(x, self.norm2, self.mlp, self.layer_scale_2, self.res_scale_2)
        return x


def _scale(dim: int, init: float | None) -> nn.Parameter | None:
    return None if init is None else nn.Parameter(torch.full((dim,), float(init)))


class MetaFormer(nn.Module):
    """MetaFormer / PoolFormer backbone. Axis arguments take one value for all stages or a per-stage list.

    Args:
        depths, dims: blocks and channels per stage.
        mixer: token mixer name per stage (see `MIXERS.names()`).
        pool_size: pooling window of `pooling` stages (odd). kernel_size: kernel of `dwconv` and `sepconv` stages.
        head_dim: channels per head of `attention` stages.
        norm, act: normalization (`NORMS`) and MLP activation (`ACTIVATIONS`) names.
        residual, mlp: keep the residual connections / the channel MLP sub-block.
        mlp_ratio: MLP hidden width over dim. mlp_bias: the MLP's layers have biases (PoolFormer) or not (Baselines).
        layer_scale_init_value: LayerScale init, None for no LayerScale.
        res_scale_init_value: ResScale init (a learnable scale on the shortcut), None for none.
        drop_path_rate: stochastic depth of the last block; rises linearly from 0 at the first block.
        position_embedding: add the learnable position embedding before the first attention stage.
        img_size: the input size that size-bound layers (random, spatial_fc, position embedding) are built for.
        stem, downsampling: (kernel, stride, padding) of the first convolution and of those between stages; the
            paper's are (7, 4, 2) and (3, 2, 1). A smaller footprint, e.g. (2, 2, 0) for both, leaves more of the
            spatial mixing to the token mixers (an ablation axis of its own: what the mixers add depends on it).
        stem_norm, downsampling_norm: a norm after the stem's convolution / before each downsampling convolution
            (`NORMS` names; the Baselines': layernorm_nobias), None for none (PoolFormer).
        head: how the features become logits (`HEADS`: v1, layernorm, mlp); head_dropout: the mlp head's dropout.
        weight_init: `poolformer` (trunc_normal(.02) for linear layers and the channel MLP, PyTorch's default for
            the other convolutions, as the official PoolFormer) or `trunc_normal` (every convolution and linear
            layer, as the MetaFormer Baselines).
    """

    def __init__(
        self,
        depths: Sequence[int] = (2, 2, 6, 2),
        dims: Sequence[int] = (64, 128, 320, 512),
        *,
        mixer: str | Sequence[str] = "pooling",
        pool_size: int | Sequence[int] = 3,
        kernel_size: int | Sequence[int] = 3,
        head_dim: int | Sequence[int] = 32,
        norm: str | Sequence[str] = "modified_layernorm",
        act: str | Sequence[str] = "gelu",
        residual: bool | Sequence[bool] = True,
        mlp: bool | Sequence[bool] = True,
        mlp_ratio: float | Sequence[float] = 4.0,
        mlp_bias: bool | Sequence[bool] = True,
        layer_scale_init_value: float | None | Sequence[float | None] = 1e-5,
        res_scale_init_value: float | None | Sequence[float | None] = None,
        drop_path_rate: float = 0.0,
        position_embedding: bool = True,
        num_classes: int = 1000,
        in_chans: int = 3,
        img_size: int = 224,
        stem: Sequence[int] = (7, 4, 2),
        downsampling: Sequence[int] = (3, 2, 1),
        stem_norm: str | None = None,
        downsampling_norm: str | None = None,
        head: str = "v1",
        head_dropout: float = 0.0,
        weight_init: str = "poolformer",
    ) -> None:
        super().__init__()
        n = len(depths)
        if n < 1 or any(not isinstance(d, int) or d < 1 for d in depths):
            raise ConfigError("depths", list(depths), "a non-empty list of positive block counts, one per stage")
        stem, downsampling = _conv_shape("stem", stem), _conv_shape("downsampling", downsampling)
        reduction = stem[1] * downsampling[1] ** (n - 1)  # input pixels per token of the last stage, per side
        if img_size < 1 or img_size % reduction:
            raise ConfigError("img_size", img_size, f"a positive multiple of {reduction} for {n} stages")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ConfigError("drop_path_rate", drop_path_rate, "a rate in [0, 1)")
        if weight_init not in WEIGHT_INITS:
            raise ConfigError("weight_init", weight_init, WEIGHT_INITS)
        axes = dict(
            mixer=mixer, pool_size=pool_size, kernel_size=kernel_size, head_dim=head_dim, norm=norm, act=act,
            residual=residual, mlp=mlp, mlp_ratio=mlp_ratio, mlp_bias=mlp_bias,
            layer_scale_init_value=layer_scale_init_value, res_scale_init_value=res_scale_init_value,
        )  # fmt: skip
        per = {key: per_stage(key, value, n) for key, value in axes.items()}
        dims = per_stage("dims", dims, n)
        self.stage_specs = [
            StageSpec(
                index=i,
                depth=depths[i],
                dim=dims[i],
                grid=(img_size // (stem[1] * downsampling[1] ** i),) * 2,
                **{key: values[i] for key, values in per.items()},
            )  # fmt: skip
            for i in range(n)
        ]
        self.img_size = img_size
        self.size_bound = any(MIXERS.get(s.mixer).size_bound for s in self.stage_specs)

        self.patch_embed = PatchEmbed(in_chans, dims[0], *stem, post_norm=stem_norm)
        total, done, pos_added = sum(depths), 0, not position_embedding
        network: list[nn.Module] = []
        for spec in self.stage_specs:
            if not pos_added and MIXERS.get(spec.mixer).needs_position_embedding:
                network.append(PositionEmbedding(spec.dim, spec.grid))
                pos_added = True
            rates = [drop_path_rate * (done + j) / max(total - 1, 1) for j in range(spec.depth)]
            network.append(nn.Sequential(*(MetaFormerBlock(spec, rate) for rate in rates)))
            done += spec.depth
            if spec.index < n - 1:
                network.append(PatchEmbed(spec.dim, dims[spec.index + 1], *downsampling, pre_norm=downsampling_norm))
        self.network = nn.ModuleList(network)
        self.head_kind = head
        self.norm_before_mean = HEADS.get(head).norm_before_mean
        self.norm, self.head = HEADS.get(head).build(dims[-1], num_classes, self.stage_specs[-1].norm, head_dropout)
        initialised = WEIGHT_INITS[weight_init]
        for module in self.modules():
            if isinstance(module, initialised):
                trunc_normal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.size_bound and tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            bound = sorted({s.mixer for s in self.stage_specs if MIXERS.get(s.mixer).size_bound})
            raise ValueError(
                f"this model's {'/'.join(bound)} mixer was built for {self.img_size}x{self.img_size} inputs "
                f"and got {x.shape[-2]}x{x.shape[-1]}; build it with img_size={x.shape[-1]}"
            )
        x = self.patch_embed(x)
        for layer in self.network:
            x = layer(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.norm(x).mean((-2, -1)) if self.norm_before_mean else self.norm(x.mean((-2, -1)))
        return self.head(x)


def _conv_shape(key: str, shape: Sequence[int]) -> tuple[int, int, int]:
    """(kernel, stride, padding), checked: an output of exactly input / stride pixels per side."""
    valid = (
        isinstance(shape, Sequence) and len(shape) == 3 and all(isinstance(v, int) for v in shape)
        and shape[1] >= 1 and shape[2] >= 0 and 0 < shape[0] - 2 * shape[2] <= shape[1]
    )  # fmt: skip
    if not valid:
        raise ConfigError(key, list(shape) if isinstance(shape, Sequence) else shape,
                          "[kernel, stride, padding] with 0 < kernel - 2 x padding <= stride (an output of input / "
                          "stride pixels), e.g. [7, 4, 2], [3, 2, 1], [2, 2, 0]")  # fmt: skip
    return tuple(shape)


