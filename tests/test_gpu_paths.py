"""What a GPU changes in the training loop, tested where it can be without one: no host sync per step (the loss is
checked every few batches), step times from CUDA events, and each rank's own CUDA random state in checkpoints."""

import json
import logging
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import FAULTS, QUICK, compose_config, only_record, run_cli

import metaformer_lab.data
from metaformer_lab import train as train_module
from metaformer_lab.record import read_record
from metaformer_lab.train import train
from metaformer_lab.training import callbacks
from metaformer_lab.training.callbacks import ResumableRng, TrainThroughput
from metaformer_lab.training.module import ImageClassifier

# 32 batches of 16 in one epoch: a check every 10 batches and at the epoch's end, logging every 10 steps
COUNTED = [*QUICK, "data.train_size=512", "data.batch_size=16", "optim.global_batch=16", "optim.epochs=1",
           "trainer.log_every_n_steps=10"]  # fmt: skip
CHECKED = {9, 19, 29, 31}  # batches (from 0) after which the loss is checked, and the logs written
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")  # each a sync with a CUDA tensor
DATA_ON_THE_HOST = tuple(str(Path(package.__file__).parent) for package in (metaformer_lab.data, torch.utils.data))


class _PerBatch(L.Callback):
    """Opens a new list of what happens at each training batch's start (until the next batch's)."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.batches.append([])


def _count_host_reads(monkeypatch, batches: _PerBatch) -> None:
    """Every read of a tensor's value by Python code, by batch, where it was read from. The data's own reads are left
    out: the loader and the labels before their transfer are on the host by design (no device waits for them)."""
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(tensor, *args, _original=original, _name=name):
            caller = sys._getframe(1).f_code
            if batches.batches and not caller.co_filename.startswith(DATA_ON_THE_HOST):
                batches.batches[-1].append(f"{_name} in {caller.co_name} ({Path(caller.co_filename).name})")
            return _original(tensor, *args)

        monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize("bar", [False, True])
def test_no_host_read_of_a_tensor_between_the_loss_checks(tmp_path, monkeypatch, bar):
    monkeypatch.setattr(ImageClassifier, "nonfinite_check_every", 10)
    overrides = COUNTED
    if bar:  # a terminal's bar, redrawn as on a GPU: every 10 batches here
        overrides = [*COUNTED, "+trainer.enable_progress_bar=true"]
        monkeypatch.setattr(train_module, "ProgressBar", lambda refresh_rate: callbacks.ProgressBar(refresh_rate=10))
    batches = _PerBatch()
    _count_host_reads(monkeypatch, batches)
    record = train(compose_config(*overrides), tmp_path, callbacks=[batches])
    assert record.status == "completed" and len(batches.batches) == 32
    between = {index: reads for index, reads in enumerate(batches.batches) if index not in CHECKED and reads}
    assert between == {}
    checks = [reads for index, reads in enumerate(batches.batches) if index in CHECKED]
    assert all("tolist in raise_if_diverged (module.py)" in reads for reads in checks)  # the counter counts


class _CudaSyncs(_PerBatch):
    """The warnings of torch.cuda.set_sync_debug_mode ("called a synchronizing CUDA operation"), by batch."""

    def __init__(self, caught: list[warnings.WarningMessage]) -> None:
        super().__init__()
        self.caught, self.seen = caught, 0

    def on_train_start(self, trainer, module):
        torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if self.batches:  # the previous batch's, from its start to this one's
            new = (str(w.message)[:300] for w in self.caught[self.seen :])
            self.batches[-1] += [message for message in new if "synchroniz" in message]
        self.seen = len(self.caught)
        super().on_train_batch_start(trainer, module, batch, batch_idx)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_no_cuda_sync_between_the_loss_checks_on_a_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageClassifier, "nonfinite_check_every", 10)
    cfg = compose_config(*[o for o in COUNTED if o != "trainer=cpu"], "trainer=gpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        syncs = _CudaSyncs(caught)
        try:
            record = train(cfg, tmp_path, callbacks=[syncs])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert record.status == "completed" and record.accelerator == "gpu" and len(syncs.batches) == 32
    # batch 0 sets up what later batches reuse (the logger's tensors, the normalization's mean and std)
    between = {i: s for i, s in enumerate(syncs.batches) if i not in CHECKED and i > 0 and s}
    assert between == {}


class _PoisonAt(L.Callback):
    """Makes the loss NaN from optimizer step `step` on."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                module.model.head.weight.fill_(float("nan"))


@pytest.mark.parametrize(("override", "seen_at"), [
    ("trainer.val_check_interval=2", 2),  # before a validation mid-epoch: never saved as the best
    ("trainer.max_steps=3", 3),  # at a stop between checks: never saved as last.ckpt
    ("trainer.limit_train_batches=3", 3),  # at the last batch of a shortened epoch
    ("trainer.save_every_minutes=0", 2),  # before a mid-epoch save
])  # fmt: skip
def test_a_diverged_model_is_never_saved_and_the_first_bad_step_is_named(tmp_path, override, seen_at):
    record = train(compose_config(*QUICK, override), tmp_path, callbacks=[_PoisonAt(1)])
    assert record.status == "diverged", record.error
    assert record.error == f"loss is nan at step 1 (epoch 0); seen at step {seen_at}" and record.steps == seen_at
    assert record.best_val_top1 is None and not (tmp_path / "checkpoints" / "best.ckpt").exists()
    for path in (tmp_path / "checkpoints").glob("*.ckpt"):  # save_every_minutes=0: the one of step 1, before
        weights = torch.load(path, weights_only=True)["state_dict"]
        assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())


def test_the_loss_is_checked_every_n_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageClassifier, "nonfinite_check_every", 3)
    record = train(compose_config(*QUICK), tmp_path, callbacks=[_PoisonAt(1)])
    assert record.error == "loss is nan at step 1 (epoch 0); seen at step 3" and read_record(tmp_path).steps == 3


def test_ddp_ranks_stop_together_at_the_first_bad_step_of_any_rank(tmp_path):
    # rank 1's loss is NaN from step 1, rank 0's from step 2 (the all-reduced gradients): the check gathers both
    env = {"PYTHONPATH": FAULTS, "METAFORMER_TEST_FAULTS": json.dumps({"data.batch_size=32": "nan", "nan_rank": 1})}
    args = [*QUICK, "optim.epochs=1", "data.batch_size=32", "trainer.strategy=ddp", "trainer.devices=2"]
    result = run_cli(*args, cwd=tmp_path, env=env, timeout=240)
    record = only_record(tmp_path / "runs")
    assert record.status == "diverged", result.stderr[-3000:]
    assert record.world_size == 2 and record.error == "loss is nan at step 1 (epoch 0); seen at step 4"


class _FakeEvent:
    """A CUDA event on a device that runs `lag` batches behind the host: `record` stamps the device's time (ms) from
    `timeline`; an event completes once `lag` more have been recorded after it, or when the host waits for it."""

    timeline: list[float] = []
    recorded: list["_FakeEvent"] = []
    lag = 4
    waits = 0

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing
        self.done = False

    def record(self) -> None:
        self.at = _FakeEvent.timeline.pop(0)
        _FakeEvent.recorded.append(self)
        if len(_FakeEvent.recorded) > _FakeEvent.lag:
            _FakeEvent.recorded[-1 - _FakeEvent.lag].done = True

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        _FakeEvent.waits += 1
        for event in _FakeEvent.recorded:
            event.done = True

    def elapsed_time(self, end: "_FakeEvent") -> float:
        assert self.done and end.done, "cudaEventElapsedTime of an event not yet completed"
        return end.at - self.at


def test_gpu_step_times_come_from_cuda_events_with_one_wait_per_window(monkeypatch):
    # the device: 100 ms a batch, back to back (a perfect loader); the host queues a batch in 10 ms and runs ahead
    device_ms = [t for batch in range(8) for t in (100.0 * batch, 100.0 * batch + 100)]
    host_s = iter(t for batch in range(8) for t in (0.1 * batch, 0.1 * batch + 0.01))
    monkeypatch.setattr(_FakeEvent, "timeline", device_ms)
    monkeypatch.setattr(_FakeEvent, "recorded", [])
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: next(host_s))
    speed, batch = TrainThroughput(began=None), (torch.zeros(8, 3, 4, 4), torch.zeros(8))
    on_gpu = SimpleNamespace(device=torch.device("cuda", 0))
    speed.on_train_epoch_start(None, on_gpu)
    for index in range(8):
        speed.on_train_batch_start(None, on_gpu, batch, index)
        speed.on_train_batch_end(None, on_gpu, None, batch, index)
    assert _FakeEvent.waits == 0  # nothing waits for the device during the epoch
    assert speed.images == 4 * 8  # read as their events completed: 4 of the 6 timed (the device is 2 behind)
    speed.on_train_epoch_end(None, on_gpu)
    assert _FakeEvent.waits == 1  # one wait at the window's end
    assert speed.images_per_second == pytest.approx(8 / 0.1)  # the device's 100 ms a batch, not the host's 10 ms
    assert speed.data_wait_fraction == 0.0  # the device never waited between batches (the host clock: 90%)


class _FakeCuda:
    """torch.cuda on a machine with `count` visible GPUs: one random state per GPU, an IndexError past the last, as
    torch's default_generators[index] raises."""

    def __init__(self, monkeypatch, count: int) -> None:
        self.count, self.states = count, {i: torch.full((16,), i, dtype=torch.uint8) for i in range(count)}
        for name in ("is_available", "device_count", "get_rng_state", "set_rng_state", "get_rng_state_all",
                     "set_rng_state_all"):  # fmt: skip
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))

    def _index(self, device) -> int:
        index = torch.device("cuda", device).index if isinstance(device, int) else torch.device(device).index
        index = 0 if index is None else index  # "cuda": the current device
        if index >= self.count:
            raise IndexError("tuple index out of range")
        return index

    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return self.count

    def get_rng_state(self, device="cuda") -> torch.Tensor:
        return self.states[self._index(device)].clone()

    def set_rng_state(self, state: torch.Tensor, device="cuda") -> None:
        self.states[self._index(device)] = state.clone()

    def get_rng_state_all(self) -> list[torch.Tensor]:
        return [self.get_rng_state(i) for i in range(self.count)]

    def set_rng_state_all(self, states: list[torch.Tensor]) -> None:
        for index, state in enumerate(states):
            self.set_rng_state(state, index)


def _rng_on(device: str, rank: int = 0) -> ResumableRng:
    rng = ResumableRng()
    trainer = SimpleNamespace(global_rank=rank, strategy=SimpleNamespace(root_device=torch.device(device)))
    rng.setup(trainer, None, "fit")
    return rng


def test_cuda_random_state_saved_under_8_gpus_resumes_under_1(monkeypatch):
    eight = _FakeCuda(monkeypatch, 8)
    eight.states[0] = torch.full((16,), 42, dtype=torch.uint8)  # rank 0's GPU, where its stream has got to
    saved = _rng_on("cuda:0").state_dict()
    one = _FakeCuda(monkeypatch, 1)
    _rng_on("cuda:0").load_state_dict(saved)  # before: IndexError (the states of GPUs 1-7 restored by index)
    assert torch.equal(one.states[0], torch.full((16,), 42, dtype=torch.uint8))


def test_a_checkpoint_with_every_gpus_state_resumes_each_rank_with_its_own(monkeypatch, caplog):
    eight = _FakeCuda(monkeypatch, 8)
    old = {**ResumableRng().state_dict(), "cuda": eight.get_rng_state_all()}  # as checkpoints were written before
    four = _FakeCuda(monkeypatch, 4)
    _rng_on("cuda:3", rank=3).load_state_dict(old)
    assert torch.equal(four.states[3], torch.full((16,), 3, dtype=torch.uint8))
    short = {**old, "cuda": old["cuda"][:2]}
    with caplog.at_level(logging.WARNING):
        _rng_on("cuda:3", rank=3).load_state_dict(short)  # no state for GPU 3: skipped, with one warning
    assert [r.message for r in caplog.records].count(
        "the checkpoint holds no random state for GPU 3 (only 2 GPUs were visible when it was saved): its random "
        "numbers start afresh") == 1  # fmt: skip


def test_ddp_asks_about_sigterm_every_n_batches_not_every_batch():
    from types import SimpleNamespace

    from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

    from metaformer_lab.training.callbacks import SigtermEveryNBatches

    assert hasattr(_TrainingEpochLoop, "_broadcast_sigterm_tensor")  # what the callback thins out still exists
    asked = []
    loop = SimpleNamespace(total_batch_idx=0, batch_progress=SimpleNamespace(is_last_batch=False))
    loop._broadcast_sigterm_tensor = lambda: asked.append(loop.total_batch_idx)
    for world_size, expected in ((1, list(range(120))), (2, [0, 50, 100, 119])):
        asked.clear()
        loop._broadcast_sigterm_tensor = lambda: asked.append(loop.total_batch_idx)
        trainer = SimpleNamespace(world_size=world_size, fit_loop=SimpleNamespace(epoch_loop=loop))
        SigtermEveryNBatches(50).on_train_start(trainer, None)
        for index in range(120):
            loop.total_batch_idx, loop.batch_progress.is_last_batch = index, index == 119
            loop._broadcast_sigterm_tensor()
        assert asked == expected  # one process: untouched (Lightning asks nothing there anyway)
