"""The run record: `result.json` in every run directory, the only thing analysis reads.

Written atomically (temp file, then rename) when a run starts (status `running`) and when it ends. The schema is
versioned; fields are only ever added, so older records stay readable.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 8  # 2: schedule, train_images, accelerator, device_name, precision, world_size; 3: unreadable_*;
#                   4: cuda_visible_devices; 5: data_wait_fraction, first_step_s;
#                   6: channels_last, tf32, cudnn_benchmark; 7: augment_on, max_side; 8: val_history, data_digest
RECORD_NAME = "result.json"
STATUSES = ("running", "completed", "diverged", "failed", "interrupted")
FINAL = ("completed", "diverged")  # outcomes a re-run keeps rather than recomputes
# what a configuration is, apart from its seed: the axes tables group by and wandb tags with
CONFIG_AXES = ("model", "mixer", "pool_size", "norm", "act", "residual", "mlp", "data", "image_size", "experiment")
AXES = (*CONFIG_AXES, "seed", "sweep")
# config keys that change no result: the twin of conf/config.yaml's hydra.job.config.override_dirname.exclude_keys
NON_RESULT_KEYS = (
    "sweep", "sweep_name", "resume", "logger", "launcher", "trainer.devices", "trainer.num_nodes",
    "trainer.save_every_minutes", "data.num_workers",
)  # fmt: skip


@dataclass
class RunRecord:
    status: str = "running"  # one of STATUSES
    error: str | None = None  # why a run failed or diverged
    run_dir: str = ""
    # the ablation axes, flat, so a DataFrame of records can be grouped by any of them
    model: str = ""  # size preset
    mixer: str = ""  # "pooling", or per stage "pooling,pooling,attention,attention"
    mixer_stages: list[str] = field(default_factory=list)
    # axes that can differ per stage hold one value, or "a,b,c,d" when they do (as `mixer`)
    pool_size: int | str | None = None
    norm: str = ""
    act: str = ""
    residual: bool | str = True
    mlp: bool | str = True
    seed: int = 0
    data: str = ""
    image_size: int | None = None
    experiment: str | None = None
    sweep: str | None = None
    # the protocol beside the axes (analysis never compares runs of two protocols in one column)
    # as planned: "12 ep", "300+10 ep" (+ cooldown), "12 ep, max 20 steps", "12 ep, 10% batches", "fast_dev_run"
    schedule: str = ""
    train_images: int | None = None  # size of the training set
    # data=shards converted with --max-side: images cut to this long side, not the source's pixels; None: as the source
    max_side: int | None = None
    # the training split's content, where the data module gives one (data=idx): MNIST and Fashion-MNIST have the same
    # sizes and sit at any path, so this keeps their runs apart in analysis
    data_digest: str | None = None
    # images a loader could not decode, skipped (not trained on, not counted in top-1): per split, and their paths
    unreadable_images: dict[str, int] = field(default_factory=dict)
    unreadable_paths: list[str] = field(default_factory=list)  # the first 100
    # where it ran
    accelerator: str = ""  # "cpu" or "gpu", as resolved (trainer.accelerator=auto picks one)
    device_name: str = ""  # e.g. "cpu" or "NVIDIA H100 80GB HBM3"
    precision: str = ""  # as resolved: "32", "bf16-mixed", "16-mixed"
    # as resolved (trainer.channels_last, trainer.tf32, trainer.benchmark: auto chooses per device); None: older record
    channels_last: bool | None = None  # NHWC memory format
    tf32: bool | None = None  # fp32 matrix products and convolutions on TF32 tensor cores
    cudnn_benchmark: bool | None = None  # cuDNN autotuning (None also where the run left torch's setting as it was)
    augment_on: str | None = None  # "device" or "loader", as resolved (data.augment_on); None: older record (loader)
    world_size: int = 1  # processes (devices x nodes)
    cuda_visible_devices: str | None = None  # the GPUs the run was given (launcher=gpus pins one group per job)
    # cost, in the paper's convention (see models/counting.py)
    params: int | None = None
    frozen_params: int | None = None
    macs: int | None = None
    # results
    best_val_top1: float | None = None
    best_val_top5: float | None = None
    final_val_top1: float | None = None
    final_val_top5: float | None = None
    # every validation: {"epoch", "step", "top1", "top5"} (fractions), in order: the learning curve, to see whether a
    # budget ended while a row was still learning; [] in older records
    val_history: list[dict[str, float]] = field(default_factory=list)
    epochs: int = 0  # completed epochs
    steps: int = 0  # optimizer steps
    global_batch: int | None = None
    lr: float | None = None  # peak learning rate
    wall_time_s: float = 0.0
    train_throughput_img_s: float | None = None
    data_wait_fraction: float | None = None  # time between training batches (data fetch, loop) over all their time
    first_step_s: float | None = None  # command to first batch (a sweep worker's later jobs: from their own start)
    # provenance
    started_at: str = ""
    finished_at: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    git_commit: str | None = None
    wandb_id: str | None = None
    config: dict[str, Any] = field(default_factory=dict)  # the resolved Hydra config
    schema_version: int = SCHEMA_VERSION


def write_record(run_dir: str | Path, record: RunRecord) -> Path:
    """Write `result.json` atomically: readers see the old record or the new one, never half of one."""
    if record.status not in STATUSES:
        raise ValueError(f"status={record.status!r}: valid: {', '.join(STATUSES)}")
    return write_json(Path(run_dir) / RECORD_NAME, asdict(record))


def write_json(path: Path, content: Any) -> Path:
    """Write a JSON file atomically (temp file beside it, then rename), with a plain file's mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    with os.fdopen(fd, "w") as f:
        json.dump(content, f, indent=2, default=str)
        f.write("\n")
    os.chmod(tmp, shared_file_mode())
    os.replace(tmp, path)
    return path


def unwritable(folder: Path) -> str | None:
    """Why no file can be written in `folder` (created if missing), e.g. "Permission denied: runs"; None: it can."""
    probe = folder / f".write-test-{socket.gethostname()}-{os.getpid()}"  # ranks may probe at once
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"metaformer_lab")
        probe.unlink()
    except OSError as error:
        return f"{error.strerror}: {error.filename or folder}"
    return None


def shared_file_mode() -> int:
    """The mode a plain `open()` would give a new file (0o644 under the usual umask 022): mkstemp's temp files are
    0o600, which would hide a run's files from the rest of a team on a shared cluster."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def read_record(path: str | Path) -> RunRecord:
    """Read a `result.json` (or the one in a run directory). Unknown fields from newer writers are ignored."""
    path = Path(path)
    if path.is_dir():
        path = path / RECORD_NAME
    return record_from_dict(json.loads(path.read_text()))


def record_from_dict(data: dict[str, Any]) -> RunRecord:
    known = {f.name for f in fields(RunRecord)}
    return RunRecord(**{k: v for k, v in data.items() if k in known})
