"""Real images from a folder in the ImageNet layout: `<root>/train/<class>/*.JPEG`, `<root>/val/<class>/*`.

Decoded with Pillow in loader workers (torchvision cannot be installed next to CPU torch). Train: random resized
crop (scale 0.08-1, ratio 3/4-4/3, bilinear or bicubic at random) and horizontal flip, as the official recipe;
eval: bicubic resize of the short side to image_size / crop_pct, then a center crop.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from metaformer_lab.data.datamodules import DATASETS, ImageDataModule
from metaformer_lab.registry import ConfigError

SPLITS = ("train", "val")
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".webp"}


def find_images(split_dir: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """(path, label) pairs and the class names (sorted sub-folder names) of one split."""
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    samples = [
        (path, label)
        for label, name in enumerate(classes)
        for path in sorted((split_dir / name).iterdir())
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]
    return samples, classes


def random_resized_crop(image: Image.Image, size: int, rng: random.Random) -> Image.Image:
    """timm/torchvision RandomResizedCrop: 10 tries at a random area and aspect ratio, else a center crop."""
    width, height = image.size
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            x, y = rng.randint(0, width - w), rng.randint(0, height - h)
            break
    else:
        w = h = min(width, height)
        x, y = (width - w) // 2, (height - h) // 2
    interpolation = rng.choice((Image.Resampling.BILINEAR, Image.Resampling.BICUBIC))
    return image.resize((size, size), interpolation, box=(x, y, x + w, y + h))


def center_crop(image: Image.Image, size: int, crop_pct: float) -> Image.Image:
    scale = size / crop_pct / min(image.size)
    width, height = round(image.width * scale), round(image.height * scale)
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    x, y = (width - size) // 2, (height - size) // 2
    return image.crop((x, y, x + size, y + size))


class ImageFolderDataset(Dataset):
    def __init__(self, split_dir: Path, image_size: int, train: bool, crop_pct: float) -> None:
        self.samples, self.classes = find_images(split_dir)
        self.image_size, self.train, self.crop_pct = image_size, train, crop_pct

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        with Image.open(path) as file:
            image = file.convert("RGB")
        if self.train:
            rng = random.Random(torch.randint(2**62, ()).item())  # seeded per worker by Lightning
            image = random_resized_crop(image, self.image_size, rng)
            if rng.random() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            image = center_crop(image, self.image_size, self.crop_pct)
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1), label


@DATASETS.register("imagenet")
class ImageFolderDataModule(ImageDataModule):
    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)

    def __init__(
        self,
        root: str,
        image_size: int = 224,
        num_classes: int = 1000,
        crop_pct: float = 0.9,
        batch_size: int = 128,
        num_workers: int = 8,
        shuffle_seed: int = 0,
    ) -> None:
        super().__init__(image_size, batch_size, num_workers, shuffle_seed, crop_pct)
        self.root, self.num_classes = Path(root), num_classes
        self.root_given = root not in ("???", None)  # "???": OmegaConf's mark of a required value never given

    def split_sizes(self) -> tuple[int | None, int | None]:
        sizes = [len(find_images(self.root / split)[0]) if (self.root / split).is_dir() else None for split in SPLITS]
        return sizes[0], sizes[1]

    def setup(self, stage: str | None = None) -> None:
        if self.train is not None:
            return
        if not self.root_given:  # checked here, not at construction, so that `plan` can list a run without data
            raise ConfigError("data.root", None, "required: the image folder, e.g. data.root=/data/imagenet")
        for split in SPLITS:
            if not (self.root / split).is_dir():
                raise ConfigError("data.root", str(self.root), f"a folder with train/ and val/ inside (no {split}/)")
        self.train = ImageFolderDataset(self.root / "train", self.image_size, True, self.crop_pct)
        self.val = ImageFolderDataset(self.root / "val", self.image_size, False, self.crop_pct)
        if len(self.train.classes) != self.num_classes or self.val.classes != self.train.classes:
            raise ConfigError(
                "data.num_classes", self.num_classes,
                f"the class folders: {len(self.train.classes)} in train/, {len(self.val.classes)} in val/ (must match)",
            )  # fmt: skip
