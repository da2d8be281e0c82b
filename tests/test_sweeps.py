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
# a quick CPU version of a paper sweep: the paper rows' models, shrunk, on the embedded data
SMALL_SWEEP = [*QUICK, "data=shapes", "model=small", "optim.cooldown_epochs=0"]


def _rows(sweep: str) -> list[str]:
    params = yaml.safe_load((ROOT / "conf" / "sweep" / f"{sweep}.yaml").read_text())["hydra"]["sweeper"]["params"]
    return params["+experiment"].split(",")


@pytest.mark.parametrize("sweep", SWEEPS)
def test_sweep_expands_to_its_rows_and_its_wandb_twin_matches(sweep):
    jobs = expand_sweep([f"+sweep={sweep}", "seed=0,1"])
    rows = _rows(sweep)
    assert len(jobs) == 2 * len(rows)
    assert {o for job in jobs for o in job if o.startswith("+experiment=")} == {f"+experiment={r}" for r in rows}
    twin = yaml.safe_load((ROOT / "sweeps" / "wandb" / f"{sweep}.yaml").read_text())
    assert twin["parameters"]["+experiment"]["values"] == rows and twin["parameters"]["+sweep"]["value"] == sweep
    assert "${args_no_hyphens}" in twin["command"]


def test_table5_sweep_covers_every_table5_experiment():
    experiments = {p.stem for p in (ROOT / "conf" / "experiment").glob("t5_*.yaml")}
    assert set(_rows("table5")) == experiments
    assert set().union(*(_rows(s) for s in SWEEPS if s.startswith("table5_"))) == experiments


def _trained(output: str) -> int:
    return len(re.findall(r"`Trainer.fit` stopped", output))


def test_sweep_runs_then_skips_finished_runs_and_resumes_interrupted_ones(tmp_path):
    sweep = ["+experiment=t5_baseline,t5_identity", "seed=0,1", *SMALL_SWEEP]
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
    assert table.loc["Pooling → Identity mapping", "Top-1 here (%, mean ± std, n)"].endswith("(n=2)")
    assert table.loc["None (PoolFormer-S12)", "Top-1 here (%, mean ± std, n)"].endswith("(n=2)")
    assert table.loc["GELU → ReLU", "Top-1 here (%, mean ± std, n)"] == "—"

    # a third row joins the sweep; one of its runs was preempted after its first epoch
    (tmp_path / "runs").mkdir(exist_ok=True)
    sweep[0] = "+experiment=t5_baseline,t5_identity,t5_relu"
    job = next(j for j in expand_sweep(sweep) if "+experiment=t5_relu" in j and "seed=0" in j)
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
    runs = plan(["+experiment=t5_baseline,t5_identity", "seed=0,1", *SMALL_SWEEP], torch.device("cpu"), 1)
    assert len(runs) == 4 and {r.state for r in runs} == {"new"}
    assert all(r.epochs_left == 2 and r.images_per_s > 0 and r.seconds > 0 for r in runs)
    assert {Path(r.run_dir).parent.name for r in runs} == {"runs"}
