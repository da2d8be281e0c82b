"""How a run begins: skip it, resume it or start it over, decided once per run, before any process writes to it.

A re-run of a finished run is skipped, an unfinished one resumes from its last checkpoint, a failed one starts
over. With several processes (DDP ranks) one of them decides and the others read that decision: a slow rank must
not read a record or a checkpoint folder that rank 0 is already rewriting. The decision is published in
`<run dir>/.launch/start.json` under a token that names this launch (the job that started the ranks, or a SLURM
job and its restart count), so a decision left by an earlier launch is never read as this one's; the ranks a
user's torchrun started share it through that torchrun's key-value store instead.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

from metaformer_lab.record import (
    FINAL,
    NON_RESULT_KEYS,
    RECORD_NAME,
    RunRecord,
    read_record,
    record_from_dict,
    write_json,
)  # fmt: skip
from metaformer_lab.registry import ConfigError

log = logging.getLogger(__name__)

LAUNCH_DIR = ".launch"  # inside the run directory: what the processes of one launch share
START_TOKEN = "METAFORMER_LAB_START_TOKEN"  # set by a job that decided for the ranks it started
WAIT_S = 600.0  # how long a rank waits for rank 0's decision (rank 0 may be slow to import on a busy node)


@dataclass
class Start:
    previous: RunRecord | None  # the record found in the run directory, if any
    checkpoint: str | None  # resume from it; None: from scratch, or not at all (skip)

    @property
    def skip(self) -> bool:
        return self.previous is not None and self.previous.status in FINAL

    @property
    def resuming(self) -> bool:
        return self.checkpoint is not None and self.previous is not None


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


def decide_start(config: dict, run_dir: Path) -> Start:
    """Read `run_dir` and decide. Reads only: a fresh start's cleanup is left to the run, after its checks."""
    previous = read_record(run_dir) if (run_dir / RECORD_NAME).exists() else None
    changed = config_changes(previous.config, config) if previous is not None else []
    if previous is not None and previous.status in FINAL:
        log.info("%s: already %s (best val top-1 %s); skipping", run_dir, previous.status, previous.best_val_top1)
        if changed:
            log.warning("%s was run with other settings (%s); delete it to run again", run_dir, ", ".join(changed))
        return Start(previous, None)
    if changed and previous.status in ("running", "interrupted") and config["resume"] is None:
        raise ConfigError(
            "resume", None,
            f"{run_dir} holds an unfinished run with other settings ({', '.join(changed)}); delete it to start "
            "over, or resume it anyway with resume=<its checkpoints/last.ckpt>",
        )  # fmt: skip
    checkpoint = config["resume"]
    if checkpoint is None and previous is not None and previous.status in ("running", "interrupted"):
        last = run_dir / "checkpoints" / "last.ckpt"
        checkpoint = str(last) if last.exists() else None
    return Start(previous, checkpoint)


@dataclass(frozen=True)
class ClusterRanks:
    """This process is rank `rank` of `world`, started by a cluster launcher: "torchrun" or "slurm"."""

    rank: int
    world: int
    launcher: str


def cluster_ranks(environ: Mapping[str, str] = os.environ) -> ClusterRanks | None:
    """The ranks a cluster launcher started, as Lightning reads them: torchrun first, then SLURM when it started
    more than one task (one task is a job that starts its own ranks, or trains in one process). None otherwise."""
    if TorchElasticEnvironment.detect():
        return ClusterRanks(int(environ["RANK"]), int(environ["WORLD_SIZE"]), "torchrun")
    if SLURMEnvironment.detect() and int(environ["SLURM_NTASKS"]) > 1:
        return ClusterRanks(int(environ["SLURM_PROCID"]), int(environ["SLURM_NTASKS"]), "slurm")
    return None


def slurm_runs_the_ranks(processes: int, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether Lightning will take this run's ranks from SLURM (one task per process), as it decides."""
    return (not TorchElasticEnvironment.detect() and SLURMEnvironment.detect()
            and int(environ["SLURM_NTASKS"]) == processes)  # fmt: skip


class _FileChannel:
    """A decision in `<run dir>/.launch/start.json`, tagged with a token that names one launch."""

    def __init__(self, run_dir: Path, token: str) -> None:
        self.path, self.token = run_dir / LAUNCH_DIR / "start.json", token

    def send(self, message: dict) -> None:
        write_json(self.path, {"token": self.token, **message})

    def receive(self, wait_s: float = WAIT_S) -> dict:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                content = json.loads(self.path.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                content = {}
            if content.pop("token", None) == self.token:
                return content
            if time.monotonic() > deadline:
                raise RuntimeError(f"no start decision for launch {self.token} in {self.path} after {wait_s:.0f} s "
                                   "(rank 0 died?)")  # fmt: skip
            time.sleep(0.2)


class _StoreChannel:
    """A decision in the key-value store of the torchrun that started the ranks: it lives as long as that launch,
    so a decision of an earlier launch cannot be read (a static rendezvous reuses its run id)."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        from torch.distributed import TCPStore

        timeout = dt.timedelta(seconds=WAIT_S)
        self.store = TCPStore(environ["MASTER_ADDR"], int(environ["MASTER_PORT"]), is_master=False, timeout=timeout)
        self.key = f"metaformer_lab/start/{environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"

    def send(self, message: dict) -> None:
        self.store.set(self.key, json.dumps(message))

    def receive(self) -> dict:
        return json.loads(self.store.get(self.key))


def _message(start: Start | None, error: ConfigError | None = None) -> dict:
    if error is not None:
        return {"error": [error.key, error.value, error.expected]}
    # the record itself, not its path: rank 0 rewrites result.json as soon as it starts
    return {"checkpoint": start.checkpoint, "previous": None if start.previous is None else asdict(start.previous)}


def _start(message: dict) -> Start:
    if "error" in message:
        raise ConfigError(*message["error"])
    previous = message["previous"]
    return Start(None if previous is None else record_from_dict(previous), message["checkpoint"])


def publish(run_dir: Path, token: str, start: Start) -> None:
    """Make the decision of a job readable by the ranks it starts (they find `token` in START_TOKEN)."""
    _FileChannel(run_dir, token).send(_message(start))


def agreed_start(config: dict, run_dir: Path, environ: Mapping[str, str] = os.environ) -> Start:
    """The one decision for this run: made here in a single process, read from the job that started these ranks
    (it set START_TOKEN), or made by rank 0 of the ranks a cluster launcher started and read by the others."""
    if token := environ.get(START_TOKEN):
        return _start(_FileChannel(run_dir, token).receive())
    ranks = cluster_ranks(environ)
    if ranks is None or ranks.world == 1:
        return decide_start(config, run_dir)
    if ranks.launcher == "torchrun":
        channel: _FileChannel | _StoreChannel = _StoreChannel(environ)
    else:  # a requeued job keeps its id and counts its restarts
        channel = _FileChannel(run_dir, f"slurm/{environ['SLURM_JOB_ID']}/{environ.get('SLURM_RESTART_COUNT', '0')}")
    if ranks.rank != 0:
        return _start(channel.receive())
    try:
        start = decide_start(config, run_dir)
    except ConfigError as error:
        channel.send(_message(None, error))
        raise
    channel.send(_message(start))
    return start
