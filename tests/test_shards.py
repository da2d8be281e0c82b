"""`data=shards`: an image folder converted into webdataset tar shards reads as the folder does (the same images,
labels and order, each rank its share of an epoch, an exact mid-epoch resume), and its conversion resumes, refuses
what it must not overwrite and records --max-side in every run's protocol."""

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import webdataset
from conftest import ROOT, compose_config, only_record, run_cli
from PIL import Image

from metaformer_lab.analysis.collect import collect_runs, protocol_label
from metaformer_lab.config import build_datamodule
from metaformer_lab.data.datamodules import EpochSampler
from metaformer_lab.data.imagefolder import ImageFolderDataset
from metaformer_lab.data.jpeg_folder import write_jpeg_folder
from metaformer_lab.data.shards import ShardDataset, check_shards, conversion, convert, main, open_split
from metaformer_lab.registry import ConfigError

CHUNK = ["--chunk-images", "8"]  # train: 31 images in 4 chunks, val: 11 in 2


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """10 classes, 3 training and 1 validation JPEG each, plus one unreadable .JPEG per split."""
    return write_jpeg_folder(tmp_path_factory.mktemp("jpeg"), train_per_class=3, val_per_class=1, corrupt=1)


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory):
    dest = tmp_path_factory.mktemp("shards") / "dest"
    assert main([str(folder), str(dest), *CHUNK, "--processes", "1"]) == 0
    return dest


def _files(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def _without_times(manifest: bytes) -> dict:
    content = json.loads(manifest)
    content.pop("completed_at")
    return content


def test_shards_hold_the_folder_s_files_labels_and_order(folder, shards):
    manifest = check_shards(shards)
    assert manifest["complete"] and manifest["max_side"] is None and manifest["unreadable"] == {"train": 1, "val": 1}
    assert [len(manifest["chunks"][split]) for split in ("train", "val")] == [4, 2]
    assert not list(shards.rglob("*.json"))[1:]  # the chunk records went when it completed: the manifest alone
    for split, train in (("train", True), ("val", False)):
        source = ImageFolderDataset(folder / split, 32, train, 0.9)
        stored = open_split(shards, split, 32, train)
        assert len(stored) == len(source) and stored.classes == source.classes
        counts = np.bincount([stored.label(i) for i in range(len(stored))]).tolist()
        assert counts == manifest["splits"][split]["per_class"] == np.bincount(source.images.labels).tolist()
        for i in range(len(source)):
            assert stored.read_bytes(i) == source.path(i).read_bytes() and stored.label(i) == source.label(i)
        # webdataset's own reader reads them as shards of its format: the same keys, bytes and labels in order
        tars = [str(shards / split / chunk["file"]) for chunk in manifest["chunks"][split]]
        samples = list(webdataset.WebDataset(tars, shardshuffle=False, empty_check=False))
        assert [int(s["__key__"]) for s in samples] == list(range(len(source)))
        assert [int(s["cls"]) for s in samples] == [source.label(i) for i in range(len(source))]
        assert [s["jpeg"] for s in samples] == [source.path(i).read_bytes() for i in range(len(source))]
    cut, source_cut = open_split(shards, "train", 32, True), ImageFolderDataset(folder / "train", 32, True, 0.9)
    cut.augment_on_device = source_cut.augment_on_device = True  # the device path: crops cut in the loader
    assert all(np.array_equal(cut[(i, 1)][0].pixels, source_cut[(i, 1)][0].pixels) for i in range(0, 31, 5))
    corrupt = next(i for i in range(len(stored)) if "corrupt" in stored.describe(i))
    assert stored[corrupt][1] == -1 - corrupt  # unreadable: marked, as on the folder
    assert stored.describe(corrupt) == f"{shards}/val/val-000000.tar:{source.images.relative_path(corrupt)}"


def _epoch(datamodule, epoch: int) -> list[tuple[str, int]]:
    """(sha256 of the image tensor, label) of every sample of the training loader's epoch, in order."""
    loader = datamodule.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return [(hashlib.sha256(image.numpy().tobytes()).hexdigest(), int(label))
            for images, labels in loader for image, label in zip(images, labels, strict=True)]  # fmt: skip


def _datamodule(name: str, root: Path, *overrides: str):
    cfg = compose_config(f"data={name}", f"data.root={root}", "data.image_size=32", "data.batch_size=4", "seed=3",
                         "data.rand_augment=rand-m9-mstd0.5-inc1", *overrides)  # fmt: skip
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")
    return datamodule


def test_an_epoch_of_shards_is_the_folder_s_epoch_in_loader_processes_too(folder, shards):
    on_folder = _epoch(_datamodule("imagefolder", folder, "data.num_workers=0"), epoch=2)
    on_shards = _epoch(_datamodule("shards", shards, "data.num_workers=2"), epoch=2)  # files opened per process
    assert on_shards == on_folder and len(on_folder) == 28  # same crops of the same images in the same order
    assert sorted(on_shards) == sorted(on_folder)


def test_a_mid_epoch_resume_goes_on_with_the_images_the_epoch_had_left(shards):
    straight = _epoch(_datamodule("shards", shards, "data.num_workers=0"), epoch=1)
    resumed = _datamodule("shards", shards, "data.num_workers=0")
    resumed.load_state_dict({"epoch": 1, "batches_done": 3, "world_size": 1})  # as a mid-epoch checkpoint holds
    assert _epoch(resumed, epoch=1) == straight[3 * 4 :]
    assert _epoch(resumed, epoch=2) != _epoch(resumed, epoch=1)  # the next epoch whole, in its own order


def _rank_share(rank: int, world: int, port: int, shards: str, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    dataset = ShardDataset(Path(shards) / "train", 32, True, 0.9)
    sampler = EpochSampler(dataset, world, rank, shuffle=True, seed=0, drop_last=True)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(dataset, 4, sampler=sampler, num_workers=1)
        labels = [int(label) for _, batch in loader for label in batch]
        seen = [(index, hashlib.sha256(dataset.read_bytes(index)).hexdigest()) for index, _ in sampler]
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, (seen, labels))
        if rank == 0:
            results[epoch] = gathered
    torch.distributed.destroy_process_group()


def test_two_ranks_each_read_their_share_of_every_epoch(folder, shards):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_rank_share, args=(2, port, str(shards), results), nprocs=2)
    source = ImageFolderDataset(folder / "train", 32, True, 0.9)
    for epoch in (0, 1):
        shares = [seen for seen, _ in results[epoch]]
        indices = [index for share in shares for index, _ in share]
        assert [len(share) for share in shares] == [15, 15] and len(set(indices)) == 30  # each once; 1 of 31 left
        for share, (_, labels) in zip(shares, results[epoch], strict=True):
            assert labels == [-1 - i if "corrupt" in source.describe(i) else source.label(i) for i, _ in share]
            assert all(digest == hashlib.sha256(source.path(i).read_bytes()).hexdigest() for i, digest in share)
    assert results[0][0][0] != results[1][0][0]  # shuffled again each epoch


def test_an_interrupted_conversion_continues_and_ends_as_an_uninterrupted_one(folder, tmp_path, monkeypatch, capsys):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert main([str(folder), str(straight), *CHUNK, "--processes", "1"]) == 0
    calls = []

    def ctrl_c_in_the_third_chunk(path, max_side, quality):
        calls.append(path)
        if len(calls) == 20:
            raise KeyboardInterrupt
        return stored_bytes(path, max_side, quality)

    stored_bytes = conversion.stored_bytes
    with monkeypatch.context() as patch:
        patch.setattr(conversion, "stored_bytes", ctrl_c_in_the_third_chunk)
        assert main([str(folder), str(interrupted), *CHUNK, "--processes", "1"]) == 130
    assert "run the same command again to continue" in capsys.readouterr().err
    assert sorted(p.name for p in (interrupted / "train").iterdir()) == [
        "train-000000.tar", "train-000000.tar.json", "train-000001.tar", "train-000001.tar.json",
    ]  # fmt: skip
    (interrupted / "train" / ".train-000002.tar.4242.tmp").write_bytes(b"half a chunk")  # as a kill leaves it
    with pytest.raises(ConfigError, match="has not finished"):
        check_shards(interrupted)
    done = {p.name: p.stat().st_mtime_ns for p in (interrupted / "train").glob("*.tar")}
    assert main([str(folder), str(interrupted), *CHUNK, "--processes", "2"]) == 0  # any number of processes
    out = capsys.readouterr().out
    assert "continuing: 2 chunks already done" in out and "4/6 chunks" in out and "6/6 chunks" in out
    assert "train-000000.tar:" not in out  # not written again
    assert all((interrupted / "train" / name).stat().st_mtime_ns == mtime for name, mtime in done.items())
    a, b = _files(straight), _files(interrupted)
    assert a.keys() == b.keys() and all(a[name] == b[name] for name in a if name != "manifest.json")
    assert _without_times(a["manifest.json"]) == _without_times(b["manifest.json"])


def test_a_conversion_refuses_another_dataset_or_a_foreign_folder_in_one_line(folder, shards, tmp_path, capsys):
    manifest = (shards / "manifest.json").read_bytes()
    smaller = write_jpeg_folder(tmp_path / "smaller", train_per_class=2, val_per_class=1)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    cases = [
        ([str(folder), str(shards), "--max-side", "64", *CHUNK], "max side none there, 64 here"),
        ([str(smaller), str(shards), *CHUNK], "train: 31 images there, 20 here"),
        ([str(folder), str(shards), "--chunk-images", "16"], "chunk images 8 there, 16 here"),
        ([str(folder), str(foreign)], "is not empty and holds no shards manifest"),
        ([str(tmp_path / "nowhere"), str(tmp_path / "new")], "no such folder; expected the ImageNet layout"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert (shards / "manifest.json").read_bytes() == manifest and [p.name for p in foreign.iterdir()] == ["notes.txt"]
    assert not (tmp_path / "new").exists()
    assert main([str(folder), str(shards), *CHUNK]) == 0  # the same conversion again: nothing to do
    assert "already complete" in capsys.readouterr().out


def test_a_data_root_that_is_not_a_complete_shards_folder_is_a_config_error(folder, shards, tmp_path):
    truncated = tmp_path / "truncated"
    convert(folder, truncated, conversion.Settings(None, None, 8), processes=1)
    with open(truncated / "val" / "val-000001.tar", "r+b") as tar:
        tar.truncate(1000)
    for root, message in ((folder, "no shards manifest"), (tmp_path / "none", "no such folder"),
                          (truncated, "val/val-000001.tar is 1,000 bytes, the manifest says")):  # fmt: skip
        with pytest.raises(ConfigError, match=message) as error:
            build_datamodule(compose_config("data=shards", f"data.root={root}")).setup("fit")
        assert error.value.key == "data.root"
    with pytest.raises(ConfigError, match="required: a shards folder made by"):
        build_datamodule(compose_config("data=shards")).setup("fit")
    assert build_datamodule(compose_config("data=shards", f"data.root={shards}")).split_sizes() == (31, 11)


def test_max_side_shards_train_end_to_end_and_their_runs_say_so(folder, tmp_path):
    dest = tmp_path / "small"
    converted = subprocess.run([sys.executable, "-m", "metaformer_lab.data.shards", str(folder), str(dest),
                                "--max-side", "64", "--chunk-images", "16", "--processes", "2"],
                               capture_output=True, text=True, cwd=ROOT, timeout=120)  # fmt: skip
    assert converted.returncode == 0, converted.stderr[-2000:]
    assert "3/3 chunks, 42/42 images (100.0%)" in converted.stdout
    assert "40 re-encoded to max side 64" in converted.stdout
    manifest = check_shards(dest)
    assert (manifest["max_side"], manifest["quality"], manifest["reencoded"]) == (64, 90, {"train": 30, "val": 10})
    cut = open_split(dest, "val", 32, train=False)
    with Image.open(io.BytesIO(cut.read_bytes(0))) as image:
        assert max(image.size) == 64 and image.format == "JPEG"
    run = ["data=shards", f"data.root={dest}", "data.image_size=32", "data.batch_size=10", "optim.global_batch=10",
           "data.num_workers=0", "model.depths=[1,1,1,1]", "model.dims=[16,16,32,32]", "optim.epochs=1", "logger=csv",
           "trainer=cpu"]  # fmt: skip
    result = run_cli(*run, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    record = only_record(tmp_path / "runs")
    assert record.status == "completed" and record.max_side == 64 and record.train_images == 31
    assert record.unreadable_images == {"train": 1, "val": 1}
    assert [p.split("/")[-1] for p in record.unreadable_paths] == ["train_corrupt_000.JPEG", "val_corrupt_000.JPEG"]
    assert collect_runs(tmp_path / "runs")["protocol"].tolist() == ["shards 32 px, max side 64, 31 img, small, 1 ep"]
    assert protocol_label({"data": "shards", "image_size": 32, "max_side": None, "model": "small"}) == \
        "shards 32 px, small"  # fmt: skip
