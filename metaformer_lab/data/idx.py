"""`data=idx`: data sets in the IDX format of MNIST (Fashion-MNIST, MNIST, KMNIST, EMNIST), read into memory.

A data set is four files in one folder, `data.root`, gzipped (as downloaded) or not:

    train-images-idx3-ubyte[.gz]  train-labels-idx1-ubyte[.gz]  t10k-images-idx3-ubyte[.gz]  t10k-labels-idx1-ubyte[.gz]

An IDX file is a big-endian header (magic number 0x0000TTNN: TT the element type, 0x08 for uint8, NN the number of
dimensions; then NN uint32 sizes) followed by the elements. Images: 0x00000803, [count, rows, columns]; labels:
0x00000801, [count]. Every file is checked before training (magic, sizes against the file's length, as many labels
as images, labels in 0..num_classes-1): a wrong file is a `ConfigError` on `data.root` naming it, one line.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from metaformer_lab.data.datamodules import DATASETS, ImageDataModule, RandAugmented, _check
from metaformer_lab.registry import ConfigError

IMAGES_MAGIC = 0x00000803  # uint8, 3 dimensions: [count, rows, columns]
LABELS_MAGIC = 0x00000801  # uint8, 1 dimension: [count]
# (images, labels) file names of each split, without .gz; validation is the test split, t10k
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
WHERE = "the four IDX files of an MNIST-format data set, gzipped or not (e.g. Fashion-MNIST: " \
        "/usr/share/datasets/fashion-mnist from the Debian package dataset-fashion-mnist, or the files of " \
        "https://github.com/zalandoresearch/fashion-mnist)"  # fmt: skip


def _error(path: Path, problem: str) -> ConfigError:
    return ConfigError("data.root", str(path.parent), f"{path.name}: {problem}")


def find_file(root: Path, name: str) -> Path:
    """`root/name`, else `root/name.gz` (the plain file wins where both are there)."""
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    if not root.is_dir():
        raise ConfigError("data.root", str(root), f"no such folder; expected {WHERE}")
    raise ConfigError("data.root", str(root), f"neither {name} nor {name}.gz in it; expected {WHERE}")


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")


def read_header(path: Path) -> tuple[int, tuple[int, ...], int]:
    """(magic number, dimensions, header length in bytes) of an IDX file, reading only its header."""
    try:
        with _open(path) as file:
            head = file.read(4)
            if len(head) < 4:
                raise _error(path, f"not an IDX file: {len(head)} bytes, shorter than a header")
            magic = struct.unpack(">I", head)[0]
            ndim = magic & 0xFF
            if magic >> 16 or ndim == 0:  # the first two bytes are 0 in every IDX file
                raise _error(path, f"not an IDX file (magic number 0x{magic:08x})")
            sizes = file.read(4 * ndim)
    except (OSError, EOFError, zlib.error) as error:  # unreadable, or a broken gzip stream
        raise _error(path, f"cannot be read: {error}") from None
    if len(sizes) < 4 * ndim:
        raise _error(path, f"truncated: its header needs {4 + 4 * ndim} bytes, found {4 + len(sizes)}")
    return magic, struct.unpack(f">{ndim}I", sizes), 4 + 4 * ndim


def read_idx(path: Path, magic: int, what: str) -> np.ndarray:
    """The uint8 array of an IDX file whose magic number must be `magic` (`what` describes it in errors)."""
    found, dims, header = read_header(path)
    if found != magic:
        raise _error(path, f"magic number 0x{found:08x}, expected 0x{magic:08x} ({what})")
    try:
        with _open(path) as file:
            data = file.read()
    except (OSError, EOFError, zlib.error) as error:
        raise _error(path, f"cannot be read: {error}") from None
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        shape = " x ".join(map(str, dims))
        problem = "truncated" if len(data) < expected else "longer than its header says"
        uncompressed = " (uncompressed)" if path.suffix == ".gz" else ""
        raise _error(path, f"{problem}: a header of {shape} needs {expected} bytes, found {len(data)}{uncompressed}")
    return np.frombuffer(bytearray(data), np.uint8, offset=header).reshape(dims)  # writable: torch shares it


def read_split(root: Path, split: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [N, rows, columns], uint8 labels [N]) of a split ("train" or "val": the t10k files), checked."""
    images_name, labels_name = SPLIT_FILES[split]
    images_path, labels_path = find_file(root, images_name), find_file(root, labels_name)
    images = read_idx(images_path, IMAGES_MAGIC, "uint8 images: count, rows, columns")
    labels = read_idx(labels_path, LABELS_MAGIC, "uint8 labels: count")
    if len(images) != len(labels):
        raise _error(labels_path, f"{len(labels)} labels for the {len(images)} images of {images_path.name}")
    if len(labels) and (bad := np.flatnonzero(labels >= num_classes)).size:
        raise _error(labels_path, f"label {labels[bad[0]]} (image {bad[0]}; {bad.size} such) is outside "
                     f"0..{num_classes - 1} of data.num_classes={num_classes}")  # fmt: skip
    return images, labels


def count_images(root: Path, split: str) -> int | None:
    """The image count of a split from its header, None where the file is missing or unreadable."""
    try:
        magic, dims, _ = read_header(find_file(root, SPLIT_FILES[split][0]))
    except ConfigError:
        return None
    return dims[0] if magic == IMAGES_MAGIC else None


def _at_most(count: int | None, limit: int | None) -> int | None:
    return count if count is None or limit is None else min(count, limit)


@dataclass(frozen=True)
class PixelStats:
    """Mean and standard deviation of a set of uint8 pixels, as fractions of 255 (as the normalization takes)."""

    mean: float
    std: float

    @classmethod
    def of(cls, images: np.ndarray) -> PixelStats:
        """Exact, from the histogram of the pixel values (no float copy of the images)."""
        counts = torch.from_numpy(np.ascontiguousarray(images)).flatten().bincount(minlength=256).double()
        values = torch.arange(256, dtype=torch.float64) / 255
        total = counts.sum()
        mean = (counts * values).sum() / total
        variance = (counts * (values - mean) ** 2).sum() / total
        return cls(float(mean), float(variance.sqrt()))


class IdxDataset(Dataset):
    """One split in memory: (uint8 [3, size, size] image, int label). Each image is padded with zeros to `size`,
    centred (28 -> 32: 2 pixels each side), and its one grey channel repeated to three, when it is asked for: the
    split stays in memory at its own size (47 MB for Fashion-MNIST's training images), whatever the `size`."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, size: int) -> None:
        self.images, self.labels, self.size = torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)), size
        rows, columns = images.shape[1:]
        self.top, self.left = (size - rows) // 2, (size - columns) // 2

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index = key[0] if isinstance(key, tuple) else key  # (index, epoch) from the training loader: no draws here
        image = self.images[index]
        padded = image.new_zeros(self.size, self.size)
        padded[self.top : self.top + image.shape[0], self.left : self.left + image.shape[1]] = image
        return padded.expand(3, -1, -1), int(self.labels[index])


@DATASETS.register("idx")
class IdxDataModule(ImageDataModule):
    """Fashion-MNIST, MNIST, KMNIST, EMNIST: the four IDX files in `root` (module docstring), all in memory.

    - Padded, not resized, to `image_size`: zeros centred around each image (28 -> 32 px: 2 each side, as the
      issue's probe and LeNet-5's 32 px input). Zero is these data sets' background, so padding adds only more of
      it, and every pixel stays as drawn; a resize to 32 would interpolate every stroke for no detail gained. 32 px
      (a multiple of 8) gives the four stages 8, 4, 2 and 1 tokens a side, as the generated shapes. Images larger
      than `image_size` are an error (never cut). A larger `image_size` pads more: no resize option, as nothing
      here needs one (add it where a model must see the digits at 224 px).
    - Grey repeated to three channels: every model of the project, its 3-channel stem, the normalization, RandAugment
      (through Pillow's RGB), mixup, random erasing and the checkpoints then work unchanged. The cost is the stem
      convolution reading three equal channels (a few percent of the small model's MACs at 32 px); a 1-channel
      stem would save that but make these data a special case of every model and tool.
    - Normalized with the data set's own mean and std: of every pixel of the whole training split, unpadded (not of
      the first `train_size` images only, so that the normalization of a run, and of evaluating its checkpoint, does
      not depend on it), the same value for the three channels, computed at setup (`mean`, `std`; Fashion-MNIST:
      0.2860, 0.3530). Validating alone (`evaluate`) therefore reads the training images too.
    - Validation is the test split (t10k); there is no held-out part of the training split.
    - `train_size` / `val_size`: the first N images of a split (null: all of it), for tests and quick runs
      (`debug=quick` sets both).
    - `num_classes`: labels must lie in 0..num_classes-1 (10 for MNIST, Fashion-MNIST and KMNIST; EMNIST letters
      numbers its 26 classes 1..26: num_classes=27, class 0 unused).
    - No crop or flip (a flipped digit is another digit); `rand_augment` and `random_erasing` as for the shapes.
    """

    def __init__(
        self,
        root: str = "???",
        image_size: int = 32,
        num_classes: int = 10,
        train_size: int | None = None,
        val_size: int | None = None,
        batch_size: int = 128,
        num_workers: int | str = 0,
        shuffle_seed: int = 0,
        crop_pct: float = 1.0,  # eval crop of image folders; these images are padded, never cropped: unused
        rand_augment: str | None = None,
        random_erasing: float = 0.0,
        augment_on: str = "auto",
    ) -> None:
        super().__init__(image_size, batch_size, num_workers, shuffle_seed, crop_pct, rand_augment, random_erasing,
                         augment_on)  # fmt: skip
        is_int = isinstance(num_classes, int) and not isinstance(num_classes, bool)
        _check("data.num_classes", num_classes, is_int and 2 <= num_classes <= 256, "a whole number from 2 to 256")
        ok = train_size is None or (isinstance(train_size, int) and train_size >= batch_size)
        _check("data.train_size", train_size, ok, f"null (all) or at least one batch (data.batch_size={batch_size})")
        ok = val_size is None or (isinstance(val_size, int) and val_size >= 1)
        _check("data.val_size", val_size, ok, "null (all) or a positive whole number")
        self.root, self.num_classes = Path(str(root)), num_classes
        self.root_given = root not in ("???", None)  # "???": OmegaConf's mark of a required value never given
        self.train_size, self.val_size = train_size, val_size
        self.stats: PixelStats | None = None
        self.digest: str | None = None  # of the training split's images and labels, once read

    def _check_root(self) -> None:
        if not self.root_given:  # checked on use, not at construction, so that `plan` can list a run without data
            raise ConfigError("data.root", None, f"required: the folder of {WHERE}")

    def split_sizes(self) -> tuple[int | None, int | None]:
        if not self.root_given:
            return None, None
        train, val = (count_images(self.root, split) for split in SPLIT_FILES)
        return _at_most(train, self.train_size), _at_most(val, self.val_size)

    def setup(self, stage: str | None = None) -> None:
        """Reads and checks the files: both splits to train, the t10k split to validate (and the training images
        for their mean and std in both cases)."""
        if self.val is not None and (self.train is not None or stage == "validate"):
            return
        self._check_root()
        train_images, train_labels = read_split(self.root, "train", self.num_classes)
        val_images, val_labels = read_split(self.root, "val", self.num_classes)
        for images, split in ((train_images, "train"), (val_images, "val")):
            rows, columns = images.shape[1:]
            if max(rows, columns) > self.image_size:
                path = find_file(self.root, SPLIT_FILES[split][0])
                expected = f"at least the {rows}x{columns} images of {path} (they are padded, never cut)"
                raise ConfigError("data.image_size", self.image_size, expected)
        if self.stats is None:
            self.stats = PixelStats.of(train_images)
            # which data set: the run record keeps it (MNIST, Fashion-MNIST and KMNIST share sizes and file names)
            digest = hashlib.sha256(np.ascontiguousarray(train_images))  # hashed in place: no copy of the split
            digest.update(np.ascontiguousarray(train_labels))
            self.digest = digest.hexdigest()[:12]
            self.mean, self.std = (self.stats.mean,) * 3, (self.stats.std,) * 3
        self.val = IdxDataset(val_images[: self.val_size], val_labels[: self.val_size], self.image_size)
        if stage != "validate":
            train = IdxDataset(train_images[: self.train_size], train_labels[: self.train_size], self.image_size)
            if len(train) < self.batch_size:
                raise ConfigError("data.batch_size", self.batch_size, f"at most the {len(train)} training images")
            self.train = train if self.rand_augment is None else RandAugmented(train, self.rand_augment,
                                                                                self.shuffle_seed)  # fmt: skip

    def sample_path(self, split: str, index: int) -> str:
        return f"{SPLIT_FILES[split][0]} image {index}"
