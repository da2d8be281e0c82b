"""One run: build model, data and LightningModule from the config, train, and write the run record.

The record (`result.json`) is written when the run starts and whenever it ends, however it ends: `completed`,
`diverged` (NaN/inf loss), `failed` (an error, named in the record) or `interrupted` (Ctrl-C, SIGTERM). Re-running
the same command in the same run directory skips a finished run, resumes an interrupted one from its last
checkpoint, and starts a failed one over.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import platform
import shutil
import subprocess
import time
import traceback
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from metaformer_lab.callbacks import ResumableRng, TrainThroughput, ValidationHistory
from metaformer_lab.config import accumulation, build_datamodule, build_model, build_optim, run_axes
from metaformer_lab.loggers import wandb_logger
from metaformer_lab.models import measure_cost
from metaformer_lab.module import DivergedError, ImageClassifier, OptimSettings
from metaformer_lab.record import FINAL, NON_RESULT_KEYS, RECORD_NAME, RunRecord, read_record, write_record
from metaformer_lab.registry import ConfigError

log = logging.getLogger(__name__)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


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
    """Train the run `cfg` describes in `run_dir`; returns its final record (also on disk as result.json)."""
    run_dir = Path(run_dir)
    previous = read_record(run_dir) if (run_dir / RECORD_NAME).exists() else None
    config = OmegaConf.to_container(cfg, resolve=True)
    changed = config_changes(previous.config, config) if previous is not None else []
    if previous is not None and previous.status in FINAL:
        log.info("%s: already %s (best val top-1 %s); skipping", run_dir, previous.status, previous.best_val_top1)
        if changed:
            log.warning("%s was run with other settings (%s); delete it to run again", run_dir, ", ".join(changed))
        return previous
    if changed and previous.status in ("running", "interrupted") and cfg.resume is None:
        raise ConfigError(
            "resume", None,
            f"{run_dir} holds an unfinished run with other settings ({', '.join(changed)}); delete it to start "
            "over, or resume it anyway with resume=<its checkpoints/last.ckpt>",
        )  # fmt: skip

    record = RunRecord(run_dir=str(run_dir), seed=cfg.seed, started_at=_now(), versions=_versions())
    record.config = config
    record.git_commit = _git_commit()
    start = time.perf_counter()
    # until the Trainer knows the global rank: the environment's (other nodes' main processes have NODE_RANK)
    is_rank_zero = rank_zero_only.rank == 0 and os.environ.get("NODE_RANK", "0") == "0"
    resuming = False

    def finish(status: str, error: str | None = None) -> RunRecord:
        record.status, record.error, record.finished_at = status, error, _now()
        record.wall_time_s = (previous.wall_time_s if resuming else 0.0) + time.perf_counter() - start
        if is_rank_zero:
            write_record(run_dir, record)
        return record

    L.seed_everything(cfg.seed, workers=True, verbose=False)  # before the model: its init is part of the seed
    try:  # everything that can reject the config runs before any training
        optim = build_optim(cfg)
        datamodule = build_datamodule(cfg)
        model = build_model(cfg, datamodule.num_classes)
        accumulate = accumulation(cfg, optim)
        for key, value in run_axes(cfg, model).items():
            setattr(record, key, value)
        cost = measure_cost(model, cfg.data.image_size)
        record.params, record.frozen_params, record.macs = cost.params, cost.frozen_params, cost.macs
        record.global_batch, record.lr = optim.global_batch, optim.lr

        checkpoints = run_dir / "checkpoints"
        ckpt_path = cfg.resume
        if ckpt_path is None and previous is not None and previous.status in ("running", "interrupted"):
            last = checkpoints / "last.ckpt"
            ckpt_path = str(last) if last.exists() else None
        resuming = ckpt_path is not None and previous is not None
        if resuming:
            record.started_at, record.wandb_id = previous.started_at, previous.wandb_id
        trainer, history, throughput, wandb = _build_trainer(cfg, run_dir, record, optim, accumulate, callbacks)
    except Exception as invalid:
        finish("failed", f"{type(invalid).__name__}: {invalid}")
        raise

    is_rank_zero = trainer.global_rank == 0
    if is_rank_zero:
        if ckpt_path is None and checkpoints.exists():
            shutil.rmtree(checkpoints)  # a failed run starts over: its checkpoints must not be mistaken for results
        write_record(run_dir, record)
    if trainer.world_size > 1:  # each rank its own stream (drop path, mixup), as timm seeds rank r with seed + r
        L.seed_everything(cfg.seed + trainer.global_rank, workers=True, verbose=False)
    if cfg.trainer.compile:  # true (inductor) or a backend name; in place, so checkpoint keys stay the plain model's
        model.compile(backend="inductor" if cfg.trainer.compile is True else cfg.trainer.compile)
    module = ImageClassifier(model, optim, datamodule.num_classes, channels_last=cfg.trainer.channels_last)
    status, error = "failed", "stopped by an unexpected signal"  # replaced below on every ordinary exit
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        status, error = "completed", None
    except DivergedError as diverged:
        status, error = "diverged", str(diverged)
    except (KeyboardInterrupt, SystemExit) as stop:
        status, error = "interrupted", f"{type(stop).__name__}: stopped before the end; a re-run resumes"
        raise
    except Exception as failure:
        status, error = "failed", "".join(traceback.format_exception_only(failure)).strip()
        raise
    finally:
        _summarize(record, trainer, history, throughput)
        finish(status, error)
        if wandb is not None:
            _finish_wandb(wandb, record)
    return record


def _build_trainer(
    cfg: DictConfig, run_dir: Path, record: RunRecord, optim: OptimSettings, accumulate: int,
    callbacks: Sequence[L.Callback],
) -> tuple[L.Trainer, ValidationHistory, TrainThroughput, WandbLogger | None]:  # fmt: skip
    loggers: list[Logger] = [CSVLogger(run_dir, name="csv", version="")]
    wandb = wandb_logger(cfg, run_dir, record) if cfg.logger.wandb else None
    if wandb is not None:
        loggers.append(wandb)
    history, throughput = ValidationHistory(), TrainThroughput()
    checkpoints = run_dir / "checkpoints"
    t = cfg.trainer
    try:
        trainer = L.Trainer(
            max_epochs=optim.epochs + optim.cooldown_epochs,
            accumulate_grad_batches=accumulate,
            gradient_clip_val=optim.grad_clip,
            accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
            precision=t.precision, deterministic=t.deterministic, log_every_n_steps=t.log_every_n_steps,
            default_root_dir=run_dir, logger=loggers, num_sanity_val_steps=0, use_distributed_sampler=False,
            callbacks=[
                ModelCheckpoint(
                    checkpoints, filename="best", monitor="val/top1", mode="max", enable_version_counter=False
                ),
                # every epoch, new best or not: Lightning 2.6's save_last only writes along with a new best
                ModelCheckpoint(checkpoints, filename="last", enable_version_counter=False),
                history, throughput, ResumableRng(), *callbacks,
            ],
        )  # fmt: skip
    except Exception as error:  # Lightning's own checks: no GPU here, a precision this device lacks, ...
        settings = f"accelerator={t.accelerator} devices={t.devices} strategy={t.strategy} precision={t.precision}"
        raise ConfigError("trainer", settings, f"Lightning cannot set this up: {error}") from None
    return trainer, history, throughput, wandb


def config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """The keys whose values differ between two resolved configs, ignoring settings that change no result."""
    changes = []
    for key in sorted(set(old) | set(new)):
        name = prefix + key
        if name in NON_RESULT_KEYS:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += config_changes(a, b, name + ".")
        elif a != b:
            changes.append(name)
    return changes


def _finish_wandb(logger: WandbLogger, record: RunRecord) -> None:
    """Close the wandb run (so the next run of a sweep gets its own), with the headline numbers in its summary."""
    run = logger._experiment  # None on other ranks, and before anything was logged
    if run is None:
        return
    run.summary.update(
        {"params": record.params, "macs": record.macs, "best_val_top1": record.best_val_top1, "status": record.status}
    )
    run.finish(exit_code=0 if record.status == "completed" else 1)


def _summarize(record: RunRecord, trainer: L.Trainer, history: ValidationHistory, speed: TrainThroughput) -> None:
    record.epochs, record.steps = trainer.current_epoch, trainer.global_step
    record.train_throughput_img_s = speed.images_per_second
    if history.history:
        best, final = history.best(), history.history[-1]
        record.best_val_top1, record.best_val_top5 = best["top1"], best["top5"]
        record.final_val_top1, record.final_val_top5 = final["top1"], final["top5"]
