"""Datasets: the embedded generated shapes task, image folders and IDX files (MNIST format), each a
LightningDataModule in `DATASETS`."""

from metaformer_lab.data import idx, imagefolder, shards  # noqa: F401  (register idx, imagefolder, imagenet, shards)
from metaformer_lab.data.datamodules import DATASETS, ImageDataModule, ShapesDataModule
from metaformer_lab.data.shapes import CLASS_NAMES, ShapesDataset, generate_shapes, measure_throughput

__all__ = [
    "CLASS_NAMES", "DATASETS", "ImageDataModule", "ShapesDataModule", "ShapesDataset", "generate_shapes",
    "measure_throughput",
]  # fmt: skip
