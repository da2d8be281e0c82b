"""`data.augment_on`: where training images are resized and RandAugmented. The device path's loader work (decode,
crop box, flip, cut), its batches of ragged crops, the per-batch work on the device, and runs on both paths."""

import numpy as np
import pytest
import torch
from conftest import FOLDER_RUN, compose_config, run_cli
from PIL import Image

from metaformer_lab.config import build_datamodule, comparable_config
from metaformer_lab.data.datamodules import CropBatch, CropSample, augments_on_device, collate
from metaformer_lab.data.imagefolder import ImageFolderDataset
from metaformer_lab.data.jpeg_folder import write_jpeg_folder
from metaformer_lab.record import read_record
from metaformer_lab.registry import ConfigError


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_jpeg_folder(tmp_path_factory.mktemp("jpeg"), train_per_class=2, val_per_class=1, corrupt=1)


@pytest.mark.parametrize(
    ("choice", "device", "on_device"),
    [("auto", "cuda", True), ("auto", "cpu", False), ("auto", "mps", False), ("device", "cpu", True),
     ("loader", "cuda", False)],
)  # fmt: skip
def test_auto_augments_on_a_gpu_and_in_the_loader_on_a_cpu(choice, device, on_device):
    assert augments_on_device(choice, device) is on_device


def test_a_bad_choice_names_the_key_and_the_choices():
    with pytest.raises(ConfigError, match=r"data.augment_on='gpu': auto, device or loader"):
        build_datamodule(compose_config("data.augment_on=gpu"))


def test_the_device_path_cuts_the_box_the_loader_path_resizes(folder):
    # the same seed, epoch and image: the same box, interpolation and flip; the loader path's image is the cut crop
    # resized as the loader path resizes it (Pillow's resize commutes with the flip here: a symmetric kernel)
    loader = ImageFolderDataset(folder / "train", 48, train=True, crop_pct=0.9, seed=3)
    device = ImageFolderDataset(folder / "train", 48, train=True, crop_pct=0.9, seed=3, augment_on_device=True)
    for index in range(0, 20, 3):
        image, label = loader[(index, 2)]
        (crop, bicubic), same_label = device[(index, 2)]
        assert label == same_label and crop.dtype == np.uint8 and crop.shape[2] == 3  # [h, w, 3], as decoded
        interpolation = Image.Resampling.BICUBIC if bicubic else Image.Resampling.BILINEAR
        resized = Image.fromarray(np.ascontiguousarray(crop)).resize((48, 48), interpolation)
        assert np.array_equal(np.asarray(resized), image.permute(1, 2, 0).numpy())
    assert len({device[(i, 0)][0].pixels.shape for i in range(10)}) > 5  # ragged: each its own box


def test_unreadable_images_come_out_marked_on_the_device_path_and_are_dropped(folder):
    dataset = ImageFolderDataset(folder / "train", 32, train=True, crop_pct=0.9, augment_on_device=True)
    corrupt = next(i for i in range(len(dataset)) if "corrupt" in dataset.path(i).name)
    samples = [dataset[(i, 0)] for i in (0, corrupt, 1)]
    assert samples[1][1] == -1 - corrupt
    datamodule = build_datamodule(compose_config("data=imagefolder", f"data.root={folder}", "data.image_size=32"))
    datamodule.setup("fit")
    crops, labels = datamodule.on_before_batch_transfer(collate(samples), 0)
    assert labels.tolist() == [samples[0][1], samples[2][1]] and len(crops.bicubic) == 2
    for kept, sample in zip(crops.crops(), (samples[0], samples[2]), strict=True):
        assert np.array_equal(kept.permute(1, 2, 0).numpy(), sample[0].pixels)


def test_crop_batches_travel_as_one_buffer_and_split_into_views():
    rng = torch.Generator().manual_seed(0)
    crops = [torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=rng) for h, w in ((5, 7), (9, 4), (1, 1))]
    flipped = crops[1].numpy()[:, ::-1]  # as the loader flips: a view, copied once by the collate
    batch, labels = collate([(CropSample(c.numpy() if i != 1 else flipped, i == 1), i) for i, c in enumerate(crops)])
    crops[1] = crops[1].flip(1)
    assert isinstance(batch, CropBatch) and batch.pixels.numel() == sum(c.numel() for c in crops)
    assert batch.sizes == ((5, 7), (9, 4), (1, 1)) and batch.bicubic == (False, True, False)
    assert labels.tolist() == [0, 1, 2]
    assert all(torch.equal(a, b.permute(2, 0, 1)) for a, b in zip(batch.crops(), crops, strict=True))
    kept = batch.select(torch.tensor([True, False, True]))
    assert kept.sizes == ((5, 7), (1, 1)) and torch.equal(kept.crops()[1], crops[2].permute(2, 0, 1))
    plain, _ = collate([(torch.zeros(3, 4, 4, dtype=torch.uint8), 0)] * 2)  # other samples: torch's default
    assert plain.shape == (2, 3, 4, 4)


def test_the_device_resizes_and_augments_a_crop_batch_into_normalized_images(folder):
    cfg = compose_config("data=imagefolder", f"data.root={folder}", "data.image_size=32", "data.augment_on=device",
                         "data.rand_augment=rand-m9-mstd0.5-inc1")  # fmt: skip
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")
    dataset = datamodule.train
    dataset.augment_on_device = True
    samples = [dataset[(i, 0)] for i in range(8)]
    torch.manual_seed(0)
    images, labels = datamodule.on_after_batch_transfer(collate(samples), 0)
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32 and labels.shape == (8,)
    assert -2.2 < images.min() < images.max() < 2.7  # normalized with the ImageNet mean and std
    torch.manual_seed(0)  # the draws come from torch's global stream: seeded and checkpointed with the run
    again, _ = datamodule.on_after_batch_transfer(collate(samples), 0)
    assert torch.equal(images, again)


def test_device_path_batches_do_not_depend_on_loader_processes(folder):
    def crops(workers: int) -> list[torch.Tensor]:
        cfg = compose_config("data=imagefolder", f"data.root={folder}", "data.image_size=32", "data.batch_size=4",
                             f"data.num_workers={workers}", "data.augment_on=device")  # fmt: skip
        datamodule = build_datamodule(cfg)
        datamodule.setup("fit")
        loader = datamodule.train_dataloader()
        loader.sampler.set_epoch(1)
        return [batch.pixels for batch, _ in loader]

    first = crops(0)
    assert all(torch.equal(a, b) for a, b in zip(first, crops(2), strict=True))


@pytest.mark.parametrize("data", ["imagefolder", "shapes"])
def test_a_run_augmenting_on_the_device_completes_and_records_it(folder, tmp_path, data):
    given = ["data=imagefolder", f"data.root={folder}"] if data == "imagefolder" else ["data.train_size=40"]
    result = run_cli(*FOLDER_RUN[1:], *given, "data.augment_on=device", "data.rand_augment=rand-m9-mstd0.5-inc1",
                     "data.random_erasing=0.25", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "augmentation: per batch on the device (data.augment_on=device" in result.stderr + result.stdout
    record = read_record(next((tmp_path / "runs").rglob("result.json")))
    assert record.status == "completed" and record.augment_on == "device"
    if data == "imagefolder":
        assert record.unreadable_images == {"train": 1, "val": 1}


def test_a_run_begun_before_augment_on_resumes_on_a_cpu_and_auto_is_the_loader_there():
    config = {"trainer": dict(compose_config().trainer), "data": {"name": "shapes", "rand_augment": None}}
    now = {**config, "data": {**config["data"], "augment_on": "auto"}}
    assert comparable_config(config) == comparable_config(now)
    assert comparable_config(now)["data"]["augment_on"] == "loader"
    on_device = {**config, "data": {**config["data"], "augment_on": "device"}}
    assert comparable_config(on_device) != comparable_config(config)
