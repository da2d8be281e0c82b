"""Convert timm-layout MetaFormer checkpoints (`stages.N.blocks.M...`) to this package's official layout, and back."""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

# timm (>= 0.9, models/metaformer.py) names -> official PoolFormer names, block-relative
_BLOCK_RENAMES = {"layer_scale1.scale": "layer_scale_1", "layer_scale2.scale": "layer_scale_2"}


def convert_timm_checkpoint(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a timm PoolFormer(v1) state dict onto ours, e.g. `stages.1.blocks.0.layer_scale1.scale` ->
    `network.2.0.layer_scale_1`, `stages.1.downsample.conv.weight` -> `network.1.proj.weight`,
    `stem.conv` -> `patch_embed.proj`, `head.norm` -> `norm`, `head.fc` -> `head`.

    Checkpoints already in the official layout are returned unchanged. Keys of other MetaFormer families
    (res_scale, stem or downsample norms) have no counterpart here and raise a ValueError naming them.
    """
    if not any(key.startswith("stages.") for key in state_dict):
        return dict(state_dict)
    return _renamed(state_dict, _convert_key, "no PoolFormer(v1) counterpart for timm keys")


def _renamed(
    state_dict: dict[str, torch.Tensor], rename: Callable[[str], str | None], unknown_message: str
) -> dict[str, torch.Tensor]:
    unknown = [key for key in state_dict if rename(key) is None]
    if unknown:
        raise ValueError(f"{unknown_message}: {', '.join(unknown[:8])}")
    return {rename(key): value for key, value in state_dict.items()}


def _convert_key(key: str) -> str | None:
    if m := re.fullmatch(r"stem\.conv\.(weight|bias)", key):
        return f"patch_embed.proj.{m[1]}"
    if m := re.fullmatch(r"stages\.(\d+)\.downsample\.conv\.(weight|bias)", key):
        return f"network.{2 * int(m[1]) - 1}.proj.{m[2]}"
    if m := re.fullmatch(r"stages\.(\d+)\.blocks\.(\d+)\.(.+)", key):
        rest = _BLOCK_RENAMES.get(m[3], m[3])
        if not re.fullmatch(r"layer_scale_[12]|(norm[12]|mlp\.fc[12])\.(weight|bias)", rest):
            return None
        return f"network.{2 * int(m[1])}.{m[2]}.{rest}"
    if m := re.fullmatch(r"head\.(norm|fc)\.(weight|bias)", key):
        return f"{'norm' if m[1] == 'norm' else 'head'}.{m[2]}"
    return None


def to_timm_checkpoint(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `convert_timm_checkpoint` for PoolFormer(v1) state dicts: official names -> timm's.

    Keys with no timm PoolFormer counterpart (position embeddings, attention or spatial-FC mixers) raise a ValueError.
    """
    return _renamed(state_dict, _to_timm_key, "no timm PoolFormer(v1) counterpart for keys")


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
