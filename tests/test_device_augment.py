"""metaformer_lab.data.device_augment against randaugment.py's Pillow RandAugment: every op at arguments up to the
extremes, the argument distributions, the official-pipeline measurement (paper.md section 3), determinism and
policies, no host sync, and resize_crops against Pillow's resize. On the CPU; the gpu-marked test runs it on CUDA."""

from __future__ import annotations

import dataclasses
import random
import statistics

import numpy as np
import pytest
import torch
from PIL import Image

from metaformer_lab.data.device_augment import (
    AugmentDraws,
    apply_augment,
    apply_op,
    draw_augment,
    op_argument,
    rand_augment_batch,
    resize_crops,
)
from metaformer_lab.data.randaugment import IMAGENET_FILL, OPS, RESAMPLE, RandAugment, level_to_arg
from metaformer_lab.registry import ConfigError

POLICY = "rand-m9-mstd0.5-inc1"
LEVELS = (0.0, 0.5, 4.5, 9.0, 9.73, 10.0)  # 0 and 10 give each op's extreme arguments


def smooth_images(count: int, size: tuple[int, int] | int, seed: int = 0) -> list[Image.Image]:
    """Natural-ish images as tests/test_recipe.py makes them: 4x4 noise resized bicubic to `size` (w, h)."""
    size = (size, size) if isinstance(size, int) else size
    noise = np.random.default_rng(seed).integers(0, 256, (count, 4, 4, 3), dtype=np.uint8)
    return [Image.fromarray(n).resize(size, Image.Resampling.BICUBIC) for n in noise]


def flat_and_edges(size: int = 64) -> list[Image.Image]:
    """Flat areas with hard edges and a one-pixel grid, and a flat grey image."""
    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[:, : size // 2] = (200, 30, 90)
    pixels[size // 4 : size // 2, size // 4 :] = (10, 250, 128)
    pixels[::7, ::5] = 255
    return [Image.fromarray(pixels), Image.new("RGB", (size, size), (77, 77, 77))]


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(image)).permute(2, 0, 1) for image in images])


def to_image(tensor: torch.Tensor) -> Image.Image:
    return Image.fromarray(tensor.permute(1, 2, 0).numpy())


class FixedSign(random.Random):
    """An rng whose random() makes timm's _randomly_negate negate (1.0 > 0.5) or not (0.0)."""

    def __init__(self, negate: bool) -> None:
        super().__init__(0)
        self.value = 1.0 if negate else 0.0

    def random(self) -> float:
        return self.value


# ------------------------------------------------------------------------------------------------ every op


IMAGE_SETS = {
    "square": smooth_images(4, 64) + flat_and_edges(64),
    "non-square": smooth_images(2, (71, 53), seed=1),  # width 71, height 53: translate and rotate centre per axis
}


def _cases(name: str) -> list[tuple[float, bool, float]]:
    """(level, negate, Pillow argument) for each level and sign; argument-free ops once."""
    if OPS[name].level_to_arg is None:
        return [(0.0, False, 0.0)]
    return [(level, negate, level_to_arg(name, level, FixedSign(negate))[0]) for level in LEVELS
            for negate in (False, True)]  # fmt: skip


def _pillow(name: str, image: Image.Image, argument: float, bicubic: bool) -> Image.Image:
    op = OPS[name]
    if op.geometric:
        return op.apply(image, argument, fill=IMAGENET_FILL, resample=RESAMPLE[bicubic])
    return op.apply(image) if op.level_to_arg is None else op.apply(image, argument)


@pytest.mark.parametrize("name", sorted(OPS))
def test_each_op_matches_pillow(name):
    cases = _cases(name)
    levels = torch.tensor([level for level, _, _ in cases], dtype=torch.float64)
    negates = torch.tensor([negate for _, negate, _ in cases])
    assert op_argument(name, levels, negates).tolist() == [argument for _, _, argument in cases]  # exactly
    for images in IMAGE_SETS.values():
        batch = to_tensor(images)
        for (_, _, argument), bicubic in ((case, cubic) for case in cases for cubic in (False, True)):
            if not OPS[name].geometric and bicubic:
                continue
            ours = apply_op(batch, name, torch.full((len(images),), float(argument), dtype=torch.float64),
                            torch.full((len(images),), bicubic))  # fmt: skip
            pillow = to_tensor([_pillow(name, image, argument, bicubic) for image in images])
            context = f"{name}({argument}) {'bicubic' if bicubic else 'bilinear'}"
            if not OPS[name].geometric:
                # the point ops, Color and Sharpness follow Pillow's arithmetic: bit for bit
                assert torch.equal(ours, pillow), context
                continue
            difference = (ours.int() - pillow.int()).abs().float()
            changed_ours, changed_pillow = (ours != batch).float().mean(), (pillow != batch).float().mean()
            # near-identity rotations: the two cubics disagree on which pixels move by a level (measured <= 0.041)
            assert abs(changed_ours - changed_pillow) <= 0.05, context
            if bicubic:
                # grid_sample's cubic has a = -0.75, Pillow's transform a = -1 (measured <= 0.42, at hard edges)
                assert difference.mean() <= 0.6, context
            else:
                # the exact bilinear value, where Pillow's double rounding leaves an exact integer just below
                # and truncates it a level down (measured <= 2.2% of values, at 64 px)
                assert difference.max() <= 1 and (difference > 0).float().mean() <= 0.03, context


def test_geometric_ops_fill_outside_and_keep_flat_areas_exact():
    grey = to_tensor([Image.new("RGB", (40, 30), (77, 77, 77))])
    for name, argument in (("Rotate", 30.0), ("ShearX", -0.3), ("TranslateYRel", 0.45)):
        for bicubic in (False, True):
            ours = apply_op(grey, name, torch.tensor([argument], dtype=torch.float64), torch.tensor([bicubic]))
            pillow = to_tensor([_pillow(name, to_image(grey[0]), argument, bicubic)])
            assert torch.equal(ours, pillow), (name, bicubic)  # only fill and 77: Pillow's inside test, exactly


def test_draws_of_two_layers_compose_as_pillow_applies_them():
    # per image: two layers of non-geometric ops (exact), some skipped; apply_augment against OPS[name].apply in turn
    images = smooth_images(6, 48, seed=3)
    policy = RandAugment.parse("rand-n2-m9-inc1")
    names = policy.op_names
    picks = [["Equalize", "SharpnessIncreasing"], ["ColorIncreasing", "PosterizeIncreasing"],
             ["SolarizeAdd", "AutoContrast"], ["ContrastIncreasing", "Invert"],
             ["BrightnessIncreasing", "SolarizeIncreasing"], ["Equalize", "Equalize"]]  # fmt: skip
    applied = torch.tensor([[True, True, False, True, True, True], [True, True, True, False, True, True]])
    level = torch.tensor([[9.0, 3.0, 10.0, 7.5, 9.4, 1.0], [8.0, 10.0, 2.0, 9.0, 6.0, 5.0]], dtype=torch.float64)
    negate = torch.tensor([[False, True, False, True, False, True], [True, False, True, False, True, False]])
    draws = AugmentDraws(
        op_index=torch.tensor([[names.index(p[layer]) for p in picks] for layer in range(2)]),
        applied=applied, level=level, negate=negate, bicubic=torch.zeros(2, 6, dtype=torch.bool),
    )  # fmt: skip
    expected = []
    for b, image in enumerate(images):
        for layer in range(2):
            if applied[layer, b]:
                argument = level_to_arg(picks[b][layer], float(level[layer, b]), FixedSign(bool(negate[layer, b])))
                image = OPS[picks[b][layer]].apply(image, *argument)
        expected.append(image)
    assert torch.equal(apply_augment(to_tensor(images), policy, draws), to_tensor(expected))


# ------------------------------------------------------------------------------------------ argument ranges


def _ks_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    a, b = a.sort().values, b.sort().values
    points = torch.cat([a, b])
    cdf_a = torch.searchsorted(a, points, right=True) / a.numel()
    cdf_b = torch.searchsorted(b, points, right=True) / b.numel()
    return (cdf_a - cdf_b).abs().max().item()


POLICIES = ["rand-m9-mstd0.5-inc1", "rand-m9-mstd0.5", "rand-m7-mstdinf-inc1", "rand-m10-mstd2-mmax8"]


@pytest.mark.parametrize("policy", POLICIES)
def test_argument_distributions_match_level_to_arg(policy):
    policy = RandAugment.parse(policy)
    count = 20_000
    draws = draw_augment(policy, count, torch.Generator().manual_seed(0))
    level, negate = draws.level[0], draws.negate[0]
    rng = random.Random(0)
    top = level == policy.magnitude_max
    for name in policy.op_names:
        if OPS[name].level_to_arg is None:
            continue
        ours = op_argument(name, level, negate)
        python_levels = [policy.sample_magnitude(rng) for _ in range(count)]
        theirs = torch.tensor([level_to_arg(name, value, rng)[0] for value in python_levels], dtype=torch.float64)
        # same distribution: KS at 1.95 * sqrt(2 / n) (p = 0.001 if equal), means within 5 standard errors, the
        # 1st and 99th percentiles within 3% of the range
        assert _ks_distance(ours, theirs) <= 1.95 * (2 / count) ** 0.5, name
        standard_error = ((ours.var() + theirs.var()) / count).sqrt().item()
        assert abs((ours.mean() - theirs.mean()).item()) <= 5 * standard_error + 1e-12, name
        spread = (theirs.max() - theirs.min()).item() or 1.0
        quantiles = torch.tensor([0.01, 0.99], dtype=torch.float64)
        gaps = (ours.quantile(quantiles) - theirs.quantile(quantiles)).abs()
        assert (gaps <= 0.03 * spread).all(), (name, gaps)
        # min and max: inside what levels 0..mmax give, and where the clip at mmax holds draws on both sides
        # (e.g. 2.3% at m9 mstd0.5), the same extreme arguments (a lone Gaussian tail draw is not compared)
        reachable = [level_to_arg(name, end, FixedSign(sign))[0] for end in (0.0, policy.magnitude_max)
                     for sign in (False, True)]  # fmt: skip
        assert min(reachable) <= ours.min() and ours.max() <= max(reachable), name
        at_top = {argument for value, argument in zip(python_levels, theirs.tolist(), strict=True)
                  if value == policy.magnitude_max}  # fmt: skip
        python_top = sum(value == policy.magnitude_max for value in python_levels) / count
        if top.double().mean() >= 0.01 and python_top >= 0.01:
            assert set(ours[top].tolist()) == at_top, name
    # the other draws: op uniform over the 15, applied with p, random sign and filter at 1/2
    frequencies = torch.bincount(draws.op_index.flatten(), minlength=15).double() / draws.op_index.numel()
    assert frequencies.numel() == 15 and (frequencies - 1 / 15).abs().max() <= 0.01
    assert abs(draws.applied.double().mean().item() - policy.prob) <= 0.01
    assert abs(draws.negate.double().mean().item() - 0.5) <= 0.01
    assert abs(draws.bicubic.double().mean().item() - 0.5) <= 0.01


# -------------------------------------------------------------------------------- the official measurement


def test_randaugment_on_the_device_leaves_as_many_images_unchanged_as_the_official_pipeline():
    # paper.md section 3, official code: 1,000 draws over 40 smooth 224 px images, 27.1% unchanged, "median
    # mean-absolute pixel change 50.9". Same images and count as tests/test_recipe.py, through both paths.
    policy = RandAugment.parse(POLICY)
    noise = np.random.default_rng(0).integers(0, 256, (40, 4, 4, 3), dtype=np.uint8)
    images = [Image.fromarray(n).resize((224, 224), Image.Resampling.BICUBIC) for n in noise]
    rng = random.Random(0)
    pillow = [float(np.abs(np.asarray(policy(images[i % 40], rng), dtype=np.int16) - np.asarray(images[i % 40]))
                    .mean()) for i in range(1000)]  # fmt: skip
    batch, generator = to_tensor(images), torch.Generator().manual_seed(0)
    device = torch.cat([
        (rand_augment_batch(batch, policy, generator).int() - batch.int()).abs().float().mean((1, 2, 3))
        for _ in range(25)
    ]).tolist()  # fmt: skip

    def unchanged(changes: list[float]) -> float:
        return sum(change == 0 for change in changes) / len(changes)

    assert 0.24 <= unchanged(device) <= 0.31 and 0.24 <= unchanged(pillow) <= 0.31  # binomial sd: 1.4 points
    # medians over all 1,000 draws and over the changed ones; between seeds each moves by ~3 levels
    medians = {path: (statistics.median(changes), statistics.median([c for c in changes if c > 0]))
               for path, changes in (("device", device), ("pillow", pillow))}  # fmt: skip
    for over_all, over_changed in zip(medians["device"], medians["pillow"], strict=True):
        assert abs(over_all - over_changed) <= 6, medians
    # paper.md does not say whether unchanged draws count: 50.9 lies between the two readings on both paths
    for over_all, over_changed in medians.values():
        assert over_all - 3 <= 50.9 <= over_changed + 3, medians


# -------------------------------------------------------------------------- determinism, policies, errors


def test_same_seed_same_output_other_seed_other_output_dtype_shape_device_kept():
    batch = to_tensor(smooth_images(8, 32, seed=5))

    def run(seed: int) -> torch.Tensor:
        return rand_augment_batch(batch, POLICY, torch.Generator().manual_seed(seed))

    first = run(0)
    assert first.dtype == torch.uint8 and first.shape == batch.shape and first.device == batch.device
    assert torch.equal(first, run(0)) and not torch.equal(first, run(1))
    assert not torch.equal(first, batch)


def test_inc0_policies_run_the_plain_ops():
    batch = to_tensor(smooth_images(16, 32, seed=6))
    policy = RandAugment.parse("rand-m9-mstd0.5")
    assert not policy.increasing and "Posterize" in policy.op_names
    out = rand_augment_batch(batch, policy, torch.Generator().manual_seed(0))
    assert out.shape == batch.shape and not torch.equal(out, batch)


@pytest.mark.parametrize("policy", ["rand-m9-p0", "rand-n0-m9-mstd0.5-inc1", "rand-m0-p1-inc1"])
def test_policies_that_change_nothing_leave_images_bit_for_bit(policy):
    # p0: every op skipped; n0: no op; m0 with the increasing ops: each op at its no-change argument but the
    # argument-free AutoContrast, Equalize, Invert and PosterizeIncreasing (4 bits at level 0): images that drew
    # none of those stay unchanged
    batch = to_tensor(smooth_images(12, 32, seed=7))
    parsed = RandAugment.parse(policy)
    generator = torch.Generator().manual_seed(0)
    draws = draw_augment(parsed, len(batch), generator)
    out = apply_augment(batch, parsed, draws)
    changing = ("AutoContrast", "Equalize", "Invert", "PosterizeIncreasing")
    free = torch.tensor([parsed.op_names.index(name) for name in changing if name in parsed.op_names])
    touched = (torch.isin(draws.op_index, free) & draws.applied).any(0)
    assert torch.equal(out[~touched], batch[~touched])
    if parsed.magnitude == 0:
        assert (~touched).sum() >= 3  # the check above checked something


@pytest.mark.parametrize("bad", ["rand-m9-x3", "auto-m9", "rand-m9-m8", "rand-p2"])
def test_a_bad_policy_raises_the_parsers_config_error(bad):
    with pytest.raises(ConfigError) as parsed:
        RandAugment.parse(bad)
    with pytest.raises(ConfigError) as ours:
        rand_augment_batch(to_tensor(smooth_images(1, 8)), bad, torch.Generator())
    assert str(ours.value) == str(parsed.value)


def test_non_uint8_images_are_refused():
    with pytest.raises(ValueError, match="uint8"):
        rand_augment_batch(torch.zeros(2, 3, 8, 8), POLICY, torch.Generator())


# ----------------------------------------------------------------------------------------------- resize


def test_resize_crops_matches_pillow_resize():
    # (h, w): down, up, odd, same size; (300, 251) and (500, 120) are shapes this Pillow build resizes vertically first
    shapes = [(375, 500), (37, 53), (13, 17), (61, 61), (224, 224), (150, 300), (300, 251), (500, 120)]
    images = [smooth_images(1, (w, h), seed=i)[0] for i, (h, w) in enumerate(shapes)]
    crops = [torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous() for image in images]
    for size in (64, 61):
        for bicubic in (False, True):
            flags = [bicubic] * len(crops)
            ours = resize_crops(crops, size, flags)
            assert torch.equal(ours, resize_crops(crops, size, torch.tensor(flags)))  # list or CPU tensor
            filter_ = RESAMPLE[bicubic]
            pillow = to_tensor([image.resize((size, size), filter_) for image in images])
            difference = (ours.int() - pillow.int()).abs().float()
            # torch's float filters against Pillow's 22-bit fixed point (and its pass order): a level or two, on
            # under 1% of values (measured <= 0.4%)
            assert difference.max() <= 2 and difference.mean() <= 0.01, (size, bicubic)
    mixed = resize_crops(crops, 32, [True, False] * 4)
    assert mixed.shape == (8, 3, 32, 32) and mixed.dtype == torch.uint8
    assert torch.equal(mixed[1], resize_crops(crops[1:2], 32, [False])[0])
    assert torch.equal(mixed[0], resize_crops(crops[:1], 32, [True])[0])


def test_each_op_on_its_own_images_gives_what_the_whole_batch_way_gives():
    # the CPU runs each op on the images that drew it (by_op), the GPU every op family on the whole batch
    batch = to_tensor(smooth_images(24, 48, seed=11) + flat_and_edges(48))
    for text in (POLICY, "rand-m9-mstd0.5", "rand-m7-n3-mstd1-p0.8"):
        policy = RandAugment.parse(text)
        draws = draw_augment(policy, len(batch), torch.Generator().manual_seed(5))
        assert torch.equal(apply_augment(batch, policy, draws, by_op=True),
                           apply_augment(batch, policy, draws, by_op=False))  # fmt: skip


# ---------------------------------------------------------------------------------------------- no sync


def test_the_hot_path_reads_nothing_back(monkeypatch):
    # on CUDA each of these reads a value back and waits for the stream; on the CPU they are caught here instead
    # (torch's own ops used inside call none of them)
    def refuse(*args, **kwargs):
        raise AssertionError("host sync")

    getitem = torch.Tensor.__getitem__

    def no_mask(self, index):  # a boolean mask's result has a data-dependent shape
        indices = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
            raise AssertionError("boolean mask")
        return getitem(self, index)

    batch = to_tensor(smooth_images(4, 32, seed=8))
    crops = [batch[0, :, :20, :25], batch[1, :, 3:, 5:]]
    for method in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, method, refuse)
    for function in ("nonzero", "masked_select", "bincount", "unique"):
        monkeypatch.setattr(torch, function, refuse)
    monkeypatch.setattr(torch.Tensor, "__getitem__", no_mask)
    for policy in map(RandAugment.parse, (POLICY, "rand-m9-mstd0.5")):  # between them every op in OPS
        draws = draw_augment(policy, len(batch), torch.Generator().manual_seed(0))
        apply_augment(batch, policy, draws, by_op=False)  # the GPU's way (on a CPU each op runs on its own images)
    resize_crops(crops, 24, [True, False])
    resize_crops(crops, 24, torch.tensor([True, False]))  # a CPU tensor is read as host memory (numpy)


# ------------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is false)")
def test_on_cuda_without_a_sync_as_on_the_cpu():
    batch = to_tensor(smooth_images(32, 64, seed=9) + flat_and_edges(64))
    policy = RandAugment.parse(POLICY)
    draws = draw_augment(policy, len(batch), torch.Generator().manual_seed(0))  # drawn on the CPU, applied on both
    geometric = torch.tensor([i for i, name in enumerate(policy.op_names) if OPS[name].geometric])
    no_warp = dataclasses.replace(draws, applied=draws.applied & ~torch.isin(draws.op_index, geometric))
    images = batch.cuda()
    crops = [images[0, :, :50, :37], images[1, :, 5:, 9:]]
    flags_on_gpu = torch.tensor([True, False], device="cuda")
    generator = torch.Generator("cuda").manual_seed(0)
    cuda_draws, cuda_no_warp = draws.to("cuda"), no_warp.to("cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any op that waits for the GPU raises
    try:
        on_cuda = apply_augment(images, policy, cuda_draws)
        on_cuda_no_warp = apply_augment(images, policy, cuda_no_warp)
        augmented = rand_augment_batch(images, POLICY, generator)
        resized = [resize_crops(crops, 48, flags) for flags in ([True, False], torch.tensor([True, False]),
                                                                flags_on_gpu)]  # fmt: skip
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert augmented.device.type == "cuda" and augmented.shape == batch.shape and augmented.dtype == torch.uint8
    # the point ops, Color and Sharpness are integer or IEEE float arithmetic in separate kernels: bit for bit
    assert torch.equal(on_cuda_no_warp.cpu(), apply_augment(batch, policy, no_warp))
    # grid_sample's float32 kernels differ between CPU and CUDA in the last bits: a pixel on the truncation
    # boundary moves a level, and a later Equalize or AutoContrast may carry that on to its whole image
    difference = (on_cuda.cpu().int() - apply_augment(batch, policy, draws).int()).abs()
    assert (difference > 0).float().mean() <= 0.01 and difference.float().mean() <= 0.05
    assert torch.equal(resized[0], resized[1]) and torch.equal(resized[0], resized[2])
    on_cpu = resize_crops([crop.cpu() for crop in crops], 48, [True, False])
    assert (resized[0].cpu().int() - on_cpu.int()).abs().max() <= 2  # float filters, rounded between the passes
