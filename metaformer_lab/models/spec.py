"""`StageSpec`: everything one stage's blocks are built from, after per-stage lists are broadcast."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from metaformer_lab.registry import ConfigError


@dataclass(frozen=True)
class StageSpec:
    index: int  # 0-based stage number
    depth: int  # blocks in this stage
    dim: int  # channels
    grid: tuple[int, int]  # token grid (H, W) at the model's img_size; size-bound layers are built for it
    mixer: str
    pool_size: int
    kernel_size: int
    head_dim: int
    norm: str
    act: str
    residual: bool
    mlp: bool
    mlp_ratio: float
    mlp_bias: bool
    layer_scale_init_value: float | None
    res_scale_init_value: float | None  # ResScale: a learnable per-channel scale on the shortcut


def per_stage(key: str, value: Any, num_stages: int) -> list[Any]:
    """Broadcast one value to every stage, or check that a per-stage list has one entry per stage."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != num_stages:
            raise ConfigError(
                key, list(value), f"a per-stage list needs {num_stages} entries (one per stage), got {len(value)}"
            )
        return list(value)
    return [value] * num_stages
