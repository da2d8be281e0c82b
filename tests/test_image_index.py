"""The index of an image folder's split: arrays, listed once per node (a cache file under a lock, mapped by every
process), listed again when the folder changes, and cheap for forked loader processes."""

import logging
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from metaformer_lab.bench.loader import index_memory
from metaformer_lab.data import index as image_index
from metaformer_lab.data.imagefolder import ImageFolderDataset
from metaformer_lab.data.jpeg_folder import class_folder, write_jpeg_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """10 classes, 2 training and 1 validation JPEG each, plus one unreadable .JPEG per split."""
    return write_jpeg_folder(tmp_path_factory.mktemp("jpeg"), train_per_class=2, val_per_class=1, corrupt=1)


@pytest.fixture(autouse=True)
def temporary_folder(tmp_path, monkeypatch):
    """This test's own temporary folder, where the index cache goes (`index.cache_dir`)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def count_listings(monkeypatch) -> list[str]:
    """The folders listed from now on (os.scandir; os.listdir, which Path.iterdir uses before Python 3.12)."""
    listed = []

    def counting(original):
        def listing(path="."):
            listed.append(os.fspath(path))
            return original(path)

        return listing

    for name in ("scandir", "listdir"):
        monkeypatch.setattr(os, name, counting(getattr(os, name)))
    return listed


def dataset(split_dir: Path) -> ImageFolderDataset:
    return ImageFolderDataset(split_dir, 32, train=False, crop_pct=0.9)


def test_the_index_is_arrays_mapped_from_the_cache_and_gives_every_image_with_its_label(folder):
    val = dataset(folder / "val")
    images = val.images
    assert images.names.dtype == np.uint8 and images.offsets.dtype == np.int64 and images.labels.dtype == np.int32
    assert isinstance(images.names.base, np.memmap) and isinstance(images.labels.base, np.memmap)
    expected = sorted(path for path in (folder / "val").rglob("*") if path.is_file())
    assert [val.path(i) for i in range(len(val))] == expected and len(val) == 11
    assert val.classes == [class_folder(label) for label in range(10)]
    assert [val.classes[label] for label in images.labels] == [path.parent.name for path in expected]


def test_a_second_dataset_of_the_same_folder_reads_the_cache_instead_of_listing(folder, monkeypatch):
    listed = count_listings(monkeypatch)
    first = dataset(folder / "train")
    class_folders = {str(folder / "train" / name) for name in first.classes}
    assert class_folders <= set(listed)
    listed.clear()
    second = dataset(folder / "train")
    assert not class_folders & set(listed)  # the split's own folder is still read: the fingerprint's class names
    assert [second.path(i) for i in range(len(second))] == [first.path(i) for i in range(len(first))]


def test_a_change_in_the_folder_lists_it_again(folder, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(folder, root)
    val = root / "val"
    an_hour_ago = time.time_ns() - 3600 * 10**9  # the changes below get another mtime, whatever the clock's tick
    for class_dir in val.iterdir():
        os.utime(class_dir, ns=(an_hour_ago, an_hour_ago))
    before = dataset(val)
    added = val / class_folder(3) / "val_added.JPEG"
    shutil.copy(val / class_folder(3) / "val_00000.JPEG", added)
    after = dataset(val)
    assert len(after) == len(before) + 1
    new = [after.path(i) for i in range(len(after))].index(added)
    assert after.images.labels[new] == 3
    (val / class_folder(5) / "val_00000.JPEG").unlink()
    assert len(dataset(val)) == len(before)


def test_a_damaged_cache_file_is_listed_again(folder, temporary_folder, caplog):
    first = dataset(folder / "val")
    [cache_file] = (temporary_folder / f"metaformer_lab-index-{os.getuid()}").glob("*.index")
    cache_file.write_bytes(cache_file.read_bytes()[:-20])
    with caplog.at_level(logging.WARNING):
        again = dataset(folder / "val")
    assert "unreadable" in caplog.text and len(again) == len(first)
    assert [again.path(i) for i in range(len(again))] == [first.path(i) for i in range(len(first))]


def test_an_unusable_cache_folder_leaves_the_index_in_memory_and_says_so(folder, temporary_folder, caplog):
    (temporary_folder / "not_a_folder").touch()
    tempfile.tempdir = str(temporary_folder / "not_a_folder")  # the cache folder cannot be made in it
    with caplog.at_level(logging.WARNING):
        val = dataset(folder / "val")
    assert len(val) == 11 and val.images.names.dtype == np.uint8 and not isinstance(val.images.names.base, np.memmap)
    [message] = [record.message for record in caplog.records if record.name == image_index.__name__]
    assert message.startswith("image index: cache not usable (") and "Not a directory" in message
    assert message.endswith(f"listing {folder / 'val'} in memory")


def _load_together(split_dir: Path, cache: Path, barrier, lengths) -> None:
    barrier.wait()
    lengths.put(len(image_index.load_index(split_dir, cache)))


def test_processes_that_need_the_index_together_list_the_folder_once(folder, tmp_path, monkeypatch):
    listings, original = tmp_path / "listings", image_index.list_images

    def slow_listing(split_dir: Path, classes: list[str]) -> image_index.ImageIndex:
        with open(listings, "a") as log:
            log.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # the other process asks meanwhile
        return original(split_dir, classes)

    monkeypatch.setattr(image_index, "list_images", slow_listing)
    context = multiprocessing.get_context("fork")
    barrier, lengths = context.Barrier(2), context.Queue()
    processes = [context.Process(target=_load_together, args=(folder / "train", tmp_path / "cache", barrier, lengths))
                 for _ in range(2)]  # fmt: skip
    for process in processes:
        process.start()
    assert [lengths.get(timeout=60) for _ in processes] == [21, 21]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    assert len(listings.read_text().splitlines()) == 1


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="reads /proc/self/smaps_rollup (Linux)")
def test_forked_loader_processes_copy_a_list_of_paths_but_not_the_arrays():
    report = index_memory(100_000, workers=2)

    def private_added(name: str) -> float:
        return statistics.mean(process["private_added"] for process in report["representations"][name]["processes"])

    baseline = private_added("no index (baseline)")  # what making Path objects costs any process
    listed = private_added("list of (Path, label)") - baseline
    assert listed > 20 * 2**20  # about 400 bytes per image, each process its own copy
    for arrays in ("arrays, mapped from the cache file", "arrays, in memory"):
        assert private_added(arrays) - baseline < listed / 5
