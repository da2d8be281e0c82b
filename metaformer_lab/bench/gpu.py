"""`python -m metaformer_lab.bench gpu`: everything this project needs to know from a GPU, in one command.

    python -m metaformer_lab.bench gpu [--seconds 2] [--batch-size 128] [--no-tests] [--json FILE]

1. the tests marked `gpu` (`pytest -m gpu`: each precision, compile, both layouts, checkpoints across devices, DDP
   through torchrun, and NCCL where there are 2 GPUs), their outcome counted;
2. `bench model poolformer_s12` at 224 px in fp32 (TF32 where the run would use it), bf16-mixed and bf16-mixed
   compiled, each with channels_last on and off: training img/s, TFLOP/s against this card's measured matrix-product
   peak in the same dtype, peak memory; and which layout is faster in each (what `trainer.channels_last=auto`
   should choose on this kind of device);
3. `bench loop`: Lightning's speed over a bare loop's on this GPU;
4. the device path's augmentation (`data.augment_on=device`): 256 ragged crops resized to 224 px and RandAugmented
   on this GPU, images/s (as `bench loader` times it).
All of it is printed and, with --json, written as JSON. Made to fit in 8 minutes on one GPU; on a machine without
CUDA it stops with one line.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from metaformer_lab.bench.loader import time_device_augment
from metaformer_lab.bench.loop import bench_loop
from metaformer_lab.bench.model import bench_model
from metaformer_lab.data.datamodules import CropSample
from metaformer_lab.data.imagefolder import crop_box
from metaformer_lab.data.randaugment import EXAMPLE, RandAugment

TESTS = Path(__file__).parents[2] / "tests"
MODEL, IMAGE_SIZE = "poolformer_s12", 224
CONFIGURATIONS = [("32", False), ("bf16-mixed", False), ("bf16-mixed", True)]  # (precision, compiled)
BUDGET_S = 480.0  # the whole command on one GPU
TESTS_SHARE = 0.5  # of the budget, at most, for `pytest -m gpu`
LOOP_S, COMPILED_ROW_S = 60.0, 90.0  # about what bench loop and one compiled row (its compiling) take


def run_gpu_tests(timeout_s: float) -> dict[str, Any]:
    """`pytest -m gpu` on this repository's tests, one at a time (they share the GPU): its counts and its end. Past
    `timeout_s` the whole process group is killed (runs and torchrun ranks too: nothing keeps the GPU busy)."""
    if not (TESTS / "test_gpu.py").exists():
        return {"ran": False, "why": f"no tests at {TESTS} (installed without the repository)"}
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-rs", "-q", "-n", "0", "-p", "no:cacheprovider",
               str(TESTS)]  # fmt: skip
    began = time.perf_counter()
    with subprocess.Popen(command, cwd=TESTS.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True) as pytest:  # fmt: skip
        try:
            output, _ = pytest.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(pytest.pid, signal.SIGKILL)
            output, _ = pytest.communicate()
            return {"ran": True, "exit_code": None, "why": f"stopped after {timeout_s:.0f} s", "tail": output[-3000:]}
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", output)}
    return {"ran": True, "exit_code": pytest.returncode, "seconds": time.perf_counter() - began, **counts,
            "tail": output[-3000:]}  # fmt: skip


def measure_models(batch_size: int, seconds: float, deadline: float) -> list[dict[str, Any]]:
    """This project's variant of `bench model` in each configuration and layout (the baseline beside it each time);
    a configuration that fails is a row with its error, and the compiled ones are left out past `deadline`."""
    rows = []
    for precision, compiled in CONFIGURATIONS:
        for channels_last in (True, False):
            row: dict[str, Any] = {"precision": precision, "compiled": compiled, "channels_last": channels_last}
            rows.append(row)
            if compiled and time.perf_counter() > deadline:
                row["error"] = "left out: the time budget was spent"
                continue
            torch.cuda.empty_cache()
            try:
                report = bench_model(
                    MODEL, {}, IMAGE_SIZE, batch_size, precision, channels_last, compiled, seconds,
                    torch.device("cuda"),
                )  # fmt: skip
            except Exception as error:  # one configuration's failure (a compiler missing) keeps the others
                row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
                continue
            ours = report["variants"]["this project"]
            row.update({
                "train_images_per_s": ours["train"]["images_per_s"],
                "inference_images_per_s": ours["inference"]["images_per_s"],
                "train_tflop_s": ours["train_gflop_s"] / 1000, "peak_tflop_s": report["matmul_peak_gflop_s"] / 1000,
                "train_fraction_of_peak": report["train_fraction_of_peak"],
                "peak_allocated_mb": ours["peak_allocated_mb"], "max_logit_diff": report["max_logit_diff"],
                "report": report,
            })  # fmt: skip
    return rows


def faster_layouts(rows: list[dict[str, Any]]) -> dict[str, bool]:
    """For each configuration measured in both layouts, whether channels_last trained faster than NCHW."""
    speed = {(r["precision"], r["compiled"], r["channels_last"]): r.get("train_images_per_s") for r in rows}
    return {
        f"{precision}{' compiled' if compiled else ''}": speed[precision, compiled, True]
        > speed[precision, compiled, False]
        for precision, compiled in CONFIGURATIONS
        if speed[precision, compiled, True] and speed[precision, compiled, False]
    }


def bench_gpu(batch_size: int, seconds: float, tests: bool, budget_s: float = BUDGET_S) -> dict[str, Any]:
    began = time.perf_counter()
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0), "capability": list(torch.cuda.get_device_capability(0)),
        "gpus": torch.cuda.device_count(), "torch": torch.__version__, "cuda": torch.version.cuda,
    }  # fmt: skip
    report["tests"] = run_gpu_tests(TESTS_SHARE * budget_s) if tests else {"ran": False, "why": "--no-tests"}
    # what is left, less the loop's minute, for the model: the compiled rows (minutes of compiling) go last
    rows = measure_models(batch_size, seconds, deadline=began + budget_s - LOOP_S - COMPILED_ROW_S)
    report["model"] = {"name": MODEL, "image_size": IMAGE_SIZE, "batch_size": batch_size, "rows": rows,
                       "channels_last_faster": faster_layouts(rows)}  # fmt: skip
    try:
        report["loop"] = bench_loop(["data.image_size=64"], steps=40, rounds=2)
    except Exception as error:
        report["loop"] = {"error": f"{type(error).__name__}: {error}"}
    try:
        report["device_augment"] = device_augment(seconds)
    except Exception as error:
        report["device_augment"] = {"error": f"{type(error).__name__}: {error}"}
    report["seconds"] = time.perf_counter() - began
    return report


def device_augment(seconds: float, batch: int = 256) -> dict[str, Any]:
    """`bench loader`'s timing of the device path's per-batch work, on cuda: crops of ImageNet-like 500x375 images
    (random pixels; the ops' cost does not depend on them) with the recipe's box and interpolation draws."""
    rng, generator = random.Random(0), torch.Generator().manual_seed(0)
    crops = []
    for _ in range(64):
        x, y, w, h = crop_box(500, 375, rng)
        pixels = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=generator)
        crops.append(CropSample(pixels.numpy(), rng.random() < 0.5))
    return time_device_augment(crops, IMAGE_SIZE, RandAugment.parse(EXAMPLE), torch.device("cuda"), batch, seconds)


def print_gpu(report: dict[str, Any]) -> None:
    print(f"gpu: {report['device']} (compute capability {'.'.join(map(str, report['capability']))}, "
          f"{report['gpus']} visible), torch {report['torch']}, CUDA {report['cuda']}")  # fmt: skip
    tests = report["tests"]
    if tests["ran"] and tests.get("exit_code") is not None:
        counts = ", ".join(f"{tests[k]} {k}" for k in ("passed", "failed", "skipped", "error", "errors") if k in tests)
        print(f"  gpu tests: {counts} in {tests['seconds']:.0f} s (exit {tests['exit_code']})")
        if tests["exit_code"] != 0:
            print("    " + "\n    ".join(tests["tail"].strip().splitlines()[-15:]))
    else:
        print(f"  gpu tests: not run ({tests['why']})")
    model = report["model"]
    print(f"  {model['name']} at {model['image_size']} px, batch {model['batch_size']}, training step:")
    print(f"    {'precision':<24} {'layout':<6} {'img/s':>8} {'TFLOP/s':>8} {'of peak':>8} {'peak MB':>8}")
    for row in model["rows"]:
        label = row["precision"] + (" + compile" if row["compiled"] else "")
        if "error" in row:
            print(f"    {label:<24} {'NHWC' if row['channels_last'] else 'NCHW':<6} {row['error']}")
            continue
        peak_mb = f"{row['peak_allocated_mb']:.0f}" if row["peak_allocated_mb"] is not None else "—"
        print(f"    {label:<24} {'NHWC' if row['channels_last'] else 'NCHW':<6} {row['train_images_per_s']:>8.0f} "
              f"{row['train_tflop_s']:>8.1f} {100 * row['train_fraction_of_peak']:>7.0f}% {peak_mb:>8}")  # fmt: skip
    faster = ", ".join(f"{name}: {'NHWC' if nhwc else 'NCHW'}" for name, nhwc in model["channels_last_faster"].items())
    print(f"  faster layout: {faster}")
    loop = report["loop"]
    if "error" in loop:
        print(f"  bench loop: {loop['error']}")
    else:
        speed = f"{loop['images_per_s']['lightning']:.0f} img/s, {loop['model']} at {loop['image_size']} px"
        print(f"  bench loop: Lightning at {loop['lightning_over_bare']:.3f}x the bare loop's speed ({speed})")
    augment = report["device_augment"]
    if "error" in augment:
        print(f"  device augmentation: {augment['error']}")
    else:
        print(f"  device augmentation (data.augment_on=device), {augment['batch']} crops to {augment['image_size']} px:"
              f" {augment['images_per_s']:.0f} img/s (resize {augment['resize']['images_per_s']:.0f}, RandAugment "
              f"{augment['randaugment']['images_per_s']:.0f})")  # fmt: skip
    print(f"  {report['seconds']:.0f} s in all")


def add_parser(commands: argparse._SubParsersAction) -> None:
    gpu = commands.add_parser(
        "gpu", help="the GPU tests and the GPU numbers the README needs, in one command",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    gpu.add_argument("--batch-size", type=int, default=128, help="bench model's batch (default 128)")
    gpu.add_argument("--seconds", type=float, default=2.0, help="time each pass of bench model about this long")
    gpu.add_argument("--no-tests", dest="tests", action="store_false", help="skip `pytest -m gpu`")
    gpu.set_defaults(measure=measure, show=print_gpu)


def measure(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    if not torch.cuda.is_available():
        build = f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
        parser.exit(2, f"error: bench gpu needs a CUDA GPU; torch {torch.__version__} ({build}) sees none\n")
    if args.batch_size < 1 or args.seconds < 0:
        parser.error("--batch-size must be positive and --seconds not negative")
    return bench_gpu(args.batch_size, args.seconds, args.tests)
