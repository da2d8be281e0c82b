"""Checkpoint files that are whole or absent: written beside their final name, flushed to disk, then renamed.

Lightning's own save goes through fsspec, whose local transaction writes to the system's temp folder and moves the
file at the end: on a cluster, where /tmp and the run directory are different filesystems, that move is a copy,
and a job killed during it (preemption, a time limit) leaves a truncated `last.ckpt` that the requeued job cannot
resume from. A rename within one directory is atomic: readers see the old checkpoint or the new one.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from metaformer_lab.record import shared_file_mode

PARTIAL = ".partial"  # the suffix of a checkpoint being written


def remove_partial_writes(folder: Path) -> None:
    """Delete what a write cut short by a kill -9 left in `folder` (the checkpoint itself is whole)."""
    for partial in folder.glob(f".*{PARTIAL}"):
        partial.unlink()


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """`torch.save(obj, path)`, atomically: a temp file in the same folder, fsync, then `os.replace`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=PARTIAL)
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temp, shared_file_mode())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def unreadable_checkpoint(path: str | Path) -> str | None:
    """Why training cannot resume from `path`, e.g. "truncated or corrupt: ..."; None: it can. Read as the resume
    reads it, with torch.load(weights_only=True): a file that holds code is refused, never unpickled."""
    path = Path(path)
    if not path.is_file():
        return "no such file"
    if path.stat().st_size == 0:
        return "empty"
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: no need to read it all
    except pickle.UnpicklingError as error:
        refused = re.search(r"GLOBAL (\S+)", str(error))
        return f"it holds {refused[1] if refused else 'objects'} besides weights, which a weights-only load refuses"
    except OSError as error:
        return error.strerror or str(error)
    except Exception as error:  # whatever a damaged file makes the reader raise
        if "mmap can only be used" in str(error):
            return "not a checkpoint in torch's zip format"
        return f"truncated or corrupt: {str(error).split('. ')[0]}"
    if not (isinstance(saved, dict) and "state_dict" in saved and "loops" in saved):
        return "not a checkpoint of a Lightning training run (no state_dict and loops)"
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with `atomic_torch_save` for local paths (remote ones keep Lightning's save)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)
