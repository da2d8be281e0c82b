"""Sweeps: every sweep expands to its paper rows, re-running skips finished runs, interrupted runs resume."""

import re
from pathlib import Path

import lightning as L
import pytest
import yaml
from conftest import QUICK, ROOT, run_cli

from metaformer_lab.analysis import collect_runs, paper_table
from metaformer_lab.plan import compose_job, expand_sweep, plan
from metaformer_lab.record import read_record
from metaformer_lab.train import train

SWEEPS = sorted(p.stem for p in (ROOT / "conf" / "sweep").glob("*.yaml"))
PAPER_SWEEPS = [s for s in SWEEPS if s != "augment_parity"]  # sweeps over paper rows, each with a wandb twin
# a quick CPU version of a paper sweep: the paper rows' models, shrunk, on the embedded data
SMALL_SWEEP = [*QUICK, "data=shapes", "model=small", "optim.cooldown_epochs=0"]


def _rows(sweep: str) -> list[str]:
    params = yaml.safe_load((ROOT / "conf" / "sweep" / f"{sweep}.yaml").read_text())["hydra"]["sweeper"]["params"]
    return params["experiment"].split(",")


@pytest.mark.parametrize("sweep", PAPER_SWEEPS)
def test_sweep_expands_to_its_rows_and_its_wandb_twin_matches(sweep):
    jobs = expand_sweep([f"sweep={sweep}", "seed=0,1"])
    rows = _rows(sweep)
    assert len(jobs) == 2 * len(rows)
    assert {o for job in jobs for o in job if o.startswith("experiment=")} == {f"experiment={r}" for r in rows}
    twin = yaml.safe_load((ROOT / "sweeps" / "wandb" / f"{sweep}.yaml").read_text())
    assert twin["parameters"]["experiment"]["values"] == rows and twin["parameters"]["sweep"]["value"] == sweep
    assert "${args_no_hyphens}" in twin["command"]


def test_the_parity_sweep_runs_each_augmentation_path_on_three_seeds():
    jobs = expand_sweep(["sweep=augment_parity", "data.root=/data/fmnist_jpeg"])
    paths_and_seeds = sorted(tuple(sorted(o for o in job if o.startswith(("data.augment_on=", "seed="))))
                             for job in jobs)  # fmt: skip
    assert paths_and_seeds == sorted((f"data.augment_on={path}", f"seed={seed}")
                                     for path in ("device", "loader") for seed in range(3))  # fmt: skip


def test_table5_sweep_covers_every_table5_experiment():
    experiments = {p.stem for p in (ROOT / "conf" / "experiment").glob("t5_*.yaml")}
    assert set(_rows("table5")) == experiments
    assert set().union(*(_rows(s) for s in PAPER_SWEEPS if s.startswith("table5_"))) == experiments


def _trained(output: str) -> int:
    return len(re.findall(r"`Trainer.fit` stopped", output))


def test_sweep_runs_then_skips_finished_runs_and_resumes_interrupted_ones(tmp_path):
    sweep = ["experiment=t5_baseline,t5_identity", "seed=0,1", *SMALL_SWEEP]
    first = run_cli("-m", *sweep, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert _trained(first.stdout + first.stderr) == 4
    records = [read_record(p) for p in (tmp_path / "runs").rglob("result.json")]
    assert len(records) == 4 and {r.status for r in records} == {"completed"}
    assert sorted((r.experiment, r.mixer, r.seed) for r in records) == [
        ("t5_baseline", "pooling", 0), ("t5_baseline", "pooling", 1),
        ("t5_identity", "identity", 0), ("t5_identity", "identity", 1),
    ]  # fmt: skip

    # the sweep, collected into the paper's Table 5 layout with the paper's numbers beside ours
    table = paper_table(collect_runs(tmp_path / "runs"), "table5").set_index("Variant")
    assert len(table) == 18 and table.loc["Pooling → Identity mapping", "Top-1 paper (%)"] == "74.3"
    # one protocol, named in the header: these small CPU runs never pass for the paper's ImageNet numbers
    [here] = [column for column in table.columns if column.startswith("Top-1 here")]
    assert here == "Top-1 here: shapes 32 px, 256 img, small, 2 ep (%, mean ± std, n)"
    assert table.loc["Pooling → Identity mapping", here].endswith("(n=2)")
    assert table.loc["None (PoolFormer-S12)", here].endswith("(n=2)")
    assert table.loc["GELU → ReLU", here] == "—"

    # a third row joins the sweep; one of its runs was preempted after its first epoch
    (tmp_path / "runs").mkdir(exist_ok=True)
    sweep[0] = "experiment=t5_baseline,t5_identity,t5_relu"
    job = next(j for j in expand_sweep(sweep) if "experiment=t5_relu" in j and "seed=0" in j)
    cfg, run_dir, _ = compose_job(job)
    run_dir = tmp_path / run_dir
    with pytest.raises(SystemExit):
        train(cfg, run_dir, callbacks=[_PreemptAfterFirstEpoch()])
    assert read_record(run_dir).status == "interrupted"

    again = run_cli("-m", *sweep, cwd=tmp_path)
    output = again.stdout + again.stderr
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(re.findall(r"already completed .*; skipping", output)) == 4  # nothing computed twice
    assert _trained(output) == 2  # the new run, and the interrupted one...
    assert output.count("Restoring states from the checkpoint") == 1  # ...resumed, not restarted
    resumed = read_record(run_dir)
    assert resumed.status == "completed" and resumed.epochs == 2 and resumed.steps == 8


class _PreemptAfterFirstEpoch(L.Callback):
    def on_train_epoch_end(self, trainer, module):
        import os
        import signal

        if trainer.current_epoch == 0:
            os.kill(os.getpid(), signal.SIGTERM)


def test_plan_counts_runs_and_estimates_time(tmp_path, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)
    runs = plan(["experiment=t5_baseline,t5_identity", "seed=0,1", *SMALL_SWEEP], torch.device("cpu"), 1)
    assert len(runs) == 4 and {r.state for r in runs} == {"new"}
    assert all(r.epochs_left == 2 and r.steps_left == 8 and r.images_per_s > 0 and r.seconds > 0 for r in runs)
    assert {r.schedule for r in runs} == {"2 ep"} and {r.why_unknown for r in runs} == {None}
    assert {Path(r.run_dir).parent.name for r in runs} == {"runs"}


# SMALL_SWEEP's 256 training images in batches of 64: 4 optimizer steps an epoch, 2 epochs
TINY = [o for o in SMALL_SWEEP if not o.startswith("optim.cooldown_epochs=")]


def test_plan_counts_epochs_and_steps_as_the_run_will(tmp_path, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)
    runs = plan([*TINY, "optim.cooldown_epochs=0,1", "trainer.max_steps=-1,3"], torch.device("cpu"), 1)
    by_schedule = {r.schedule: r for r in runs}
    full, cooldown, short = by_schedule["2 ep"], by_schedule["2+1 ep"], by_schedule["2 ep, max 3 steps"]
    assert (full.epochs_left, full.steps_left) == (2, 8)
    assert (cooldown.epochs_left, cooldown.steps_left) == (3, 12)
    assert cooldown.seconds == pytest.approx(1.5 * full.seconds)  # one model, timed once: the same throughput
    # max_steps stops in the first epoch, before its validation
    assert (short.epochs_left, short.steps_left) == (0.75, 3) and short.seconds < full.seconds / 2
    assert by_schedule["2+1 ep, max 3 steps"].steps_left == 3

    (fast,) = plan([*TINY, "trainer.fast_dev_run=true"], torch.device("cpu"), 1)
    assert (fast.epochs_left, fast.steps_left, fast.schedule) == (1, 1, "fast_dev_run")
    assert 0 < fast.seconds < full.seconds / 4


def test_count_work_follows_lightning_limits_accumulation_devices_and_resume():
    from conftest import QUICK, compose_config

    from metaformer_lab.config import build_optim
    from metaformer_lab.plan import count_work

    optim = build_optim(compose_config(*QUICK, "optim.cooldown_epochs=1"))  # 2 + 1 epochs
    trainer = dict(accumulate_grad_batches=1, max_steps=-1, fast_dev_run=False, limit_train_batches=None,
                   limit_val_batches=None, val_check_interval=None, check_val_every_n_epoch=1)  # fmt: skip
    work = count_work(trainer, optim, 32, 1, (256, 100))
    assert (work.epochs, work.steps, work.train_images, work.val_images) == (3, 24, 768, 300)
    # 2 devices: half the batches each, 2 micro-batches a step; 3 of the 4 batches, so 2 steps an epoch
    trainer.update(accumulate_grad_batches=2, limit_train_batches=3, limit_val_batches=0.5)
    work = count_work(trainer, optim, 32, 2, (256, 100))
    assert (work.epochs, work.steps, work.train_images, work.val_images) == (3, 6, 3 * 3 * 32, 3 * 32)
    resumed = count_work(trainer, optim, 32, 2, (256, 100), done_epochs=2)
    assert (resumed.epochs, resumed.steps) == (1, 2)
    assert count_work(trainer, optim, 32, 2, (None, None)) is None
    trainer.update(fast_dev_run=3)  # 3 batches, whatever the data: 2 steps of 2 micro-batches (the last one short)
    assert count_work(trainer, optim, 32, 2, (None, None)) == count_work(trainer, optim, 32, 2, (256, 100))
    assert (count_work(trainer, optim, 32, 2, (None, None)).steps) == 2


def test_plan_streams_rows_after_a_header(tmp_path, monkeypatch, capsys):
    from metaformer_lab import plan as plan_module

    monkeypatch.chdir(tmp_path)
    seen = []  # what was printed when each model was measured
    measure = plan_module.measure_throughput

    def measure_and_look(*args, **kwargs):
        seen.append(capsys.readouterr().out)
        return measure(*args, **kwargs)

    monkeypatch.setattr(plan_module, "measure_throughput", measure_and_look)
    plan_module.main(["experiment=t5_baseline,t5_identity", *SMALL_SWEEP, "--device", "cpu", "--steps", "1"])
    rest = capsys.readouterr().out
    assert len(seen) == 2
    header, columns = seen[0].splitlines()
    assert header.startswith("2 runs (2 to run, 0 done); timing 2 distinct models on cpu")
    assert columns.split()[:6] == ["state", "epochs", "steps", "train", "img/s", "time"]
    assert seen[1].startswith("new ") and "experiment=t5_baseline" in seen[1]  # before the second measurement
    assert rest.startswith("new ") and "experiment=t5_identity" in rest
    assert "2 runs: 0 done, 2 to run; estimated" in rest.splitlines()[-1]


def test_plan_says_why_a_time_is_unknown(tmp_path, monkeypatch, capsys):
    from metaformer_lab.plan import main

    monkeypatch.chdir(tmp_path)
    # the paper row on ImageNet, made small to measure quickly; data.root is not given
    paper_row = ["experiment=t5_identity", "model=small", "data.image_size=32", "trainer=cpu", "--device", "cpu"]
    main([*paper_row, "--steps", "1"])
    lines = capsys.readouterr().out.splitlines()
    row = next(line for line in lines if line.startswith("new "))
    assert row.split()[:3] == ["new", "310", "?"] and "300+10 ep" in row
    assert "time unknown: data.root not set: no image count" in row
    assert lines[-1] == "no estimate for 1 run: data.root not set: no image count (1)"

    main([*paper_row, f"data.root={tmp_path}", "--steps", "1"])
    assert f"no train/ folder in {tmp_path}" in capsys.readouterr().out


def test_plan_stops_at_a_config_error_before_measuring(tmp_path, monkeypatch, capsys):
    from metaformer_lab import plan as plan_module

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(plan_module, "measure_throughput", None)  # never reached
    with pytest.raises(SystemExit) as stop:
        plan_module.main([*SMALL_SWEEP, "optim.base_lr=0.001,-1", "--device", "cpu"])
    assert stop.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: optim.base_lr=-1")


def test_plan_knows_done_and_interrupted_runs(tmp_path, monkeypatch):
    import torch
    from omegaconf import OmegaConf

    from metaformer_lab.record import RunRecord, write_record

    monkeypatch.chdir(tmp_path)
    jobs = expand_sweep([*SMALL_SWEEP, "seed=0,1,2"])
    for job, status in zip(jobs, ("completed", "interrupted"), strict=False):
        cfg, run_dir, _ = compose_job(job)
        config = OmegaConf.to_container(cfg, resolve=True)
        write_record(run_dir, RunRecord(status=status, epochs=1, schedule="2 ep", config=config))
        (Path(run_dir) / "checkpoints").mkdir()
        (Path(run_dir) / "checkpoints" / "last.ckpt").touch()
    done, resumed, new = plan([*SMALL_SWEEP, "seed=0,1,2"], torch.device("cpu"), 1)
    assert (done.state, done.seconds, new.state) == ("done", 0, "new")
    assert (resumed.state, resumed.epochs_left, resumed.steps_left) == ("resume", 1, 4)
    assert 0 < resumed.seconds < new.seconds
