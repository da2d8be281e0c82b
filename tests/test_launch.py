"""Jobs on more than one process: DDP inside a sweep's jobs, GPUs of their own per job, submitit and SLURM."""

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import FAULTS, QUICK, ROOT, only_record, records_by_mixer, run_cli
from hydra import compose, initialize_config_dir

from metaformer_lab.plan import compose_job
from metaformer_lab.record import read_record
from metaformer_lab.registry import ConfigError
from metaformer_lab.training.gpus import cpus_of_group, jobs_at_once, pinned_gpus

WITHOUT_TRAINER = [arg for arg in QUICK if not arg.startswith("trainer=")]


def test_ddp_inside_a_sweep_runs_each_job_once_on_fresh_ranks(tmp_path):
    # the command: Lightning's own launcher would re-run the whole sweep in each rank
    args = ["-m", "mixer=pooling,identity", "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]
    result = run_cli(*args, *WITHOUT_TRAINER, "optim.epochs=1", "data.batch_size=32", "norm=batchnorm", cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "sweep of 2 jobs: 2 completed" in result.stdout
    assert len(re.findall(r"`Trainer.fit` stopped", output)) == 2  # each job trained once, not once per rank
    records = records_by_mixer(tmp_path / "runs")
    assert set(records) == {"pooling", "identity"}
    for record in records.values():
        assert record.status == "completed" and record.world_size == 2 and record.global_batch == 64
        assert record.steps == 4 and record.precision == "32"  # trainer=ddp: precision auto, fp32 on the CPU
        assert "trainer.devices" not in Path(record.run_dir).name  # the device count does not change the run
        assert record.norm == "batchnorm" and record.config["trainer"]["dist_bn"] == "reduce"
        # every rank trained the config the job resolved and saved, with the job's one decision on how to start
        run_dir = Path(record.run_dir)
        assert yaml.safe_load((run_dir / ".launch" / "config.yaml").read_text()) == record.config
        assert json.loads((run_dir / ".launch" / "start.json").read_text())["checkpoint"] is None
    again = run_cli(*args, *WITHOUT_TRAINER, "optim.epochs=1", "data.batch_size=32", "norm=batchnorm", cwd=tmp_path)
    assert again.returncode == 0 and "2 of them finished before (skipped)" in again.stdout
    assert "torchrun" not in again.stdout + again.stderr  # decided by the job: no ranks started to skip


def test_jobs_take_a_free_gpu_group_and_wait_for_one(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert jobs_at_once(2) == 2 and jobs_at_once(1) == 4 and jobs_at_once(8) == 1
    third: list[str] = []

    def third_job() -> None:
        with pinned_gpus(2, tmp_path, poll_s=0.02) as gpus:
            third.append(gpus)

    with pinned_gpus(2, tmp_path) as first:
        with pinned_gpus(2, tmp_path) as second:
            assert {first, second} == {"4,5", "6,7"}
            waiting = threading.Thread(target=third_job)
            waiting.start()
            time.sleep(0.3)
            assert third == []  # both groups are taken
        waiting.join(timeout=5)
    assert third == [second]  # the group the second job gave back
    with pytest.raises(ConfigError, match=r"trainer.devices=8: at most the 4 GPUs"):
        with pinned_gpus(8, tmp_path):
            pass
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ConfigError, match=r"launcher='gpus': gives each job GPUs of its own, but this machine has no"):
        with pinned_gpus(1, tmp_path):
            pass


def test_jobs_side_by_side_get_their_gpus_share_of_the_cpus(monkeypatch):
    # 8 one-GPU jobs on a 64-core machine: 8 cores each (their loaders count these), not all 64 each
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    cpus = list(range(64))
    assert cpus_of_group("0", cpus) == list(range(8)) and cpus_of_group("7", cpus) == list(range(56, 64))
    assert cpus_of_group("2,3", cpus) == list(range(16, 32))  # the second group of two GPUs
    assert cpus_of_group("5", [0, 1]) == [0]  # more GPUs than CPUs: one each at least
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")  # a user's restriction: the jobs share what it leaves
    assert cpus_of_group("5", cpus) == list(range(32, 64))


def test_gpus_launcher_runs_jobs_side_by_side_each_on_its_own_gpu(tmp_path):
    # two "GPUs" named by CUDA_VISIBLE_DEVICES; the runs train on the CPU, so only the pinning is tested
    env = {"CUDA_VISIBLE_DEVICES": "0,1", "PYTHONPATH": FAULTS, "METAFORMER_TEST_FAULTS": '{"mixer=identity": "raise"}'}
    result = run_cli("-m", "launcher=gpus", "mixer=pooling,identity", *QUICK, cwd=tmp_path, env=env)
    assert result.returncode == 1, result.stderr[-3000:]  # one job failed; the other went on
    assert "sweep of 2 jobs: 1 completed, 1 failed" in result.stdout
    assert re.search(r"failed +runs/\S*mixer=identity\S*: .*injected failure", result.stdout)
    records = records_by_mixer(tmp_path / "runs")
    assert {m: r.status for m, r in records.items()} == {"pooling": "completed", "identity": "failed"}
    assert {r.cuda_visible_devices for r in records.values()} == {"0", "1"}  # side by side, each on its own
    cpus = len(os.sched_getaffinity(0))
    assert f"on GPUs 0 and {max(1, cpus // 2)} CPUs" in result.stdout + result.stderr  # and half the CPUs each
    assert "injected failure" in records["identity"].error


def test_submitit_local_launcher_runs_a_two_job_sweep(tmp_path):
    result = run_cli("-m", "hydra/launcher=submitit_local", "mixer=pooling,identity", *QUICK, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sweep of 2 jobs: 2 completed" in result.stdout
    assert {m: r.status for m, r in records_by_mixer(tmp_path / "runs").items()} == {
        "pooling": "completed", "identity": "completed"
    }  # fmt: skip


def test_slurm_launcher_submits_one_task_per_gpu_on_two_nodes_of_eight(tmp_path):
    # a stand-in sbatch keeps the script submitit generates (and refuses the job: there is no cluster here)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {tmp_path}/job.sh\necho "no cluster" >&2\nexit 1\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")  # submitit looks for it before it submits
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    args = ["-m", "launcher=slurm", "trainer=ddp", "trainer.devices=8", "trainer.num_nodes=2", "seed=0,1",
            "hydra.launcher.partition=gpu"]  # fmt: skip
    result = run_cli(*args, cwd=tmp_path, env=env)
    assert result.returncode != 0 and "no cluster" in result.stderr
    script = (tmp_path / "job.sh").read_text()
    for line in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=16", "--partition=gpu",
                 "--signal=USR2@300", "--time=2880", "--array=0-1%2", "--open-mode=append"):  # fmt: skip
        assert f"#SBATCH {line}\n" in script, line
    assert re.search(r"^srun .*submitit\.core\._submit", script, re.MULTILINE)
    assert "export SLURM_KILL_BAD_EXIT=1\n" in script  # a dead task ends the others


def test_slurm_launcher_ties_nodes_and_tasks_to_the_trainer():
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", ["launcher=slurm", "trainer.devices=4", "trainer.num_nodes=3"], True)
    launcher = cfg.hydra.launcher
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (3, 4, 4)
    assert launcher.max_num_timeout > 0 and launcher.signal_delay_s >= 60
    assert cfg.launcher.pin_gpus is False  # SLURM gives each job its GPUs


def test_slurm_tasks_decide_once_and_train_as_the_ranks_of_one_run(tmp_path):
    # two tasks of a requeued SLURM job on this machine, as srun starts them (Lightning's SLURMEnvironment reads these)
    slurm = {"SLURM_NTASKS": "2", "SLURM_NODEID": "0", "SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "1",
             "SLURM_JOB_NAME": "table5", "SLURM_NODELIST": "localhost", "SLURM_NTASKS_PER_NODE": "2",
             "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}  # fmt: skip
    args = [*QUICK, "optim.epochs=1", "data.batch_size=32", "trainer.strategy=ddp", "trainer.devices=2"]
    # the decision the job's first launch left: rank 1 must wait for rank 0's, not take this one
    run_dir = tmp_path / compose_job(args)[1]
    stale = {"token": "slurm/4242/0", "checkpoint": "/nowhere/last.ckpt", "previous": None}
    (run_dir / ".launch").mkdir(parents=True)
    (run_dir / ".launch" / "start.json").write_text(json.dumps(stale))

    def task(rank: str) -> subprocess.Popen:
        env = {**os.environ, **slurm, "SLURM_PROCID": rank, "SLURM_LOCALID": rank}
        return subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args], cwd=tmp_path, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip

    second = task("1")
    time.sleep(5)
    assert second.poll() is None and not (run_dir / "result.json").exists()  # waiting for rank 0
    first = task("0")
    outputs = [process.communicate(timeout=240)[0] for process in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert "completed:" in outputs[0] and "completed:" not in outputs[1]  # rank 0 writes and says it
    record = read_record(run_dir)
    assert record.status == "completed" and record.world_size == 2 and record.steps == 4
    decision = json.loads((run_dir / ".launch" / "start.json").read_text())
    assert decision == {"token": "slurm/4242/1", "checkpoint": None, "previous": None}


def test_ranks_a_user_started_with_torchrun_train_one_run(tmp_path):
    # each rank runs run.py; rank 0 decides and the others read it from torchrun's store
    args = [*QUICK, "optim.epochs=1", "data.batch_size=32", "trainer.strategy=ddp", "trainer.devices=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", ROOT / "run.py"]
    result = subprocess.run([*command, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    record = only_record(tmp_path / "runs")
    assert record.status == "completed" and record.world_size == 2 and record.steps == 4
    assert result.stdout.count("completed:") == 1
