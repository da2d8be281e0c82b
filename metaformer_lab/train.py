"""One run: build model, data and LightningModule from the config, train, and write the run record.

The record (`result.json`) is written when the run starts and whenever it ends, however it ends: `completed`,
`diverged` (NaN/inf loss), `failed` (an error, named in the record) or `interrupted` (Ctrl-C, SIGTERM). Re-running
the same command in the same run directory skips a finished run, resumes an interrupted one from its last
checkpoint, and starts a failed one over.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from contextlib import suppress
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf
from submitit.core.utils import UncompletedJobError

from metaformer_lab.config import (
    accumulation,
    build_datamodule,
    build_model,
    build_optim,
    check_validation_interval,
    comparable_config,
    optimizer_steps,
    process_count,
    resolve_device,
    run_axes,
    schedule_label,
    tf32_enabled,
    trainer_arguments,
)
from metaformer_lab.data.datamodules import ImageDataModule, augments_on_device
from metaformer_lab.models import measure_cost
from metaformer_lab.record import RECORD_NAME, RunRecord, unwritable, write_record
from metaformer_lab.registry import ConfigError
from metaformer_lab.training.callbacks import (
    ProgressBar,
    ResumableRng,
    SaveEvery,
    ShareBatchNormStats,
    SigtermEveryNBatches,
    TrainThroughput,
    UnreadableImages,
    ValidationHistory,
    run_began,
)
from metaformer_lab.training.checkpoint_io import AtomicCheckpointIO, remove_partial_writes
from metaformer_lab.training.loggers import route_library_output, shown_path, wandb_location, wandb_logger
from metaformer_lab.training.module import DivergedError, ImageClassifier, OptimSettings
from metaformer_lab.training.start import AlreadyRunning, Start, agreed_start, now_utc, run_lock, slurm_runs_the_ranks

log = logging.getLogger(__name__)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except OSError:
        return None
    return out.stdout.strip() or None


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in ("metaformer_lab", "torch", "lightning", "hydra-core", "wandb", "torchmetrics"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:  # e.g. run from a checkout that was never pip-installed
            found[name] = "unknown"
    return found


def train(cfg: DictConfig, run_dir: str | Path, callbacks: Sequence[L.Callback] = ()) -> RunRecord:
    """Train the run `cfg` describes in `run_dir`; returns its final record (also on disk as result.json).

    Every check (config, model, data, Lightning's own) runs before the record is first written: a configuration
    error raises a ConfigError and leaves no record behind (nor changes an earlier one). `failed` is for runs that
    started. A run another process is running raises AlreadyRunning, and is left as it is.
    """
    route_library_output()
    run_dir = Path(run_dir)
    config = OmegaConf.to_container(cfg, resolve=True)
    # decided once per run, whatever the number of processes; the process that decides holds the run's lock
    with agreed_start(config, run_dir, comparable_config) as begin:
        if begin.skip:
            return begin.previous
        return _train(cfg, run_dir, config, begin, callbacks)


def _train(cfg: DictConfig, run_dir: Path, config: dict, begin: Start, callbacks: Sequence[L.Callback]) -> RunRecord:
    previous = begin.previous

    start = time.perf_counter()
    began = run_began(start)
    record = RunRecord(run_dir=str(run_dir), seed=cfg.seed, started_at=now_utc(), versions=_versions(), config=config)
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # before the model: its init is part of the seed
    optim = build_optim(cfg)
    datamodule = build_datamodule(cfg)
    model = build_model(cfg, datamodule.num_classes)
    trainer_args = trainer_arguments(cfg, accumulation(cfg, optim))
    resolved = resolve_device(cfg.trainer)  # our keys among them (channels_last, tf32), which the Trainer does not take
    for key, value in run_axes(cfg, model).items():
        setattr(record, key, value)
    cost = measure_cost(model, cfg.data.image_size)
    record.params, record.frozen_params, record.macs = cost.params, cost.frozen_params, cost.macs
    record.global_batch, record.lr = optim.global_batch, optim.lr
    datamodule.setup("fit")  # the data's own checks (an image folder's layout) before anything is written
    record.schedule, record.train_images = schedule_label(optim, trainer_args), len(datamodule.train)
    record.max_side = getattr(datamodule, "max_side", None)  # data=shards made with --max-side
    record.data_digest = getattr(datamodule, "digest", None)  # data=idx: which MNIST-format data set
    record.accelerator, record.precision = trainer_args["accelerator"], trainer_args["precision"]
    record.channels_last, record.tf32 = resolved["channels_last"], resolved["tf32"]
    record.cudnn_benchmark = trainer_args["benchmark"]
    record.git_commit = _git_commit()

    checkpoints = run_dir / "checkpoints"
    ckpt_path, resuming = begin.checkpoint, begin.resuming
    if resuming:
        record.started_at, record.wandb_id = previous.started_at, previous.wandb_id
    trainer, history, throughput, wandb = _build_trainer(
        cfg, run_dir, record, optim, trainer_args, callbacks, resuming, began
    )
    record.world_size = trainer.world_size
    steps = optimizer_steps(trainer, record.train_images, cfg.data.batch_size)  # (run's, an epoch's)
    record.cuda_visible_devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    check_validation_interval(trainer_args, record.train_images, cfg.data.batch_size, trainer.world_size)
    device = trainer.strategy.root_device
    record.augment_on = "device" if augments_on_device(cfg.data.augment_on, device.type) else "loader"
    record.device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type

    check_room(run_dir, record.params)  # on every rank: a refusal on rank 0 alone would leave the others waiting
    if ckpt_path is not None:
        check_resume_world(ckpt_path, trainer.world_size)
    is_rank_zero = trainer.global_rank == 0
    if is_rank_zero:
        remove_partial_writes(checkpoints)
        if ckpt_path is None:  # a failed run starts over: its checkpoints and metrics must not be mistaken for results
            for folder in (checkpoints, run_dir / "csv"):
                shutil.rmtree(folder, ignore_errors=True)
        write_record(run_dir, record)
        _log_start(cfg, record, optim, trainer, steps, ckpt_path, datamodule)
    if trainer.world_size > 1:  # each rank its own stream (drop path, mixup), as timm seeds rank r with seed + r
        L.seed_everything(cfg.seed + trainer.global_rank, workers=True, verbose=False)
    if cfg.trainer.compile:  # true (inductor) or a backend name; in place, so checkpoint keys stay the plain model's
        model.compile(backend="inductor" if cfg.trainer.compile is True else cfg.trainer.compile)
    module = ImageClassifier(
        model, optim, datamodule.num_classes, resolved["channels_last"], datamodule.random_erasing,
        schedule_steps=steps[0],
    )  # fmt: skip
    status, error = "failed", "stopped by an unexpected signal"  # replaced below on every ordinary exit
    try:
        with tf32_enabled(resolved["tf32"]):  # restored after: a sweep's next run in this process chooses its own
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
            if not history.validated_at(trainer.global_step):  # stopped between validations (max_steps, max_time)
                trainer.validate(module, datamodule=datamodule, verbose=False)
                if not trainer.fast_dev_run:  # the checkpoints hold the weights the record's numbers were measured on
                    trainer.save_checkpoint(checkpoints / "last.ckpt", weights_only=False)  # all of it: it resumes
                    if history.best() is history.history[-1]:
                        trainer.save_checkpoint(checkpoints / "best.ckpt", weights_only=False)
        status, error = "completed", None
    except DivergedError as diverged:
        status, error = "diverged", str(diverged)
    except (KeyboardInterrupt, SystemExit, UncompletedJobError) as stop:  # the last: submitit's requeues ran out
        status, error = "interrupted", f"{type(stop).__name__}: stopped before the end; a re-run resumes"
        raise
    except Exception as failure:
        status, error = "failed", "".join(traceback.format_exception_only(failure)).strip()
        raise
    finally:
        _summarize(record, trainer, history, throughput)
        record.status, record.error, record.finished_at = status, error, now_utc()
        record.wall_time_s = (previous.wall_time_s if resuming else 0.0) + time.perf_counter() - start
        if is_rank_zero:
            write_record(run_dir, record)
            if wandb is not None and (where := wandb_location(wandb)):
                log.info(where)
            if speed := speed_line(record):
                log.info(speed)
            log.info(end_line(record))
        if wandb is not None:
            _finish_wandb(wandb, record)
    return record


def check_room(run_dir: Path, params: int) -> None:
    """Before training: the run directory is writable and its disk has room for the checkpoints (best.ckpt,
    last.ckpt and one being written: weights and AdamW's two moments, 12 bytes a parameter), plus 100 MB of logs."""
    if why := unwritable(run_dir):
        raise ConfigError("hydra.run.dir", str(run_dir), f"cannot write there ({why}); set hydra.run.dir (or "
                          "hydra.sweep.dir under -m) to a writable directory")  # fmt: skip
    checkpoint = 12 * params
    need, free = 3 * checkpoint + 100 * 2**20, shutil.disk_usage(run_dir).free
    if free < need:
        raise ConfigError(
            "hydra.run.dir", str(run_dir),
            f"its disk has {free / 2**30:.2f} GB free; this run needs about {need / 2**30:.2f} GB (three "
            f"checkpoints of {checkpoint / 2**20:.0f} MB while one is written, and logs): free some space, or set "
            "hydra.run.dir (hydra.sweep.dir under -m) to another disk",
        )  # fmt: skip


def check_resume_world(checkpoint: str, world_size: int) -> None:
    """A checkpoint saved mid-epoch resumes only on as many processes as saved it: each rank's place in the epoch
    is its own (an epoch-end checkpoint resumes on any number). The file reads: decide_start checked it."""
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    position = next((v for k, v in saved.items() if isinstance(v, dict) and "batches_done" in v), None)
    if position and position["batches_done"] and position.get("world_size", world_size) != world_size:
        raise ConfigError(
            "trainer.devices", f"{world_size} processes",
            f"{checkpoint} was saved in the middle of epoch {position['epoch']} by {position['world_size']} "
            "processes: resume it with trainer.devices x trainer.num_nodes = the same number (or from a checkpoint "
            "saved at an epoch's end)",
        )  # fmt: skip


def discard_unstarted_run(run_dir: str | Path) -> None:
    """Remove a run directory that holds only what was written before the run was refused (.hydra/, run.log, and
    .launch/ when its ranks refused it)."""
    run_dir = Path(run_dir)
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {".hydra", ".launch", "run.log"}:
        with suppress(AlreadyRunning), run_lock(run_dir):  # not while another launch of the run is setting it up
            shutil.rmtree(run_dir)


def end_line(record: RunRecord) -> str:
    """The line every run ends with: status, best and final top-1, wall time, and where its record is."""
    def pct(value: float | None) -> str:
        return "—" if value is None else f"{100 * value:.2f}%"

    minutes, seconds = divmod(round(record.wall_time_s), 60)
    result = f"best val top-1 {pct(record.best_val_top1)}, final {pct(record.final_val_top1)}"
    reason = f" ({record.error})" if record.error and record.status != "completed" else ""
    took = f"{minutes} min {seconds} s" if minutes else f"{seconds} s"
    took = f"{record.epochs} ep / {record.steps} step{'s' * (record.steps != 1)} in {took}"
    if skipped := sum(record.unreadable_images.values()):
        took += f", {skipped} unreadable image{'s' * (skipped > 1)} skipped (listed in the record)"
    return f"{record.status}{reason}: {result}, {took}; record {shown_path(Path(record.run_dir) / RECORD_NAME)}"


def speed_line(record: RunRecord) -> str | None:
    """How fast the steps ran, how long they waited between batches, and how soon the first one began."""
    if record.train_throughput_img_s is None:
        return None
    line = f"speed: {record.train_throughput_img_s:.1f} img/s per process in training steps"
    if record.data_wait_fraction is not None:
        line += f", {100 * record.data_wait_fraction:.1f}% of the time between batches (data, loop)"
    if record.first_step_s is not None:
        line += f"; first step {record.first_step_s:.1f} s after the run began"
    return line


def _count(number: float, unit: str) -> str:
    """1361898 params -> "1.36 M params", 4384000 MACs -> "4.38 M MACs"."""
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if number >= scale:
            return f"{number / scale:.3g} {prefix} {unit}"
    return f"{number:g} {unit}"


def _log_start(
    cfg: DictConfig, record: RunRecord, optim: OptimSettings, trainer: L.Trainer, steps: tuple[int, int],
    ckpt: str | None, datamodule: ImageDataModule,
) -> None:  # fmt: skip
    """What is about to run, in a few lines (in place of Lightning's model summary, which cannot count MACs)."""
    axes = f"mixer {record.mixer}, norm {record.norm}, act {record.act}"
    axes += "".join(f", {key}={value}" for key, value in (("residual", record.residual), ("mlp", record.mlp))
                    if value is not True)  # fmt: skip
    log.info("run %s%s", shown_path(record.run_dir), f" (resuming from {shown_path(ckpt)})" if ckpt else "")
    log.info("  model %s: %s; %s, %s at %d px", record.model, axes, _count(record.params, "params"),
             _count(record.macs, "MACs"), cfg.data.image_size)  # fmt: skip
    images = f"{record.train_images:,} training images" if record.train_images else "training images"
    log.info("  data %s: %s; %d per optimizer step = %d per device x %d device%s x %d accumulated", record.data,
             images, optim.global_batch, cfg.data.batch_size, trainer.world_size, "s" * (trainer.world_size > 1),
             trainer.accumulate_grad_batches)  # fmt: skip
    if record.max_side is not None:
        log.info("  images cut to a long side of %d px when converted to shards: not the source's pixels",
                 record.max_side)  # fmt: skip
    if datamodule.num_workers != 0:  # 0: loaded in this process (the embedded data), nothing to say
        log.info("  loaders: %d training + %d validation processes per device (%s)",
                 *datamodule.loader_processes(trainer.num_devices))  # fmt: skip
    if record.augment_on == "device":
        log.info("  augmentation: per batch on the device (data.augment_on=%s; the loaders decode and cut)",
                 cfg.data.augment_on)  # fmt: skip
    log.info("  schedule %s: %s", record.schedule, optim.describe(*steps))
    threads = torch.get_num_threads()
    on_cpu = f" ({threads} thread{'s' * (threads > 1)})" if record.accelerator == "cpu" else ""
    protocol = "".join(f", {group}={cfg[group]}" for group in ("proxy", "debug") if cfg.get(group))
    log.info("  device %s%s, precision %s%s", record.device_name, on_cpu, record.precision, protocol)


def _build_trainer(
    cfg: DictConfig, run_dir: Path, record: RunRecord, optim: OptimSettings, trainer_args: dict,
    callbacks: Sequence[L.Callback], resuming: bool, began: float | None,
) -> tuple[L.Trainer, ValidationHistory, TrainThroughput, WandbLogger | None]:  # fmt: skip
    # a resumed run logs to a folder of its own: Lightning's CSVLogger deletes the metrics.csv it finds
    segment = f"resume-{len(list(run_dir.glob('csv/resume-*'))) + 1}" if resuming else ""
    loggers: list[Logger] = [CSVLogger(run_dir, name="csv", version=segment)]
    wandb = wandb_logger(cfg, run_dir, record) if cfg.logger.wandb else None
    if wandb is not None:
        loggers.append(wandb)
    # Lightning's bar on a terminal only: in a file or a pipe its redraws are noise, and a line per validation says more
    progress_bar = trainer_args.get("enable_progress_bar", sys.stdout.isatty())
    history, throughput = ValidationHistory(report=not progress_bar), TrainThroughput(began)
    checkpoints = run_dir / "checkpoints"
    extra: list[L.Callback] = []
    if progress_bar:  # a refresh reads the loss it shows (.item()): on a GPU a wait for the device, so not every step
        extra.append(ProgressBar(refresh_rate=1 if trainer_args["accelerator"] == "cpu" else 50))
    if (minutes := cfg.trainer.save_every_minutes) is not None:
        extra.append(SaveEvery(checkpoints / "last.ckpt", minutes))
    plugins: list = [AtomicCheckpointIO()]
    if slurm_runs_the_ranks(process_count(cfg.trainer)):
        plugins.append(SLURMEnvironment(auto_requeue=False))  # requeue is submitit's: Lightning's would be a second
    arguments = dict(
        dict(num_sanity_val_steps=0, enable_model_summary=False, enable_progress_bar=progress_bar),  # a user may change
        **trainer_args,
        max_epochs=optim.total_epochs, gradient_clip_val=optim.grad_clip, default_root_dir=run_dir,
        logger=loggers, use_distributed_sampler=False, plugins=plugins,
        callbacks=[
            # saved after a validation, not at an epoch's end: one that max_steps cuts short has none
            ModelCheckpoint(checkpoints, filename="best", monitor="val/top1", mode="max", enable_version_counter=False,
                            save_on_train_epoch_end=False),
            # every epoch, new best or not: Lightning 2.6's save_last only writes along with a new best
            ModelCheckpoint(checkpoints, filename="last", enable_version_counter=False),
            history, throughput, ResumableRng(), ShareBatchNormStats(cfg.trainer.dist_bn), UnreadableImages(),
            SigtermEveryNBatches(ImageClassifier.nonfinite_check_every),
            *extra, *callbacks,
        ],
    )  # fmt: skip
    try:
        trainer = L.Trainer(**arguments)
    except Exception as error:  # Lightning's own checks: no GPU here, a precision this device lacks, ...
        settings = " ".join(f"{key}={trainer_args[key]}" for key in ("accelerator", "devices", "strategy", "precision"))
        raise ConfigError("trainer", settings, f"Lightning cannot set this up: {error}") from None
    return trainer, history, throughput, wandb


def _finish_wandb(logger: WandbLogger, record: RunRecord) -> None:
    """Close the wandb run (so the next run of a sweep gets its own), with the headline numbers in its summary."""
    run = logger._experiment  # None on other ranks, and before anything was logged
    if run is None:
        return
    run.summary.update({"params": record.params, "macs": record.macs, "best_val_top1": record.best_val_top1,
                        "status": record.status, "val_history": record.val_history})  # fmt: skip
    run.finish(exit_code=0 if record.status == "completed" else 1)


def _summarize(record: RunRecord, trainer: L.Trainer, history: ValidationHistory, speed: TrainThroughput) -> None:
    record.epochs, record.steps = trainer.current_epoch, trainer.global_step
    record.train_throughput_img_s = speed.images_per_second
    record.data_wait_fraction, record.first_step_s = speed.data_wait_fraction, speed.first_step_s
    unreadable = next(c for c in trainer.callbacks if isinstance(c, UnreadableImages))
    if datamodule := trainer.datamodule:
        record.unreadable_images = unreadable.counts(datamodule)
        record.unreadable_paths = unreadable.paths(datamodule)
    if history.history:
        best, final = history.best(), history.history[-1]
        record.best_val_top1, record.best_val_top5 = best["top1"], best["top5"]
        record.final_val_top1, record.final_val_top5 = final["top1"], final["top5"]
        record.val_history = [dict(validation) for validation in history.history]
