"""`data=idx`: MNIST-format data sets (Fashion-MNIST, MNIST, ...) from their four IDX files, gzipped or not; every
broken file a one-line error naming it before training. The files are written here: nothing needs the data sets."""

import gzip
import struct

import numpy as np
import pytest
import torch
from conftest import compose_config, only_record, run_cli, run_cli_many

from metaformer_lab.config import build_datamodule
from metaformer_lab.data.datamodules import RandAugmented
from metaformer_lab.data.idx import PixelStats, read_split
from metaformer_lab.registry import ConfigError

NAMES = {
    ("train", "images"): "train-images-idx3-ubyte", ("train", "labels"): "train-labels-idx1-ubyte",
    ("val", "images"): "t10k-images-idx3-ubyte", ("val", "labels"): "t10k-labels-idx1-ubyte",
}  # fmt: skip
TINY_RUN = [
    "data=idx", "data.batch_size=32", "optim.global_batch=32", "optim.epochs=1", "optim.warmup_epochs=0",
    "model.depths=[1,1,1,1]", "model.dims=[16,16,32,32]", "logger=csv", "trainer=cpu",
]  # fmt: skip


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """`array` (uint8) as an IDX file: big-endian magic (0x0000 08 <ndim> unless given), sizes, then the bytes."""
    magic = 0x0800 | array.ndim if magic is None else magic
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + np.asarray(array, np.uint8).tobytes()


def write_idx(path, content: bytes, gz: bool):
    """`content` at `path` (+ `.gz`, gzipped, where `gz`); returns the file's path."""
    path = path.with_name(path.name + ".gz") if gz else path
    path.write_bytes(gzip.compress(content) if gz else content)
    return path


def make_split(count: int, size: int = 28, num_classes: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, size, size), dtype=np.uint8), np.arange(count, dtype=np.uint8) % num_classes


def write_dataset(root, gz: bool = True, train: int = 128, val: int = 40, size: int = 28, **broken: bytes) -> dict:
    """The four files of a small data set in `root`; `broken` replaces a file's bytes (keys `train_images`, ...).
    Returns the arrays by (split, kind)."""
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, count, seed in (("train", train, 0), ("val", val, 1)):
        arrays[split, "images"], arrays[split, "labels"] = make_split(count, size, seed=seed)
    for (split, kind), name in NAMES.items():
        content = broken.get(f"{split}_{kind}", idx_bytes(arrays[split, kind]))
        write_idx(root / name, content, gz)
    return arrays


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("fashion")
    return root, write_dataset(root)


def datamodule(root, *overrides: str):
    module = build_datamodule(compose_config("data=idx", f"data.root={root}", "data.batch_size=32", *overrides))
    module.setup("fit")
    return module


def test_gzipped_and_plain_files_read_alike(tmp_path):
    arrays = write_dataset(tmp_path / "gz", gz=True)
    write_dataset(tmp_path / "plain", gz=False)
    for split in ("train", "val"):
        for form in ("gz", "plain"):
            images, labels = read_split(tmp_path / form, split, num_classes=10)
            assert images.dtype == labels.dtype == np.uint8 and images.shape[1:] == (28, 28)
            assert np.array_equal(images, arrays[split, "images"]) and np.array_equal(labels, arrays[split, "labels"])


def test_the_digest_tells_data_sets_apart_whatever_their_form_and_path(tmp_path):
    # MNIST-format data sets share sizes and file names: the record's data_digest keeps their runs apart
    write_dataset(tmp_path / "gz", gz=True)
    write_dataset(tmp_path / "plain", gz=False)
    same = {datamodule(tmp_path / form).digest for form in ("gz", "plain")}
    assert len(same) == 1 and len(next(iter(same))) == 12
    assert datamodule(tmp_path / "gz", "data.train_size=64").digest in same  # of the whole split, not the part used
    other = write_dataset(tmp_path / "other")  # the same images, one label changed
    other["train", "labels"][0] = 9
    write_idx(tmp_path / "other" / NAMES["train", "labels"], idx_bytes(other["train", "labels"]), gz=True)
    assert datamodule(tmp_path / "other").digest not in same


@pytest.mark.parametrize("image_size", [32, 40])
def test_images_are_padded_centred_with_zeros_and_grey_repeated_to_three_channels(dataset, image_size):
    root, arrays = dataset
    module = datamodule(root, f"data.image_size={image_size}")
    assert (len(module.train), len(module.val), module.num_classes) == (128, 40, 10)
    pad = (image_size - 28) // 2
    for split, data in (("train", module.train), ("val", module.val)):
        for index in (0, 7):
            image, label = data[(index, 3) if split == "train" else index]  # the training loader asks (index, epoch)
            assert image.shape == (3, image_size, image_size) and image.dtype == torch.uint8
            assert label == arrays[split, "labels"][index] and isinstance(label, int)
            assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
            inner = image[0, pad : pad + 28, pad : pad + 28]
            assert torch.equal(inner, torch.from_numpy(arrays[split, "images"][index]))
            assert image[0].sum() == inner.sum()  # zeros all around
    batch = next(iter(module.val_dataloader()))
    assert batch[0].shape == (32, 3, image_size, image_size) and batch[1].dtype == torch.int64


def test_mean_and_std_are_the_training_pixels_whatever_the_size_limits(dataset):
    root, arrays = dataset
    pixels = arrays["train", "images"].astype(np.float64) / 255
    for module in (datamodule(root), datamodule(root, "data.train_size=32", "data.val_size=8", "data.image_size=48")):
        assert module.mean == pytest.approx((pixels.mean(),) * 3, abs=1e-12)
        assert module.std == pytest.approx((pixels.std(),) * 3, abs=1e-12)
    stats = PixelStats.of(np.array([[0, 255], [255, 255]], np.uint8))
    assert (stats.mean, stats.std) == pytest.approx((0.75, 3**0.5 / 4))
    # the batches that reach the model: normalized with them (on the device, as every data module)
    module = datamodule(root)
    images, _ = module.on_after_batch_transfer(next(iter(module.val_dataloader())), 0)
    raw = module.val[0][0].float() / 255
    assert torch.allclose(images[0], (raw - module.mean[0]) / module.std[0])


def test_train_and_val_size_take_the_first_images_and_sizes_come_from_the_headers(dataset):
    root, arrays = dataset
    overrides = ["data.batch_size=32", "data.train_size=64", "data.val_size=8"]
    module = build_datamodule(compose_config("data=idx", f"data.root={root}", *overrides))
    assert module.split_sizes() == (64, 8)  # without reading the images
    assert module.train is None
    module.setup("fit")
    assert (len(module.train), len(module.val)) == (64, 8)
    assert torch.equal(module.train[63][0][0, 2:30, 2:30], torch.from_numpy(arrays["train", "images"][63]))
    assert build_datamodule(compose_config("data=idx", f"data.root={root}")).split_sizes() == (128, 40)
    # without a root (as `plan` lists a run): no sizes, and an error only when the data is used
    unset = build_datamodule(compose_config("data=idx"))
    assert unset.split_sizes() == (None, None)
    with pytest.raises(ConfigError, match="required: the folder of the four IDX files") as error:
        unset.setup("fit")
    assert error.value.key == "data.root"


def test_validating_alone_reads_the_t10k_split_with_the_training_statistics(dataset):
    root, _ = dataset
    module = build_datamodule(compose_config("data=idx", f"data.root={root}"))
    module.setup("validate")
    assert module.train is None and len(module.val) == 40 and module.mean == datamodule(root).mean


def test_rand_augment_works_on_the_padded_grey_images(dataset):
    root, _ = dataset
    module = datamodule(root, "data.rand_augment=rand-m9-mstd0.5-inc1")
    assert isinstance(module.train, RandAugmented)
    image, _ = module.train[(5, 0)]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8


IMAGES, LABELS = make_split(128)
BROKEN = {
    "bad magic": ({"train_images": idx_bytes(IMAGES, magic=0x0000_0C03)}, "train-images-idx3-ubyte.gz",
                  "magic number 0x00000c03, expected 0x00000803"),
    "labels as images": ({"val_images": idx_bytes(make_split(40)[1])}, "t10k-images-idx3-ubyte.gz",
                         "magic number 0x00000801, expected 0x00000803"),
    "not IDX": ({"train_labels": b"<html>404</html>"}, "train-labels-idx1-ubyte.gz", "not an IDX file"),
    "truncated": ({"train_images": idx_bytes(IMAGES)[:-100]}, "train-images-idx3-ubyte.gz",
                  f"truncated: a header of 128 x 28 x 28 needs {16 + 128 * 784} bytes, found {16 + 128 * 784 - 100}"),
    "too long": ({"train_labels": idx_bytes(LABELS) + b"\0"}, "train-labels-idx1-ubyte.gz",
                 "longer than its header says: a header of 128 needs 136 bytes, found 137"),
    "count mismatch": ({"train_labels": idx_bytes(LABELS[:100])}, "train-labels-idx1-ubyte.gz",
                       "100 labels for the 128 images of train-images-idx3-ubyte.gz"),
    "label out of range": ({"val_labels": idx_bytes(np.array([3] * 39 + [12], np.uint8))}, "t10k-labels-idx1-ubyte.gz",
                           "label 12 (image 39; 1 such) is outside 0..9 of data.num_classes=10"),
}  # fmt: skip


@pytest.mark.parametrize("case", BROKEN)
def test_a_broken_file_is_a_config_error_naming_it(tmp_path, case):
    broken, name, message = BROKEN[case]
    write_dataset(tmp_path, **broken)
    with pytest.raises(ConfigError) as error:
        datamodule(tmp_path)
    assert error.value.key == "data.root" and error.value.value == str(tmp_path)
    assert f"{name}: {message}" in str(error.value), str(error.value)
    assert "\n" not in str(error.value)


def test_a_missing_file_or_folder_says_what_was_looked_for(tmp_path):
    write_dataset(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(ConfigError, match="neither t10k-labels-idx1-ubyte nor t10k-labels-idx1-ubyte.gz in it"):
        datamodule(tmp_path)
    with pytest.raises(ConfigError, match="no such folder; expected the four IDX files") as error:
        datamodule(tmp_path / "nowhere")
    assert error.value.key == "data.root"


def test_a_broken_gzip_stream_and_a_label_range_of_another_data_set(tmp_path):
    write_dataset(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-500])
    with pytest.raises(ConfigError, match="train-images-idx3-ubyte.gz: cannot be read"):
        datamodule(tmp_path)
    write_dataset(tmp_path)  # labels 0..9: fine for 10 classes or more, not fewer
    assert datamodule(tmp_path, "data.num_classes=26").num_classes == 26
    with pytest.raises(ConfigError, match="label 5 .* outside 0..4 of data.num_classes=5"):
        datamodule(tmp_path, "data.num_classes=5")


def test_images_larger_than_image_size_are_refused_not_cut(tmp_path):
    write_dataset(tmp_path, size=36, train=32, val=8)
    with pytest.raises(ConfigError, match="at least the 36x36 images of") as error:
        datamodule(tmp_path)
    assert error.value.key == "data.image_size"
    assert datamodule(tmp_path, "data.image_size=40").train[0][0].shape == (3, 40, 40)


def test_a_tiny_run_on_idx_files_completes(dataset, tmp_path):
    root, _ = dataset
    result = run_cli(*TINY_RUN, f"data.root={root}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    record = only_record(tmp_path / "runs")
    assert record.status == "completed" and record.train_images == 128 and record.steps == 4
    assert record.config["data"]["name"] == "idx" and 0 <= record.best_val_top1 <= 1
    assert record.data_digest == datamodule(root).digest


def test_a_bad_root_stops_run_py_with_one_line_before_training(tmp_path):
    write_dataset(tmp_path / "no_labels")
    (tmp_path / "no_labels" / "train-labels-idx1-ubyte.gz").unlink()
    cases = {
        "wrong": [*TINY_RUN, f"data.root={tmp_path / 'wrong'}"],
        "no labels": [*TINY_RUN, f"data.root={tmp_path / 'no_labels'}"],
        "not given": TINY_RUN,
    }
    expected = {
        "wrong": f"error: data.root='{tmp_path / 'wrong'}': no such folder; expected the four IDX files",
        "no labels": f"error: data.root='{tmp_path / 'no_labels'}': neither train-labels-idx1-ubyte nor ",
        "not given": "error: data.root=None: required: the folder of the four IDX files",
    }
    for name, result in run_cli_many(cases, tmp_path / "runs_of").items():
        assert result.returncode != 0 and expected[name] in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # one line: the error
        assert "Traceback" not in result.stderr and "Epoch" not in result.stderr + result.stdout
        runs = result.cwd / "runs"
        assert not runs.exists() or not any(runs.iterdir())
