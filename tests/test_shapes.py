"""The generated shapes task: deterministic, balanced, labelled by where the disc and square are, not by colour."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metaformer_lab.data.shapes import CLASS_NAMES, ShapesDataset, generate_shapes

NOISE = 32  # pinned so the foreground threshold below stays valid if the default changes


@pytest.fixture(scope="module")
def split() -> tuple[torch.Tensor, torch.Tensor]:
    return generate_shapes(5000, 32, seed=11, noise=NOISE)


def ridge_probe_accuracy(features: torch.Tensor, labels: torch.Tensor, num_train: int = 4000) -> float:
    """Held-out accuracy of a least-squares (ridge) fit of one-hot labels on standardised features."""
    features = features.double()
    features = (features - features[:num_train].mean(0)) / (features[:num_train].std(0) + 1e-6)
    features = torch.cat([features, torch.ones(len(features), 1, dtype=torch.float64)], 1)
    train, test = features[:num_train], features[num_train:]
    gram = train.T @ train + 1e-3 * num_train * torch.eye(train.shape[1], dtype=torch.float64)
    weights = torch.linalg.solve(gram, train.T @ F.one_hot(labels[:num_train], len(CLASS_NAMES)).double())
    return ((test @ weights).argmax(1) == labels[num_train:]).double().mean().item()


def test_same_arguments_give_the_same_data_whatever_the_global_state() -> None:
    torch.manual_seed(0)
    first = generate_shapes(1500, 32, seed=3)  # two chunks
    torch.manual_seed(1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        second = generate_shapes(1500, 32, seed=3)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_global_random_state_is_untouched() -> None:
    torch.manual_seed(5)
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    generate_shapes(100, 32, seed=1)
    assert torch.equal(torch_state, torch.get_rng_state())
    assert np.array_equal(numpy_state, np.random.get_state()[1])


def test_different_seeds_and_chunks_give_different_data() -> None:
    images, labels = generate_shapes(2000, 32, seed=0)
    other_images, other_labels = generate_shapes(2000, 32, seed=1)
    assert not torch.equal(images, other_images) and not torch.equal(labels, other_labels)
    assert not torch.equal(labels[:1000], labels[1000:])  # chunks have their own streams


@pytest.mark.parametrize("image_size", [16, 32, 64, 128])
def test_dtypes_and_shapes(image_size: int) -> None:
    images, labels = generate_shapes(50, image_size, seed=2)
    assert images.dtype == torch.uint8 and images.shape == (50, 3, image_size, image_size)
    assert labels.dtype == torch.int64 and labels.shape == (50,)
    assert int(labels.min()) >= 0 and int(labels.max()) < len(CLASS_NAMES) == 10
    assert images.float().std() > 20  # an actual picture, not a constant fill


def test_classes_are_balanced(split: tuple[torch.Tensor, torch.Tensor]) -> None:
    assert split[1].bincount(minlength=10).tolist() == [500] * 10  # exact: 5 full chunks of 1000
    counts = generate_shapes(2345, 32, seed=4)[1].bincount(minlength=10)
    assert int(counts.max() - counts.min()) <= 1


def test_labels_match_the_drawn_relation() -> None:
    """Without noise or distractors the picture alone gives the label: the square is the object that fills its
    bounding box, the disc the other; compare their grid rows and columns."""
    images, labels = generate_shapes(400, 32, seed=6, max_distractors=0, noise=0)
    cell = 32 // 4
    foreground = (images != images[:, :, :1, :1]).any(1)  # the top-left pixel is always background
    by_row = foreground.view(-1, 4, cell, 32)  # [N, grid row, y in cell, x]
    occupied_rows, occupied_columns = by_row.any(3), by_row.any(2)
    area = by_row.sum((2, 3))
    filled = (area > 0) & (area == occupied_rows.sum(2) * occupied_columns.sum(2))
    assert ((area > 0).sum(1) == 2).all() and (filled.sum(1) == 1).all()  # never one row; one square, one disc
    square_row, disc_row = filled.int().argmax(1), ((area > 0) & ~filled).int().argmax(1)
    column = occupied_columns.int().argmax(2) // cell  # grid column of the leftmost pixel, per grid row
    column_offset = column.gather(1, disc_row[:, None]) - column.gather(1, square_row[:, None])
    expected = 2 * (column_offset.squeeze(1).clamp(-2, 2) + 2) + (disc_row > square_row).long()
    assert torch.equal(expected, labels)


@pytest.mark.parametrize("image_size", [16, 32, 64])
def test_small_objects_are_still_drawn(image_size: int) -> None:
    images, _ = generate_shapes(300, image_size, seed=8, max_distractors=0, noise=0, object_size=(0.2, 0.3))
    foreground = (images != images[:, :, :1, :1]).any(1).view(300, 4, -1)  # per grid row
    assert (foreground.any(2).sum(1) == 2).all()  # the square and the disc, in different rows


def test_colour_statistics_carry_no_label_information(split: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = split
    levels = (images >> 6).long()  # the palette has 4 levels per channel
    colour_codes = (levels[:, 0] * 16 + levels[:, 1] * 4 + levels[:, 2]).flatten(1)
    colour_codes += 64 * torch.arange(len(images))[:, None]  # one bincount for all images
    joint_histogram = torch.bincount(colour_codes.flatten(), minlength=64 * len(images)).view(-1, 64).float()
    channel_histograms = torch.stack([((images >> 5) == bin_).float().mean((2, 3)) for bin_ in range(8)], 2)
    mean_colour = images.float().mean((2, 3))
    accuracy = ridge_probe_accuracy(torch.cat([mean_colour, channel_histograms.flatten(1), joint_histogram], 1), labels)
    assert accuracy < 0.2, accuracy  # chance is 0.1


def test_where_the_objects_are_carries_it(split: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = split
    # Colour-blind foreground: background pixels differ by at most NOISE, objects by a palette step minus NOISE.
    difference = (images.int() - images[:, :, :1, :1].int()).abs().amax(1)
    foreground = (difference > NOISE + 5).float()
    accuracy = ridge_probe_accuracy(F.avg_pool2d(foreground[:, None], 2).flatten(1), labels)
    assert accuracy > 0.3, accuracy


def test_dataset_serves_the_generated_split() -> None:
    dataset = ShapesDataset(30, 32, seed=9, max_distractors=1)
    images, labels = generate_shapes(30, 32, seed=9, max_distractors=1)
    image, label = dataset[7]
    assert len(dataset) == 30 and isinstance(label, int) and label == int(labels[7])
    assert image.dtype == torch.uint8 and torch.equal(image, images[7])


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("image_size", 36),
        ("image_size", 8),
        ("image_size", 1024),
        ("image_size", 32.0),
        ("num_images", -1),
        ("seed", -3),
        ("max_distractors", 15),
        ("noise", 200),
        ("object_size", (0.9, 0.5)),
        ("object_size", (0.1, 0.5)),
        ("object_size", 0.5),
    ],
)
def test_bad_arguments_name_the_key_and_value(key: str, value: object) -> None:
    arguments = {"num_images": 4, key: value}
    with pytest.raises(ValueError, match=key) as error:
        generate_shapes(**arguments)
    assert repr(value) in str(error.value)
