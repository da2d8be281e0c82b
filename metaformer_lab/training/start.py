"""How a run begins: skip it, resume it or start it over, decided once per run, before any process writes to it.

A re-run of a finished run is skipped, an unfinished one resumes from its last checkpoint, a failed one starts
over. With several processes (DDP ranks) one of them decides and the others read that decision: a slow rank must
not read a record or a checkpoint folder that rank 0 is already rewriting. The decision is published in
`<run dir>/.launch/start.json` under a token that names this launch (the job that started the ranks, or a SLURM
job and its restart count), so a decision left by an earlier launch is never read as this one's; the ranks a
user's torchrun started share it through that torchrun's key-value store instead.

One process at a time runs a run: the one that decides holds a lock on `<run dir>/.launch/lock` until the run ends
(the job for the ranks it starts, rank 0 for a cluster's ranks). Another launch of the same run finds it held and
leaves the directory as it is: two processes would write one record and one set of checkpoints.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
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
    write_record,
)  # fmt: skip
from metaformer_lab.registry import ConfigError
from metaformer_lab.training.checkpoint_io import unreadable_checkpoint
from metaformer_lab.training.loggers import shown_path

log = logging.getLogger(__name__)

LAUNCH_DIR = ".launch"  # inside the run directory: what the processes of one launch share
START_TOKEN = "METAFORMER_LAB_START_TOKEN"  # set by a job that decided for the ranks it started
WAIT_S = 600.0  # how long a rank waits for rank 0's decision (rank 0 may be slow to import on a busy node)
LOCK = "lock"  # in LAUNCH_DIR: held by the process that runs the run, and naming it


class AlreadyRunning(RuntimeError):
    """Another process holds the run's lock; the message names it: "already running (pid N on host H)"."""


class UnreadableCheckpoint(RuntimeError):
    """The last checkpoint of an unfinished run cannot be read: the run is now `failed`, with this message."""


def now_utc() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


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


def decide_start(config: dict, run_dir: Path, comparable: Callable[[dict], dict] = lambda config: config) -> Start:
    """Read `run_dir` and decide. Reads only (a fresh start's cleanup is left to the run, after its checks), but
    for a last checkpoint that cannot be read: the run becomes `failed`, and UnreadableCheckpoint says what to do."""
    previous = read_record(run_dir) if (run_dir / RECORD_NAME).exists() else None
    # `comparable`: both configs as the run would resolve them (config.comparable_config: `auto` decided)
    changed = config_changes(comparable(previous.config), comparable(config)) if previous is not None else []
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
    if checkpoint is not None and (why := unreadable_checkpoint(checkpoint)):
        if config["resume"] is not None:  # the user's setting: refused, the run left as it was
            raise ConfigError("resume", checkpoint, f"cannot resume from it: {why}")
        best = run_dir / "checkpoints" / "best.ckpt"
        message = (f"{shown_path(checkpoint)} cannot be read ({why}); the run is marked failed: the same command "
                   "starts it over (its checkpoints deleted: move away any to keep)")  # fmt: skip
        if best.exists() and unreadable_checkpoint(best) is None:
            message += f", or resume={shown_path(best)} goes on from its best epoch"
        previous.status, previous.error, previous.finished_at = "failed", message, now_utc()
        write_record(run_dir, previous)
        raise UnreadableCheckpoint(message)
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


def _message(start: Start | None, refusal: Exception | None = None) -> dict:
    if isinstance(refusal, ConfigError):
        return {"error": [refusal.key, refusal.value, refusal.expected]}
    if refusal is not None:
        return {"refusal": [type(refusal).__name__, str(refusal)]}
    # the record itself, not its path: rank 0 rewrites result.json as soon as it starts
    return {"checkpoint": start.checkpoint, "previous": None if start.previous is None else asdict(start.previous)}


def _start(message: dict) -> Start:
    if "error" in message:
        raise ConfigError(*message["error"])
    if "refusal" in message:
        kind, text = message["refusal"]
        raise {"AlreadyRunning": AlreadyRunning, "UnreadableCheckpoint": UnreadableCheckpoint}[kind](text)
    previous = message["previous"]
    return Start(None if previous is None else record_from_dict(previous), message["checkpoint"])


def publish(run_dir: Path, token: str, start: Start) -> None:
    """Make the decision of a job readable by the ranks it starts (they find `token` in START_TOKEN)."""
    _FileChannel(run_dir, token).send(_message(start))


_held_locks: set[int] = set()  # the file descriptors of the run locks this process holds


def _close_inherited_locks() -> None:
    """In a forked child (a loader worker): close its copies of the locks, so that they end with their holder (a
    worker outlives a kill -9 of its run by seconds)."""
    while _held_locks:
        os.close(_held_locks.pop())


os.register_at_fork(after_in_child=_close_inherited_locks)


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold `run_dir`'s lock while the body runs, or raise AlreadyRunning. An flock: the kernel releases it when the
    process ends, however it ends, so a killed run never leaves its directory locked."""
    path = run_dir / LAUNCH_DIR / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    _held_locks.add(fd)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 256).decode(errors="replace").strip() or "another process"
            raise AlreadyRunning(f"already running ({holder})") from None
        except OSError as error:  # a filesystem without locks (NFS mounted with nolock): run, unguarded
            log.warning("%s: %s; a second launch of this run would not be refused", shown_path(path), error.strerror)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}".encode())
        yield
    finally:
        if fd in _held_locks:  # a forked child has closed it already
            _held_locks.remove(fd)
            os.close(fd)


@contextmanager
def agreed_start(
    config: dict, run_dir: Path, comparable: Callable[[dict], dict] = lambda config: config,
    environ: Mapping[str, str] = os.environ,
) -> Iterator[Start]:  # fmt: skip
    """The one decision for this run, and its lock while the body runs: decided here in a single process, read
    from the job that started these ranks (it set START_TOKEN, and holds the lock), or decided by rank 0 of the
    ranks a cluster launcher started (rank 0 holds the lock) and read by the others."""
    if token := environ.get(START_TOKEN):
        yield _start(_FileChannel(run_dir, token).receive())
        return
    ranks = cluster_ranks(environ)
    channel: _FileChannel | _StoreChannel | None = None
    if ranks is not None and ranks.world > 1:
        if ranks.launcher == "torchrun":
            channel = _StoreChannel(environ)
        else:  # a requeued job keeps its id and counts its restarts
            restart = environ.get("SLURM_RESTART_COUNT", "0")
            channel = _FileChannel(run_dir, f"slurm/{environ['SLURM_JOB_ID']}/{restart}")
        if ranks.rank != 0:
            yield _start(channel.receive())
            return
    with ExitStack() as held:
        try:
            held.enter_context(run_lock(run_dir))
            start = decide_start(config, run_dir, comparable)
        except (ConfigError, AlreadyRunning, UnreadableCheckpoint) as refusal:
            if channel is not None:  # the other ranks stop as well
                channel.send(_message(None, refusal))
            raise
        if channel is not None:
            channel.send(_message(start))
        yield start
