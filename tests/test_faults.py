"""Faults a long run meets, each as it happens: kills, failing and diverging jobs, dead ranks, bad disks."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections import namedtuple
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import FAULTS, QUICK, ROOT, compose_config, only_record, records_by_mixer, run_cli, run_cli_many

from metaformer_lab.record import read_record, shared_file_mode
from metaformer_lab.registry import ConfigError
from metaformer_lab.train import train
from metaformer_lab.training.checkpoint_io import AtomicCheckpointIO, unreadable_checkpoint
from metaformer_lab.training.start import UnreadableCheckpoint, decide_start, run_lock

WRITER = """
import sys, torch
from metaformer_lab.training.checkpoint_io import atomic_torch_save
big = {"weights": torch.arange(12_000_000, dtype=torch.float32)}  # 48 MB: a write takes a while
version = 0
while True:
    version += 1
    big["version"] = version
    atomic_torch_save(big, sys.argv[1])
"""


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("the job died half way through the write")


def test_a_write_that_fails_half_way_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1, "weights": torch.ones(3)}, path)
    with pytest.raises(RuntimeError, match="half way"):
        AtomicCheckpointIO().save_checkpoint({"step": 2, "weights": torch.zeros(3), "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # the partial file is gone
    assert path.stat().st_mode & 0o777 == shared_file_mode()  # as a plain open() would make it, not mkstemp's 0o600


@pytest.mark.parametrize("delay", [0.2])  # plain torch.save leaves a truncated file at 0.05, 0.2 and 0.45 s
def test_kill_9_during_a_write_leaves_a_whole_checkpoint(tmp_path, delay):
    path = tmp_path / "last.ckpt"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)])
    try:
        deadline = time.monotonic() + 60
        while not path.exists():  # the first version is whole; kill during a later write
            assert time.monotonic() < deadline and writer.poll() is None
            time.sleep(0.01)
        time.sleep(delay)
    finally:
        writer.kill()
        writer.wait()
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["version"] >= 1 and checkpoint["weights"][-1] == 11_999_999


def test_kill_9_mid_epoch_then_the_same_command_ends_as_an_uninterrupted_run(tmp_path):
    # drop path and mixup draw random numbers every step; two micro-batches per optimizer step; a checkpoint after
    # every optimizer step (trainer.save_every_minutes=0), so the kill lands after a mid-epoch one
    args = [*QUICK, "optim.epochs=3", "data.batch_size=32", "model.drop_path_rate=0.1", "optim.mixup_alpha=0.8",
            "optim.cutmix_alpha=1.0", "trainer.save_every_minutes=0"]  # fmt: skip
    (tmp_path / "straight").mkdir()
    (tmp_path / "killed").mkdir()
    assert run_cli(*args, cwd=tmp_path / "straight").returncode == 0
    slow = {"PYTHONPATH": FAULTS, "METAFORMER_TEST_FAULTS": json.dumps({"sleep_s": 0.2})}  # the same numbers
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", **slow}
    job = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args], cwd=tmp_path / "killed", env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        step, deadline = None, time.monotonic() + 120
        while step not in (5, 6):  # 4 optimizer steps an epoch: 5 and 6 are in the middle of the second
            assert job.poll() is None and time.monotonic() < deadline, "the run ended before the kill"
            last = list((tmp_path / "killed").rglob("last.ckpt"))
            step = torch.load(last[0], weights_only=True)["global_step"] if last else None
            time.sleep(0.02)
    finally:
        job.kill()  # SIGKILL: no handler runs, the record still says `running`
        job.wait()
    assert only_record(tmp_path / "killed").status == "running"
    [checkpoints] = (tmp_path / "killed").rglob("checkpoints")
    (checkpoints / ".last.ckpt.x1y2.partial").write_bytes(b"half a checkpoint")  # as a kill during a write leaves
    again = run_cli(*args, cwd=tmp_path / "killed")
    assert again.returncode == 0 and "resuming from" in again.stdout
    straight, resumed = only_record(tmp_path / "straight"), only_record(tmp_path / "killed")
    assert resumed.status == "completed" and (resumed.epochs, resumed.steps) == (3, 12)
    assert (resumed.best_val_top1, resumed.final_val_top1) == (straight.best_val_top1, straight.final_val_top1)

    def weights(run: str) -> dict:
        [path] = (tmp_path / run).rglob("last.ckpt")
        return torch.load(path, weights_only=True)["state_dict"]

    a, b = weights("straight"), weights("killed")
    assert all(torch.equal(a[k], b[k]) for k in a)  # same machine, same kernels: bit for bit
    assert not list(checkpoints.glob("*.partial"))  # cleared when the run resumed


def test_a_failing_and_a_diverging_job_do_not_stop_the_sweep(tmp_path):
    env = {"PYTHONPATH": FAULTS, "METAFORMER_TEST_FAULTS": json.dumps({"mixer=identity": "raise",
                                                                        "mixer=attention": "nan"})}  # fmt: skip
    result = run_cli("-m", "mixer=identity,attention,pooling", *QUICK, cwd=tmp_path, env=env)
    assert result.returncode == 1  # not every job completed
    assert "sweep of 3 jobs: 1 completed, 1 diverged, 1 failed" in result.stdout
    assert "injected failure" in result.stdout and "loss is nan" in result.stdout
    records = records_by_mixer(tmp_path / "runs")
    assert {m: r.status for m, r in records.items()} == {
        "identity": "failed", "attention": "diverged", "pooling": "completed"
    }  # fmt: skip
    assert "RuntimeError: injected failure" in records["identity"].error
    assert "Traceback" in next((tmp_path / "runs").glob("*mixer=identity*/run.log")).read_text()


def _processes_with(marker: str) -> dict[int, list[bytes]]:
    """pid -> environment of the live processes that carry `marker` in theirs."""
    found = {}
    for folder in Path("/proc").iterdir():
        if folder.name.isdigit():
            try:
                environ = (folder / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"TEST_MARKER={marker}".encode() in environ:
                found[int(folder.name)] = environ
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank processes through /proc")
def test_a_dead_rank_ends_the_job_without_a_hang_or_an_orphan(tmp_path):
    marker = uuid.uuid4().hex
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "TEST_MARKER": marker,
           "PYTHONPATH": FAULTS, "METAFORMER_TEST_FAULTS": json.dumps({"sleep_s": 0.3})}  # fmt: skip
    args = ["-m", *QUICK, "optim.epochs=20", "data.batch_size=32", "trainer.strategy=ddp", "trainer.devices=2"]
    job = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args], cwd=tmp_path, env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.monotonic() + 120
    while True:  # until both ranks train
        rank_1 = [pid for pid, environ in _processes_with(marker).items() if b"RANK=1" in environ]
        record = list(tmp_path.rglob("result.json"))  # written by rank 0 just before training
        if rank_1 and record and read_record(record[0]).status == "running":
            break
        assert job.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(2)  # a few steps in
    os.kill(min(rank_1), 9)  # as the out-of-memory killer would
    killed = time.monotonic()
    output, _ = job.communicate(timeout=180)
    assert time.monotonic() - killed < 90  # torchrun stops the other rank (it would wait 30 min for its peer)
    assert job.returncode == 1 and "sweep of 1 job: 1 failed" in output
    time.sleep(1)
    assert _processes_with(marker) == {}  # no rank, loader or torchrun left behind
    record = only_record(tmp_path / "runs")
    assert record.status == "failed" and record.error.startswith("rank 1 ended (Signal 9 (SIGKILL))")


def test_an_unwritable_output_directory_stops_before_anything_starts(tmp_path):
    cases = {"run": ["hydra.run.dir=a_file/run", *QUICK], "sweep": ["-m", "hydra.sweep.dir=a_file/runs", "seed=0,1"]}
    for i in range(2):  # where each case runs (tests/run_many.py), a file stands where a folder should be
        (tmp_path / f"case{i}").mkdir()
        (tmp_path / f"case{i}" / "a_file").write_text("")
    results = run_cli_many(cases, tmp_path)
    for name, key in (("run", "hydra.run.dir='a_file/run'"), ("sweep", "hydra.sweep.dir='a_file/runs'")):
        result = results[name]
        assert result.returncode == 2
        assert f"error: {key}: cannot write there (Not a directory" in result.stderr
        assert "Traceback" not in result.stderr


def test_a_full_disk_stops_a_run_before_training_with_what_it_needs(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * 2**30, 10 * 2**30 - 50 * 2**20, 50 * 2**20))
    with pytest.raises(ConfigError, match=r"hydra.run.dir=.*its disk has 0.05 GB free; this run needs about 0.10 GB"):
        train(compose_config(*QUICK), tmp_path / "run")
    assert not (tmp_path / "run" / "result.json").exists()


def test_the_sweep_summary_counts_every_outcome_and_says_what_to_do():
    from metaformer_lab.training.hydra_callbacks import summarize

    jobs = [
        {"run_dir": "runs/a", "status": "completed", "detail": None, "earlier": True},
        {"run_dir": "runs/b", "status": "completed", "detail": None, "earlier": False},
        {"run_dir": "runs/c", "status": "refused", "detail": "mixer='x': valid choices: ...", "earlier": False},
    ]
    lines, all_good = summarize(jobs, expected=4)
    assert not all_good and lines[0] == (
        "sweep of 4 jobs: 2 completed, 1 refused, 1 of them finished before (skipped), 1 ended without a report "
        "(killed?)"
    )
    assert lines[1] == "  refused     runs/c: mixer='x': valid choices: ..." and "starts failed ones over" in lines[2]
    assert summarize(jobs[:2], expected=2) == (["sweep of 2 jobs: 2 completed, 1 of them finished before (skipped)"],
                                               True)  # fmt: skip
    running = {"run_dir": "runs/d", "status": "skipped", "detail": "already running (pid 7 on host h)",
               "earlier": False}  # fmt: skip
    assert summarize([jobs[1], running], expected=2) == ([
        "sweep of 2 jobs: 1 completed, 1 skipped (already running)",
        "  skipped     runs/d: already running (pid 7 on host h)",
    ], False)  # fmt: skip


def test_a_mid_epoch_checkpoint_resumes_only_on_as_many_processes(tmp_path):
    from metaformer_lab.train import check_resume_world

    for batches_done, saved_world, world, refused in ((3, 8, 4, True), (3, 8, 8, False), (0, 8, 4, False)):
        path = tmp_path / f"{batches_done}-{saved_world}.ckpt"
        torch.save({"ShapesDataModule": {"epoch": 7, "batches_done": batches_done, "world_size": saved_world}}, path)
        if refused:
            with pytest.raises(ConfigError, match=r"in the middle of epoch 7 by 8 processes"):
                check_resume_world(str(path), world)
        else:
            check_resume_world(str(path), world)
    with pytest.raises(ConfigError, match=r"resume=.*: cannot resume from it: no such file"):
        decide_start({"resume": str(tmp_path / "missing.ckpt")}, tmp_path)


def test_a_job_whose_requeues_ran_out_is_interrupted_not_failed(tmp_path, monkeypatch):
    from submitit.core.utils import UncompletedJobError

    monkeypatch.setenv("WANDB_MODE", "offline")

    class OutOfRequeues(L.Callback):  # what submitit raises in the job at its last time limit
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.current_epoch == 1:
                raise UncompletedJobError("Job not requeued because: timed-out too many times.")

    cfg = compose_config(*QUICK, "logger=wandb")
    with pytest.raises(UncompletedJobError):
        train(cfg, tmp_path, callbacks=[OutOfRequeues()])
    stopped = read_record(tmp_path)
    assert stopped.status == "interrupted"
    resumed = train(cfg, tmp_path)  # resumed from the first epoch's checkpoint, not started over
    assert resumed.status == "completed" and "resume-1" in {p.name for p in (tmp_path / "csv").iterdir()}
    assert resumed.wandb_id == stopped.wandb_id  # the same wandb run goes on
    assert len([p for p in (tmp_path / "wandb").glob(f"offline-run-*-{stopped.wandb_id}")]) == 2


def test_an_unreadable_last_checkpoint_fails_the_run_in_one_line(tmp_path):
    from submitit.core.utils import UncompletedJobError

    class StopInTheSecondEpoch(L.Callback):  # an interrupted run: last.ckpt and best.ckpt of its first epoch
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.current_epoch == 1:
                raise UncompletedJobError("out of requeues")

    run_dir = tmp_path / "run"
    with pytest.raises(UncompletedJobError):
        train(compose_config(*QUICK), run_dir, callbacks=[StopInTheSecondEpoch()])
    last, best = run_dir / "checkpoints" / "last.ckpt", run_dir / "checkpoints" / "best.ckpt"
    whole = last.read_bytes()
    last.write_bytes(whole[: len(whole) // 2])  # as a copy cut short leaves it
    (tmp_path / "elsewhere.ckpt").write_bytes(whole[:100])
    results = run_cli_many({
        "a resume= that cannot be read": [*QUICK, f"hydra.run.dir={run_dir}", f"resume={tmp_path / 'elsewhere.ckpt'}"],
        "the same command": [*QUICK, f"hydra.run.dir={run_dir}"],
        "from best.ckpt, as it says": [*QUICK, f"hydra.run.dir={run_dir}", f"resume={best}"],
    }, tmp_path)  # fmt: skip
    refused, failed, resumed = results.values()
    # the user's own setting: refused as a bad setting, and the run left interrupted (the next command finds it so)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        f"error: resume='{tmp_path / 'elsewhere.ckpt'}': cannot resume from it: truncated or corrupt: "
        "PytorchStreamReader failed reading zip archive: failed finding central directory"
    ]  # fmt: skip
    reason = (f"{last} cannot be read (truncated or corrupt: PytorchStreamReader failed reading zip archive: failed "
              "finding central directory); the run is marked failed: the same command starts it over (its "
              f"checkpoints deleted: move away any to keep), or resume={best} goes on from its best epoch")  # fmt: skip
    assert failed.returncode == 1 and failed.stderr.strip().splitlines() == [f"error: {reason}"]
    assert "Traceback" not in failed.stdout
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout
    record = read_record(run_dir)
    assert record.status == "completed" and (record.epochs, record.steps) == (2, 8)
    assert "resume-1" in {p.name for p in (run_dir / "csv").iterdir()}  # resumed, not started over

    # the record the failed command left, and files of other kinds: a pickle that runs code is refused, never run
    class RunsCode:
        def __reduce__(self):
            return os.mkdir, (str(tmp_path / "code ran"),)

    torch.save({"state_dict": {}, "loops": {}, "hook": RunsCode()}, last)
    torch.save({"stem.weight": torch.ones(1)}, best)  # an official state dict, copied in
    (run_dir / "result.json").write_text(json.dumps({**json.loads((run_dir / "result.json").read_text()),
                                                     "status": "interrupted"}))  # fmt: skip
    with pytest.raises(UnreadableCheckpoint) as unreadable:
        decide_start({**read_record(run_dir).config, "resume": None}, run_dir)  # as the same command would
    assert re.fullmatch(r".* cannot be read \(it holds \w+\.mkdir besides weights, which a weights-only load "
                        r"refuses\); .* starts it over \(its checkpoints deleted: move away any to keep\)",
                        str(unreadable.value))  # fmt: skip
    assert read_record(run_dir).status == "failed" and read_record(run_dir).error == str(unreadable.value)
    assert not (tmp_path / "code ran").exists()
    assert unreadable_checkpoint(best) == "not a checkpoint of a Lightning training run (no state_dict and loops)"


def _start_held(args: list[str], cwd: Path, hold_at_step: int, until: Path) -> subprocess.Popen:
    """`python run.py args...` that waits at its step `hold_at_step` until the file `until` exists."""
    faults = json.dumps({"hold_at_step": hold_at_step, "hold_until": str(until)})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONPATH": FAULTS,
           "METAFORMER_TEST_FAULTS": faults}  # fmt: skip
    with open(cwd / "held.out", "w") as out:
        return subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT)  # fmt: skip


def _wait_for(condition, process: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before the test went on"
        time.sleep(0.1)


def test_a_second_launch_of_a_running_run_says_so_and_leaves_it_alone(tmp_path):
    go = tmp_path / "go"
    first = _start_held(QUICK, tmp_path, hold_at_step=1, until=go)
    try:
        _wait_for(lambda: any(read_record(path).status == "running" for path in tmp_path.glob("runs/*/result.json")),
                  first)  # fmt: skip
        [record] = tmp_path.glob("runs/*/result.json")
        written = record.read_bytes()
        second = run_cli(*QUICK, cwd=tmp_path)
        run_dir = record.parent.relative_to(tmp_path)
        assert second.returncode == 1 and second.stderr.strip().splitlines() == [
            f"{run_dir}: already running (pid {first.pid} on host {socket.gethostname()}); skipped"
        ]  # fmt: skip
        assert record.read_bytes() == written and "run " not in second.stdout  # the running one's, untouched
    finally:
        go.touch()
    assert first.wait(timeout=120) == 0
    assert read_record(record).status == "completed" and read_record(record).steps == 8


def test_a_killed_run_leaves_no_lock_and_the_same_command_resumes_it(tmp_path):
    args = [*QUICK, "data.num_workers=1"]  # a loader process, forked with the lock's descriptor, outlives a kill -9
    first = _start_held(args, tmp_path, hold_at_step=5, until=tmp_path / "never")  # in the second epoch
    try:
        _wait_for(lambda: any(tmp_path.glob("runs/*/checkpoints/last.ckpt")), first)
    finally:
        first.kill()
        first.wait()
    [run_dir] = tmp_path.glob("runs/*")
    with run_lock(run_dir):  # free at once, the loader process alive or not
        pass
    again = run_cli(*args, cwd=tmp_path)
    assert again.returncode == 0 and "resuming from" in again.stdout
    record = read_record(run_dir)
    assert record.status == "completed" and (record.epochs, record.steps) == (2, 8)
