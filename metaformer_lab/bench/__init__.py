"""Benchmarks: `python -m metaformer_lab.bench {model,loop,loader,index-memory,gpu} --help`.

- `model`: training-step and inference throughput of a model, against the straightforward baseline in the same
  process (`bench/model.py`);
- `loop`: the Lightning loop against a bare PyTorch loop over the same model, data and batch (`bench/loop.py`);
- `loader`: can this machine's CPUs keep a GPU fed (`bench/loader.py`)?
- `index-memory`: what an image folder's index costs each loader process (`bench/loader.py`);
- `gpu`: on a CUDA GPU, the `gpu` tests, `model` in each precision and layout, and `loop` (`bench/gpu.py`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from metaformer_lab.bench import gpu, loader, loop, model
from metaformer_lab.registry import ConfigError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m metaformer_lab.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for command in (model, loop, loader, gpu):
        command.add_parser(commands)
    for subparser in commands.choices.values():
        subparser.add_argument("--json", type=Path, metavar="FILE", help="write all numbers to FILE as JSON")
    args = parser.parse_args(argv)
    try:
        report = args.measure(args, parser)
    except ConfigError as error:
        parser.exit(2, f"error: {error}\n")
    args.show(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
