"""Profile a model: params, frozen params, MACs and forward / training-step throughput on this device.

    python -m metaformer_lab.profile poolformer_s12 mixer=identity norm=layernorm --resolution 224 [--json]

Overrides are MetaFormer arguments in Hydra's syntax (`mixer=[pooling,pooling,attention,attention]`).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from hydra.core.override_parser.overrides_parser import OverridesParser
from torch import nn

from metaformer_lab.models import PRESETS, create_model, measure_cost
from metaformer_lab.registry import ConfigError


@dataclass(frozen=True)
class Throughput:
    forward_img_s: float
    train_step_img_s: float
    batch_size: int
    device: str


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["mixer=identity", "depths=[1,1,3,1]"]` -> {"mixer": "identity", "depths": [1, 1, 3, 1]}."""
    parsed = OverridesParser.create().parse_overrides(items)
    return {o.key_or_group: o.value() for o in parsed}


def _timed(fn: Any, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps


def measure_throughput(
    model: nn.Module, resolution: int, batch_size: int, device: torch.device, steps: int = 5, warmup: int = 2
) -> Throughput:
    """Images per second of an eval forward pass and of a full AdamW training step (forward, backward, update)."""
    model = model.to(device)
    x = torch.randn(batch_size, 3, resolution, resolution, device=device)
    y = torch.randint(0, 2, (batch_size,), device=device)
    model.eval()
    with torch.no_grad():
        forward = _timed(lambda: model(x), steps, warmup, device)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    train = _timed(train_step, steps, warmup, device)
    return Throughput(batch_size / forward, batch_size / train, batch_size, str(device))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m metaformer_lab.profile", description=__doc__.split("\n")[0])
    parser.add_argument("model", help="preset: " + ", ".join(PRESETS.names()))
    parser.add_argument("overrides", nargs="*", help="MetaFormer arguments, key=value")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="timed iterations (after 2 warm-up ones)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        overrides = {"img_size": args.resolution, **parse_overrides(args.overrides)}
        model = create_model(args.model, **overrides)
    except ConfigError as error:
        parser.exit(2, f"error: {error}\n")
    cost = measure_cost(model, args.resolution)
    speed = measure_throughput(model, args.resolution, args.batch_size, torch.device(args.device), args.steps)
    report = dict(model=args.model, overrides=overrides, **asdict(cost), **asdict(speed))
    if args.json:
        print(json.dumps(report))
        return
    print(f"model          {args.model} {' '.join(args.overrides)}".rstrip())
    print(f"resolution     {cost.resolution}")
    print(f"params         {cost.params:,} ({cost.params / 1e6:.2f} M trainable)")
    print(f"frozen params  {cost.frozen_params:,} ({cost.frozen_params / 1e6:.2f} M)")
    print(f"MACs           {cost.macs / 1e9:.4f} G (paper convention, fvcore)")
    print(f"forward        {speed.forward_img_s:.1f} img/s (batch {speed.batch_size}, {speed.device})")
    print(f"train step     {speed.train_step_img_s:.1f} img/s (forward + backward + AdamW)")


if __name__ == "__main__":
    main()
