"""timm's RandAugment policy (rand-m9-mstd0.5-inc1) re-implemented on Pillow: arguments, noise, skips, ops, fill."""

from __future__ import annotations

import collections
import math
import random
import statistics

import numpy as np
import pytest
from PIL import Image

from metaformer_lab.data.randaugment import (
    EXAMPLE,
    IMAGENET_FILL,
    OPS,
    RESAMPLE,
    Op,
    RandAugment,
    level_to_arg,
    rotate_arg,
    translate_x_rel,
)
from metaformer_lab.registry import ConfigError

INCREASING = {
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
    "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
    "TranslateXRel", "TranslateYRel",
}  # fmt: skip
PLAIN = {
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color", "Contrast",
    "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
}  # fmt: skip
GEOMETRIC = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}


def noise_image(seed: int, size: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def grey_ramp() -> Image.Image:
    """A 256x1 RGB image whose pixel x is (x, x, x)."""
    return Image.fromarray(np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2))


def same(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and a.mode == b.mode and a.tobytes() == b.tobytes()


# ------------------------------------------------------------------------------------------------ arguments


@pytest.mark.parametrize(
    "level, degrees, shear, translate, enhance_inc, enhance, posterize_inc, posterize, solarize_inc, solarize, add",
    [(9, 27, 0.27, 0.405, 0.81, 1.72, 1, 3, 26, 230, 99), (10, 30, 0.3, 0.45, 0.9, 1.9, 0, 4, 0, 256, 110)],
)
def test_level_to_argument(
    level, degrees, shear, translate, enhance_inc, enhance, posterize_inc, posterize, solarize_inc, solarize, add
):
    rng = random.Random(0)

    def values(name: str) -> set[float]:
        return {round(level_to_arg(name, level, rng)[0], 9) for _ in range(64)}

    def signed(size: float) -> set[float]:
        return {round(size, 9), round(-size, 9)}  # both signs occur

    assert values("Rotate") == signed(degrees)
    assert values("ShearX") == values("ShearY") == signed(shear)
    assert values("TranslateXRel") == values("TranslateYRel") == signed(translate)
    for name in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"):
        assert values(name) == {round(1 + enhance_inc, 9), round(1 - enhance_inc, 9)}
    for name in ("Color", "Contrast", "Brightness", "Sharpness"):
        assert values(name) == {round(enhance, 9)}
    assert values("PosterizeIncreasing") == {posterize_inc}
    assert values("Posterize") == {posterize}
    assert values("SolarizeIncreasing") == {solarize_inc}
    assert values("Solarize") == {solarize}
    assert values("SolarizeAdd") == {add}
    for name in ("AutoContrast", "Equalize", "Invert"):
        assert level_to_arg(name, level, rng) == ()


def test_argument_ranges_over_all_magnitudes():
    rng = random.Random(1)
    for level in np.linspace(0, 10, 41):
        assert abs(level_to_arg("Rotate", level, rng)[0]) <= 30
        assert abs(level_to_arg("ShearX", level, rng)[0]) <= 0.3
        assert abs(level_to_arg("TranslateYRel", level, rng)[0]) <= 0.45
        assert 0.1 <= level_to_arg("ContrastIncreasing", level, rng)[0] <= 1.9
        assert 0 <= level_to_arg("PosterizeIncreasing", level, rng)[0] <= 4
        assert 0 <= level_to_arg("SolarizeIncreasing", level, rng)[0] <= 256
        assert 0 <= level_to_arg("SolarizeAdd", level, rng)[0] <= 110
    assert level_to_arg("PosterizeIncreasing", 0, rng) == (4,) and level_to_arg("SolarizeIncreasing", 0, rng) == (256,)
    assert level_to_arg("BrightnessIncreasing", 0, rng) == (1.0,)


def test_arguments_reach_the_image():
    ramp = grey_ramp()
    policy = RandAugment.parse("rand-m9-p1.0-inc1")  # mstd0: exactly m9
    v = np.arange(256)

    def out(name: str) -> np.ndarray:
        result = np.asarray(policy.apply_op(ramp, name, random.Random(0)))
        assert (result == result[..., :1]).all()  # still grey
        return result[0, :, 0].astype(int)

    assert set(out("PosterizeIncreasing")) == {0, 128}  # 1 bit
    assert (out("SolarizeIncreasing") == np.where(v < 26, v, 255 - v)).all()
    assert (out("SolarizeAdd") == np.where(v < 128, np.minimum(255, v + 99), v)).all()
    assert (out("Invert") == 255 - v).all()
    brightened = out("BrightnessIncreasing")[100]
    assert brightened in (181, 19)  # 100 * 1.81 or 100 * 0.19
    assert (out("AutoContrast") == v).all()  # already full range
    assert (np.asarray(policy.apply_op(ramp, "Posterize", random.Random(0)))[0, :, 0] == v & 0b11100000).all()


# ------------------------------------------------------------------------------------------------ magnitude


def test_magnitude_noise():
    rng = random.Random(0)
    draws = [RandAugment.parse(EXAMPLE).sample_magnitude(rng) for _ in range(20000)]
    assert abs(statistics.fmean(draws) - 9) < 0.02
    assert 0.45 < statistics.pstdev(draws) < 0.52  # 0.5, a little less for the clip at 10 (2 std above)
    assert min(draws) >= 0 and max(draws) == 10  # clipped, and the clip is reached
    assert min(draws) < 8
    assert {RandAugment.parse("rand-m9-mstd0-inc1").sample_magnitude(rng) for _ in range(100)} == {9.0}
    assert {RandAugment.parse("rand-m9").sample_magnitude(rng) for _ in range(100)} == {9.0}


@pytest.mark.parametrize("policy", ["rand-m9-mstdinf", "rand-m9-mstd101"])
def test_magnitude_uniform(policy):
    rng = random.Random(0)
    draws = [RandAugment.parse(policy).sample_magnitude(rng) for _ in range(5000)]
    assert 0 <= min(draws) < 0.1 and 8.9 < max(draws) <= 9
    assert abs(statistics.fmean(draws) - 4.5) < 0.15


def test_magnitude_clip():
    rng = random.Random(0)
    assert RandAugment.parse("rand-m15").sample_magnitude(rng) == 10  # mmax defaults to 10
    assert RandAugment.parse("rand-m15-mmax20").sample_magnitude(rng) == 15
    assert RandAugment.parse("rand-m15-mmax12.5").sample_magnitude(rng) == 12.5


# -------------------------------------------------------------------------------------------- skips and ops


def fraction_unchanged(policy: str, count: int) -> float:
    augment, rng = RandAugment.parse(policy), random.Random(0)
    images = [noise_image(seed) for seed in range(16)]
    return sum(same(augment(images[i % 16], rng), images[i % 16]) for i in range(count)) / count


def test_fraction_unchanged():
    # both ops skipped: 0.5**2, plus ~0.03 for AutoContrast (a no-op on full-range noise) or Invert twice
    assert 0.22 < fraction_unchanged(EXAMPLE, 1200) < 0.33
    assert fraction_unchanged("rand-m9-mstd0.5-inc1-p1.0", 600) < 0.03
    assert fraction_unchanged("rand-m9-mstd0.5-inc1-p0", 50) == 1.0
    assert fraction_unchanged("rand-m9-mstd0.5-inc1-n0-p1.0", 50) == 1.0


def test_op_sets():
    assert set(RandAugment.parse(EXAMPLE).op_names) == INCREASING and len(INCREASING) == 15
    assert set(RandAugment.parse("rand-m9-mstd0.5-inc0").op_names) == PLAIN and len(PLAIN) == 15
    assert set(RandAugment.parse("rand-m9-mstd0.5").op_names) == PLAIN  # inc0 is the default
    assert INCREASING | PLAIN <= set(OPS)
    assert {name for name, op in OPS.items() if op.geometric} == GEOMETRIC


@pytest.mark.parametrize("policy, names", [(EXAMPLE, INCREASING), ("rand-m9-mstd0.5-inc0", PLAIN)])
def test_ops_drawn_uniformly_with_replacement(policy, names):
    augment, rng = RandAugment.parse(policy), random.Random(0)
    pairs = [augment.choose_ops(rng) for _ in range(6000)]
    assert {len(pair) for pair in pairs} == {2}
    counts = collections.Counter(name for pair in pairs for name in pair)
    assert set(counts) == names
    assert all(650 < count < 950 for count in counts.values()), counts  # 800 each
    repeated = sum(a == b for a, b in pairs) / len(pairs)
    assert 0.05 < repeated < 0.085  # 1/15: the same op twice happens
    assert len(RandAugment.parse(policy + "-n3").choose_ops(rng)) == 3


# ---------------------------------------------------------------------------------------------- geometry


def test_translate_fills_with_the_mean_pixel():
    white = Image.new("RGB", (100, 50), (255, 255, 255))
    for resample in RESAMPLE:
        left = np.asarray(translate_x_rel(white, 0.9, IMAGENET_FILL, resample))
        assert (left[:, :8] == 255).all() and (left[:, 12:] == IMAGENET_FILL).all()  # content moved left by 90 px
        right = np.asarray(translate_x_rel(white, -0.9, IMAGENET_FILL, resample))
        assert (right[:, :88] == IMAGENET_FILL).all() and (right[:, 92:] == 255).all()


@pytest.mark.parametrize("name", sorted(GEOMETRIC))
def test_geometric_ops_fill(name):
    white = Image.new("RGB", (40, 40), (255, 255, 255))
    policy = RandAugment.parse("rand-m10-n1-p1.0", fill=(1, 2, 3))
    out = np.asarray(policy.apply_op(white, name, random.Random(0)))
    assert (out == (1, 2, 3)).all(axis=-1).sum() >= 40  # corners / a strip of uncovered pixels
    assert RandAugment.parse(EXAMPLE).fill == IMAGENET_FILL


def test_fill_and_resample_passed_to_geometric_ops(monkeypatch):
    calls = []

    def record(img, degrees, fill, resample):
        calls.append((degrees, fill, resample))
        return img

    monkeypatch.setitem(OPS, "Rotate", Op(record, rotate_arg, geometric=True))
    policy, rng = RandAugment.parse("rand-m9-p1.0-inc1", fill=(7, 8, 9)), random.Random(0)
    for _ in range(100):
        policy.apply_op(Image.new("RGB", (8, 8)), "Rotate", rng)
    assert {fill for _, fill, _ in calls} == {(7, 8, 9)}
    assert set(RESAMPLE) == {Image.Resampling.BILINEAR, Image.Resampling.BICUBIC}
    assert {resample for _, _, resample in calls} == set(RESAMPLE)  # chosen at random per call
    assert {round(degrees, 9) for degrees, _, _ in calls} == {27, -27}


def test_policy_applies_geometric_ops_about_a_third_of_the_time():
    white = Image.new("RGB", (32, 32), (255, 255, 255))
    policy, rng = RandAugment.parse("rand-m10-n1-p1.0-inc1", fill=(1, 2, 3)), random.Random(0)
    # only a geometric op can put the (non-grey) fill colour into a grey image: 5 of the 15 ops
    filled = sum((np.asarray(policy(white, rng)) == (1, 2, 3)).all(axis=-1).any() for _ in range(600)) / 600
    assert 0.27 < filled < 0.40


# ------------------------------------------------------------------------------------------- determinism


def test_same_seed_same_image():
    policy = RandAugment.parse(EXAMPLE)
    image = noise_image(0)
    before = image.tobytes()
    outputs = [policy(image, random.Random(seed)) for seed in range(40)]
    again = [policy(image, random.Random(seed)) for seed in range(40)]
    assert all(same(a, b) for a, b in zip(outputs, again, strict=True))
    assert image.tobytes() == before  # the input is not modified
    assert len({out.tobytes() for out in outputs}) > 20  # and seeds differ


def test_rng_is_the_only_randomness():
    policy, image = RandAugment.parse("rand-m9-mstd0.5-inc1-p1.0"), noise_image(1)
    random.seed(0)
    np.random.seed(0)
    first = policy(image, random.Random(5))
    random.seed(1)
    np.random.seed(1)
    assert same(policy(image, random.Random(5)), first)


# ------------------------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    "policy, expected",
    [
        (EXAMPLE, dict(magnitude=9, num_ops=2, magnitude_std=0.5, magnitude_max=10, increasing=True, prob=0.5)),
        ("rand", dict(magnitude=10, num_ops=2, magnitude_std=0, magnitude_max=10, increasing=False, prob=0.5)),
        ("rand-m9-n3-mstd0.5", dict(magnitude=9, num_ops=3, magnitude_std=0.5, increasing=False)),
        ("rand-inc1-p1.0-m7.5-mmax12", dict(magnitude=7.5, magnitude_max=12, increasing=True, prob=1.0)),
        ("rand-mstdinf-inc0", dict(magnitude=10, magnitude_std=math.inf, increasing=False)),
        ("rand-mstd101", dict(magnitude_std=math.inf)),
    ],
)
def test_parse(policy, expected):
    parsed = RandAugment.parse(policy)
    assert {field: getattr(parsed, field) for field in expected} == expected


@pytest.mark.parametrize(
    "policy",
    [
        "", "rand-", "randm9", "Rand-m9", "auto-m9", "rand-m", "rand-mx", "rand-x9", "rand-m9-m9", "rand-inc2",
        "rand-p1.5", "rand-n2.5", "rand-n-1", "rand-tweights", "rand-m9-", "rand-minf", "rand-mmax0", "rand-m9 ",
        "rand-w0", "rand-mstd-1", "rand_m9", "rand-m9_mstd0.5", "rand-m1e1", "rand-n1_0",
    ],
)  # fmt: skip
def test_bad_policy(policy):
    with pytest.raises(ConfigError) as error:
        RandAugment.parse(policy)
    assert error.value.key == "data.rand_augment" and error.value.value == policy
    assert EXAMPLE in str(error.value) and "data.rand_augment" in str(error.value)
    with pytest.raises(ConfigError, match="recipe.aa"):
        RandAugment.parse(policy, key="recipe.aa")
