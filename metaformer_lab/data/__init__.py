"""Datasets: the embedded generated shapes task and image folders, each a LightningDataModule in `DATASETS`."""

from metaformer_lab.data import imagefolder  # noqa: F401  (registers `imagenet`)
from metaformer_lab.data.datamodules import DATASETS, ImageDataModule, ShapesDataModule
from metaformer_lab.data.shapes import CLASS_NAMES, ShapesDataset, generate_shapes, measure_throughput

__all__ = [
    "CLASS_NAMES", "DATASETS", "ImageDataModule", "ShapesDataModule", "ShapesDataset", "generate_shapes",
    "measure_throughput",
]  # fmt: skip
