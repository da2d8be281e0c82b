"""Faults a long run meets: a job killed while it writes a checkpoint."""

import subprocess
import sys
import time

import pytest
import torch

from metaformer_lab.record import shared_file_mode
from metaformer_lab.training.checkpoint_io import AtomicCheckpointIO

WRITER = """
import sys, torch
from metaformer_lab.training.checkpoint_io import atomic_torch_save
big = {"weights": torch.arange(12_000_000, dtype=torch.float32)}  # 48 MB: a write takes a while
version = 0
while True:
    version += 1
    big["version"] = version
    atomic_torch_save(big, sys.argv[1])
"""


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("the job died half way through the write")


def test_a_write_that_fails_half_way_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1, "weights": torch.ones(3)}, path)
    with pytest.raises(RuntimeError, match="half way"):
        AtomicCheckpointIO().save_checkpoint({"step": 2, "weights": torch.zeros(3), "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # the partial file is gone
    assert path.stat().st_mode & 0o777 == shared_file_mode()  # as a plain open() would make it, not mkstemp's 0o600


@pytest.mark.parametrize("delay", [0.2])  # plain torch.save leaves a truncated file at 0.05, 0.2 and 0.45 s
def test_kill_9_during_a_write_leaves_a_whole_checkpoint(tmp_path, delay):
    path = tmp_path / "last.ckpt"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)])
    try:
        deadline = time.monotonic() + 60
        while not path.exists():  # the first version is whole; kill during a later write
            assert time.monotonic() < deadline and writer.poll() is None
            time.sleep(0.01)
        time.sleep(delay)
    finally:
        writer.kill()
        writer.wait()
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["version"] >= 1 and checkpoint["weights"][-1] == 11_999_999
