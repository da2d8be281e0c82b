"""Image folders as users have them: any folder in the ImageNet layout, unreadable files skipped and counted, clear
layout errors before training."""

import os
import shutil

import lightning as L
import pytest
import torch
from conftest import FOLDER_RUN, compose_config, run_cli

from metaformer_lab.config import build_datamodule, build_model, build_optim
from metaformer_lab.data.imagefolder import ImageFolderDataset
from metaformer_lab.data.jpeg_folder import class_folder, write_jpeg_folder
from metaformer_lab.record import read_record
from metaformer_lab.registry import ConfigError
from metaformer_lab.training.module import ImageClassifier


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """10 classes, 3 training and 1 validation JPEG each, plus one unreadable .JPEG per split."""
    return write_jpeg_folder(tmp_path_factory.mktemp("jpeg"), train_per_class=3, val_per_class=1, corrupt=1)


def test_unreadable_file_comes_out_marked_not_raised(folder):
    dataset = ImageFolderDataset(folder / "val", 32, train=False, crop_pct=0.9)
    labels = [dataset[i][1] for i in range(len(dataset))]
    corrupt = [i for i in range(len(dataset)) if "corrupt" in dataset.path(i).name]
    assert len(dataset) == 11 and len(corrupt) == 1
    assert labels[corrupt[0]] == -1 - corrupt[0] and sorted(set(labels) - {labels[corrupt[0]]}) == list(range(10))
    image, _ = dataset[corrupt[0]]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8


def test_a_run_on_a_folder_with_corrupt_files_completes_and_counts_them(folder, tmp_path):
    # loader processes as data.num_workers=auto starts them, capped at 2 CPUs (the way a SLURM task is)
    run = [arg for arg in FOLDER_RUN if not arg.startswith("data.num_workers=")]
    result = run_cli(*run, "data.num_workers=auto", f"data.root={folder}", "data.rand_augment=rand-m9-mstd0.5-inc1",
                     "data.random_erasing=0.25", cwd=tmp_path, env={"SLURM_CPUS_PER_TASK": "2"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    cpus = min(2, len(os.sched_getaffinity(0)))
    assert f"  loaders: {cpus - 1} training + {cpus - 1} validation processes per device ({cpus} CPU" \
           f"{'s' * (cpus > 1)} this process may use, 1 rank on them)" in result.stderr + result.stdout  # fmt: skip
    record = read_record(next((tmp_path / "runs").rglob("result.json")))
    assert record.status == "completed" and record.train_images == 31 and record.steps == 3
    assert record.unreadable_images == {"train": 1, "val": 1}
    assert [p.split("/")[-1] for p in record.unreadable_paths] == ["train_corrupt_000.JPEG", "val_corrupt_000.JPEG"]
    assert record.config["data"]["num_classes"] is None  # counted from the folders: 10
    log = (next((tmp_path / "runs").rglob("run.log"))).read_text()
    assert "skipped unreadable image" in log and "train_corrupt_000.JPEG" in log
    assert "2 unreadable images skipped" in result.stderr + result.stdout


def test_imagefolder_counts_its_classes_and_imagenet_wants_1000(folder):
    datamodule = build_datamodule(compose_config("data=imagefolder", f"data.root={folder}"))
    assert datamodule.num_classes == 10
    imagenet = build_datamodule(compose_config("data=imagenet", f"data.root={folder}"))
    with pytest.raises(ConfigError, match="the 10 class folders") as error:
        imagenet.setup("fit")
    assert error.value.key == "data.num_classes"


def _copy(folder, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(folder, root)
    return root


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("missing root", "no such folder"),
        ("no val", "no val/ folder in it"),
        ("empty train", "train/ has no class folders"),
        ("no images", "val/ has class folders but no images"),
        ("other classes", "different class folders: 1 only in train/ (e.g. 09_"),
    ],
)
def test_layout_errors_show_the_expected_layout(folder, tmp_path, breakage, message):
    root = _copy(folder, tmp_path)
    if breakage == "missing root":
        root = tmp_path / "nowhere"
    elif breakage == "no val":
        shutil.rmtree(root / "val")
    elif breakage == "empty train":
        shutil.rmtree(root / "train")
        (root / "train").mkdir()
    elif breakage == "no images":
        for path in (root / "val").rglob("*.JPEG"):
            path.unlink()
    else:
        (root / "val" / class_folder(9)).rename(root / "val" / "zz_other")
    datamodule = build_datamodule(compose_config("data=imagefolder", f"data.root={root}"))
    with pytest.raises(ConfigError) as error:
        datamodule.setup("fit")
    assert error.value.key == "data.root" and message in str(error.value)
    assert "<root>/train/<class>/<image>.JPEG" in str(error.value)


def test_a_layout_error_stops_run_py_before_training_and_leaves_no_run(tmp_path):
    result = run_cli(*FOLDER_RUN, f"data.root={tmp_path / 'nowhere'}", cwd=tmp_path)
    assert result.returncode != 0
    assert "data.root=" in result.stderr and "expected the ImageNet layout" in result.stderr
    assert "Traceback" not in result.stderr and not list(tmp_path.rglob("result.json"))


def test_a_folder_with_only_val_is_enough_to_validate(folder, tmp_path):
    root = _copy(folder, tmp_path)
    shutil.rmtree(root / "train")
    datamodule = build_datamodule(compose_config("data=imagefolder", f"data.root={root}"))
    assert datamodule.num_classes == 10
    datamodule.setup("validate")
    assert len(datamodule.val) == 11 and datamodule.train is None
    with pytest.raises(ConfigError, match="no train/ folder"):
        datamodule.setup("fit")


def test_a_batch_left_empty_by_unreadable_images_trains_nothing_and_does_not_diverge():
    cfg = compose_config()
    module = ImageClassifier(build_model(cfg, 10), build_optim(cfg), 10)
    module.trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    empty = (torch.zeros(0, 3, 32, 32), torch.zeros(0, dtype=torch.long))
    loss = module.training_step(empty, 0)
    loss.backward()  # zero gradients: under DDP this rank still joins the gradient all-reduce
    assert loss.item() == 0.0 and all(not p.grad.any() for p in module.parameters() if p.requires_grad)
    assert module.validation_step(empty, 0) is None


def test_training_draws_depend_on_seed_epoch_and_image_not_on_loader_processes(folder):
    def batches(workers: int, epoch: int, seed: int = 0) -> list[torch.Tensor]:
        cfg = compose_config("data=imagefolder", f"data.root={folder}", "data.image_size=32", "data.batch_size=8",
                             f"data.num_workers={workers}", "data.rand_augment=rand-m9-mstd0.5-inc1", f"seed={seed}")
        datamodule = build_datamodule(cfg)
        datamodule.setup("fit")
        loader = datamodule.train_dataloader()
        loader.sampler.set_epoch(epoch)  # as Lightning does at each epoch's start (and on resume)
        return [images for images, _ in loader]

    first = batches(0, epoch=1)
    assert all(torch.equal(a, b) for a, b in zip(first, batches(2, epoch=1), strict=True))  # any num_workers
    assert not torch.equal(first[0], batches(0, epoch=2)[0]) and not torch.equal(first[0], batches(0, 1, seed=1)[0])
