"""`data=shards`: an image folder in the ImageNet layout converted once into a few hundred large tar files.

ImageNet on a cluster's shared file system is 1.28 M small files, which many clusters read slowly (every file is a
metadata operation on a shared server) and some forbid. A shards folder holds the same images in large files:

    python -m metaformer_lab.data.shards /data/imagenet /scratch/imagenet_shards    # once (resumable)
    python run.py data=shards data.root=/scratch/imagenet_shards ...

What DEST holds:
- `manifest.json`: what was converted and how (the classes, the images per class of each split, a digest of the
  file list, `max_side`), and whether the conversion is complete. Training refuses a DEST that is not.
- `<split>/<split>-NNNNNN.tar` (split: train, val): webdataset shards, `chunk_images` images each (the last one
  fewer). Image i of a split is the members `<i:08d>.<suffix>` (the source file's bytes, unchanged unless
  `--max-side`) and `<i:08d>.cls` (its label, as text), in the folder's order (classes sorted, files sorted:
  index.py): image i of the shards is image i of the folder, with the same label, so a run draws the same order and
  the same crops on either. Any webdataset reader reads them (`webdataset.WebDataset(...)`); `tar tvf` lists them.
- `<split>/index`: the folder's index of the split (index.py's arrays: file names, labels; mapped read-only and
  shared by a node's processes), and `<split>/positions.npy`: int64 [images, 2], where each image's bytes lie in its
  tar (offset, size), so that image i is one `pread` of a file that is already open: no file per image is opened,
  listed or stat'ed while training.

`--max-side N` re-encodes the images whose long side exceeds N (bicubic downscale to a long side of N, then JPEG at
`--quality`, 90 by default): smaller shards and faster decoding, but not the paper's pixels. The manifest records
it, the run record carries it (`max_side`) and the protocol label of such runs says it ("max side 256"), so that
their numbers are never taken for runs on the original images. Unreadable files are stored as they are: training
meets them, skips and counts them as it does on the folder; the conversion reports how many fail to decode.

Why webdataset, and why this reader (measured on a 2-core machine; the numbers are in the README, "Shards for
shared file systems"): litdata reads by index, but its wheel requires torchvision (whose registry wheel is a CUDA
build that breaks `import lightning` next to the CPU torch) and boto3/obstore (57 MB installed even without
torchvision); webdataset needs braceexpand, numpy and pyyaml (about 0.2 MB). webdataset's own reader streams
shards in sequence, which cannot give each rank its share of one shuffled order nor resume mid-epoch exactly; its
indexed reader (the `wids` package) copies each shard to
/tmp/_wids_cache unless told otherwise, and builds its index by reading every tar header when a process opens the
shards: all of the shards' bytes read, and 533 bytes of Python objects per image (about 650 MB per loader process
at ImageNet's size). So the shards are webdataset's format, written by its `TarWriter`, and read by index the way
wids' `TarFileReader` reads with its `.index` files (a stored offset, then one read), with the offsets kept as
arrays made at conversion (16 bytes an image, mapped and shared).

Reading and the data module: reader.py; converting: conversion.py.
"""

from metaformer_lab.data.shards.conversion import convert, main
from metaformer_lab.data.shards.reader import ShardDataset, ShardsDataModule, check_shards, is_shards, open_split

__all__ = ["ShardDataset", "ShardsDataModule", "check_shards", "convert", "is_shards", "main", "open_split"]
