"""Parameters and MACs in the paper's convention (fvcore, which the paper's MAC column was counted with).

MACs = multiply-accumulates of convolutions, linear layers and matrix products (torch's `FlopCounterMode`,
FLOPs = 2 x MACs, plus a formula for CPU attention), plus each normalization module's `macs_per_element` times
its input size (5 for the modified LayerNorm; see `norms.py`). Pooling, activations, additions and the final
mean are not counted, as in fvcore.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _cpu_attention_flops(q: torch.Size, k: torch.Size, v: torch.Size, *args: object, **kwargs: object) -> int:
    # torch registers the CUDA attention kernels but not the CPU one; the matmuls are the same
    return sdpa_flop_count(q, k, v)


EXTRA_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


@dataclass(frozen=True)
class ModelCost:
    params: int  # trainable
    frozen_params: int  # e.g. the random mixer's matrices
    macs: int  # per image, at `resolution`
    resolution: int


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return trainable, frozen


def count_macs(model: nn.Module, resolution: int = 224, in_chans: int = 3) -> int:
    """MACs of one eval-mode forward pass of one image. Works on the meta device (no compute)."""
    norm_macs = 0

    def count_norm(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal norm_macs
        norm_macs += module.macs_per_element * inputs[0].numel()

    hooks = [m.register_forward_hook(count_norm) for m in model.modules() if hasattr(m, "macs_per_element")]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=EXTRA_FORMULAS) as counter:
            model(torch.zeros(1, in_chans, resolution, resolution, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return counter.get_total_flops() // 2 + norm_macs


def measure_cost(model: nn.Module, resolution: int = 224, in_chans: int = 3) -> ModelCost:
    trainable, frozen = count_params(model)
    return ModelCost(trainable, frozen, count_macs(model, resolution, in_chans), resolution)
