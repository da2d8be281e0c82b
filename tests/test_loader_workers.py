"""Loader processes: how many `data.num_workers=auto` starts, pinned memory only for a GPU run, and the per-batch
normalization on the device without a host-to-device copy of mean and std."""

import os
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import compose_config

from metaformer_lab.config import build_datamodule
from metaformer_lab.data.datamodules import loader_workers, ranks_sharing_cpus, usable_cpus

LAUNCHER_VARIABLES = ("LOCAL_WORLD_SIZE", "SLURM_NTASKS", "SLURM_CPUS_PER_TASK")


@pytest.fixture
def machine(monkeypatch):
    """`machine(cpus, **environment)`: this process may run on `cpus` CPUs, under these launcher variables only."""

    def set_up(cpus: int, **environment: str) -> None:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
        for name in LAUNCHER_VARIABLES:
            monkeypatch.delenv(name, raising=False)
        for name, value in environment.items():
            monkeypatch.setenv(name, value)

    return set_up


def _trainer(devices: int, device: str = "cpu") -> SimpleNamespace:
    """What the data module reads of its Lightning Trainer."""
    return SimpleNamespace(world_size=devices, global_rank=0, num_devices=devices,
                           strategy=SimpleNamespace(root_device=torch.device(device)))  # fmt: skip


def _loaders(devices: int = 1, device: str = "cpu", num_workers: str | int = "auto"):
    datamodule = build_datamodule(compose_config("data.train_size=256", "data.val_size=64",
                                                 f"data.num_workers={num_workers}"))  # fmt: skip
    datamodule.setup("fit")
    datamodule.trainer = _trainer(devices, device)
    return datamodule.train_dataloader(), datamodule.val_dataloader()  # made, not iterated: no process starts


def test_a_slurm_task_per_gpu_uses_its_own_cpus_not_a_share_of_them(machine):
    # launcher=slurm, 8 tasks per node of cpus_per_task 10: SLURM binds each task to its 10 cores
    machine(10, SLURM_NTASKS="16", SLURM_CPUS_PER_TASK="10")
    train, val = _loaders(devices=8)
    assert (train.num_workers, val.num_workers) == (9, 4)  # not 10 // 8 = 1
    assert loader_workers(10, ranks_sharing_cpus(8))[:2] == (9, 4)


def test_ranks_on_the_same_cpus_split_them(machine):
    machine(64, LOCAL_WORLD_SIZE="8")  # torchrun's 8 ranks (ours, or a user's) inherit one CPU set
    assert ranks_sharing_cpus(8) == 8 and loader_workers(64, 8) == (7, 3, "64 CPUs this process may use, 8 ranks "
                                                                       "on them")  # fmt: skip
    machine(64)  # one process that starts its devices' ranks itself (ddp_spawn)
    assert ranks_sharing_cpus(4) == 4


def test_no_fixed_cap_and_one_core_left_to_the_rank(machine):
    machine(64)
    train, val = _loaders()
    assert (train.num_workers, val.num_workers) == (63, 31)  # more than the old cap of 8
    assert loader_workers(16, 1) == (15, 7, "16 CPUs this process may use, 1 rank on them")
    assert loader_workers(2, 1)[:2] == (1, 1)  # validation at least one where training has one
    assert loader_workers(1, 1)[:2] == (0, 0)  # one CPU: the rank loads its own batches
    assert loader_workers(8, 8)[:2] == (0, 0)


def test_cpus_are_the_affinity_at_most_slurm_cpus_per_task(machine, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 96)
    machine(12)
    assert usable_cpus() == 12  # a container's cpuset, a SLURM task's cores: not the node's 96
    machine(96, SLURM_NTASKS="8", SLURM_CPUS_PER_TASK="12")  # a cluster that does not bind tasks to cores
    assert usable_cpus() == 12


def test_a_set_number_is_kept_for_both_loaders(machine):
    machine(64)
    train, val = _loaders(num_workers=3)
    assert (train.num_workers, val.num_workers) == (3, 3)


def test_memory_is_pinned_only_for_a_gpu_run(machine, monkeypatch):
    machine(4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine; the run is on its CPU
    train, val = _loaders(device="cpu")
    assert not train.pin_memory and not val.pin_memory
    train, val = _loaders(device="cuda")
    assert train.pin_memory and val.pin_memory


def test_pin_memory_follows_a_real_cpu_trainer(machine, monkeypatch):
    machine(4)
    datamodule = build_datamodule(compose_config("data.train_size=256", "data.val_size=64"))
    datamodule.setup("fit")
    datamodule.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not datamodule.train_dataloader().pin_memory


def test_normalization_makes_mean_and_std_once_per_device(monkeypatch):
    datamodule = build_datamodule(compose_config("data=imagefolder", "data.root=/nowhere"))
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(4)
    mean = torch.tensor(datamodule.mean).view(1, 3, 1, 1)
    std = torch.tensor(datamodule.std).view(1, 3, 1, 1)
    expected = (images.float() / 255 - mean) / std
    made = []
    tensor = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *args, **kwargs: made.append(args) or tensor(*args, **kwargs))
    for _ in range(3):
        normalized, same_labels = datamodule.on_after_batch_transfer((images, labels), 0)
        assert torch.equal(normalized, expected) and same_labels is labels
    assert len(made) == 2  # mean and std, on the first batch only
