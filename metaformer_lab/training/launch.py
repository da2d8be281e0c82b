"""Where a run's processes come from: this one, the cluster's, or fresh ones started per job with torchrun.

Lightning's own DDP launcher re-runs the command line in each device process: under `-m` every child would run the
whole sweep, and the parent keeps its DDP state after the first job (Lightning #18175, unfixed). So a job that needs
several processes and was not given them by a cluster launcher (SLURM tasks, or a torchrun the user started):
1. takes the run's lock (held until the job ends: its ranks take none), decides once how its run starts (skip,
   resume, start over) and publishes that decision,
2. saves its resolved config in `<run dir>/.launch/config.yaml`,
3. runs torchrun (`torch.distributed.run --standalone --nproc-per-node=N`, quieted: `python -m
   metaformer_lab.training.launch agent N <run dir>`) on this module: every rank trains that config, and rank 0
   writes the record,
4. reads the outcome from `result.json`; a rank that died (killed, out of memory) makes the record `failed`.
Fresh processes per job, so nothing leaks from one job of a sweep into the next; torchrun stops the other ranks
when one dies, so a job never hangs on a dead peer. `launcher=gpus` takes this path for every job, since only a
fresh process can be given its own GPUs.
"""

from __future__ import annotations

import ctypes
import json
import logging
import logging.config
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from metaformer_lab.config import comparable_config, process_count
from metaformer_lab.data.datamodules import affinity
from metaformer_lab.record import RECORD_NAME, RunRecord, read_record, write_json, write_record
from metaformer_lab.registry import ConfigError
from metaformer_lab.train import end_line, now_utc, train
from metaformer_lab.training.gpus import cpus_of_group, pinned_gpus
from metaformer_lab.training.start import LAUNCH_DIR, START_TOKEN, cluster_ranks, decide_start, publish, run_lock

log = logging.getLogger(__name__)

LOGGING = Path(__file__).parents[2] / "conf" / "hydra" / "job_logging" / "run.yaml"
THIS_MODULE = "metaformer_lab.training.launch"  # also when it runs as __main__
STOP_GRACE_S = 60  # after Ctrl-C, how long the ranks get to write their record before they are killed


class RanksFailed(RuntimeError):
    """A rank process of a job ended abnormally; the run's record says `failed` with the reason."""


def launch(cfg: DictConfig, run_dir: str | Path) -> RunRecord:
    """Train `cfg` in `run_dir` with as many processes as it asks for; returns its record."""
    run_dir = Path(run_dir)
    processes = process_count(cfg.trainer)
    if (ranks := cluster_ranks()) is not None:  # SLURM tasks or a user's torchrun: one per device
        if ranks.world != processes:
            raise ConfigError(
                "trainer.devices", cfg.trainer.devices,
                f"{ranks.launcher} started {ranks.world} processes, but trainer.devices x trainer.num_nodes = "
                f"{processes}: start one per device (launcher=slurm does), or set these to match",
            )  # fmt: skip
        return train(cfg, run_dir)
    if cfg.trainer.num_nodes > 1:
        raise ConfigError(
            "trainer.num_nodes", cfg.trainer.num_nodes,
            "more than one node needs a cluster launcher to start the processes on each: launcher=slurm (or "
            "torchrun on each node)",
        )  # fmt: skip
    if cfg.launcher.pin_gpus:
        devices = cfg.trainer.devices
        if not (isinstance(devices, int) and devices >= 1):
            raise ConfigError("trainer.devices", devices, "a number of GPUs per job (launcher=gpus gives each job "
                              "its own: lists, -1 and auto are for one job on the whole machine)")  # fmt: skip
        with run_lock(run_dir), pinned_gpus(devices) as gpus:  # the lock first: a second launch takes no GPUs
            return train_in_fresh_processes(cfg, run_dir, processes, gpus)
    strategy = str(cfg.trainer.strategy)
    starts_its_own = "spawn" in strategy or "fork" in strategy or "notebook" in strategy  # no re-run of argv
    if processes == 1 or starts_its_own:
        return train(cfg, run_dir)
    with run_lock(run_dir):
        return train_in_fresh_processes(cfg, run_dir, processes, None)


def train_in_fresh_processes(cfg: DictConfig, run_dir: Path, processes: int, gpus: str | None) -> RunRecord:
    """Steps 1-4 of the module's docstring, under the run's lock; `gpus`: the CUDA_VISIBLE_DEVICES the ranks get
    (None: unchanged)."""
    config = OmegaConf.to_container(cfg, resolve=True)
    start = decide_start(config, run_dir, comparable_config)
    if start.skip:
        return start.previous
    launch_dir = run_dir / LAUNCH_DIR
    launch_dir.mkdir(parents=True, exist_ok=True)
    (launch_dir / "error.json").unlink(missing_ok=True)
    OmegaConf.save(config, launch_dir / "config.yaml")
    token = uuid.uuid4().hex
    publish(run_dir, token, start)
    env = {**os.environ, START_TOKEN: token}
    cpus = affinity()
    if gpus is not None:  # the job's own GPUs, and its share of the CPUs (its loaders count these)
        env["CUDA_VISIBLE_DEVICES"] = gpus
        cpus = cpus_of_group(gpus, cpus)
    env.setdefault("OMP_NUM_THREADS", str(max(1, len(cpus) // processes)))  # torchrun would set 1, with a warning
    command = [sys.executable, "-m", THIS_MODULE, "agent", str(processes), str(run_dir)]
    log.info("training in %d fresh process%s (torchrun)%s", processes, "es" * (processes > 1),
             f" on GPUs {gpus} and {len(cpus)} CPUs" if gpus is not None else "")  # fmt: skip
    before = (run_dir / RECORD_NAME).stat().st_mtime_ns if (run_dir / RECORD_NAME).exists() else None
    (launch_dir / "failure.json").unlink(missing_ok=True)
    code = _run(command, env, cpus)
    if (launch_dir / "error.json").exists():  # a bad setting, found by the ranks' checks; nothing was written
        raise ConfigError(*json.loads((launch_dir / "error.json").read_text()))
    written = (run_dir / RECORD_NAME).exists() and (run_dir / RECORD_NAME).stat().st_mtime_ns != before
    record = read_record(run_dir) if written else None
    if record is not None and record.status in ("completed", "diverged"):
        if code != 0:  # after the record was final: a rank crashed on its way out (teardown, wandb)
            log.warning("the run is %s, but a rank ended badly on its way out (see above)", record.status)
        return record
    failure = launch_dir / "failure.json"
    cause = json.loads(failure.read_text())["cause"] if failure.exists() else None
    if cause is None and record is not None and record.status == "failed":
        raise RanksFailed(record.error)  # rank 0's own error, in the record
    cause = cause or f"torchrun exited with status {code}"
    if record is None:
        raise RanksFailed(f"the ranks ended before the run started: {cause}")
    if record.status in ("running", "interrupted", "failed"):
        # rank 0 could not say why (killed, or stopped by torchrun), or said only what it saw of a dead peer
        then = f"; rank 0 then: {record.error.splitlines()[0][:300]}" if record.status == "failed" else ""
        record.status, record.error, record.finished_at = "failed", cause + then, now_utc()
        write_record(run_dir, record)
        log.info(end_line(record))
    raise RanksFailed(record.error)


def _run(command: list[str], env: dict[str, str], cpus: list[int]) -> int:
    """Run the agent on `cpus` and wait; if this process is stopped, the ranks get time to write their record."""

    def in_the_child() -> None:
        _die_with_parent()
        if hasattr(os, "sched_setaffinity"):  # Linux; the ranks and their loader processes inherit it
            os.sched_setaffinity(0, cpus)

    process = subprocess.Popen(command, env=env, preexec_fn=in_the_child)
    try:
        return process.wait()
    except BaseException:  # Ctrl-C (the agent got it too) or a stop
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
        raise


def agent_main(processes: int, run_dir: Path) -> int:
    """torchrun (its `run`), quiet: when a rank fails, the job says which and how in one line, not torchrun's log
    lines and traceback. Writes `.launch/failure.json` with that line."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    arguments = ["--standalone", f"--nproc-per-node={processes}", "-m", THIS_MODULE, "rank", str(run_dir)]
    try:
        run(parse_args(arguments))
    except ChildFailedError as failed:
        rank, failure = failed.get_first_failure()
        how = f"Signal {-failure.exitcode} ({failure.signal_name()})" if failure.exitcode < 0 else \
            f"exit code {failure.exitcode}"  # fmt: skip
        cause = f"rank {rank} ended ({how}); torchrun stopped the others"
        write_json(run_dir / LAUNCH_DIR / "failure.json", {"cause": cause})
        return 1
    return 0


def _die_with_parent() -> None:
    """In the torchrun child: SIGTERM it if this job's process dies (kill -9 included), so no rank outlives it."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _log_like_a_job(run_dir: Path, rank: int) -> None:
    """The job's logging (conf/hydra/job_logging/run.yaml): rank 0 to the console and run.log, others warnings."""
    config = yaml.safe_load(LOGGING.read_text())
    config["handlers"]["file"]["filename"] = str(run_dir / "run.log")
    if rank != 0:
        del config["handlers"]["file"]
        config["root"] = {"level": "WARNING", "handlers": ["console"]}
    logging.config.dictConfig(config)


def rank_main(run_dir: Path) -> int:
    """One rank, as torchrun starts it: train the job's saved config with the job's decision."""
    rank = int(os.environ.get("RANK", "0"))
    _log_like_a_job(run_dir, rank)
    cfg = OmegaConf.load(run_dir / LAUNCH_DIR / "config.yaml")
    try:
        train(cfg, run_dir)
    except ConfigError as error:  # every rank finds it; the first to tell the job wins (the job says it)
        write_json(run_dir / LAUNCH_DIR / "error.json", [error.key, error.value, error.expected])
        return 2
    return 0


if __name__ == "__main__":  # `agent N RUN_DIR` (the job starts it), `rank RUN_DIR` (the agent starts N of them)
    if sys.argv[1] == "agent":
        sys.exit(agent_main(int(sys.argv[2]), Path(sys.argv[3])))
    sys.exit(rank_main(Path(sys.argv[2])))
