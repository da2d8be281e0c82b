"""The paper's ImageNet recipe against the official pipeline's facts: eval resize and crop, the random resized crop's
fallback, random erasing, BatchNorm statistics under DDP, and which settings the recipe and debug=quick switch on."""

import math
import os
import random
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import compose_config
from PIL import Image

from metaformer_lab.config import build_datamodule, trainer_arguments
from metaformer_lab.data.erasing import RandomErasing
from metaformer_lab.data.imagefolder import center_crop, eval_resize_size, random_resized_crop
from metaformer_lab.data.randaugment import RandAugment
from metaformer_lab.registry import ConfigError
from metaformer_lab.training.callbacks import share_batchnorm_stats


@pytest.mark.parametrize(
    ("size", "crop_pct", "short"), [(224, 0.9, 248), (224, 0.95, 235), (224, 1.0, 224), (64, 0.9, 71)]
)
def test_eval_resize_is_floor_of_size_over_crop_pct(size, crop_pct, short):
    # timm's transforms_imagenet_eval: math.floor(img_size / crop_pct); round() would give 249 and 236
    assert eval_resize_size(500, 375, size, crop_pct) == (int(short * 500 / 375), short)
    assert eval_resize_size(375, 500, size, crop_pct) == (short, int(short * 500 / 375))
    assert eval_resize_size(300, 300, size, crop_pct) == (short, short)


def test_center_crop_takes_the_middle_at_rounded_offsets():
    # a 500x375 image with a vertical ramp: after the resize to 330x248, the crop starts at x = round(106 / 2) = 53
    ramp = Image.linear_gradient("L").rotate(90).resize((500, 375)).convert("RGB")
    crop = center_crop(ramp, 224, 0.9)
    assert crop.size == (224, 224)
    resized = ramp.resize((330, 248), Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(crop), np.asarray(resized.crop((53, 12, 53 + 224, 12 + 224))))


def test_random_resized_crop_falls_back_to_the_whole_image_cut_to_the_ratio_range():
    # a 1000x10 strip: no try fits (a crop of >= 8% area at ratio <= 4/3 is taller than 10 px), so timm takes the
    # whole height and a width of round(10 * 4/3) = 13 in the middle: not the largest centred square (10x10)
    strip = Image.new("RGB", (1000, 10))
    strip.paste((0, 255, 0), (493, 0, 495, 10))  # the 13 middle columns start at (1000 - 13) // 2 = 493: green,
    strip.paste((255, 0, 0), (495, 0, 505, 10))  # then the 10 of the centred square: red,
    strip.paste((0, 0, 255), (505, 0, 506, 10))  # and one more: blue
    for seed in range(5):
        crop = np.asarray(random_resized_crop(strip, 26, random.Random(seed))).astype(int)
        assert crop.shape == (26, 26, 3)
        assert (crop[:, 0, 1] > 150).all() and (crop[:, -1, 2] > 150).all()  # green left edge, blue right edge
        assert (crop[:, 13, 0] > 200).all() and (crop[:, 13, 1:] < 60).all()  # red middle, nothing else around


def test_random_resized_crop_crops_then_resizes_as_torchvision():
    # Image.resize(box=...) would read pixels just outside the box into the border rows (timm crops first)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8))
    crop = random_resized_crop(image, 64, random.Random(3))
    rng = random.Random(3)  # the same draws, replayed: the first try that fits, then the interpolation
    while True:
        area, ratio = 500 * 375 * rng.uniform(0.08, 1.0), math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if w <= 500 and h <= 375:
            break
    y, x = rng.randint(0, 375 - h), rng.randint(0, 500 - w)
    interpolation = rng.choice((Image.Resampling.BILINEAR, Image.Resampling.BICUBIC))
    expected = image.crop((x, y, x + w, y + h)).resize((64, 64), interpolation)
    assert np.array_equal(np.asarray(crop), np.asarray(expected))


def test_random_resized_crop_area_and_ratio_ranges():
    image = Image.new("RGB", (500, 375))
    rng = random.Random(0)
    boxes = []
    original = Image.Image.crop

    def spy(self, box=None):
        boxes.append(box)
        return original(self, box)

    Image.Image.crop = spy
    try:
        for _ in range(300):
            random_resized_crop(image, 32, rng)
    finally:
        Image.Image.crop = original
    areas = [(x1 - x0) * (y1 - y0) / (500 * 375) for x0, y0, x1, y1 in boxes]
    ratios = [(x1 - x0) / (y1 - y0) for x0, y0, x1, y1 in boxes]
    assert 0.07 < min(areas) < 0.15 and max(areas) > 0.9
    assert min(ratios) > 0.74 and max(ratios) < 1.35 and min(ratios) < 0.8 and max(ratios) > 1.25


def test_random_erasing_box_and_values_follow_timm():
    torch.manual_seed(0)
    erasing = RandomErasing(0.25)
    images = torch.full((4000, 3, 32, 32), 100.0)
    erasing(images)
    erased = (images != 100.0).any(dim=1)  # [N, H, W] pixels replaced
    fraction = erased.flatten(1).any(dim=1).float().mean().item()
    assert 0.22 < fraction < 0.28  # probability 0.25 per image (a box always fits at 32 px)
    areas, aspects = [], []
    for mask in erased[erased.flatten(1).any(dim=1)]:
        rows, cols = mask.any(dim=1).nonzero(), mask.any(dim=0).nonzero()
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert mask.sum() == h * w  # one box, filled
        areas.append((h * w).item() / 1024)
        aspects.append(math.log(h / w))
    assert min(areas) >= 0.015 and max(areas) <= 0.36  # 2% to 1/3 of the image, give or take rounding
    assert sum(areas) / len(areas) == pytest.approx((0.02 + 1 / 3) / 2, abs=0.02)
    assert max(aspects) > 0.9 and min(aspects) < -0.9 and abs(sum(aspects) / len(aspects)) < 0.1  # log-uniform
    values = images[images != 100.0]
    assert abs(values.mean().item()) < 0.02 and values.std().item() == pytest.approx(1.0, abs=0.02)  # N(0, 1)


def test_random_erasing_never_fills_the_whole_image_and_is_seeded():
    erasing = RandomErasing(1.0)
    torch.manual_seed(1)
    first = erasing(torch.zeros(64, 3, 16, 16))
    torch.manual_seed(1)
    assert torch.equal(first, erasing(torch.zeros(64, 3, 16, 16)))
    assert ((first != 0).flatten(1).float().mean(dim=1) < 0.5).all()  # the box is strictly inside (w < W, h < H)


def _share_worker(rank: int, world: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    for mode in ("reduce", "broadcast"):
        model = torch.nn.Sequential(torch.nn.BatchNorm2d(2), torch.nn.Conv2d(2, 2, 1), torch.nn.BatchNorm2d(2))
        for layer in (model[0], model[2]):
            layer.running_mean.fill_(float(rank))
            layer.running_var.fill_(float(rank + 1))
        weight = model[1].weight.detach().clone()
        shared = share_batchnorm_stats(model, mode)
        results[rank, mode] = (shared, model[0].running_mean.tolist(), model[2].running_var.tolist(),
                               bool(torch.equal(weight, model[1].weight)))  # fmt: skip
    torch.distributed.destroy_process_group()


def test_batchnorm_stats_are_averaged_over_ranks_or_taken_from_rank_0():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_share_worker, args=(2, port, results), nprocs=2)
    for rank in (0, 1):
        for mode, mean, var in (("reduce", 0.5, 1.5), ("broadcast", 0.0, 1.0)):
            shared, running_mean, running_var, weights_untouched = results[rank, mode]
            assert shared == 4 and weights_untouched  # 2 layers x (mean, var); num_batches_tracked, weights alone
            assert running_mean == [mean, mean] and running_var == [var, var]


def test_batchnorm_stats_untouched_outside_ddp():
    layer = torch.nn.BatchNorm2d(2)
    layer.running_mean.fill_(3.0)
    assert share_batchnorm_stats(layer, "reduce") == 0 and layer.running_mean.tolist() == [3.0, 3.0]


def test_paper_recipe_switches_on_randaugment_and_erasing_and_debug_quick_off():
    cfg = compose_config("experiment=t5_identity", "data.root=/data/imagenet")
    assert cfg.data.rand_augment == "rand-m9-mstd0.5-inc1" and cfg.data.random_erasing == 0.25
    assert cfg.data.name == "imagenet" and cfg.data.num_classes == 1000 and cfg.trainer.dist_bn == "reduce"
    quick = compose_config("experiment=t5_identity", "debug=quick")
    assert quick.data.name == "shapes" and quick.data.rand_augment is None and quick.data.random_erasing == 0.0
    default = compose_config()
    assert default.data.rand_augment is None and default.data.random_erasing == 0.0


@pytest.mark.parametrize(
    ("override", "key"),
    [("data.rand_augment=rand-m9-x", "data.rand_augment"), ("data.random_erasing=1.5", "data.random_erasing")],
)
def test_bad_augmentation_settings_are_refused_before_training(override, key):
    with pytest.raises(ConfigError) as error:
        build_datamodule(compose_config(override))
    assert error.value.key == key


def test_dist_bn_choices():
    with pytest.raises(ConfigError, match="reduce, broadcast, none"):
        trainer_arguments(compose_config("trainer.dist_bn=average"), 1)
    assert "dist_bn" not in trainer_arguments(compose_config("trainer.dist_bn=none"), 1)


def test_randaugment_on_the_generated_shapes_changes_training_images_only():
    cfg = compose_config("data.train_size=256", "data.val_size=64", "data.rand_augment=rand-m9-mstd0.5-inc1-p1.0")
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")
    plain = build_datamodule(compose_config("data.train_size=256", "data.val_size=64"))
    plain.setup("fit")
    torch.manual_seed(0)
    changed = sum(not torch.equal(datamodule.train[i][0], plain.train[i][0]) for i in range(64))
    assert changed > 50 and datamodule.train[0][0].shape == plain.train[0][0].shape
    assert torch.equal(datamodule.val[0][0], plain.val[0][0])


def test_randaugment_leaves_as_many_images_unchanged_as_the_official_pipeline():
    # paper.md section 3, measured with the official code: 27.1% of 1,000 draws over 40 smooth 224 px images
    # unchanged (both ops skipped at p 0.5, or a no-op). Binomial sd at n = 1000: 1.4 points.
    policy = RandAugment.parse("rand-m9-mstd0.5-inc1")
    noise = np.random.default_rng(0).integers(0, 256, (40, 4, 4, 3), dtype=np.uint8)
    images = [Image.fromarray(n).resize((224, 224), Image.Resampling.BICUBIC) for n in noise]
    rng = random.Random(0)
    unchanged = sum(np.array_equal(np.asarray(policy(images[i % 40], rng)), images[i % 40]) for i in range(1000))
    assert 0.24 <= unchanged / 1000 <= 0.31
