"""A generated image folder in the ImageNet layout: the shapes task as JPEGs of ImageNet-like sizes.

For trying `data=imagefolder` without ImageNet, for the loader benchmark and for tests: `<root>/train/<class>/*.JPEG`
and `<root>/val/<class>/*.JPEG`, sizes around ImageNet's typical 500x375 (landscape and portrait), JPEG quality 90.
`corrupt` files per split are written as unreadable bytes under a .JPEG name, as real folders sometimes hold.

    python -m metaformer_lab.data.jpeg_folder /tmp/shapes_jpeg --train-per-class 50 --val-per-class 10 --corrupt 1
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
from PIL import Image

from metaformer_lab.data.shapes import CLASS_NAMES, generate_shapes

GENERATED_SIZE = 128  # the shapes are drawn at this size, then resized to each image's own size
SIDES = (375, 500)  # ImageNet's most common size, 500x375; each image is within +-20% of it


def class_folder(label: int) -> str:
    """`03_disc_below_the_square_1_column_to_the_left`: sortable, so folder order is label order."""
    slug = "".join(c if c.isalnum() else "_" for c in CLASS_NAMES[label]).replace("__", "_").strip("_")
    return f"{label:02d}_{slug}"


def write_jpeg_folder(
    root: str | Path,
    train_per_class: int = 20,
    val_per_class: int = 5,
    corrupt: int = 0,
    seed: int = 0,
    quality: int = 90,
) -> Path:
    """Write the folder (replacing nothing: existing files of the same names are overwritten) and return its root.

    Images are determined by the arguments. The `corrupt` unreadable files of each split go in the first classes.
    """
    root = Path(root)
    rng = random.Random(seed)
    for split, per_class, split_seed in (("train", train_per_class, seed), ("val", val_per_class, seed + 1)):
        count = per_class * len(CLASS_NAMES)
        images, labels = generate_shapes(count * 2, GENERATED_SIZE, split_seed, max_distractors=3, noise=48)
        written = [0] * len(CLASS_NAMES)
        for image, label in zip(images, labels.tolist(), strict=True):
            if written[label] == per_class:
                continue  # classes are balanced per chunk, not per prefix: take the first per_class of each
            folder = root / split / class_folder(label)
            folder.mkdir(parents=True, exist_ok=True)
            short, long = (round(side * rng.uniform(0.8, 1.2)) for side in SIDES)
            size = (long, short) if rng.random() < 0.75 else (short, long)  # most photos are landscape
            picture = Image.fromarray(image.permute(1, 2, 0).numpy()).resize(size, Image.Resampling.BILINEAR)
            picture.save(folder / f"{split}_{written[label]:05d}.JPEG", quality=quality)
            written[label] += 1
        if min(written) < per_class:
            raise RuntimeError(f"{split}: too few images of some class ({written}); raise the oversampling")
        for index in range(corrupt):
            path = root / split / class_folder(index % len(CLASS_NAMES)) / f"{split}_corrupt_{index:03d}.JPEG"
            path.write_bytes(np.random.default_rng(seed + index).bytes(2048))  # no image header: unreadable
    return root


def write_idx_as_jpeg_folder(
    idx_root: str | Path, root: str | Path, train_per_class: int, val_per_class: int, quality: int = 90
) -> Path:
    """An MNIST-format data set (data/idx.py: e.g. Fashion-MNIST) as a folder in the ImageNet layout: the first
    `*_per_class` images of each class of its train and t10k splits, greyscale JPEGs at their own size. Real
    photographs whose labels a horizontal flip keeps, unlike the generated shapes' left/right relations: for
    checks that need the paper's augmentation to leave something to learn (the augment_on parity sweep)."""
    from metaformer_lab.data.idx import read_split  # only this writer reads IDX files

    root = Path(root)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        images, labels = read_split(Path(idx_root), split, num_classes=256)
        classes = sorted(set(labels.tolist()))
        for label in classes:
            folder = root / split / f"{label:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            chosen = np.flatnonzero(labels == label)[:per_class]
            if len(chosen) < per_class:
                raise RuntimeError(f"{split}: class {label} has {len(chosen)} images, fewer than {per_class}")
            for number, index in enumerate(chosen):
                Image.fromarray(images[index]).save(folder / f"{split}_{number:05d}.JPEG", quality=quality)
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m metaformer_lab.data.jpeg_folder", description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("root", help="folder to write (train/ and val/ go inside)")
    parser.add_argument("--train-per-class", type=int, default=20)
    parser.add_argument("--val-per-class", type=int, default=5)
    parser.add_argument("--corrupt", type=int, default=0, help="unreadable .JPEG files per split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--from-idx", metavar="FOLDER", help="write an MNIST-format data set's images (its four "
                        "IDX files in FOLDER, e.g. /usr/share/datasets/fashion-mnist), not generated shapes")
    args = parser.parse_args(argv)
    if args.from_idx is not None:
        if args.corrupt:
            parser.error("--corrupt applies to the generated shapes")
        root = write_idx_as_jpeg_folder(args.from_idx, args.root, args.train_per_class, args.val_per_class)
        classes = len(list((root / "train").iterdir()))
    else:
        root = write_jpeg_folder(args.root, args.train_per_class, args.val_per_class, args.corrupt, args.seed)
        classes = len(CLASS_NAMES)
    total = (args.train_per_class + args.val_per_class) * classes
    print(f"{root}: {total} JPEGs in {classes} classes, {args.corrupt} unreadable per split; "
          f"train with: python run.py data=imagefolder data.root={root}")  # fmt: skip


if __name__ == "__main__":
    main()
