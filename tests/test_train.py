"""Training end to end: run.py on the embedded data, the run record, resume, divergence, wandb, DDP."""

import itertools
import json
import logging
import os
import re
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import QUICK, compose_config, only_record, run_cli
from lightning.pytorch.loggers import WandbLogger

from metaformer_lab.config import build_optim
from metaformer_lab.record import STATUSES, read_record
from metaformer_lab.registry import ConfigError
from metaformer_lab.train import train


@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
def test_run_py_trains_and_writes_a_completed_record(tmp_path, precision):
    result = run_cli(*QUICK, f"trainer.precision={precision}", "mixer=identity", "norm=layernorm", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    record = only_record(tmp_path / "runs")
    assert record.status == "completed" and record.error is None
    assert (record.mixer, record.norm, record.act, record.model) == ("identity", "layernorm", "gelu", "small")
    assert record.epochs == 2 and record.steps == 8 and record.global_batch == 64
    assert 0.0 <= record.best_val_top1 <= 1.0 and record.best_val_top1 >= record.final_val_top1
    assert [(v["epoch"], v["step"]) for v in record.val_history] == [(0, 4), (1, 8)]  # the learning curve
    assert record.val_history[-1]["top1"] == record.final_val_top1
    assert max(v["top1"] for v in record.val_history) == record.best_val_top1
    assert record.params > 0 and record.macs > 0 and record.train_throughput_img_s > 0
    assert str(record.config["trainer"]["precision"]) == precision
    run_dir = Path(record.run_dir)
    assert "mixer=identity" in run_dir.name and (run_dir / "checkpoints" / "last.ckpt").exists()
    assert (run_dir / "csv" / "metrics.csv").exists()


def test_compiled_model_trains_and_keeps_plain_checkpoint_keys(tmp_path):
    record = train(
        compose_config(*QUICK, "optim.epochs=1", "trainer.compile=aot_eager", "trainer.channels_last=true"), tmp_path
    )
    assert record.status == "completed"
    keys = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert "model.patch_embed.proj.weight" in keys and not any("_orig_mod" in k for k in keys)


def test_per_stage_mixers_from_one_override(tmp_path):
    cfg = compose_config(*QUICK, "optim.epochs=1", "mixer.stages=[pooling,identity,attention,attention]")
    record = train(cfg, tmp_path)
    assert record.status == "completed"
    assert record.mixer_stages == ["pooling", "identity", "attention", "attention"]
    assert record.mixer == "pooling,identity,attention,attention"


def test_record_schema_of_a_completed_run(tmp_path):
    train(compose_config(*QUICK, "optim.epochs=1", "seed=3"), tmp_path)
    data = json.loads((tmp_path / "result.json").read_text())
    assert data["schema_version"] == 8 and data["status"] in STATUSES
    assert [v["epoch"] for v in data["val_history"]] == [0]  # schema 8: the learning curve
    assert data["unreadable_images"] == {"train": 0, "val": 0} and data["unreadable_paths"] == []
    assert data["max_side"] is None  # not data=shards --max-side: the source's pixels
    assert (data["schedule"], data["train_images"], data["world_size"]) == ("1 ep", 256, 1)
    assert (data["accelerator"], data["device_name"], data["precision"]) == ("cpu", "cpu", "32")
    axes = ("model", "mixer", "pool_size", "norm", "act", "residual", "mlp", "seed", "data", "experiment")
    assert all(key in data for key in axes) and data["seed"] == 3
    for key in (
        "params",
        "frozen_params",
        "macs",
        "best_val_top1",
        "best_val_top5",
        "final_val_top1",
        "final_val_top5",
        "epochs",
        "steps",
        "global_batch",
        "lr",
        "wall_time_s",
        "train_throughput_img_s",
        "data_wait_fraction",
        "first_step_s",
    ):
        assert isinstance(data[key], int | float), key  # fmt: skip
    assert data["versions"]["torch"] == torch.__version__ and "git_commit" in data
    assert data["config"]["mixer"]["name"] == "pooling"  # the resolved config


def test_rerun_of_a_completed_run_is_skipped(tmp_path):
    cfg = compose_config(*QUICK, "optim.epochs=1")
    first = train(cfg, tmp_path)
    again = train(cfg, tmp_path)
    assert again.status == "completed" and again.finished_at == first.finished_at


def test_a_run_ends_with_one_line_and_logs_to_run_log_without_noise(tmp_path):
    result = run_cli(*QUICK, "logger=wandb", "trainer=auto", "trainer.max_steps=3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    record = only_record(tmp_path / "runs")
    run_dir = Path(record.run_dir)
    last = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"completed: best val top-1 \d+\.\d\d%, final \d+\.\d\d%, 1 ep / 3 steps in \d+ s; record "
                        r"runs/.*/result.json", last), last  # fmt: skip
    assert "schedule 2 ep, max 3 steps" in result.stdout
    assert re.search(r"speed: \d+\.\d img/s per process in training steps, \d+\.\d% of the time between batches "
                     r"\(data, loop\); first step \d+\.\d s after the run began\n", result.stdout)
    assert re.search(r"device cpu \(\d+ threads?\), precision 32\n", result.stdout)
    assert re.search(r"wandb: offline; upload with `wandb sync runs/.*/wandb/offline-run-", result.stdout)
    for noise in ("Tip", "Total Flops", "litlogger", "Tracking run with wandb", "Run history", "anonymous",
                  "GPU available", "LeafSpec"):  # fmt: skip
        assert noise not in output
    log = (run_dir / "run.log").read_text()
    assert "`Trainer.fit` stopped" in log and last in log and "model small" in log  # Lightning's lines and ours
    # output to a pipe: no progress bar (carriage returns, cursor moves) but a line per validation; no complaints
    for noise in ("\r", "\x1b[", "it/s", "weights_only", "could not find the monitored key"):
        assert noise not in output and noise not in log, noise
    assert re.search(r"\nepoch 1, step 3: val top-1 \d+\.\d\d%, top-5 \d+\.\d\d%\n", result.stdout)
    assert record.accelerator == "cpu" and record.schedule == "2 ep, max 3 steps"


class _LrPerStep(L.Callback):
    def __init__(self):
        self.lrs = []
        self.estimated = None

    def on_train_start(self, trainer, module):
        self.estimated = trainer.estimated_stepping_batches  # Lightning's count of the steps, from the loader

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_lr_schedule_follows_the_steps_actually_run(tmp_path):
    lrs = _LrPerStep()
    cfg = compose_config(*QUICK, "optim.warmup_epochs=0.2", "trainer.max_steps=5", "optim.min_lr=0")
    record = train(cfg, tmp_path, callbacks=[lrs])
    assert record.steps == 5 and record.schedule == "2 ep, max 5 steps"
    optim = build_optim(cfg)  # warmup, cosine over 2 epochs and no cooldown, all fitted into 5 steps
    assert lrs.lrs == pytest.approx([optim.lr_at(step * 2 / 5) for step in range(5)])
    assert lrs.lrs[0] == pytest.approx(optim.warmup_lr) and max(lrs.lrs) > 0.5 * optim.lr


@pytest.mark.parametrize("overrides", [
    ["optim.epochs=12", "trainer.max_steps=20"],  # 12 epochs of 4 steps, cut at 20: the schedule fitted into them
    ["optim.epochs=3", "trainer.limit_train_batches=0.5"],  # 3 epochs of 2 steps
    ["trainer.fast_dev_run=true"],  # 1 step
    ["optim.epochs=1", "data.train_size=1280"],  # 1 epoch of 20 steps: the warmup capped at a tenth of it
])  # fmt: skip
def test_the_schedule_line_says_the_steps_the_lr_takes(tmp_path, caplog, overrides):
    caplog.set_level(logging.INFO)
    lrs, cfg = _LrPerStep(), compose_config(*QUICK, "optim.warmup_epochs=1", *overrides)
    record = train(cfg, tmp_path, callbacks=[lrs])
    line = next(message for message in caplog.messages if message.startswith("  schedule "))
    # "warmup 2 steps then cosine to 1e-5 over 20 steps", "warmup 1 ep (2 steps) then cosine ... over 3 ep (6 steps)"
    found = re.search(r"warmup (?:[\d.]+ ep \()?(\d+) steps?\b.* then cosine to \S+ over (?:\d+ ep \()?(\d+) steps?",
                      line)  # fmt: skip
    warmup, total = int(found[1]), int(found[2])
    assert total == len(lrs.lrs) == record.steps == lrs.estimated, line  # the steps run, as Lightning counts them
    optim = build_optim(cfg)
    slope = lrs.lrs[1] - lrs.lrs[0] if total > 1 else 0.0
    ramp = [lrs.lrs[0] + slope * step for step in range(total)]
    assert lrs.lrs[0] == pytest.approx(optim.warmup_lr) and lrs.lrs[:warmup] == pytest.approx(ramp[:warmup]), line
    if warmup < total:  # the lr leaves the warmup's straight line at the step said, and only decays from there
        assert lrs.lrs[warmup] < 0.999 * ramp[warmup] and lrs.lrs[-1] >= optim.min_lr, line
        assert all(b <= a for a, b in itertools.pairwise(lrs.lrs[warmup:])), line
    assert not any("fast_dev_run` mode" in message or "weights_only" in message for message in caplog.messages)
    assert "`Trainer.fit` stopped" in caplog.text  # Lightning's lines are seen here: the banner was left out


@pytest.mark.parametrize("override, steps, schedule", [
    ("trainer.limit_train_batches=0.5", 4, "2 ep, 50% batches"),
    ("trainer.fast_dev_run=true", 1, "fast_dev_run"),
])  # fmt: skip
def test_lightning_shortcuts_work_without_plus_and_say_so(tmp_path, override, steps, schedule):
    record = train(compose_config(*QUICK, override), tmp_path)
    assert record.status == "completed" and record.steps == steps and record.schedule == schedule


def test_quick_mode_learns(tmp_path):
    # debug=quick on the default command: 248 steps on the embedded data, well above chance (10%); about 47% here
    record = train(compose_config("debug=quick", "logger=csv", "trainer=cpu"), tmp_path)
    assert record.status == "completed" and record.schedule == "4 ep" and record.train_images == 8000
    assert record.best_val_top1 > 0.3


class _PoisonWeights(L.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == 2:
            with torch.no_grad():
                module.model.head.weight.fill_(float("nan"))


def test_nan_loss_stops_the_run_as_diverged(tmp_path):
    record = train(compose_config(*QUICK), tmp_path, callbacks=[_PoisonWeights()])
    # the loss is checked on the host every 50 batches and at an epoch's end (4 steps here): the run stops there,
    # before validating or saving, and reports the step where the loss first was NaN
    assert record.status == "diverged" and "loss is nan at step 2 (epoch 0); seen at step 4" in record.error
    assert read_record(tmp_path).status == "diverged" and record.steps == 4
    assert not list((tmp_path / "checkpoints").glob("*.ckpt")) and record.best_val_top1 is None


class _PreemptAfterFirstEpoch(L.Callback):
    def on_train_epoch_end(self, trainer, module):
        if trainer.current_epoch == 0:
            os.kill(os.getpid(), signal.SIGTERM)  # what a cluster scheduler sends before preempting a job


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path):
    # drop path and mixup draw random numbers every step: resume must restore the RNG, not just the weights
    overrides = (*QUICK, "model.drop_path_rate=0.1", "optim.mixup_alpha=0.8", "optim.cutmix_alpha=1.0")
    cfg = compose_config(*overrides)
    train(cfg, tmp_path / "straight")
    with pytest.raises(SystemExit):
        train(cfg, tmp_path / "resumed", callbacks=[_PreemptAfterFirstEpoch()])
    interrupted = read_record(tmp_path / "resumed")
    assert interrupted.status == "interrupted" and interrupted.epochs == 1
    resumed = train(cfg, tmp_path / "resumed")
    assert resumed.status == "completed" and resumed.epochs == 2 and resumed.steps == 8
    # the metrics of both segments are kept (Lightning's CSVLogger would delete the first)
    first, second = (tmp_path / "resumed" / "csv" / p / "metrics.csv" for p in ("", "resume-1"))
    assert "val/top1" in first.read_text() and "val/top1" in second.read_text()

    def weights(run: str) -> dict:
        return torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]

    straight, again = weights("straight"), weights("resumed")
    assert all(torch.equal(straight[k], again[k]) for k in straight)
    assert resumed.best_val_top1 == read_record(tmp_path / "straight").best_val_top1
    assert resumed.val_history == read_record(tmp_path / "straight").val_history  # both segments' validations


def test_rerun_with_other_settings_never_mixes_into_the_old_run(tmp_path, caplog):
    cfg = compose_config(*QUICK)
    with pytest.raises(SystemExit):
        train(cfg, tmp_path / "a", callbacks=[_PreemptAfterFirstEpoch()])
    with pytest.raises(ConfigError, match=r"resume=None: .*unfinished run with other settings \(optim.base_lr\)"):
        train(compose_config(*QUICK, "optim.base_lr=1e-3"), tmp_path / "a")
    assert read_record(tmp_path / "a").status == "interrupted"  # untouched
    done = train(compose_config(*QUICK, "optim.epochs=1"), tmp_path / "b")
    again = train(compose_config(*QUICK, "optim.epochs=1", "optim.min_lr=0"), tmp_path / "b")
    assert again.finished_at == done.finished_at and "other settings (optim.min_lr)" in caplog.text


def test_a_run_begun_before_the_auto_trainer_defaults_resumes_where_nothing_computed_changed(tmp_path):
    # a record written before trainer.tf32 and trainer.benchmark existed, with channels_last and precision explicit
    # (the old defaults on the CPU): the same command resumes it; a setting that computes otherwise does not
    cfg = compose_config(*QUICK)
    with pytest.raises(SystemExit):
        train(cfg, tmp_path, callbacks=[_PreemptAfterFirstEpoch()])
    record = json.loads((tmp_path / "result.json").read_text())
    old_trainer = {k: v for k, v in record["config"]["trainer"].items() if k not in ("tf32", "benchmark")}
    record["config"]["trainer"] = {**old_trainer, "channels_last": True, "precision": "32"}
    (tmp_path / "result.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError, match=r"other settings \(trainer.channels_last\)"):
        train(compose_config(*QUICK, "trainer.channels_last=false"), tmp_path)
    resumed = train(cfg, tmp_path)
    assert resumed.status == "completed" and resumed.epochs == 2


def test_failed_run_records_the_error_and_reruns_from_scratch(tmp_path):
    class Crash(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            raise RuntimeError("disk on fire")

    cfg = compose_config(*QUICK, "optim.epochs=1")
    with pytest.raises(RuntimeError):
        train(cfg, tmp_path, callbacks=[Crash()])
    failed = read_record(tmp_path)
    assert failed.status == "failed" and "disk on fire" in failed.error
    assert train(cfg, tmp_path).status == "completed"


class _WandbSnapshot(L.Callback):
    def on_train_end(self, trainer, module):
        run = next(lg for lg in trainer.loggers if isinstance(lg, WandbLogger)).experiment
        self.config, self.group, self.tags, self.mode = dict(run.config), run.group, set(run.tags), run.settings.mode


def test_wandb_offline_run_has_the_axes_in_its_config(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # no key configured: offline by default
    snapshot = _WandbSnapshot()
    cfg = compose_config(
        *QUICK, "optim.epochs=1", "logger=wandb", "mixer=identity", "norm=batchnorm", "sweep=table5_act", "data=shapes"
    )
    record = train(cfg, tmp_path, callbacks=[snapshot])
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert record.status == "completed" and len(runs) == 1 and record.wandb_id in runs[0].name
    assert snapshot.mode == "offline" and snapshot.group == "table5_act"
    assert {"mixer=identity", "norm=batchnorm", "act=gelu", "seed=0"} <= snapshot.tags
    assert snapshot.config["mixer"] == "identity" and snapshot.config["norm"] == "batchnorm"
    assert snapshot.config["params"] == record.params and snapshot.config["config"]["optim"]["epochs"] == 1


def test_the_end_line_counts_steps_in_words():
    from metaformer_lab.record import RunRecord
    from metaformer_lab.train import end_line

    one = RunRecord(status="completed", run_dir="runs/x", epochs=1, steps=1, wall_time_s=3.0, best_val_top1=0.5,
                    final_val_top1=0.5)  # fmt: skip
    assert "1 ep / 1 step in 3 s" in end_line(one)
    assert "1 ep / 2 steps in 3 s" in end_line(RunRecord(**{**one.__dict__, "steps": 2}))
