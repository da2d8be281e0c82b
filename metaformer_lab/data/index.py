"""The index of one split of an image folder (which images, which labels), held as a few arrays, listed once per node.

At ImageNet scale a Python object per image (1.28 M `Path`s) costs every loader process its own copy: after fork,
reading an object writes its reference count, so each page of them is copied in each process that reads it. Here
the relative paths are one bytes buffer with offsets and the labels an integer array: no object per image, and a
process that reads them writes nothing.

The first process of a node to need the index of a split lists it and writes the arrays to a cache file
(`cache_dir()`, one file per split) under a file lock; the node's other processes (ranks) wait for the lock, then
map the same file read-only, so that they all share one copy of its pages. The file is listed again when the
folder's fingerprint (`fingerprint`) changes.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import math
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png", ".bmp", ".webp"})
CACHE_FORMAT = 1  # part of the fingerprint: change it when the cache file's layout or the listing rules change


@dataclass(frozen=True, eq=False)
class ImageIndex:
    """The images of one split: image i is `names[offsets[i]:offsets[i + 1]]`, "<class>/<file>" relative to the
    split's folder (the file system's bytes), and its label `labels[i]`, the place of its class in `classes`."""

    classes: list[str]  # the class folders' names, sorted
    names: np.ndarray  # uint8
    offsets: np.ndarray  # int64, len(self) + 1 of them
    labels: np.ndarray  # int32

    def __len__(self) -> int:
        return len(self.labels)

    def relative_path(self, index: int) -> str:
        return os.fsdecode(self.names[self.offsets[index] : self.offsets[index + 1]].tobytes())

    @classmethod
    def from_files(cls, classes: list[str], files: Iterable[list[str]]) -> ImageIndex:
        """From each class's file names, in the order of `classes` (one class's strings at a time in memory)."""
        buffers, lengths, labels = [], [np.zeros(1, np.int64)], [np.zeros(0, np.int32)]
        for label, (name, class_files) in enumerate(zip(classes, files, strict=True)):
            paths = [os.fsencode(f"{name}/{file}") for file in class_files]
            buffers.append(b"".join(paths))
            lengths.append(np.fromiter(map(len, paths), np.int64, len(paths)))
            labels.append(np.full(len(paths), label, np.int32))
        names = np.frombuffer(b"".join(buffers), np.uint8)
        return cls(classes, names, np.cumsum(np.concatenate(lengths)), np.concatenate(labels))


def class_names(split_dir: Path) -> list[str]:
    """The class folders of one split, sorted (the label of a class is its place here)."""
    with os.scandir(split_dir) as entries:
        return sorted(entry.name for entry in entries if entry.is_dir())


def list_images(split_dir: Path, classes: list[str]) -> ImageIndex:
    """List each class folder: its files with an image suffix, sorted by name."""

    def images(name: str) -> list[str]:
        with os.scandir(split_dir / name) as entries:
            return sorted(e.name for e in entries if os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES)

    return ImageIndex.from_files(classes, map(images, classes))


def fingerprint(split_dir: Path, classes: list[str]) -> bytes:
    """What a cached index is valid for: the listing rules, the split folder's and each class folder's mtime, the
    class names. Adding, removing or renaming an image changes its class folder's mtime; a file replaced in place
    changes none, and needs none (the index holds names). Missed: a change after which a folder's mtime was set
    back (`touch -d`, a copy that keeps an older source's times), and, where the file system's clock is coarse (1 s
    on some network file systems), a change made while the folder was listed, in the same tick as the one before."""
    stamps = [f"{name}\t{os.stat(split_dir / name).st_mtime_ns}" for name in classes]
    rules = f"{CACHE_FORMAT} {sorted(IMAGE_SUFFIXES)} {split_dir.stat().st_mtime_ns}"
    return hashlib.sha256(os.fsencode("\n".join([rules, *stamps]))).digest()


def cache_dir() -> Path:
    """Where indexes are cached: this user's folder in this node's temporary folder ($TMPDIR, else /tmp)."""
    return Path(tempfile.gettempdir()) / f"metaformer_lab-index-{os.getuid()}"


def load_index(split_dir: Path, cache: Path | None = None) -> ImageIndex:
    """The index of a split: mapped from the cache file in `cache` (default `cache_dir()`) when it is current, else
    listed and cached first. Where the cache cannot be used, listed in memory (still arrays), said in one line."""
    classes = class_names(split_dir)
    stamp = fingerprint(split_dir, classes)
    try:
        file = _cache_file(split_dir, cache or cache_dir())
        lock = _locked(file.with_suffix(".lock"))
    except OSError as error:
        log.warning("image index: cache not usable (%s); listing %s in memory", error, split_dir)
        return list_images(split_dir, classes)
    with lock:  # the node's other processes wait here while the first lists
        cached = read_index(file, stamp, classes)
        if cached is not None:
            return cached
        listed = list_images(split_dir, classes)
        try:
            write_index(file, stamp, listed)
        except OSError as error:
            log.warning("image index: cannot write %s (%s); listed %s in memory", file, error, split_dir)
            return listed
        mapped = read_index(file, stamp, classes)  # the pages the node's other processes will map too
    return mapped if mapped is not None else listed


def _cache_file(split_dir: Path, cache: Path) -> Path:
    """The cache file of a split, named after its resolved path; its folder made, and refused unless it is ours
    alone (in a shared /tmp another user could have made it)."""
    cache.mkdir(mode=0o700, parents=True, exist_ok=True)
    owner = cache.stat()
    if owner.st_uid != os.getuid() or owner.st_mode & 0o022:
        raise PermissionError(f"{cache} is not this user's alone")
    resolved = split_dir.resolve()
    return cache / f"{hashlib.sha256(os.fsencode(resolved)).hexdigest()[:16]}-{resolved.name}.index"


def _locked(path: Path) -> IO[bytes]:
    """`path` opened with an exclusive lock, released when it is closed (or its process ends)."""
    file = open(path, "a+b")  # the caller closes it
    try:
        fcntl.flock(file, fcntl.LOCK_EX)
    except OSError:
        file.close()
        raise
    return file


def write_index(file: Path, stamp: bytes, index: ImageIndex) -> None:
    """The fingerprint and the arrays in `file`, one .npy record after another, written whole or not at all."""
    temporary = file.with_name(f"{file.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as out:
            for array in (np.frombuffer(stamp, np.uint8), index.names, index.offsets, index.labels):
                np.lib.format.write_array(out, array, allow_pickle=False)
        os.replace(temporary, file)
    finally:
        temporary.unlink(missing_ok=True)


def read_index(file: Path, stamp: bytes, classes: list[str]) -> ImageIndex | None:
    """The index cached in `file`, mapped read-only, if it was made for `stamp`; None if missing, stale or damaged."""
    try:
        stored, names, offsets, labels = _map_arrays(file, 4)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:  # written by rename, so only damaged from outside: list again
        log.warning("image index: %s unreadable (%s); listing again", file, error)
        return None
    if stored.tobytes() != stamp or len(offsets) != len(labels) + 1:
        return None
    return ImageIndex(classes, names, offsets, labels)


def _map_arrays(file: Path, count: int) -> list[np.ndarray]:
    """The `count` arrays that `np.lib.format.write_array` wrote one after another in `file`, mapped read-only."""
    arrays = []
    with open(file, "rb") as records:
        for _ in range(count):
            if (version := np.lib.format.read_magic(records)) != (1, 0):
                raise ValueError(f".npy format {version}, expected (1, 0)")
            shape, _, dtype = np.lib.format.read_array_header_1_0(records)
            start, size = records.tell(), math.prod(shape) * dtype.itemsize
            # a plain ndarray view of the map (slices of an np.memmap are slower); np.memmap cannot map 0 bytes
            mapped = np.memmap(file, dtype, "r", start, shape).view(np.ndarray) if size else np.zeros(shape, dtype)
            arrays.append(mapped)
            records.seek(start + size)
    return arrays
