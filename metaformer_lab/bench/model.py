"""`python -m metaformer_lab.bench model`: how fast this project trains and runs a model, against the baseline.

    python -m metaformer_lab.bench model poolformer_s12 [mixer=identity ...] [--image-size 224] [--batch-size 32]
        [--precision 32|bf16-mixed|16-mixed] [--[no-]channels-last] [--[no-]tf32] [--compile] [--seconds 20]
        [--json FILE]

Two variants of the same model (same weights, same batch) are timed in this one process, in turn, round after
round, so that their ratio holds on a noisy machine:
- `baseline`: the straightforward computation, as the official code (`bench/reference.py`): the MLP as 1x1
  convolutions, NCHW, eager, fp32;
- `this project`: the model as training runs it by default (MLP as matrix products, the memory format
  `trainer.channels_last=auto` chooses on this kind of device), in the precision asked for, compiled with
  `--compile`.
Both run as training does on this device: on a GPU with fp32 matrix products on TF32 tensor cores (`trainer.tf32`;
the official code's 1x1 convolutions get TF32 from cuDNN by default) and cuDNN autotuning (`trainer.benchmark`).
Each reports the training step (forward, backward, AdamW step) and the eval forward in images/s (median pass, with
the slowest and fastest), the GFLOP/s they achieve (3 x and 1 x the forward's 2 x MACs, the paper's MAC count), and
the activations kept for backward (MB; on a GPU also the peak allocated by the variant alone: its weights, gradients,
AdamW state and activations). The logits and gradients of the two in strict fp32 (TF32 off) are compared (they must
agree to 1e-5), and the matrix-product peak of this device in the precision's dtype is measured, for the fraction of
it the training step reaches.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from metaformer_lab.bench.reference import straightforward
from metaformer_lab.bench.timing import Rate, rate, time_rounds
from metaformer_lab.config import CHANNELS_LAST_FASTER, tf32_enabled
from metaformer_lab.models import PRESETS, create_model, measure_cost
from metaformer_lab.registry import ConfigError

PRECISIONS = {"32": torch.float32, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
TOLERANCE = 1e-5  # fp32 logits and gradients of the two variants: the same maths, other kernels


@dataclass(frozen=True)
class VariantReport:
    name: str
    precision: str
    channels_last: bool
    compiled: bool
    train: Rate
    inference: Rate
    train_gflop_s: float
    inference_gflop_s: float
    saved_for_backward_mb: float  # tensors autograd keeps from the forward for the backward, one training step
    peak_allocated_mb: float | None  # GPU only: the peak of a training step, less what was allocated before the variant


class Variant:
    """One way of running the model: its own copy, optimizer, memory format and autocast."""

    def __init__(
        self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, precision: str, channels_last: bool,
        compiled: bool, fused_optimizer: bool,
    ) -> None:  # fmt: skip
        self.precision, self.channels_last, self.compiled = precision, channels_last, compiled
        layout = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(memory_format=layout)
        self.images, self.labels = images.contiguous(memory_format=layout), labels
        self.forward: Callable[[torch.Tensor], torch.Tensor] = torch.compile(self.model) if compiled else self.model
        # the official timm recipe's AdamW (a loop over tensors) for the baseline, training's fused one for this project
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=fused_optimizer)
        device = images.device
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "16-mixed" and device.type == "cuda")
        self.device = device

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=PRECISIONS[self.precision])

    def loss(self) -> torch.Tensor:
        with self.autocast():
            logits = self.forward(self.images)
        return F.cross_entropy(logits.float(), self.labels)

    def train_step(self) -> None:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(self.loss()).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self._sync()

    def infer(self) -> None:
        self.model.eval()
        with torch.no_grad(), self.autocast():
            self.forward(self.images)
        self._sync()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def saved_for_backward_mb(self) -> float:
        """MB of the tensors autograd saves in one training forward (each storage counted once)."""
        storages: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        self.model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = self.loss()
        del loss
        return sum(storages.values()) / 2**20

    def peak_allocated_mb(self, allocated_before: int) -> float | None:
        """GPU only: MB this variant's training step needs by itself: the peak of a step (after one in which AdamW
        creates its state and a compiled model compiles) less `allocated_before`, what was allocated before this
        variant's weights came to the device (the batch, and another variant's weights and state)."""
        if self.device.type != "cuda":
            return None
        self.train_step()
        torch.cuda.reset_peak_memory_stats(self.device)
        self.train_step()
        return (torch.cuda.max_memory_allocated(self.device) - allocated_before) / 2**20


def fp32_differences(baseline: Variant, fast: Variant) -> dict[str, float]:
    """Largest |difference| of the two variants' eval logits and of their parameter gradients (training mode, the
    same drop-path masks), in strict fp32 (TF32 off for both: its 10-bit mantissa alone differs by ~1e-3) without
    autocast or compilation, each in its memory format."""
    differences = {}
    with tf32_enabled(False):
        for training in (False, True):
            outputs = []
            for variant in (baseline, fast):
                variant.model.train(training)
                variant.model.zero_grad(set_to_none=True)
                torch.manual_seed(0)  # the same drop-path masks in both
                logits = variant.model(variant.images)
                if training:
                    F.cross_entropy(logits, variant.labels).backward()
                    outputs.append([p.grad for p in variant.model.parameters() if p.requires_grad])
                else:
                    outputs.append([logits.detach()])
            pairs = [(a, b) for a, b in zip(*outputs, strict=True) if a is not None and b is not None]
            worst = max((a - b).abs().max().item() for a, b in pairs)
            differences["max_grad_diff" if training else "max_logit_diff"] = worst
            for variant in (baseline, fast):
                variant.model.zero_grad(set_to_none=True)
    return differences


def matmul_peak_gflop_s(device: torch.device, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """GFLOP/s of square matrix products in `dtype` on `device` (the median of repeats): what a training step's
    FLOPs can be compared with. The size doubles from 256 while a product takes under 50 ms (up to 8192 on a GPU,
    2048 on a CPU): a CPU without fp16 instructions multiplies in fp16 at well under 1 GFLOP/s."""
    largest, size = (8192 if device.type == "cuda" else 2048), 128

    def product() -> None:
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    took = 0.0
    while size < largest and took < 0.05:
        size *= 2
        a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
        product()  # warm-up
        begin = time.perf_counter()
        product()
        took = time.perf_counter() - begin

    times = time_rounds({"matmul": product}, seconds, min_rounds=5)["matmul"]
    return rate(times, 1).images_per_s * 2 * size**3 / 1e9


def bench_model(
    preset: str, overrides: dict[str, Any], image_size: int, batch_size: int, precision: str, channels_last: bool,
    compiled: bool, seconds: float, device: torch.device, min_rounds: int = 3, tf32: bool | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The numbers of the module docstring, as a JSON-ready dict. `precision`, `channels_last`, `compiled`: this
    project's variant; `tf32`: fp32 matrix products on TF32 tensor cores while timing, both variants (None: as
    training's `trainer.tf32=auto`, on for a GPU)."""
    if precision not in PRECISIONS:
        raise ConfigError("--precision", precision, ", ".join(PRECISIONS))
    tf32 = device.type == "cuda" if tf32 is None else tf32
    with torch.random.fork_rng():  # the same model and batch every time, without touching the caller's stream
        torch.manual_seed(0)
        model = create_model(preset, img_size=image_size, **overrides)
        images = torch.randn(batch_size, 3, image_size, image_size)
        labels = torch.randint(0, model.head.out_features if isinstance(model.head, nn.Linear) else 1, (batch_size,))
    cost = measure_cost(model, image_size)
    images, labels = images.to(device), labels.to(device)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as training's trainer.benchmark=auto (and timm's recipe)
    settings = {  # model (still on the CPU), precision, channels_last, compiled, fused AdamW
        "baseline": (straightforward(model), "32", False, False, False),
        "this project": (model, precision, channels_last, compiled, True),
    }
    initial = copy.deepcopy(model.state_dict())  # both variants' weights (the steps that measure memory train them)
    variants, peaks = {}, {}
    with tf32_enabled(tf32):
        for name, (network, *how) in settings.items():  # each to the device in turn, to measure its memory alone
            before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            variants[name] = Variant(network.to(device), images, labels, *how)
            peaks[name] = variants[name].peak_allocated_mb(before)
        for variant in variants.values():
            variant.model.load_state_dict(initial)  # the same weights again, for the comparison
        differences = fp32_differences(*variants.values())
        runs: dict[str, Callable[[], None]] = {}
        for name, variant in variants.items():
            runs[f"{name} train"] = variant.train_step
            runs[f"{name} inference"] = variant.infer
        times = time_rounds(runs, seconds, min_rounds)
        peak = matmul_peak_gflop_s(device, PRECISIONS[precision])
        # here too: outside these settings dynamo's guards would compile a compiled variant once more
        saved = {name: variant.saved_for_backward_mb() for name, variant in variants.items()}
    train_flop, inference_flop = 3 * 2 * cost.macs, 2 * cost.macs  # per image; backward ~ 2x forward
    reports = {}
    for name, variant in variants.items():
        train, inference = rate(times[f"{name} train"], batch_size), rate(times[f"{name} inference"], batch_size)
        reports[name] = VariantReport(
            name, variant.precision, variant.channels_last, variant.compiled, train, inference,
            train.images_per_s * train_flop / 1e9, inference.images_per_s * inference_flop / 1e9,
            saved[name], peaks[name],
        )  # fmt: skip
    base, fast = reports["baseline"], reports["this project"]
    threads = torch.get_num_threads()
    return {
        "model": preset, "overrides": overrides, "image_size": image_size, "batch_size": batch_size,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({threads} threads)",
        "torch": torch.__version__, "macs": cost.macs, "params": cost.params, "tf32": tf32,
        "variants": {name: asdict(report) for name, report in reports.items()},
        "train_speedup": fast.train.images_per_s / base.train.images_per_s,
        "inference_speedup": fast.inference.images_per_s / base.inference.images_per_s,
        **differences, "tolerance": TOLERANCE,
        "matmul_peak_gflop_s": peak, "matmul_dtype": str(PRECISIONS[precision]).removeprefix("torch."),
        "train_fraction_of_peak": fast.train_gflop_s / peak,
    }  # fmt: skip


def print_model(report: dict[str, Any]) -> None:
    overrides = " ".join(f"{key}={value}" for key, value in report["overrides"].items())
    print(f"model: {report['model']} {overrides}".rstrip() + f" at {report['image_size']} px, batch "
          f"{report['batch_size']}, {report['device']}, torch {report['torch']}, {report['macs'] / 1e9:.3g} GMACs"
          + (", fp32 matrix products on TF32" if report["tf32"] else ""))  # fmt: skip
    print(f"  {'variant':<38} {'train img/s':>11} {'(slowest-fastest)':>17} {'GFLOP/s':>8} "
          f"{'infer img/s':>11} {'saved MB':>9}")  # fmt: skip
    for name, variant in report["variants"].items():
        layout = "NHWC" if variant["channels_last"] else "NCHW"
        label = f"{name} ({variant['precision']}, {layout}{', compiled' if variant['compiled'] else ''})"
        train, inference = variant["train"], variant["inference"]
        spread = f"{train['slowest_images_per_s']:.3g}-{train['fastest_images_per_s']:.3g}"
        peak = f", peak {variant['peak_allocated_mb']:.0f} MB" if variant["peak_allocated_mb"] is not None else ""
        print(f"  {label:<38} {train['images_per_s']:>11.4g} {spread:>17} {variant['train_gflop_s']:>8.1f} "
              f"{inference['images_per_s']:>11.4g} {variant['saved_for_backward_mb']:>9.0f}{peak}")  # fmt: skip
    agree = "within" if max(report["max_logit_diff"], report["max_grad_diff"]) <= report["tolerance"] else "ABOVE"
    print(f"  this project / baseline: training {report['train_speedup']:.2f}x, inference "
          f"{report['inference_speedup']:.2f}x (median of {report['variants']['baseline']['train']['repeats']} "
          "interleaved rounds)")  # fmt: skip
    print(f"  strict fp32 max |difference|: logits {report['max_logit_diff']:.1e}, gradients "
          f"{report['max_grad_diff']:.1e} ({agree} {report['tolerance']:.0e})")  # fmt: skip
    print(f"  {report['matmul_dtype']} matrix products here: {report['matmul_peak_gflop_s']:.0f} GFLOP/s; the "
          f"training step reaches {100 * report['train_fraction_of_peak']:.0f}% of it")  # fmt: skip


def add_parser(commands: argparse._SubParsersAction) -> None:
    model = commands.add_parser(
        "model", help="training and inference throughput against the straightforward baseline",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    model.add_argument("preset", nargs="?", default="poolformer_s12", help="default poolformer_s12; one of: "
                       + ", ".join(PRESETS.names()))  # fmt: skip
    model.add_argument("overrides", nargs="*", help="MetaFormer arguments, key=value (Hydra syntax)")
    model.add_argument("--image-size", type=int, default=224)
    model.add_argument("--batch-size", type=int, default=32)
    model.add_argument("--precision", default="32", choices=list(PRECISIONS),
                       help="this project's variant (the baseline stays fp32); CPUs without bf16 or fp16 instructions "
                       "emulate them, far slower than fp32")  # fmt: skip
    model.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                       help="this project's variant in NHWC or NCHW (default: as trainer.channels_last=auto chooses "
                       "on this kind of device)")  # fmt: skip
    model.add_argument("--tf32", action=argparse.BooleanOptionalAction,
                       help="fp32 matrix products on TF32 tensor cores while timing (default: as trainer.tf32=auto, "
                       "on for a GPU); the fp32 agreement check never uses them")  # fmt: skip
    model.add_argument("--compile", action="store_true", help="torch.compile this project's variant (inductor)")
    model.add_argument("--seconds", type=float, default=10.0, help="time each of the 4 passes about this long")
    model.add_argument("--rounds", type=int, default=3, help="at least this many timed rounds (default 3)")
    model.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    model.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    model.set_defaults(measure=measure, show=print_model)


def measure(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    from metaformer_lab.profile import parse_overrides

    if args.image_size < 1 or args.batch_size < 1 or args.seconds < 0 or args.rounds < 1:
        parser.error("--image-size, --batch-size and --rounds must be positive, --seconds not negative")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    channels_last = args.channels_last
    if channels_last is None:
        channels_last = CHANNELS_LAST_FASTER.get("gpu" if device.type == "cuda" else device.type, False)
    return bench_model(
        args.preset, parse_overrides(args.overrides), args.image_size, args.batch_size, args.precision,
        channels_last, args.compile, args.seconds, device, args.rounds, args.tf32,
    )  # fmt: skip
