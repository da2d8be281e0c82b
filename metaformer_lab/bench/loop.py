"""`python -m metaformer_lab.bench loop`: the Lightning loop against a bare PyTorch loop over the same model, data
and batch, to show what Lightning costs per step.

    python -m metaformer_lab.bench loop [run.py overrides; default data.image_size=64] [--steps 60] [--rounds 3]

The run's config is composed as `python run.py` would (the default: the small model on the embedded data at 64 px,
batch 128), on the device, precision, memory format and TF32 setting the run would resolve (`trainer=auto`: one GPU
where there is one). `lightning`: `trainer.fit` of run.py's LightningModule (mixup and cutmix, soft-target loss, the
finite-loss check, logging, AdamW and the per-step schedule) with `max_steps`, no logger, checkpoint or progress
bar. `bare`: the same step written as a plain loop over the same DataLoader, placed and cast as Lightning would
(batches to the device, autocast for bf16-mixed and 16-mixed, a GradScaler for 16-mixed). A step's time is the time
between one batch's start and the next (data loading included); the first steps of each pass are left out. On a
GPU, where the host runs ahead of the device, the device is waited for where the timed steps begin and end, and each
step counts the mean of that window. Passes alternate, `--rounds` of each; the median step of all rounds is compared.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import statistics
import time
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from metaformer_lab.bench.model import PRECISIONS
from metaformer_lab.config import build_datamodule, build_model, build_optim, resolve_device, tf32_enabled
from metaformer_lab.registry import ConfigError
from metaformer_lab.training.module import ImageClassifier, OptimSettings, parameter_groups

WARMUP_STEPS = 3  # of each pass: worker start-up, first allocations
TARGET = 0.95  # the bound on Lightning's speed over the bare loop's


def device_time(device: torch.device) -> float:
    """time.perf_counter() once the device has done the work queued so far."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class StepClock(L.Callback):
    """The time at each training batch's start, and at the end of training (the first timed start and the end wait
    for the device)."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.device = torch.device("cpu")

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, idx: int) -> None:
        self.device = module.device
        self.starts.append(device_time(module.device) if len(self.starts) == WARMUP_STEPS else time.perf_counter())

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.starts.append(device_time(module.device))


def step_times(starts: list[float], device: torch.device) -> list[float]:
    """Seconds per step from the batch start times of one pass (and its end), without its first WARMUP_STEPS steps.
    On a GPU the host runs ahead of the device between the window's two waits for it, so each step counts the
    window's mean."""
    times = [b - a for a, b in itertools.pairwise(starts[WARMUP_STEPS:])]
    return [sum(times) / len(times)] * len(times) if device.type == "cuda" else times


def lightning_pass(
    module: ImageClassifier, datamodule: L.LightningDataModule, trainer_args: dict, steps: int
) -> list[float]:
    clock = StepClock()
    trainer = L.Trainer(
        accelerator=trainer_args["accelerator"], precision=trainer_args["precision"], devices=1, max_steps=steps,
        benchmark=trainer_args["benchmark"], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[clock],
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    return step_times(clock.starts, clock.device)


class BareLoop:
    """run.py's training step without Lightning: the same batch hooks (normalization), mixing, random erasing, loss,
    finite-loss check (as often as the module's), AdamW and schedule, on `device` in `precision` as Lightning runs
    them (the module's forward applies its memory format)."""

    def __init__(
        self, module: ImageClassifier, optim: OptimSettings, datamodule: L.LightningDataModule, device: torch.device,
        precision: str,
    ) -> None:  # fmt: skip
        self.module, self.optim, self.datamodule, self.device = module, optim, datamodule, device
        self.optimizer = torch.optim.AdamW(
            parameter_groups(module.model, optim.weight_decay), lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
            fused=not (optim.grad_clip and precision.startswith("16")),  # as the LightningModule's
        )
        self.dtype = PRECISIONS[precision]
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "16-mixed")
        steps_per_epoch = max(1, len(datamodule.train_dataloader()))
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: optim.lr_at(step / steps_per_epoch) / optim.lr
        )
        self.waits: list[float] = []

    def autocast(self) -> contextlib.AbstractContextManager:
        """Lightning's mixed precision: the training step (mixing, forward, loss) under autocast."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def run(self, steps: int) -> list[float]:
        model, starts = self.module, []
        model.to(self.device)  # Lightning's pass ends with the module moved back to the CPU
        model.train()
        batches = iter(self.datamodule.train_dataloader())
        nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)  # watched on the device, read now and then
        for step in range(steps):
            starts.append(device_time(self.device) if step == WARMUP_STEPS else time.perf_counter())
            batch = self.datamodule.on_before_batch_transfer(next(batches), 0)
            batch = move_data_to_device(batch, self.device)
            images, labels = self.datamodule.on_after_batch_transfer(batch, 0)  # uint8 -> normalized float
            self.waits.append(time.perf_counter() - starts[-1])
            with self.autocast():
                loss = model.training_loss(images, labels)
            nonfinite |= ~torch.isfinite(loss.detach())
            if ((step + 1) % model.nonfinite_check_every == 0 or step == steps - 1) and nonfinite:
                raise RuntimeError("the loss diverged")
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.schedule.step()
        starts.append(device_time(self.device))
        return step_times(starts, self.device)


def bench_loop(overrides: list[str], steps: int, rounds: int) -> dict[str, Any]:
    from metaformer_lab.overrides import check_command_line
    from metaformer_lab.plan import compose_job

    cfg = compose_job(check_command_line(overrides))[0]
    torch.manual_seed(cfg.seed)
    optim, datamodule = build_optim(cfg), build_datamodule(cfg)
    datamodule.setup("fit")
    trainer_args = resolve_device(cfg.trainer)
    if trainer_args["precision"] not in PRECISIONS:
        raise ConfigError("trainer.precision", trainer_args["precision"], ", ".join(PRECISIONS))
    model = build_model(cfg, datamodule.num_classes)
    module = ImageClassifier(
        model, optim, datamodule.num_classes, trainer_args["channels_last"], datamodule.random_erasing,
        schedule_steps=steps,  # each Lightning pass
    )
    device = torch.device("cuda" if trainer_args["accelerator"] in ("gpu", "cuda") else trainer_args["accelerator"])
    bare = BareLoop(module, optim, datamodule, device, trainer_args["precision"])
    times: dict[str, list[float]] = {"lightning": [], "bare": []}
    with tf32_enabled(trainer_args["tf32"]):
        for _ in range(rounds):
            times["lightning"] += lightning_pass(module, datamodule, trainer_args, steps)
            times["bare"] += bare.run(steps)
    medians = {name: statistics.median(values) for name, values in times.items()}
    batch = cfg.data.batch_size
    return {
        "overrides": overrides, "model": cfg.model.name, "image_size": cfg.data.image_size, "batch_size": batch,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        **{key: trainer_args[key] for key in ("precision", "channels_last", "tf32")},
        "num_workers": cfg.data.num_workers, "threads": torch.get_num_threads(), "steps_per_pass": steps,
        "rounds": rounds, "median_step_ms": {name: 1000 * m for name, m in medians.items()},
        "images_per_s": {name: batch / m for name, m in medians.items()},
        "lightning_over_bare": medians["bare"] / medians["lightning"], "target": TARGET,
        "bare_data_wait_fraction": sum(bare.waits) / (sum(times["bare"]) or 1.0),
    }  # fmt: skip


def print_loop(report: dict[str, Any]) -> None:
    layout = "NHWC" if report["channels_last"] else "NCHW"
    print(f"loop: model {report['model']} at {report['image_size']} px, batch {report['batch_size']}, "
          f"{report['device']}, {report['precision']}, {layout}{', TF32' if report['tf32'] else ''}; "
          f"{report['num_workers']} loader workers, {report['threads']} threads; {report['rounds']} rounds of "
          f"{report['steps_per_pass']} steps each")  # fmt: skip
    for name in ("lightning", "bare"):
        print(f"  {name:<10} {report['median_step_ms'][name]:8.1f} ms/step  {report['images_per_s'][name]:8.1f} img/s")
    verdict = "meets" if report["lightning_over_bare"] >= report["target"] else "below"
    print(f"  Lightning runs at {report['lightning_over_bare']:.3f}x the bare loop's speed ({verdict} the target of "
          f"{report['target']}x); the bare loop waited on data {100 * report['bare_data_wait_fraction']:.1f}% of "
          "its time")  # fmt: skip


def add_parser(commands: argparse._SubParsersAction) -> None:
    loop = commands.add_parser(
        "loop", help="the Lightning loop against a bare PyTorch loop", description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    loop.add_argument("overrides", nargs="*", default=["data.image_size=64"],
                      help="run.py overrides (default: data.image_size=64)")  # fmt: skip
    loop.add_argument("--steps", type=int, default=60, help="steps per pass (default 60)")
    loop.add_argument("--rounds", type=int, default=3, help="passes of each loop (default 3)")
    loop.set_defaults(measure=measure, show=print_loop)


def measure(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    if args.steps <= WARMUP_STEPS + 1 or args.rounds < 1:
        parser.error(f"--steps must be more than {WARMUP_STEPS + 1} and --rounds positive")
    return bench_loop(args.overrides, args.steps, args.rounds)
