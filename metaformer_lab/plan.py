"""What a run or sweep will cost, before it starts: runs, their state, and time from measured throughput.

    python -m metaformer_lab.plan sweep=table5_mixers seed=0,1,2 data=shapes optim.epochs=30

Takes the same overrides as `python run.py -m`, expands the sweep as Hydra's basic sweeper does, checks every
run's config (an error stops the plan before anything is measured), looks for each run's directory (completed runs
cost nothing, interrupted ones only their remaining epochs), counts the epochs and optimizer steps each run will
take as Lightning does (cooldown, max_steps, limit_*_batches, fast_dev_run, accumulation, devices x nodes), and
times a few training steps of each distinct model on this machine's device as the run would train there: in the
precision, memory format and TF32 setting it resolves for that device (`trainer.precision=auto` is bf16-mixed on a
recent GPU), with fused AdamW, uncompiled. Rows print as they are measured.
"""

from __future__ import annotations

import argparse
import math
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from metaformer_lab.bench.model import PRECISIONS, Variant
from metaformer_lab.bench.timing import rate, time_rounds
from metaformer_lab.config import (
    accumulation,
    build_datamodule,
    build_model,
    build_optim,
    comparable_config,
    limited_batches,
    model_arguments,
    per_stage_groups,
    process_count,
    resolve_device,
    schedule_label,
    tf32_enabled,
    train_batches_per_epoch,
    trainer_arguments,
)  # fmt: skip
from metaformer_lab.overrides import check_command_line, compose_raw, sweep_jobs
from metaformer_lab.record import FINAL, RECORD_NAME, read_record
from metaformer_lab.registry import ConfigError
from metaformer_lab.training.module import OptimSettings
from metaformer_lab.training.start import config_changes

MEASURE_BATCH = 32  # on a CPU: enough to be representative, small enough to be quick (a GPU times the run's batch)


@dataclass
class PlannedRun:
    run_dir: str
    state: str  # new, resume, rerun (starts over: failed, or stopped before its first checkpoint) or done
    schedule: str  # as the record names it: "300+10 ep", "12 ep, max 20 steps", "fast_dev_run"
    epochs_left: float  # epochs the loop runs from where it starts (a fraction where max_steps stops mid-epoch)
    steps_left: int | None  # optimizer steps from there; None where the training-set size is unknown
    images_per_s: float | None  # training throughput measured here
    seconds: float | None
    why_unknown: str | None = None  # why `seconds` is None


@dataclass(frozen=True)
class Work:
    """What each device of a run computes from where it starts: the time estimate multiplies it by throughput."""

    epochs: float
    steps: int
    train_images: int
    val_images: int  # over all validation passes


@dataclass
class CheckedJob:
    """A job whose config passed every check the run makes before training; only its time is left to measure."""

    cfg: DictConfig | None  # None for a done run (nothing to build)
    run: PlannedRun
    work: Work | None  # None where the image counts are unknown (run.why_unknown says why)
    model_key: str | None  # jobs with the same model and input size are timed once


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """The jobs `python run.py -m <overrides>` would launch, each as its list of overrides (checked as run.py checks
    its command line: every group choice and key exists)."""
    return sweep_jobs(check_command_line(overrides, multirun=True))


def compose_job(job: list[str]) -> tuple[DictConfig, str, DictConfig | None]:
    """A job's config (as `run.py` trains it), the run directory `run.py -m` gives it, and the sweep's params."""
    cfg = compose_raw(job)
    run_dir = str(Path(cfg.hydra.sweep.dir) / cfg.hydra.sweep.subdir)
    with open_dict(cfg):
        params = cfg.hydra.sweeper.params
        del cfg["hydra"]
    return per_stage_groups(cfg, job), run_dir, params


def count_work(
    trainer: Mapping[str, Any], optim: OptimSettings, batch_size: int, world: int,
    sizes: tuple[int | None, int | None], done_epochs: int = 0,
) -> Work | None:  # fmt: skip
    """What each of `world` devices runs from epoch `done_epochs` on, counted as Lightning does; None without the
    (train, val) image counts. `trainer`: trainer_arguments(), with accumulate_grad_batches."""
    accumulate = trainer["accumulate_grad_batches"]
    fast = int(trainer.get("fast_dev_run") or 0)  # True is 1
    if fast:  # N training and N validation batches in one epoch, whatever the schedule and the data
        return Work(1, math.ceil(fast / accumulate), fast * batch_size, fast * batch_size)
    train, val = sizes
    if train is None or val is None:
        return None
    per_epoch = train_batches_per_epoch(trainer, train, batch_size, world)
    steps_per_epoch = math.ceil(per_epoch / accumulate)  # an epoch's last micro-batches still make a step
    if not steps_per_epoch:
        return Work(optim.total_epochs - done_epochs, 0, 0, 0)
    end = optim.total_epochs * steps_per_epoch
    if trainer.get("max_steps", -1) not in (-1, None):
        end = min(end, trainer["max_steps"])
    steps = max(0, end - done_epochs * steps_per_epoch)  # a resumed run restarts at its last finished epoch
    full, rest = divmod(steps, steps_per_epoch)
    partial = min(rest * accumulate, per_epoch)  # batches of the epoch max_steps stops in
    batches = full * per_epoch + partial
    # validation: after every check_val_every_n_epoch-th epoch, or every val_check_interval training batches
    interval, every = trainer.get("val_check_interval"), trainer.get("check_val_every_n_epoch", 1)
    if isinstance(interval, float):
        check = max(1, int(per_epoch * interval))
    else:
        check = interval if isinstance(interval, int) and interval > 0 else per_epoch
    if every is None:
        passes = batches // check
    else:
        finished = range(done_epochs + 1, done_epochs + full + 1)  # 1-based, as Lightning tests (epoch + 1) % every
        passes = sum(epoch % every == 0 for epoch in finished) * (per_epoch // check)
        if partial and (done_epochs + full + 1) % every == 0:
            passes += partial // check
    per_device = math.ceil(val / world)  # not dropped: the sampler pads the last one
    val_batches = limited_batches(math.ceil(per_device / batch_size), trainer.get("limit_val_batches"))
    val_images = min(val_batches * batch_size, per_device) * passes
    return Work(full + rest / steps_per_epoch, steps, batches * batch_size, val_images)


def _image_counts(cfg: DictConfig, datamodule: Any, missing: list[str]) -> tuple[int | None, int | None, str | None]:
    """(train, val) image counts, or the reason they are unknown."""
    if missing:
        return None, None, f"{', '.join(missing)} not set: no image count"
    train, val = datamodule.split_sizes()
    if train and val:
        return train, val, None
    root = cfg.data.get("root")
    if root is None:
        return train, val, f"data={cfg.data.name} does not count its images"
    split = Path(root) / ("val" if train else "train")
    return train, val, f"no images found under {split}" if split.is_dir() else f"no {split.name}/ folder in {root}"


def check_jobs(overrides: list[str]) -> list[CheckedJob]:
    """Every job of the sweep, composed and checked as `run.py -m` would before training, with the work it has
    left. Raises the first ConfigError (or Hydra's error) before anything is measured."""
    sizes: dict[str, tuple[int | None, int | None, str | None]] = {}  # distinct data settings -> image counts
    checked = []
    for job in expand_sweep(overrides):
        cfg, run_dir, _ = compose_job(job)
        previous = read_record(run_dir) if (Path(run_dir) / RECORD_NAME).exists() else None
        if previous is not None and previous.status in FINAL:  # skipped by the run, before any check
            done = PlannedRun(run_dir, "done", previous.schedule, 0, 0, None, 0.0)
            checked.append(CheckedJob(None, done, None, None))
            continue
        unfinished = previous is not None and previous.status in ("running", "interrupted")
        if unfinished and cfg.resume is None:
            changed = config_changes(comparable_config(previous.config),
                                     comparable_config(OmegaConf.to_container(cfg, resolve=True)))  # fmt: skip
            if changed:  # the run refuses to resume into a mix of two settings
                raise ConfigError(
                    "resume", None, f"{run_dir} holds an unfinished run with other settings ({', '.join(changed)}); "
                    "delete it to start over, or resume it anyway with resume=<its checkpoints/last.ckpt>",
                )  # fmt: skip
        missing = sorted(OmegaConf.missing_keys(cfg))
        for key in missing:
            if not key.startswith("data."):  # only the data's location may stay unknown to a plan
                raise ConfigError(key, "???", f"required: {key}=...")
        optim = build_optim(cfg)
        datamodule = build_datamodule(cfg)
        build_model(cfg, datamodule.num_classes, device="meta")  # its checks, without the memory
        trainer = trainer_arguments(cfg, accumulation(cfg, optim))
        if trainer["precision"] not in PRECISIONS:  # Lightning takes others ("bf16-true", "64"): not timed here
            raise ConfigError("trainer.precision", trainer["precision"], "auto or one that plan can time: "
                              + ", ".join(PRECISIONS))  # fmt: skip
        resume = unfinished and (cfg.resume is not None or (Path(run_dir) / "checkpoints" / "last.ckpt").exists())
        state = "new" if previous is None else "resume" if resume else "rerun"
        data_key = repr(OmegaConf.to_container(cfg.data))
        if data_key not in sizes:  # an image folder is scanned once, not once per job
            sizes[data_key] = _image_counts(cfg, datamodule, missing)
        train, val, why = sizes[data_key]
        world = process_count(cfg.trainer)
        done_epochs = previous.epochs if state == "resume" else 0
        work = count_work(trainer, optim, cfg.data.batch_size, world, (train, val), done_epochs)
        schedule = schedule_label(optim, trainer)
        if work is None:
            run = PlannedRun(run_dir, state, schedule, max(0, optim.total_epochs - done_epochs), None, None, None, why)
        else:
            run = PlannedRun(run_dir, state, schedule, work.epochs, work.steps, None, None)
        model_key = repr((model_arguments(cfg, datamodule.num_classes), cfg.data.image_size))
        checked.append(CheckedJob(cfg, run, work, model_key))
    return checked


def training_settings(cfg: DictConfig, device: torch.device) -> dict[str, Any]:
    """The job's trainer settings as its run would resolve them on a machine whose device is `device`'s kind:
    precision, channels_last, tf32, benchmark."""
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    return resolve_device(trainer | {"accelerator": "gpu" if device.type == "cuda" else device.type})


def timing_key(job: CheckedJob, device: torch.device) -> str:
    """Jobs that train the same model on the same input in the same way are timed once."""
    settings = training_settings(job.cfg, device)
    return repr((job.model_key, *(settings[key] for key in ("precision", "channels_last", "tf32"))))


def measure_throughput(
    model: nn.Module, image_size: int, batch: int, settings: dict[str, Any], device: torch.device, steps: int
) -> tuple[float, float]:
    """(training step, eval forward) img/s of `model` on `device` as its run trains it (`settings`: its resolved
    trainer): in its precision (autocast, a GradScaler for 16-mixed), memory format and TF32 setting, with fused
    AdamW, as bench model's variant of this project; `steps` timed of each after one."""
    images = torch.randn(batch, 3, image_size, image_size, device=device)
    labels = torch.randint(0, 2, (batch,), device=device)
    variant = Variant(model.to(device), images, labels, settings["precision"], settings["channels_last"], False, True)
    if settings["benchmark"] is not None:
        torch.backends.cudnn.benchmark = settings["benchmark"]  # as Lightning sets it for the run
    with tf32_enabled(settings["tf32"]):
        times = time_rounds({"train": variant.train_step, "inference": variant.infer}, seconds=0, min_rounds=steps)
    return rate(times["train"], batch).images_per_s, rate(times["inference"], batch).images_per_s


def estimate(jobs: list[CheckedJob], device: torch.device, measure_steps: int = 3) -> Iterator[PlannedRun]:
    """The jobs' runs with measured throughput and time, one at a time as each is measured."""
    speeds: dict[str, tuple[float, float]] = {}  # timing key -> (train, forward) img/s
    for job in jobs:
        if job.cfg is None:
            yield job.run
            continue
        key = timing_key(job, device)
        if key not in speeds:
            model = build_model(job.cfg, build_datamodule(job.cfg).num_classes)
            batch = job.cfg.data.batch_size if device.type == "cuda" else min(job.cfg.data.batch_size, MEASURE_BATCH)
            settings = training_settings(job.cfg, device)
            speeds[key] = measure_throughput(model, job.cfg.data.image_size, batch, settings, device, measure_steps)
            del model
        train_speed, forward_speed = speeds[key]
        seconds = None
        if job.work is not None:
            seconds = job.work.train_images / train_speed + job.work.val_images / forward_speed
        yield replace(job.run, images_per_s=train_speed, seconds=seconds)


def plan(overrides: list[str], device: torch.device, measure_steps: int = 3) -> list[PlannedRun]:
    """All runs of `python run.py -m <overrides>` with their state, remaining work and estimated time."""
    return list(estimate(check_jobs(overrides), device, measure_steps))


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 86400 * 2 else f"{seconds / 86400:.1f} days"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({torch.get_num_threads()} threads)" if device.type == "cpu" else str(device)


ROW = "{:7s} {:>7s} {:>9s} {:>11s} {:>10s}  {:20s}  {}"  # the numbers aligned first; labels vary in width


def _row(run: PlannedRun) -> str:
    steps = "?" if run.steps_left is None else f"{run.steps_left:,}"
    speed = f"{run.images_per_s:.1f}" if run.images_per_s else ""
    epochs = f"{round(run.epochs_left, 2):g}"
    line = ROW.format(run.state, epochs, steps, speed, _duration(run.seconds), run.schedule, run.run_dir)
    return f"{line}  (time unknown: {run.why_unknown})" if run.why_unknown else line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m metaformer_lab.plan", description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="as for `python run.py -m`")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per distinct model")
    args = parser.parse_intermixed_args(argv)  # overrides before or after the options
    device = torch.device(args.device)
    try:
        jobs = check_jobs(args.overrides)
    except (ConfigError, HydraException) as error:
        parser.exit(2, f"error: {error}\n")
    pending = [job for job in jobs if job.cfg is not None]
    models = len({timing_key(job, device) for job in pending})
    batch = "the run's batch" if device.type == "cuda" else f"batch <= {MEASURE_BATCH}"
    print(f"{len(jobs)} runs ({len(pending)} to run, {len(jobs) - len(pending)} done); timing {models} distinct "
          f"model{'s' * (models != 1)} on {_device_name(device)} in each run's precision and layout, {batch}, "
          f"{args.steps} timed step{'s' * (args.steps != 1)} each")  # fmt: skip
    print(ROW.format("state", "epochs", "steps", "train img/s", "time", "schedule", "run directory"), flush=True)
    runs = []
    for run in estimate(jobs, device, args.steps):
        print(_row(run), flush=True)  # as measured: one distinct model takes seconds on a CPU
        runs.append(run)
    todo = [r for r in runs if r.state != "done"]
    unknown = Counter(r.why_unknown for r in todo if r.seconds is None)
    timed = len(todo) - unknown.total()
    total = f"{len(runs)} runs: {len(runs) - len(todo)} done, {len(todo)} to run"
    if timed or not unknown:
        total += f"; estimated {_duration(sum(r.seconds for r in todo if r.seconds is not None))}"
        total += f" for {timed} of them" if unknown else ""
        total += f" on {args.device} (training throughput measured here; a run's devices x nodes share its batches)"
    print(total)
    if unknown:
        reasons = "; ".join(f"{why} ({n})" for why, n in unknown.items())
        print(f"no estimate for {unknown.total()} run{'s' * (unknown.total() != 1)}: {reasons}")


if __name__ == "__main__":
    main()
