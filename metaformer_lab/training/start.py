"""How a run begins: skip it, resume it or start it over, decided once per run, before any process writes to it.

A re-run of a finished run is skipped, an unfinished one resumes from its last checkpoint, a failed one starts
over. With several processes (DDP ranks) one of them decides and the others read that decision: a slow rank must
not read a record or a checkpoint folder that rank 0 is already rewriting. The decision is published in
`<run dir>/.launch/start.json` under a token that names this launch (a SLURM job and its restart count, a torchrun
run, or the job that started the ranks), so a decision left by an earlier launch is never read as this one's.
"""

from __future__ import annotations

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


def cluster_rank(environ: Mapping[str, str]) -> tuple[int, int, str] | None:
    """(rank, world size, launch token) when a cluster launcher started this process as one of a run's ranks:
    SLURM (one task per device) or torchrun. None otherwise."""
    if SLURMEnvironment.detect():
        token = f"slurm/{environ.get('SLURM_JOB_ID')}/{environ.get('SLURM_RESTART_COUNT', '0')}"
        return int(environ["SLURM_PROCID"]), int(environ["SLURM_NTASKS"]), token
    if TorchElasticEnvironment.detect():
        token = f"torchrun/{environ.get('TORCHELASTIC_RUN_ID')}/{environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        return int(environ["RANK"]), int(environ["WORLD_SIZE"]), token
    return None


def publish(run_dir: Path, token: str, start: Start | None, error: ConfigError | None = None) -> None:
    """Make a decision (or the ConfigError that stopped it) readable by the other processes of this launch."""
    (run_dir / LAUNCH_DIR).mkdir(parents=True, exist_ok=True)
    content: dict = {"token": token}
    if error is not None:
        content["error"] = [error.key, error.value, error.expected]
    else:
        content["checkpoint"] = start.checkpoint
        # the record itself, not its path: rank 0 rewrites result.json as soon as it starts
        content["previous"] = None if start.previous is None else asdict(start.previous)
    write_json(run_dir / LAUNCH_DIR / "start.json", content)


def read_published(run_dir: Path, token: str, wait_s: float = WAIT_S) -> Start:
    """The decision published for `token`, waiting for it; raises the publisher's ConfigError."""
    path = run_dir / LAUNCH_DIR / "start.json"
    deadline = time.monotonic() + wait_s
    while True:
        try:
            content = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            content = {}
        if content.get("token") == token:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"no start decision for launch {token} in {path} after {wait_s:.0f} s (rank 0 died?)")
        time.sleep(0.2)
    if "error" in content:
        raise ConfigError(*content["error"])
    previous = content["previous"]
    return Start(None if previous is None else record_from_dict(previous), content["checkpoint"])


def agreed_start(config: dict, run_dir: Path, environ: Mapping[str, str] = os.environ) -> Start:
    """The one decision for this run: made here in a single process, by rank 0 under a cluster launcher, or read
    from the job that started these ranks (it set START_TOKEN)."""
    if token := environ.get(START_TOKEN):
        return read_published(run_dir, token)
    launch = cluster_rank(environ)
    if launch is None or launch[1] == 1:
        return decide_start(config, run_dir)
    rank, _, token = launch
    if rank != 0:
        return read_published(run_dir, token)
    try:
        start = decide_start(config, run_dir)
    except ConfigError as error:
        publish(run_dir, token, None, error)
        raise
    publish(run_dir, token, start)
    return start
