"""Callbacks that keep what a run record needs, and make a resumed run continue exactly where it stopped."""

from __future__ import annotations

import logging
import os
import random
import time
from collections import deque
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.trainer.states import TrainerFn

from metaformer_lab.training.module import ImageClassifier

log = logging.getLogger(__name__)


class ValidationHistory(L.Callback):
    """Top-1 / top-5 of every validation epoch; saved in checkpoints, so a resumed run still knows its best.
    `report`: each also as a line of the run's log (where no progress bar shows them)."""

    def __init__(self, report: bool = False) -> None:
        self.history: list[dict[str, float]] = []
        self.report = report

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        self.history.append(dict(
            epoch=trainer.current_epoch, step=trainer.global_step,
            top1=float(metrics["val/top1"]), top5=float(metrics["val/top5"]),
        ))  # fmt: skip
        if self.report and trainer.is_global_zero:
            # counted from 1; after fit (stopped by max_steps), current_epoch is already the one it stopped in
            epoch = trainer.current_epoch + (trainer.state.fn == TrainerFn.FITTING)
            last = self.history[-1]
            log.info(f"epoch {epoch}, step {last['step']}: val top-1 {last['top1']:.2%}, top-5 {last['top5']:.2%}")

    def validated_at(self, step: int) -> bool:
        return bool(self.history) and self.history[-1].get("step") == step

    def best(self) -> dict[str, float] | None:
        return max(self.history, key=lambda h: h["top1"], default=None)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state["history"])


class ResumableRng(L.Callback):
    """Saves the RNG states (drop path, mixup) with each checkpoint and restores them on resume.

    Lightning does not, so without this a resumed run would draw other random numbers than an uninterrupted one.
    Checkpoints hold rank 0's states (of its own GPU only: a resume may see fewer GPUs); under DDP the other ranks
    derive their own streams from them on resume (deterministic, but only single-process runs resume bit for bit).
    """

    def __init__(self) -> None:
        self.rank = 0
        self.gpu: torch.device | None = None  # the rank's own, if any: only its CUDA generator is saved and restored

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        # setup runs before a checkpoint is restored
        self.rank, device = trainer.global_rank, trainer.strategy.root_device
        self.gpu = device if device.type == "cuda" else None

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if self.gpu is not None:
            state["cuda"] = torch.cuda.get_rng_state(self.gpu)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        cuda = state.get("cuda") if self.gpu is not None else None
        if isinstance(cuda, list | tuple):  # older checkpoints: the states of all the GPUs that were visible, by index
            index = self.gpu.index or 0
            if index >= len(cuda):
                log.warning("the checkpoint holds no random state for GPU %d (only %d GPUs were visible when it was "
                            "saved): its random numbers start afresh", index, len(cuda))  # fmt: skip
            cuda = cuda[index] if index < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, self.gpu)
        if self.rank > 0:
            seed = int(torch.randint(2**62, ()).item()) + self.rank
            torch.manual_seed(seed)
            random.seed(seed)


class ProgressBar(TQDMProgressBar):
    """Lightning's bar, with the training loss read when the bar redraws (every `refresh_rate` batches) only: a value
    logged with prog_bar=True would be read (.item(), on a GPU a wait for the device) after every batch by Lightning's
    logger connector, whether a bar shows it or not."""

    def get_metrics(self, trainer: L.Trainer, module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, module)
        if (loss := trainer.callback_metrics.get("train/loss")) is not None:
            metrics["train/loss"] = loss.item()
        return metrics


_runs_begun = 0  # in this process: a sweep's worker process trains one job after another


def run_began(now: float) -> float | None:
    """When the run starting `now` (time.perf_counter()) began: its process's start for the process's first run (the
    command, imports included), else `now`. None where the process's start cannot be read."""
    global _runs_begun
    _runs_begun += 1
    if _runs_begun > 1:
        return now
    age = process_age_s()
    return None if age is None else now - age


def process_age_s() -> float | None:
    """Seconds since this process started (Linux: /proc), None where that cannot be read."""
    try:
        after_name = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - int(after_name[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat: start time, in ticks
    except (OSError, IndexError, ValueError):
        return None


Mark = float | torch.cuda.Event  # a point in time: time.perf_counter(), or an event on the GPU's stream


class TrainThroughput(L.Callback):
    """Training images per second (per process), timed over all batches but the first two; the share of time spent
    between batches (fetching the next one, and the loop's own work) and when the first batch started.

    The time between one batch's end and the next one's start is Lightning's data fetch and loop: what the issue
    calls waiting on data, counted within an epoch only (not across validation or an epoch's end).

    On a GPU the host runs ahead of the device, so its clock would count a step's queued kernels as time between
    batches: there each batch's start and end are CUDA events on the device's own timeline, read once completed
    (without waiting), and with one wait at the end of a window (a validation, an epoch, training)."""

    warmup_batches = 2  # the first batches include one-off set-up (allocation, compilation)

    def __init__(self, began: float | None = None) -> None:
        self.images = 0
        self.seconds = 0.0
        self.between = 0.0
        self.seen = 0
        self.began = began  # time.perf_counter() when the run began
        self.first_step_s: float | None = None  # from `began` to the first training batch
        self._start: Mark | None = None
        self._end: Mark | None = None  # the last batch's end; None at an epoch's start and after a validation
        self._unread: deque[tuple[Mark | None, Mark, Mark, int]] = deque()  # (previous end, start, end, images)

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._end = None

    def on_validation_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._end = None
        self._read(wait=True)

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._read(wait=True)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._read(wait=True)

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, idx: int) -> None:
        now = time.perf_counter()
        if self.first_step_s is None and self.began is not None:
            self.first_step_s = now - self.began
        self._start = _cuda_mark() if module.device.type == "cuda" else now

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, out: Any, batch: Any, idx: int) -> None:
        self.seen += 1
        end = _cuda_mark() if module.device.type == "cuda" else time.perf_counter()
        if self.seen > self.warmup_batches:
            before = self._end if self.seen > self.warmup_batches + 1 else None
            self._unread.append((before, self._start, end, len(batch[0])))
        self._end = end
        self._read(wait=False)

    def _read(self, wait: bool) -> None:
        """Add the timed batches whose marks have completed; `wait`: wait for all of them (one sync on a GPU)."""
        if wait and self._unread and isinstance(self._unread[-1][2], torch.cuda.Event):
            self._unread[-1][2].synchronize()
        while self._unread and _completed(self._unread[0][2]):
            before, start, end, images = self._unread.popleft()
            self.images += images
            self.seconds += _seconds(start, end)
            if before is not None:
                self.between += _seconds(before, start)

    @property
    def images_per_second(self) -> float | None:
        return self.images / self.seconds if self.seconds > 0 else None

    @property
    def data_wait_fraction(self) -> float | None:
        """Time between batches over all the time of the timed batches (their steps and the gaps before them)."""
        return self.between / (self.between + self.seconds) if self.seconds > 0 else None


def _cuda_mark() -> torch.cuda.Event:
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def _completed(mark: Mark) -> bool:
    return isinstance(mark, float) or mark.query()  # query: without waiting


def _seconds(start: Mark, end: Mark) -> float:
    return end - start if isinstance(start, float) else start.elapsed_time(end) / 1000  # events: milliseconds


def share_batchnorm_stats(model: torch.nn.Module, mode: str) -> int:
    """Make every rank's BatchNorm running means and variances the same: their average over ranks (`reduce`) or
    rank 0's (`broadcast`), as timm's `distribute_bn`. Returns how many buffers it shared (0 outside DDP)."""
    if mode == "none" or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 0
    world = torch.distributed.get_world_size()
    shared = 0
    for name, buffer in model.named_buffers():
        if name.endswith(("running_mean", "running_var")):
            if mode == "reduce":
                torch.distributed.all_reduce(buffer, op=torch.distributed.ReduceOp.SUM)
                buffer /= world
            else:
                torch.distributed.broadcast(buffer, 0)
            shared += 1
    return shared


class ShareBatchNormStats(L.Callback):
    """`trainer.dist_bn`: under DDP each rank's BatchNorm layers see only its own images; the official recipe
    averages their running statistics after each training epoch, before evaluating and saving (`--dist-bn reduce`).
    Here: before each validation (what it measures and the checkpoint then saves), at the end of each training
    epoch (for epochs without a validation) and of training. Sharing equal statistics again changes nothing."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def on_validation_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            share_batchnorm_stats(module, self.mode)

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        share_batchnorm_stats(module, self.mode)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        share_batchnorm_stats(module, self.mode)


class SigtermEveryNBatches(L.Callback):
    """Under DDP, Lightning 2.6 asks every rank whether rank 0 got SIGTERM before each batch: a tensor built on the
    device, a broadcast and an `.item()`, so no rank ever runs ahead of its GPU (Lightning #21487; its fix, a
    `broadcast_sigterm_every_n_steps` argument, is not released). Asked every `every` batches instead (all ranks at
    the same batches), and at each epoch's last one: a scheduler's SIGTERM is then seen a few steps later, well
    inside its grace period. Where Lightning has no such method, nothing changes."""

    def __init__(self, every: int) -> None:
        self.every = every

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        loop = trainer.fit_loop.epoch_loop
        ask = getattr(loop, "_broadcast_sigterm_tensor", None)
        if trainer.world_size < 2 or ask is None:
            return

        def ask_now_and_then() -> None:
            if loop.total_batch_idx % self.every == 0 or loop.batch_progress.is_last_batch:
                ask()

        loop._broadcast_sigterm_tensor = ask_now_and_then


class UnreadableImages(L.Callback):
    """Unreadable images the data module dropped (see data/datamodules.py), merged over ranks at each validation's
    end (all ranks are there; each saw only its share of the data), for the run record."""

    def __init__(self) -> None:
        self.indices: dict[str, set[int]] = {"train": set(), "val": set()}

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        seen = getattr(trainer.datamodule, "unreadable", None)
        if seen is None:
            return
        found = [{split: sorted(indices) for split, indices in seen.items()}]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            found = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(found, {split: sorted(indices) for split, indices in seen.items()})
        for rank_found in found:
            for split, indices in rank_found.items():
                self.indices.setdefault(split, set()).update(indices)

    def state_dict(self) -> dict[str, Any]:
        return {split: sorted(indices) for split, indices in self.indices.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.indices = {split: set(indices) for split, indices in state.items()}

    def counts(self, datamodule: L.LightningDataModule) -> dict[str, int]:
        """Per split, the unreadable images found (this rank's own where no validation merged them yet)."""
        own = getattr(datamodule, "unreadable", {})
        return {split: len(self.indices.get(split, set()) | own.get(split, set())) for split in ("train", "val")}

    def paths(self, datamodule: L.LightningDataModule, limit: int = 100) -> list[str]:
        own = getattr(datamodule, "unreadable", {})
        found = [(split, index) for split in ("train", "val")
                 for index in sorted(self.indices.get(split, set()) | own.get(split, set()))]  # fmt: skip
        return [datamodule.sample_path(split, index) for split, index in found[:limit]]


class SaveEvery(L.Callback):
    """Saves `path` (last.ckpt) every `minutes` of training as well, mid-epoch, between optimizer steps: a job that
    a scheduler preempts or times out loses at most that much (a requeued job writes no checkpoint on its way out).

    0 saves after every optimizer step. Rank 0's clock decides, so all ranks save together; under DDP it is asked
    every `every_steps` optimizer steps (a broadcast is a host sync).
    """

    def __init__(self, path: Path, minutes: float, every_steps: int = 20) -> None:
        self.path, self.seconds = path, 60 * minutes
        self.every_steps = 1 if minutes == 0 else every_steps
        self.last_save = time.monotonic()

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.last_save = time.monotonic()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        progress = trainer.fit_loop.epoch_loop.batch_progress
        if trainer.fast_dev_run or progress.is_last_batch or (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # a smoke test saves nothing; the epoch's own checkpoint follows; or mid-accumulation, where a
            #         checkpoint would lack the gradients accumulated so far
        due = time.monotonic() - self.last_save >= self.seconds
        if trainer.world_size > 1:
            if trainer.global_step % self.every_steps:
                return
            due = trainer.strategy.broadcast(due)
        if due:
            if isinstance(module, ImageClassifier):
                module.raise_if_diverged()  # never a checkpoint of a diverged model
            trainer.save_checkpoint(self.path, weights_only=False)
            self.last_save = time.monotonic()
