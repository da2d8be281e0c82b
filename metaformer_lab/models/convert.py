"""Checkpoints of other layouts in this package's (the official PoolFormer's: `patch_embed`, `network.<i>`, `norm`,
`head`), and what their source fixes about the model.

- the official MetaFormer Baselines (sail-sg/metaformer: `downsample_layers.<i>`, `stages.<i>.<j>`);
- timm (>= 0.9, `models/metaformer.py`: `stem`, `stages.<i>.downsample`, `stages.<i>.blocks.<j>`, `head.norm`,
  `head.fc`), for PoolFormer v1 and the Baselines alike.

timm's port of PoolFormer v1 normalises after the global mean (LayerNorm, eps 1e-6) where the official code applies
its GroupNorm to the feature map before it: same keys and shapes, other logits. A timm checkpoint therefore comes
with `head="layernorm"` for the model it is loaded into (`Converted.model_overrides`), so that it reproduces timm's
logits. Layers in the Baselines that are `nn.Linear` where ours are 1x1 convolutions (or the reverse) are reshaped.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

# block-relative names of the Baselines and timm -> ours
_BLOCK_RENAMES = {"layer_scale1.scale": "layer_scale_1", "layer_scale2.scale": "layer_scale_2",
                  "res_scale1.scale": "res_scale_1", "res_scale2.scale": "res_scale_2"}  # fmt: skip
_BLOCK_KEY = re.compile(
    r"layer_scale_[12]|res_scale_[12]|(norm[12]|mlp\.fc[12])\.(weight|bias)|mlp\.act\.(scale|bias)"
    r"|token_mixer\.(pwconv[12]\.weight|act1\.(scale|bias)|dwconv\.weight|qkv\.weight|proj\.weight|random_matrix)"
)


@dataclass(frozen=True)
class Converted:
    state_dict: dict[str, torch.Tensor]  # in this package's layout
    layout: str  # where it came from: "official" (PoolFormer, as ours), "baselines" (sail-sg/metaformer) or "timm"
    model_overrides: dict[str, Any] = field(default_factory=dict)  # what the source fixes, e.g. {"head": "layernorm"}


def convert_checkpoint(state_dict: dict[str, torch.Tensor]) -> Converted:
    """Any supported layout -> ours. Keys with no counterpart here raise a ValueError naming them."""
    if "downsample_layers.0.conv.weight" in state_dict:
        return Converted(_renamed(state_dict, _baselines_key, "the official Baselines"), "baselines")
    if "stem.conv.weight" in state_dict or any(key.startswith("stages.") for key in state_dict):
        mlp_head = any(key.startswith("head.fc.fc1.") for key in state_dict)
        # timm's heads all normalise after the mean; its MLP head is the Baselines' (our preset's `mlp`)
        overrides = {} if mlp_head else {"head": "layernorm"}
        return Converted(_renamed(state_dict, _timm_key, "timm"), "timm", overrides)
    return Converted(dict(state_dict), "official")


def _renamed(
    state_dict: dict[str, torch.Tensor], rename: Callable[[str], str | None], source: str
) -> dict[str, torch.Tensor]:
    names = {key: rename(key) for key in state_dict}
    unknown = [key for key, name in names.items() if name is None]
    if unknown:
        raise ValueError(f"no counterpart here for these keys of {source}: {', '.join(unknown[:8])}")
    return {names[key]: _our_shape(names[key], value) for key, value in state_dict.items()}


def _our_shape(key: str, value: torch.Tensor) -> torch.Tensor:
    """Our channel MLP keeps the official PoolFormer's 1x1 convolutions; our separable convolution's pointwise
    layers are the official Baselines' nn.Linear (timm has 1x1 convolutions for both in its NCHW stages)."""
    if re.search(r"\.mlp\.fc[12]\.weight$", key) and value.ndim == 2:
        return value.reshape(*value.shape, 1, 1)
    if re.search(r"\.token_mixer\.pwconv[12]\.weight$", key) and value.ndim == 4:
        return value.flatten(1)
    return value


def _block(stage: str, block: str, rest: str) -> str | None:
    rest = _BLOCK_RENAMES.get(rest, rest)
    return f"network.{2 * int(stage)}.{block}.{rest}" if _BLOCK_KEY.fullmatch(rest) else None


def _baselines_key(key: str) -> str | None:
    if m := re.fullmatch(r"downsample_layers\.0\.(conv|post_norm)\.(weight|bias)", key):
        return f"patch_embed.{'proj' if m[1] == 'conv' else 'post_norm'}.{m[2]}"
    if m := re.fullmatch(r"downsample_layers\.(\d+)\.(conv|pre_norm)\.(weight|bias)", key):
        return f"network.{2 * int(m[1]) - 1}.{'proj' if m[2] == 'conv' else 'pre_norm'}.{m[3]}"
    if m := re.fullmatch(r"stages\.(\d+)\.(\d+)\.(.+)", key):
        return _block(m[1], m[2], m[3])
    if re.fullmatch(r"(norm|head(\.fc[12]|\.norm)?)\.(weight|bias)", key):
        return key
    return None


def _timm_key(key: str) -> str | None:
    if m := re.fullmatch(r"stem\.(conv|norm)\.(weight|bias)", key):
        return f"patch_embed.{'proj' if m[1] == 'conv' else 'post_norm'}.{m[2]}"
    if m := re.fullmatch(r"stages\.(\d+)\.downsample\.(conv|norm)\.(weight|bias)", key):
        return f"network.{2 * int(m[1]) - 1}.{'proj' if m[2] == 'conv' else 'pre_norm'}.{m[3]}"
    if m := re.fullmatch(r"stages\.(\d+)\.blocks\.(\d+)\.(.+)", key):
        return _block(m[1], m[2], m[3])
    if m := re.fullmatch(r"head\.norm\.(weight|bias)", key):
        return f"norm.{m[1]}"
    if m := re.fullmatch(r"head\.fc\.((fc[12]|norm)\.)?(weight|bias)", key):
        return f"head.{m[1] or ''}{m[3]}"
    return None


def to_timm_checkpoint(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our PoolFormer v1 state dicts in timm's names (the inverse of `convert_checkpoint` for them), e.g. to write a
    timm-layout test file. Keys with no timm PoolFormer counterpart (position embeddings, attention or spatial-FC
    mixers, the Baselines' layers) raise a ValueError."""
    unknown = [key for key in state_dict if _to_timm_key(key) is None]
    if unknown:
        raise ValueError(f"no timm PoolFormer(v1) counterpart for keys: {', '.join(unknown[:8])}")
    return {_to_timm_key(key): value for key, value in state_dict.items()}


def _to_timm_key(key: str) -> str | None:
    if m := re.fullmatch(r"patch_embed\.proj\.(weight|bias)", key):
        return f"stem.conv.{m[1]}"
    if m := re.fullmatch(r"network\.(\d+)\.proj\.(weight|bias)", key):
        return f"stages.{(int(m[1]) + 1) // 2}.downsample.conv.{m[2]}" if int(m[1]) % 2 else None
    if m := re.fullmatch(r"network\.(\d+)\.(\d+)\.(layer_scale_[12]|(?:norm[12]|mlp\.fc[12])\.(?:weight|bias))", key):
        rest = {value: name for name, value in _BLOCK_RENAMES.items()}.get(m[3], m[3])
        return f"stages.{int(m[1]) // 2}.blocks.{m[2]}.{rest}" if int(m[1]) % 2 == 0 else None
    if m := re.fullmatch(r"(norm|head)\.(weight|bias)", key):
        return f"head.{'norm' if m[1] == 'norm' else 'fc'}.{m[2]}"
    return None
