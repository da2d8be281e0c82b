"""LightningDataModules, one per `data=` choice, registered by name.

Images travel as uint8 and are normalized after the transfer to the device, so loading stays cheap.
Unreadable images (label `-1 - index`, see imagefolder.py) are dropped from their batch before the transfer,
logged once by path and counted in `unreadable`, which the run record reports.
Every loader uses a `DistributedSampler` seeded by the run's seed and re-shuffled per epoch: the same order on one
device or many, and a resumed run sees exactly the batches an uninterrupted one would. The training loader asks for
`(index, epoch)`, and a training image's random draws (crop, flip, RandAugment) come from `sample_rng(seed, key)`:
they depend on the run's seed, the epoch and the image alone, not on which loader process made it, so they are the
same for any `num_workers` and after a resume.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate, get_worker_info

from metaformer_lab.data.device_augment import rand_augment_batch, resize_crops
from metaformer_lab.data.erasing import RandomErasing
from metaformer_lab.data.randaugment import RandAugment
from metaformer_lab.data.shapes import CLASS_NAMES, MAX_DISTRACTORS, ShapesDataset
from metaformer_lab.registry import ConfigError, Registry

log = logging.getLogger(__name__)

DATASETS: Registry[type[L.LightningDataModule]] = Registry("data")
VAL_SEED_OFFSET = 1_000_003  # validation images come from a disjoint seed stream


SampleKey = int | tuple[int, int]  # an index, or (index, epoch) from the training loader
AUGMENT_ON = ("auto", "device", "loader")


def augments_on_device(augment_on: str, device_type: str) -> bool:
    """Whether a run's training images are resized and RandAugmented per batch on its device (`device`) or per
    image in the loader processes (`loader`); `auto`: on a GPU the device, on a CPU the loader (there the device is
    the same CPU, and the loader processes are many)."""
    return augment_on == "device" or (augment_on == "auto" and device_type not in ("cpu", "mps"))


class CropSample(NamedTuple):
    """A training image of the device path as a loader process leaves it: the crop box cut out (flipped where
    drawn), not yet resized, and the interpolation drawn for its resize."""

    pixels: np.ndarray  # uint8 [h, w, 3], as decoded, flipped as a view: copied once, into the batch's buffer
    bicubic: bool


@dataclass
class CropBatch:
    """A batch of ragged crops as one buffer: `pixels` is every crop's uint8 [h, w, 3] flattened, one after the
    other; `sizes` their (h, w), known on the host, so that splitting them on the device reads nothing back.
    One buffer, not a list of tensors: a loader process sends it as one shared-memory segment (`collate` writes it
    there directly), where a list is one segment per image."""

    pixels: torch.Tensor  # uint8 [sum of h * w * 3]
    sizes: tuple[tuple[int, int], ...]
    bicubic: tuple[bool, ...]  # host values, as `sizes`: a tensor would travel to the device with the pixels

    @classmethod
    def collate(cls, samples: list[tuple[CropSample, int]]) -> tuple[CropBatch, torch.Tensor]:
        """The DataLoader's collate_fn for CropSamples: (CropBatch, int64 labels)."""
        crops = [crop for crop, _ in samples]
        pixels = torch.empty(sum(crop.pixels.size for crop in crops), dtype=torch.uint8)
        if get_worker_info() is not None:  # in a loader process: straight into shared memory, as default_collate
            pixels.share_memory_()
        buffer, start = pixels.numpy(), 0
        for crop in crops:
            buffer[start : start + crop.pixels.size].reshape(crop.pixels.shape)[...] = crop.pixels
            start += crop.pixels.size
        sizes = tuple(tuple(crop.pixels.shape[:2]) for crop in crops)
        labels = torch.tensor([label for _, label in samples])
        return cls(pixels, sizes, tuple(crop.bicubic for crop in crops)), labels

    def pin_memory(self) -> CropBatch:  # the DataLoader's pin_memory thread calls this for custom batch types
        return CropBatch(self.pixels.pin_memory(), self.sizes, self.bicubic)

    def crops(self) -> list[torch.Tensor]:
        """The crops as uint8 [3, h, w] views of `pixels` (sizes from the host: no sync)."""
        lengths = [h * w * 3 for h, w in self.sizes]
        views = zip(self.pixels.split(lengths), self.sizes, strict=True)
        return [flat.view(h, w, 3).permute(2, 0, 1) for flat, (h, w) in views]

    def select(self, keep: torch.Tensor) -> CropBatch:
        """The crops where the CPU bool tensor `keep` is true (unreadable images dropped before the transfer)."""
        flats = self.pixels.split([h * w * 3 for h, w in self.sizes])
        crops = zip(flats, self.sizes, self.bicubic, strict=True)
        kept = [crop for crop, k in zip(crops, keep.tolist(), strict=True) if k]
        pixels = torch.cat([flat for flat, _, _ in kept]) if kept else self.pixels[:0]
        return CropBatch(pixels, tuple(size for _, size, _ in kept), tuple(bicubic for _, _, bicubic in kept))


class EpochSampler(DistributedSampler):
    """A DistributedSampler that yields `(index, epoch)` (Lightning calls `set_epoch` at each epoch's start).

    `resume_at(epoch, images)` drops the first images of that epoch: a run resumed from a mid-epoch checkpoint goes
    on with the images the epoch had left, in the same order. (Every pass over that epoch skips them: Lightning
    starts and drops an iterator before the one it trains with.)
    """

    resume_epoch, resume_images = -1, 0

    def resume_at(self, epoch: int, images: int) -> None:
        self.resume_epoch, self.resume_images = epoch, images

    def __iter__(self) -> Iterator[tuple[int, int]]:
        skip = self.resume_images if self.epoch == self.resume_epoch else 0
        return ((index, self.epoch) for index in itertools.islice(super().__iter__(), skip, None))


def collate(samples: list[tuple]) -> tuple:
    """The loaders' collate_fn: torch's default, or a CropBatch for the device path's CropSamples."""
    return CropBatch.collate(samples) if isinstance(samples[0][0], CropSample) else default_collate(samples)


def sample_rng(seed: int, key: SampleKey) -> tuple[int, random.Random]:
    """(index, the random stream of this image in this epoch of a run with `seed`); an int key is epoch 0."""
    index, epoch = key if isinstance(key, tuple) else (key, 0)
    return index, random.Random(f"{seed}/{epoch}/{index}")


def image_tensor(image: Image.Image) -> torch.Tensor:
    """A Pillow RGB image as the uint8 [3, H, W] tensor the loaders yield."""
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def affinity() -> list[int]:
    """The CPUs the kernel lets this process run on (a SLURM task's own cores, a container's cpuset); all of them
    where the platform cannot say."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def usable_cpus(environ: Mapping[str, str] = os.environ) -> int:
    """The CPUs this process may run on: its affinity, at most SLURM_CPUS_PER_TASK where set (a cluster that does
    not bind tasks to cores shows every task the whole node)."""
    cpus = len(affinity())
    if per_task := environ.get("SLURM_CPUS_PER_TASK"):
        cpus = min(cpus, int(per_task))
    return cpus


def ranks_sharing_cpus(devices_per_node: int, environ: Mapping[str, str] = os.environ) -> int:
    """How many ranks split this process's CPUs: the ranks torchrun started on this node (they inherit one CPU
    set), 1 for a SLURM task per device (each has its own), else this process's devices (a spawning strategy)."""
    if "LOCAL_WORLD_SIZE" in environ:  # torchrun's, ours (launcher=gpus, DDP on one machine) or a user's
        return int(environ["LOCAL_WORLD_SIZE"])
    if int(environ.get("SLURM_NTASKS", "1")) > 1:
        return 1
    return devices_per_node


def loader_workers(cpus_available: int, ranks_sharing: int) -> tuple[int, int, str]:
    """(training, validation) loader processes per rank for `data.num_workers=auto`, and why: the rank's share
    of the CPUs less one core for the rank itself; validation (a small part of an epoch) half as many."""
    train = max(0, cpus_available // ranks_sharing - 1)
    val = max(1, train // 2) if train else 0
    why = f"{cpus_available} CPU{'s' * (cpus_available > 1)} this process may use, {ranks_sharing} " \
          f"rank{'s' * (ranks_sharing > 1)} on them"  # fmt: skip
    return train, val, why


def _check(key: str, value: object, ok: bool, expected: str) -> None:
    if not ok:
        raise ConfigError(key, value, expected)


class ImageDataModule(L.LightningDataModule):
    """Shared loading: per-rank sampler, unreadable images dropped, uint8 -> normalized float on the device.

    `rand_augment` (a timm policy, parsed here; per image in the loader) and `random_erasing` (a probability, per
    image of the batch on the device, after mixup: the module applies `self.random_erasing`) are the paper
    recipe's augmentations; both are off unless set.
    """

    num_classes: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __init__(
        self, image_size: int, batch_size: int, num_workers: int | str, shuffle_seed: int, crop_pct: float,
        rand_augment: str | None, random_erasing: float, augment_on: str = "auto",
    ) -> None:  # fmt: skip
        super().__init__()
        _check("data.augment_on", augment_on, augment_on in AUGMENT_ON,
               "auto, device or loader (where training images are resized and RandAugmented)")  # fmt: skip
        self.augment_on = augment_on
        # parsed now: a bad policy is an error before any data is read
        self.rand_augment = RandAugment.parse(rand_augment) if rand_augment is not None else None
        is_number = isinstance(random_erasing, int | float) and not isinstance(random_erasing, bool)
        _check("data.random_erasing", random_erasing, is_number and 0 <= random_erasing <= 1, "a probability in [0, 1]")
        self.random_erasing = RandomErasing(random_erasing) if random_erasing > 0 else None
        self.unreadable: dict[str, set[int]] = {"train": set(), "val": set()}  # dataset indices, per split
        _check("data.image_size", image_size, isinstance(image_size, int) and image_size >= 32 and image_size % 8 == 0,
               "a multiple of 8, at least 32")  # fmt: skip
        _check("data.batch_size", batch_size, isinstance(batch_size, int) and batch_size >= 1, "a positive integer")
        ok = num_workers == "auto" or (isinstance(num_workers, int) and num_workers >= 0)
        _check("data.num_workers", num_workers, ok, "0 or more loader processes per device, or auto")
        _check("data.crop_pct", crop_pct, isinstance(crop_pct, int | float) and 0 < crop_pct <= 1, "in (0, 1]")
        self.crop_pct = crop_pct
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.shuffle_seed = shuffle_seed
        self.train: Dataset | None = None
        self.val: Dataset | None = None
        self._train_sampler: EpochSampler | None = None
        self._resume_at = (-1, 0)  # (epoch, images of it done) from a checkpoint
        self._normalization: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # device -> (mean, std)
        self._generators: dict[torch.device, torch.Generator] = {}

    def split_sizes(self) -> tuple[int | None, int | None]:
        """(train, val) image counts, without loading anything; None where unknown. For cost estimates."""
        return None, None

    @property
    def augments_on_device(self) -> bool:
        """`data.augment_on` decided for the run's device (the loader path without a trainer: bench, plan)."""
        device_type = self.trainer.strategy.root_device.type if self.trainer is not None else "cpu"
        return augments_on_device(self.augment_on, device_type)

    def loader_processes(self, devices_per_node: int) -> tuple[int, int, str]:
        """(training, validation) loader processes per device and why: `num_workers` for both, or for `auto` the
        CPUs this process may use, split among the ranks that run on them (`loader_workers`)."""
        if self.num_workers != "auto":
            return self.num_workers, self.num_workers, f"data.num_workers={self.num_workers}"
        return loader_workers(usable_cpus(), ranks_sharing_cpus(devices_per_node))

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        train_workers, val_workers, _ = self.loader_processes(self.trainer.num_devices if self.trainer else 1)
        workers = train_workers if train else val_workers
        # pinned pages only speed up copies to a GPU: the run's device, not whether this machine has one
        on_gpu = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        sampler = (EpochSampler if train else DistributedSampler)(
            dataset, world, rank, shuffle=train, seed=self.shuffle_seed, drop_last=train
        )
        if train:
            if hasattr(dataset, "augment_on_device"):  # datasets with both paths: decided now, the device known
                dataset.augment_on_device = self.augments_on_device
            sampler.resume_at(*self._resume_at)
            self._train_sampler = sampler
        return DataLoader(
            dataset, self.batch_size, sampler=sampler, drop_last=train, num_workers=workers,
            persistent_workers=workers > 0, pin_memory=on_gpu,
            collate_fn=collate,
            # its own generator: a loader's iterator draws its workers' base seed, which would otherwise come from
            # the global stream that drop path and mixup use, and shift it differently on a mid-epoch resume
            generator=torch.Generator().manual_seed(self.shuffle_seed),
        )  # fmt: skip

    # Checkpointed with the run (Lightning saves a data module's state): the epoch and the training batches of it
    # each rank has done, so that a run resumed from a mid-epoch checkpoint goes on with the images that epoch had
    # left (on as many ranks: train.check_resume_world).
    def state_dict(self) -> dict[str, int]:
        trainer = self.trainer
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        done = done if done < trainer.num_training_batches else 0
        return {"epoch": trainer.current_epoch, "batches_done": done, "world_size": trainer.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume_at = (state["epoch"], state["batches_done"] * self.batch_size)
        if self._train_sampler is not None:  # the loader may be made before the checkpoint is read
            self._train_sampler.resume_at(*self._resume_at)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val, train=False)

    def sample_path(self, split: str, index: int) -> str:
        """Where sample `index` of a split comes from, for the log of unreadable images."""
        return f"{split} image {index}"

    def on_before_batch_transfer(self, batch: tuple[torch.Tensor, torch.Tensor], dataloader_idx: int) -> tuple:
        images, labels = batch
        bad = labels < 0  # on the CPU, before the transfer: no device sync
        if not bad.any():
            return batch
        split = "train" if self.trainer is not None and self.trainer.training else "val"
        for index in (-1 - labels[bad]).tolist():
            if index not in self.unreadable[split]:
                self.unreadable[split].add(index)
                log.warning("skipped unreadable image %s (%d in %s so far)", self.sample_path(split, index),
                            len(self.unreadable[split]), split)  # fmt: skip
        return images.select(~bad) if isinstance(images, CropBatch) else images[~bad], labels[~bad]

    def on_after_batch_transfer(self, batch: tuple, dataloader_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """On the device: the device path's resize and RandAugment (training batches), then the normalization."""
        images, labels = batch
        if isinstance(images, CropBatch):
            images = resize_crops(images.crops(), self.image_size, images.bicubic)
        training = isinstance(batch[0], CropBatch) or (self.trainer is not None and self.trainer.training)
        if self.rand_augment is not None and training and self.augments_on_device:
            images = rand_augment_batch(images, self.rand_augment, self._generator(images.device))
        mean, std = self._mean_std(images.device)
        return (images.float() / 255 - mean) / std, labels

    def _generator(self, device: torch.device) -> torch.Generator:
        """The device's generator for this batch's RandAugment draws, seeded from torch's global stream (on the
        CPU: no sync), which each rank seeds apart and a checkpoint saves: a resume draws what an uninterrupted
        run would, and the loader processes' count plays no part."""
        if device not in self._generators:
            self._generators[device] = torch.Generator(device)
        return self._generators[device].manual_seed(int(torch.randint(2**62, ())))

    def _mean_std(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """mean and std as [1, 3, 1, 1] tensors on `device`, made once: no host-to-device copy per batch."""
        if device not in self._normalization:
            self._normalization[device] = tuple(
                torch.tensor(values, device=device).view(1, 3, 1, 1) for values in (self.mean, self.std)
            )
        return self._normalization[device]


@DATASETS.register("shapes")
class ShapesDataModule(ImageDataModule):
    """The embedded generated task (data/shapes.py): images made in memory at setup, no files."""

    num_classes = len(CLASS_NAMES)

    def __init__(
        self,
        image_size: int = 32,
        train_size: int = 20000,
        val_size: int = 2000,
        seed: int = 0,
        max_distractors: int = 3,
        batch_size: int = 128,
        num_workers: int = 0,
        shuffle_seed: int = 0,
        crop_pct: float = 1.0,  # eval crop of image folders; generated images are made at size, so it is unused
        rand_augment: str | None = None,
        random_erasing: float = 0.0,
        augment_on: str = "auto",
    ) -> None:
        super().__init__(image_size, batch_size, num_workers, shuffle_seed, crop_pct, rand_augment, random_erasing,
                         augment_on)  # fmt: skip
        _check("data.train_size", train_size, isinstance(train_size, int) and train_size >= batch_size,
               f"at least one batch (data.batch_size={batch_size})")  # fmt: skip
        _check("data.val_size", val_size, isinstance(val_size, int) and val_size >= 1, "a positive whole number")
        ok = isinstance(max_distractors, int) and 0 <= max_distractors <= MAX_DISTRACTORS
        _check("data.max_distractors", max_distractors, ok, f"0 to {MAX_DISTRACTORS} other shapes per image")
        self.train_size, self.val_size, self.seed, self.max_distractors = train_size, val_size, seed, max_distractors

    def split_sizes(self) -> tuple[int | None, int | None]:
        return self.train_size, self.val_size

    def setup(self, stage: str | None = None) -> None:
        if self.train is None:
            self.train = ShapesDataset(self.train_size, self.image_size, self.seed, self.max_distractors)
            if self.rand_augment is not None:  # in the loader, unless augment_on resolves to the device
                self.train = RandAugmented(self.train, self.rand_augment, self.shuffle_seed)
            self.val = ShapesDataset(self.val_size, self.image_size, self.seed + VAL_SEED_OFFSET, self.max_distractors)


class RandAugmented(Dataset):
    """A dataset of uint8 tensors with RandAugment applied per image (through Pillow), e.g. the generated shapes."""

    augment_on_device = False  # set by the data module: then the device augments, and this passes images through

    def __init__(self, dataset: Dataset, rand_augment: RandAugment, seed: int) -> None:
        self.dataset, self.rand_augment, self.seed = dataset, rand_augment, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: SampleKey) -> tuple[torch.Tensor, int]:
        index, rng = sample_rng(self.seed, key)
        image, label = self.dataset[index]
        if self.augment_on_device:
            return image, label
        augmented = self.rand_augment(Image.fromarray(image.permute(1, 2, 0).numpy()), rng)
        return image_tensor(augmented), label
