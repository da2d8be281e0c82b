"""Reading a shards folder: its manifest checked, image i one `pread` of its tar at the offset the conversion stored,
and the `shards` data module (`data=shards`). What a shards folder holds: the package's docstring."""

from __future__ import annotations

import hashlib
import io
import json
import os
import resource
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from metaformer_lab.data.datamodules import DATASETS
from metaformer_lab.data.imagefolder import SPLITS, ImageDataset, ImageFolderDataModule, decode
from metaformer_lab.data.index import ImageIndex, read_index
from metaformer_lab.data.randaugment import RandAugment
from metaformer_lab.registry import ConfigError

FORMAT = "metaformer_lab shards"
VERSION = 1  # of the layout of a shards folder: a reader refuses another
MANIFEST = "manifest.json"
INDEX = "index"  # the split's ImageIndex (index.write_index): file names and labels
POSITIONS = "positions.npy"  # int64 [images, 2]: (offset of the image's bytes in its tar, their size)
WHAT = "a shards folder made by `python -m metaformer_lab.data.shards SRC DEST` (data.root=DEST)"


def chunk_file(split: str, chunk: int) -> str:
    """The tar of chunk `chunk` of `split`: `train-000012.tar`."""
    return f"{split}-{chunk:06d}.tar"


def listing_digest(index: ImageIndex) -> str:
    """sha256 of a split's listing (file names, their order, labels): equal iff the folder lists the same files."""
    digest = hashlib.sha256()
    for array in (index.names, index.offsets.astype("<i8"), index.labels.astype("<i4")):
        digest.update(np.ascontiguousarray(array).tobytes())
    digest.update(json.dumps(index.classes).encode())
    return digest.hexdigest()


def read_manifest(root: Path) -> dict[str, Any] | None:
    """The manifest of a shards folder; None where `root` has none (or one that is not a shards manifest)."""
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def is_shards(root: Path) -> bool:
    """Whether `root` is a shards folder (complete or not): it holds a shards manifest."""
    return read_manifest(root) is not None


def check_shards(root: Path, splits: tuple[str, ...] = SPLITS) -> dict[str, Any]:
    """The manifest of a complete shards folder, with every tar of `splits` in place at its size; a ConfigError on
    `data.root` saying what is wrong otherwise (before training, not at the first unreadable image)."""
    if not root.is_dir():
        raise ConfigError("data.root", str(root), f"no such folder; expected {WHAT}")
    manifest = read_manifest(root)
    if manifest is None:
        raise ConfigError("data.root", str(root), f"no shards manifest ({MANIFEST}) in it; expected {WHAT}")
    if manifest.get("version") != VERSION:
        raise ConfigError("data.root", str(root), f"shards format version {manifest.get('version')}; this code reads "
                          f"version {VERSION}: convert the image folder again")  # fmt: skip
    if not manifest.get("complete"):
        raise ConfigError("data.root", str(root), "its conversion has not finished: run the same `python -m "
                          "metaformer_lab.data.shards SRC DEST` again, it continues where it stopped")  # fmt: skip
    for split in splits:
        for chunk in manifest["chunks"][split]:
            path = root / split / chunk["file"]
            size = path.stat().st_size if path.is_file() else None
            if size != chunk["bytes"]:
                found = "missing" if size is None else f"{size:,} bytes"
                raise ConfigError("data.root", str(root), f"{split}/{chunk['file']} is {found}, the manifest says "
                                  f"{chunk['bytes']:,} bytes: an incomplete copy?")  # fmt: skip
    return manifest


class ShardDataset(ImageDataset):
    """One split of a shards folder, image i being image i of the source folder; the recipe's transforms, the
    unreadable-image handling and the device path are ImageDataset's.

    Files are opened on first use, in each process (a forked loader process may also use those its parent had
    opened: `os.pread` needs no file position, so sharing them is safe), and kept open: at most `max_open` at once
    (the least recently used closed beyond), well under the open-file limit.
    """

    def __init__(
        self, split_dir: Path, image_size: int, train: bool, crop_pct: float, rand_augment: RandAugment | None = None,
        seed: int = 0, augment_on_device: bool = False,
    ) -> None:  # fmt: skip
        super().__init__(image_size, train, crop_pct, rand_augment, seed, augment_on_device)
        self.split_dir, self.split = split_dir, split_dir.name
        manifest = check_shards(split_dir.parent, (self.split,))
        self.chunk_images: int = manifest["chunk_images"]
        self.max_side: int | None = manifest["max_side"]
        self._classes: list[str] = manifest["classes"]
        self._stamp = bytes.fromhex(manifest["splits"][self.split]["listing_sha256"])
        self.max_open = max(8, min(1024, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 4))
        self._files: OrderedDict[int, int] = OrderedDict()  # chunk -> file descriptor, most recently used last
        self._map()

    def _map(self) -> None:
        """The split's index and positions, mapped read-only (the pages are shared by every process that maps them)."""
        images = read_index(self.split_dir / INDEX, self._stamp, self._classes)
        if images is None:
            raise ConfigError("data.root", str(self.split_dir.parent), f"{self.split}/{INDEX} is missing or not the "
                              "one of this manifest: convert the image folder again")  # fmt: skip
        self.images: ImageIndex = images
        # a plain ndarray view of the map: rows of an np.memmap are slower to index (index.py)
        self.positions: np.ndarray = np.load(self.split_dir / POSITIONS, mmap_mode="r").view(np.ndarray)

    # a spawned loader process (or any pickling) gets the paths, not copies of the arrays nor this process's files
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for name in ("images", "positions", "_files"):
            state.pop(name)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._files = OrderedDict()
        self._map()

    @property
    def classes(self) -> list[str]:
        return self.images.classes

    def __len__(self) -> int:
        return len(self.images)

    def label(self, index: int) -> int:
        return int(self.images.labels[index])  # a Python int: a batch of labels collates to int64

    def chunk_path(self, index: int) -> Path:
        """The tar that holds image `index`."""
        return self.split_dir / chunk_file(self.split, index // self.chunk_images)

    def describe(self, index: int) -> str:
        """`<DEST>/train/train-000000.tar:<class>/<file>`: the tar and the source file the image came from."""
        return f"{self.chunk_path(index)}:{self.images.relative_path(index)}"

    def read_bytes(self, index: int) -> bytes:
        """The stored file of image `index`: one read of its tar."""
        offset, size = (int(value) for value in self.positions[index])
        data = os.pread(self._file(index // self.chunk_images), size, offset)
        if len(data) != size:
            raise OSError(f"{self.chunk_path(index)}: {len(data)} of {size} bytes at {offset} (a truncated tar?)")
        return data

    def open_image(self, index: int) -> Image.Image:
        return decode(io.BytesIO(self.read_bytes(index)))

    def _file(self, chunk: int) -> int:
        fd = self._files.pop(chunk, None)
        if fd is None:
            while len(self._files) >= self.max_open:
                os.close(self._files.popitem(last=False)[1])
            fd = os.open(self.split_dir / chunk_file(self.split, chunk), os.O_RDONLY)
        self._files[chunk] = fd
        return fd

    def close(self) -> None:
        """Close this process's files (they open again on the next read)."""
        while self._files:
            os.close(self._files.popitem()[1])


def open_split(
    root: Path, split: str, image_size: int, train: bool, crop_pct: float = 0.9,
    rand_augment: RandAugment | None = None, seed: int = 0,
) -> ShardDataset:  # fmt: skip
    """`split` of the shards folder `root` with the training (`train`) or the eval transform, as a run reads it (for
    the loader benchmark); a ConfigError on `data.root` where `root` is not a complete shards folder."""
    return ShardDataset(root / split, image_size, train, crop_pct, rand_augment if train else None, seed)


@DATASETS.register("shards")
class ShardsDataModule(ImageFolderDataModule):
    """A shards folder (`python -m metaformer_lab.data.shards SRC DEST`, data.root=DEST): the image folder SRC's
    images, classes and order; `num_classes` None takes the manifest's class count."""

    def _check_root(self, splits: tuple[str, ...] = SPLITS) -> None:
        if not self.root_given:  # checked on use, not at construction, so that `plan` can list a run without data
            raise ConfigError("data.root", None, f"required: {WHAT}")
        check_shards(self.root, splits)

    def _manifest(self) -> dict[str, Any]:
        self._check_root(())
        manifest = read_manifest(self.root)
        assert manifest is not None  # checked above
        return manifest

    @property
    def num_classes(self) -> int:
        """As configured, else the classes of the source folder (the manifest's)."""
        if self.configured_classes is not None:
            return self.configured_classes
        return len(self._manifest()["classes"])

    @property
    def max_side(self) -> int | None:
        """The long side the conversion cut larger images to (`--max-side`); None: the source folder's pixels."""
        return self._manifest()["max_side"]

    def split_sizes(self) -> tuple[int | None, int | None]:
        manifest = read_manifest(self.root) if self.root_given else None
        if manifest is None:
            return None, None
        return manifest["splits"]["train"]["images"], manifest["splits"]["val"]["images"]

    def dataset(self, split: str) -> ShardDataset:
        """The `split` ("train": with the training transform, else the eval one) of the shards folder."""
        if split == "train":
            return ShardDataset(self.root / split, self.image_size, True, self.crop_pct, self.rand_augment,
                                self.shuffle_seed)  # fmt: skip
        return ShardDataset(self.root / split, self.image_size, False, self.crop_pct)


