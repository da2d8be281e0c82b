"""GPUs of its own for each job of a sweep on one multi-GPU machine (`launcher=gpus`).

Hydra's joblib and submitit-local launchers run jobs side by side, all on GPU 0 (hydra#2757). Here a job takes a
free group of `trainer.devices` GPUs, holding one lock file per GPU for as long as it trains, and its processes see
only that group (CUDA_VISIBLE_DEVICES). Locks, not job numbers: jobs end in any order, and two sweeps on one machine
share its GPUs without knowing of each other. The kernel drops a dead job's locks.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

from metaformer_lab.registry import ConfigError

log = logging.getLogger(__name__)

LOCK_DIR = Path(tempfile.gettempdir()) / f"metaformer_lab-gpus-{os.getuid()}"  # per machine (not a shared disk)


def visible_gpus() -> list[str]:
    """This machine's GPUs as CUDA_VISIBLE_DEVICES names them (a user's restriction is kept), else all of them."""
    if (visible := os.environ.get("CUDA_VISIBLE_DEVICES")) is not None:
        return [gpu.strip() for gpu in visible.split(",") if gpu.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def jobs_at_once(devices: object) -> int:
    """How many jobs of `devices` GPUs each fit on this machine at once (at least 1; a `devices` that is not a count
    is refused by each job, with the reason)."""
    return max(1, len(visible_gpus()) // devices) if isinstance(devices, int) and devices >= 1 else 1


def cpus_of_group(gpus: str, cpus: Sequence[int]) -> list[int]:
    """The share of `cpus` (this process's) that goes with the GPU group `gpus` ("2,3"): jobs side by side on one
    machine each get the CPUs of their GPUs' fraction of it, as SLURM binds a task to its cores; without this every
    job's loaders would count the whole machine's CPUs as their own."""
    visible, group = visible_gpus(), gpus.split(",")
    groups = max(1, len(visible) // len(group))
    index = min(visible.index(group[0]) // len(group), groups - 1) if group[0] in visible else 0
    cpus = sorted(cpus)
    share = cpus[index * len(cpus) // groups : (index + 1) * len(cpus) // groups]
    return share or cpus[:1]


@contextmanager
def pinned_gpus(count: int, lock_dir: Path = LOCK_DIR, poll_s: float = 1.0) -> Iterator[str]:
    """Wait for `count` free GPUs of one group and hold them: yields their CUDA_VISIBLE_DEVICES value."""
    gpus = visible_gpus()
    groups = [gpus[i : i + count] for i in range(0, len(gpus) - count + 1, count)]
    if not gpus:
        raise ConfigError("launcher", "gpus", "gives each job GPUs of its own, but this machine has none (or "
                          "CUDA_VISIBLE_DEVICES names none)")  # fmt: skip
    if not groups:
        raise ConfigError("trainer.devices", count, f"at most the {len(gpus)} GPUs this machine has ({gpus})")
    lock_dir.mkdir(parents=True, exist_ok=True)
    waiting_said = False
    while True:
        for group in groups:
            with ExitStack() as held:
                if all(_try_lock(lock_dir / f"gpu-{gpu}.lock", held) for gpu in group):
                    yield ",".join(group)
                    return
        if not waiting_said:
            log.info("waiting for %d free GPU%s (all %d are taken by other jobs)", count, "s" * (count > 1), len(gpus))
            waiting_said = True
        time.sleep(poll_s)


def _try_lock(path: Path, held: ExitStack) -> bool:
    handle = held.enter_context(open(path, "a"))  # noqa: SIM115 (closed by the stack, which releases the lock)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
