"""Real images from a folder in the ImageNet layout: `<root>/train/<class>/*.JPEG`, `<root>/val/<class>/*`.

Decoded with Pillow in loader workers (torchvision cannot be installed next to CPU torch). The transforms are timm's
as the official train.py used them (`transforms_imagenet_train` / `_eval`):
- train: random resized crop (scale 0.08-1, log-uniform ratio 3/4-4/3, 10 tries, else the whole image clamped to
  the ratio range; bilinear or bicubic at random), horizontal flip, then RandAugment where `rand_augment` is set;
- eval: bicubic resize of the short side to floor(image_size / crop_pct) (the long side in proportion, truncated),
  then a center crop at rounded offsets.
An unreadable image (corrupt, truncated, not an image) does not stop a run: it comes out with label `-1 - index`,
and the data module drops it from the batch, logs its path once and counts it (`ImageDataModule.unreadable`).
Which images a split holds is its `ImageIndex` (index.py): arrays, listed once per node and shared.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from metaformer_lab.data.datamodules import (
    DATASETS,
    CropSample,
    ImageDataModule,
    SampleKey,
    image_tensor,
    sample_rng,
)
from metaformer_lab.data.index import IMAGE_SUFFIXES, ImageIndex, class_names, load_index
from metaformer_lab.data.randaugment import RESAMPLE, RandAugment
from metaformer_lab.registry import ConfigError

SPLITS = ("train", "val")
LAYOUT = "<root>/train/<class>/<image>.JPEG and <root>/val/<class>/<image>.JPEG, the same class folders in both"
# errors Pillow raises for files it cannot decode (UnidentifiedImageError and truncation are OSErrors)
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _layout_error(root: Path, problem: str) -> ConfigError:
    return ConfigError("data.root", str(root), f"{problem}; expected the ImageNet layout: {LAYOUT}")


def check_layout(root: Path, splits: tuple[str, ...] = SPLITS) -> None:
    """A clear error, before training, for a folder that is not in the ImageNet layout."""
    if not root.is_dir():
        raise _layout_error(root, "no such folder")
    for split in splits:
        if not (root / split).is_dir():
            raise _layout_error(root, f"no {split}/ folder in it")
        if not class_names(root / split):
            raise _layout_error(root, f"{split}/ has no class folders")
    if len(splits) == 2:
        train, val = (class_names(root / split) for split in splits)
        if train != val:
            only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))
            differ = "; ".join(
                f"{len(names)} only in {split}/ (e.g. {', '.join(names[:3])})"
                for names, split in ((only_train, "train"), (only_val, "val")) if names
            ) or "the same names in another order"
            raise _layout_error(root, f"train/ and val/ have different class folders: {differ}")


def decode(file: str | Path | BinaryIO) -> Image.Image:
    """An image file (a path, or bytes in a BytesIO) decoded to RGB; raises one of UNREADABLE where it cannot be."""
    image = Image.open(file)
    try:
        image.load()  # decodes, and closes a file Image.open opened itself (single-frame images: all of ours)
    except BaseException:
        image.close()
        raise
    return image if image.mode == "RGB" else image.convert("RGB")  # convert would copy an RGB image


def crop_box(width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
    """(x, y, w, h) of timm's RandomResizedCropAndInterpolation box (scale 0.08-1, ratio 3/4-4/3, 10 tries)."""
    area = width * height
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        ratio = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            y = rng.randint(0, height - h)  # y drawn first, as timm
            return rng.randint(0, width - w), y, w, h
    # the whole image, cut to the ratio range where it lies outside it (timm's fallback)
    in_ratio = width / height
    if in_ratio < 3 / 4:
        w, h = width, round(width / (3 / 4))
    elif in_ratio > 4 / 3:
        w, h = round(height * (4 / 3)), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def random_resized_crop(image: Image.Image, size: int, rng: random.Random) -> Image.Image:
    """timm's RandomResizedCropAndInterpolation (`crop_box`, then bilinear or bicubic at random)."""
    x, y, w, h = crop_box(*image.size, rng)
    interpolation = rng.choice(RESAMPLE)
    # crop, then resize, as torchvision's resized_crop: a resize with box= would read pixels outside the box
    return image.crop((x, y, x + w, y + h)).resize((size, size), interpolation)


def eval_resize_size(width: int, height: int, size: int, crop_pct: float) -> tuple[int, int]:
    """(width, height) after the eval resize: short side floor(size / crop_pct), long side in proportion, truncated
    (timm's `transforms_imagenet_eval` through torchvision's Resize(int))."""
    short = math.floor(size / crop_pct)
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


def center_crop(image: Image.Image, size: int, crop_pct: float) -> Image.Image:
    """The official eval transform: bicubic resize (`eval_resize_size`), then a `size` crop at the centre."""
    width, height = eval_resize_size(image.width, image.height, size, crop_pct)
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    x, y = round((width - size) / 2), round((height - size) / 2)
    return image.crop((x, y, x + size, y + size))


class ImageDataset(Dataset):
    """One split of images with the recipe's transforms: (uint8 [3, size, size] image, label), or label
    `-1 - index` if unreadable. Where the images come from is a subclass's: `open_image`, `label`, `describe`.

    `augment_on_device` (training, `data.augment_on` decided as device): a training sample is only what must be done
    per file, `(CropSample(uint8 [h, w, 3] crop of the box, flipped where drawn; bicubic), label)`, with the same box,
    flip and interpolation draws as the loader path; the resize and RandAugment happen per batch on the device
    (device_augment.py).
    """

    def __init__(
        self, image_size: int, train: bool, crop_pct: float, rand_augment: RandAugment | None = None, seed: int = 0,
        augment_on_device: bool = False,
    ) -> None:  # fmt: skip
        self.image_size, self.train, self.crop_pct = image_size, train, crop_pct
        self.rand_augment, self.seed, self.augment_on_device = rand_augment, seed, augment_on_device

    classes: list[str]

    def __len__(self) -> int:
        raise NotImplementedError

    def open_image(self, index: int) -> Image.Image:
        """Image `index`, decoded to RGB; raises one of UNREADABLE where it cannot be."""
        raise NotImplementedError

    def label(self, index: int) -> int:
        raise NotImplementedError

    def describe(self, index: int) -> str:
        """Where image `index` comes from, for the log of unreadable images."""
        raise NotImplementedError

    def read_bytes(self, index: int) -> bytes:
        """The stored file of image `index`, undecoded (`decode(io.BytesIO(...))` is `open_image`)."""
        raise NotImplementedError

    def __getitem__(self, key: SampleKey) -> tuple[torch.Tensor | CropSample, int]:
        """The image and its label; `key` (index, epoch) seeds a training image's draws (`sample_rng`)."""
        index, rng = sample_rng(self.seed, key)
        label = self.label(index)
        try:
            image = self.open_image(index)
        except UNREADABLE:
            if self.train and self.augment_on_device:
                return CropSample(np.zeros((1, 1, 3), np.uint8), False), -1 - index
            return torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8), -1 - index
        if not self.train:
            return image_tensor(center_crop(image, self.image_size, self.crop_pct)), label
        if self.augment_on_device:
            x, y, w, h = crop_box(*image.size, rng)
            bicubic = rng.choice(RESAMPLE) == Image.Resampling.BICUBIC
            crop = np.asarray(image.crop((x, y, x + w, y + h)))  # [h, w, 3]: no permuted copy here
            if rng.random() < 0.5:  # flipping the crop before the resize is flipping the resized image
                crop = crop[:, ::-1]  # a view: the collate's one copy flips it
            return CropSample(crop, bicubic), label
        image = random_resized_crop(image, self.image_size, rng)
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.rand_augment is not None:
            image = self.rand_augment(image, rng)
        return image_tensor(image), label


class ImageFolderDataset(ImageDataset):
    """One split of an image folder, `split_dir/<class>/<file>`, listed by its `ImageIndex`."""

    def __init__(
        self, split_dir: Path, image_size: int, train: bool, crop_pct: float, rand_augment: RandAugment | None = None,
        seed: int = 0, augment_on_device: bool = False,
    ) -> None:  # fmt: skip
        super().__init__(image_size, train, crop_pct, rand_augment, seed, augment_on_device)
        self.split_dir = split_dir
        self.images: ImageIndex = load_index(split_dir)

    @property
    def classes(self) -> list[str]:
        return self.images.classes

    def __len__(self) -> int:
        return len(self.images)

    def path(self, index: int) -> Path:
        """The file of image `index`, made when asked for: the index holds no object per image (index.py)."""
        return self.split_dir / self.images.relative_path(index)

    def describe(self, index: int) -> str:
        return str(self.path(index))

    def label(self, index: int) -> int:
        return int(self.images.labels[index])  # a Python int: a batch of labels collates to int64

    def read_bytes(self, index: int) -> bytes:
        return self.path(index).read_bytes()

    def open_image(self, index: int) -> Image.Image:
        return decode(self.path(index))


@DATASETS.register("imagefolder")
@DATASETS.register("imagenet")
class ImageFolderDataModule(ImageDataModule):
    """Any folder in the ImageNet layout; `num_classes` None reads the class count from its train/ folders."""

    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)

    def __init__(
        self,
        root: str,
        image_size: int = 224,
        num_classes: int | None = None,
        crop_pct: float = 0.9,
        batch_size: int = 128,
        num_workers: int | str = "auto",
        shuffle_seed: int = 0,
        rand_augment: str | None = None,
        random_erasing: float = 0.0,
        augment_on: str = "auto",
    ) -> None:
        super().__init__(image_size, batch_size, num_workers, shuffle_seed, crop_pct, rand_augment, random_erasing,
                         augment_on)  # fmt: skip
        ok = num_classes is None or (isinstance(num_classes, int) and not isinstance(num_classes, bool))
        if not ok or (num_classes is not None and num_classes < 2):
            raise ConfigError("data.num_classes", num_classes, "a whole number >= 2, or null to count the folders")
        self.root, self.configured_classes = Path(str(root)), num_classes
        self.root_given = root not in ("???", None)  # "???": OmegaConf's mark of a required value never given

    def _check_root(self, splits: tuple[str, ...] = SPLITS) -> None:
        if not self.root_given:  # checked on use, not at construction, so that `plan` can list a run without data
            raise ConfigError("data.root", None, f"required: an image folder, e.g. data.root=/data/imagenet ({LAYOUT})")
        check_layout(self.root, splits)

    @property
    def num_classes(self) -> int:
        """As configured, else the class folders of train/ (of val/ in a folder that has only val/, to evaluate)."""
        if self.configured_classes is not None:
            return self.configured_classes
        split = "train" if (self.root / "train").is_dir() or not (self.root / "val").is_dir() else "val"
        self._check_root((split,))
        return len(class_names(self.root / split))

    def split_sizes(self) -> tuple[int | None, int | None]:
        sizes = [len(load_index(self.root / split)) if (self.root / split).is_dir() else None for split in SPLITS]
        return sizes[0], sizes[1]

    def setup(self, stage: str | None = None) -> None:
        """Both splits to train; only val/ to validate (evaluating a checkpoint needs no training images)."""
        splits = ("val",) if stage == "validate" else SPLITS
        if self.val is not None and (self.train is not None or splits == ("val",)):
            return
        self._check_root(splits)
        self.val = self.dataset("val")
        datasets = {"val": self.val}
        if "train" in splits:
            self.train = datasets["train"] = self.dataset("train")
        for split, dataset in datasets.items():
            if not len(dataset):
                raise _layout_error(self.root, f"{split}/ has class folders but no images "
                                    f"({', '.join(sorted(IMAGE_SUFFIXES))})")  # fmt: skip
        split = splits[0]
        if len(datasets[split].classes) != self.num_classes:
            raise ConfigError(
                "data.num_classes", self.num_classes,
                f"the {len(datasets[split].classes)} class folders of {self.root / split} (or null to count them)",
            )  # fmt: skip

    def dataset(self, split: str) -> ImageDataset:
        """The `split` ("train": with the training transform, else the eval one) of the folder."""
        if split == "train":
            return ImageFolderDataset(self.root / split, self.image_size, True, self.crop_pct, self.rand_augment,
                                      self.shuffle_seed)  # fmt: skip
        return ImageFolderDataset(self.root / split, self.image_size, False, self.crop_pct)

    def sample_path(self, split: str, index: int) -> str:
        return (self.train if split == "train" else self.val).describe(index)
