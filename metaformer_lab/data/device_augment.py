"""The train transform's per-image Pillow work on the device, batched: the resize of ragged random-resized crops to
one uint8 batch (`resize_crops`) and timm's RandAugment (`rand_augment_batch`, the policy of
`metaformer_lab.data.randaugment`) on uint8 [B, 3, H, W] tensors, in pure torch (CPU or CUDA, no extra dependency).

    generator = torch.Generator(images.device).manual_seed(0)
    images = rand_augment_batch(images, "rand-m9-mstd0.5-inc1", generator)  # uint8 [B, 3, H, W], same device

Semantics per image are `RandAugment.__call__`'s: `num_ops` layers, each an op drawn uniformly with replacement
from `policy.op_names`, applied with probability `prob`, at magnitude m + N(0, mstd) clipped to [0, mmax] (U(0, m)
for mstd inf), with timm's random signs and level-to-argument mappings, geometric ops resampling bilinear or bicubic
at random and filling with `policy.fill`. Every random choice is drawn up front as [num_ops, B] tensors with the
generator on the images' device (`draw_augment`); the ops then run on the whole batch and `torch.where` keeps each
image's chosen op only, so an image that skips an op is bit-for-bit unchanged and nothing is read back to the host
(no `.item()`, no data-dependent shapes): a CUDA stream never waits on the CPU.

Matching Pillow (checked against `randaugment.py` on Pillow 13 by tests/test_device_augment.py):
* exactly, bit for bit: AutoContrast, Equalize, Invert, Posterize, Solarize, SolarizeAdd, Brightness, Contrast
  (per-image per-channel lookup tables built with Pillow's ImageOps / ImageEnhance arithmetic: its Python floats in
  float64, its C blend `in1 + (float)alpha * (in2 - in1)` in float32, truncated), Color (its RGB->L integer formula,
  then that blend) and Sharpness (its SMOOTH filter, which rounds an integer sum / 13, then that blend);
* geometric ops (Rotate, ShearX/Y, TranslateX/YRel), approximately: Pillow's inverse affine coefficients (rotate's
  round(cos, 15) matrix about the centre), its mapping of the output pixel centre (x + 0.5, y + 0.5), its fill test
  (a source point outside [0, w) x [0, h) gets the fill), its edge clamping of the taps, its truncation and its
  exact copy at argument 0 are reproduced; the interpolation is `grid_sample`'s. Bilinear then gives the exact
  bilinear value, truncated, where Pillow's double arithmetic sometimes lands just below an exact integer
  (70.99999999999994 for 71) and truncates it a level lower: a level apart on up to ~2% of the values of a
  translated 64 px image, ~0.7% at 224 px, ~0.01% for rotations. Bicubic differs by design: Pillow's transform
  filter is the cubic with a = -1 (its resize uses a = -0.5), grid_sample's has a = -0.75: ~0.05-0.2 levels on
  average on smooth images, up to ~15 at hard edges. Pillow's sampler re-written in torch (16 gathered taps,
  Horner sums in float64) did match bit for bit, but took ~30x grid_sample's time on the CPU and ~100 float64
  passes over the batch on a GPU: not worth it for an augmentation.
* CPU and CUDA give the same result for the same draws (`draw_augment` on one, `AugmentDraws.to` the other), but
  for grid_sample's float32 kernels, which can move a pixel on a truncation boundary by a level. The generators'
  streams differ, so one seed gives other draws on each device.
* `resize_crops`, approximately: Pillow's two passes (horizontal into a uint8 image, then vertical), each as
  `interpolate(antialias=True)`, torch's float re-implementation of Pillow's resize filters (same supports and
  bounds, bicubic a = -0.5), rounded half up. Pillow sums in 22-bit fixed point, so a pixel can come out a level
  apart. The Pillow 13 build installed here runs the vertical pass first for some shapes (upstream's code always
  runs the horizontal one first; we could not pin down this build's rule): there a pixel can differ by a level or
  two on smooth images, more on noise where bicubic overshoot is clipped in the other pass.

Why hand-written rather than kornia: kornia's RandAugment is another policy (n distinct ops without replacement, the
same ops for the whole batch, a fixed magnitude m/30 with no noise, always applied, translate up to 0.1, none of
timm's increasing ops), and torch's own `interpolate`, `grid_sample` and gathers suffice, so no dependency is added.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from metaformer_lab.data import randaugment as ra
from metaformer_lab.data.randaugment import LEVEL_DENOM, OPS, Fill, RandAugment

__all__ = [
    "AugmentDraws", "apply_augment", "apply_op", "draw_augment", "op_argument", "rand_augment_batch", "resize_crops",
]  # fmt: skip

Tensor = torch.Tensor
# Pillow truncates its interpolated value; grid_sample's float32 (its coordinates ~2e-5 px off at 224 px) lands a
# little below an exact integer (flat areas, whole-pixel shifts), which truncating alone would take a level down
TRUNCATE_SLACK = 1e-3


# ------------------------------------------------------------------------------------------------------ random draws


@dataclass(frozen=True)
class AugmentDraws:
    """Every random choice of one batch: [num_ops, B] tensors, one column per image, one row per op layer."""

    op_index: Tensor  # int64: index into policy.op_names (uniform, with replacement)
    applied: Tensor  # bool: the op runs (timm skips it when random() > prob)
    level: Tensor  # float64: the magnitude after noise and clipping to [0, mmax]
    negate: Tensor  # bool: the random sign of signed arguments (timm's _randomly_negate)
    bicubic: Tensor  # bool: geometric ops resample bicubic, else bilinear (timm's 'random' interpolation)

    def to(self, device: torch.device | str) -> AugmentDraws:
        """The same draws on `device` (e.g. drawn on the CPU, applied on a GPU)."""
        return AugmentDraws(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def draw_augment(
    policy: RandAugment, batch_size: int, generator: torch.Generator, device: torch.device | None = None
) -> AugmentDraws:
    """The random choices of `policy` for `batch_size` images, drawn with `generator` on `device` (default: the
    generator's). Always the same five draws in the same order, whatever the policy: one generator state, one
    result."""
    shape, device = (policy.num_ops, batch_size), generator.device if device is None else device

    def uniform() -> Tensor:
        return torch.rand(shape, generator=generator, device=device, dtype=torch.float64)

    op_index = torch.randint(len(policy.op_names), shape, generator=generator, device=device)
    applied = uniform() < policy.prob  # `<`: p0 never applies, p1 always (timm draws nothing at p1)
    if policy.magnitude_std == math.inf:
        level = policy.magnitude * uniform()
    else:  # std 0 adds exact zeros: m stays m
        noise = torch.randn(shape, generator=generator, device=device, dtype=torch.float64)
        level = policy.magnitude + policy.magnitude_std * noise
    level = level.clamp(0.0, policy.magnitude_max)
    negate = uniform() > 0.5
    bicubic = uniform() < 0.5
    return AugmentDraws(op_index, applied, level, negate, bicubic)


# ------------------------------------------------------------------------------------- level -> argument, batched


def _signed(value: Tensor, negate: Tensor) -> Tensor:
    return torch.where(negate, -value, value)


def _rotate_arg(level: Tensor, negate: Tensor) -> Tensor:
    return _signed(level / LEVEL_DENOM * 30.0, negate)


def _shear_arg(level: Tensor, negate: Tensor) -> Tensor:
    return _signed(level / LEVEL_DENOM * 0.3, negate)


def _translate_rel_arg(level: Tensor, negate: Tensor) -> Tensor:
    return _signed(level / LEVEL_DENOM * 0.45, negate)


def _enhance_arg(level: Tensor, negate: Tensor) -> Tensor:
    return level / LEVEL_DENOM * 1.8 + 0.1


def _enhance_increasing_arg(level: Tensor, negate: Tensor) -> Tensor:
    return (1.0 + _signed(level / LEVEL_DENOM * 0.9, negate)).clamp(min=0.1)


def _posterize_arg(level: Tensor, negate: Tensor) -> Tensor:
    return (level / LEVEL_DENOM * 4).trunc()


def _posterize_increasing_arg(level: Tensor, negate: Tensor) -> Tensor:
    return 4 - _posterize_arg(level, negate)


def _solarize_arg(level: Tensor, negate: Tensor) -> Tensor:
    return (level / LEVEL_DENOM * 256).trunc().clamp(max=256)


def _solarize_increasing_arg(level: Tensor, negate: Tensor) -> Tensor:
    return 256 - _solarize_arg(level, negate)


def _solarize_add_arg(level: Tensor, negate: Tensor) -> Tensor:
    return (level / LEVEL_DENOM * 110).trunc().clamp(max=128)


# randaugment's level_to_arg functions -> their batched twins (same float64 arithmetic, int() as trunc)
_ARGUMENTS: dict[Callable, Callable[[Tensor, Tensor], Tensor]] = {
    ra.rotate_arg: _rotate_arg, ra.shear_arg: _shear_arg, ra.translate_rel_arg: _translate_rel_arg,
    ra.enhance_arg: _enhance_arg, ra.enhance_increasing_arg: _enhance_increasing_arg,
    ra.posterize_arg: _posterize_arg, ra.posterize_increasing_arg: _posterize_increasing_arg,
    ra.solarize_arg: _solarize_arg, ra.solarize_increasing_arg: _solarize_increasing_arg,
    ra.solarize_add_arg: _solarize_add_arg,
}  # fmt: skip


def op_argument(name: str, level: Tensor, negate: Tensor) -> Tensor:
    """Op `name`'s argument per element of `level` (float64), as `randaugment.level_to_arg` gives it with the sign
    `negate`; zeros for the argument-free ops."""
    mapping = OPS[name].level_to_arg
    return torch.zeros_like(level) if mapping is None else _ARGUMENTS[mapping](level, negate)


# --------------------------------------------------------------------------------------------- Pillow arithmetic


def _blend(degenerate: Tensor, image: Tensor, factor: Tensor) -> Tensor:
    """Pillow's Image.blend(degenerate, image, factor) on uint8 tensors: in float32 (the C code converts the factor
    to float), truncated toward zero and clipped, as ImageEnhance does. `factor` broadcasts against the images."""
    low = degenerate.float()
    mixed = low + factor.float() * (image.float() - low)
    return mixed.clamp(0, 255).to(torch.uint8)  # float -> uint8 truncates toward zero, as C's cast


def _grey(images: Tensor) -> Tensor:
    """Pillow's RGB -> L conversion, [B, 3, H, W] -> int32 [B, 1, H, W]."""
    r, g, b = images.int().unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).unsqueeze(1)


def _smooth(images: Tensor) -> Tensor:
    """Pillow's ImageFilter.SMOOTH: kernel [[1,1,1],[1,5,1],[1,1,1]] / 13, rounded (Pillow adds 0.5 and truncates),
    the one-pixel border copied unchanged. In integers, exactly: the weighted sum S is an integer and
    (S + 6.5) / 13 lies at least 1/26 from any integer, so Pillow's float rounding never moves its floor, which is
    floor((2S + 13) / 26)."""
    height, width = images.shape[-2:]
    if height < 3 or width < 3:
        return images
    x = images.to(torch.int16)  # S <= 13 * 255
    rows = x[..., :-2, :] + x[..., 1:-1, :] + x[..., 2:, :]
    total = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:] + 4 * x[..., 1:-1, 1:-1]
    smoothed = images.clone()
    smoothed[..., 1:-1, 1:-1] = torch.div(2 * total + 13, 26, rounding_mode="floor").to(torch.uint8)
    return smoothed


# ------------------------------------------------------------------------------------------- point ops as tables


def _levels(images: Tensor) -> Tensor:
    """0..255 as int64 [1, 1, 256]: the identity lookup table."""
    return torch.arange(256, device=images.device).view(1, 1, 256)


def _per_image(argument: Tensor) -> Tensor:
    return argument.view(-1, 1, 1)


def _auto_contrast_lut(images: Tensor, argument: Tensor) -> Tensor:
    """ImageOps.autocontrast (cutoff 0): each channel's [min, max] stretched to [0, 255]; flat channels unchanged."""
    flat = images.flatten(2)
    low, high = flat.amin(2, keepdim=True).double(), flat.amax(2, keepdim=True).double()
    spread = (high - low).clamp(min=1.0)
    scale = torch.full_like(spread, 255.0) / spread  # not 255.0 / spread: torch computes that as a reciprocal
    offset = -low * scale
    stretched = (_levels(images) * scale + offset).trunc().clamp(0, 255).long()
    return torch.where(high > low, stretched, _levels(images))


def _equalize_lut(images: Tensor, argument: Tensor) -> Tensor:
    """ImageOps.equalize: Pillow's integer histogram algorithm per channel (step from all but the last bin)."""
    flat = images.flatten(2).long()
    histogram = torch.zeros((*flat.shape[:2], 256), dtype=torch.int64, device=images.device)
    histogram.scatter_add_(2, flat, torch.ones((1, 1, 1), dtype=torch.int64, device=images.device).expand_as(flat))
    last = histogram.gather(2, flat.amax(2, keepdim=True))  # count of the highest value present
    step = (flat.shape[2] - last) // 255
    before = histogram.cumsum(2) - histogram
    equalized = ((step // 2 + before) // step.clamp(min=1)).clamp(max=255)  # Pillow's point() clips to 255
    distinct = (histogram > 0).sum(2, keepdim=True)
    return torch.where((distinct > 1) & (step > 0), equalized, _levels(images))


def _invert_lut(images: Tensor, argument: Tensor) -> Tensor:
    return 255 - _levels(images)


def _posterize_lut(images: Tensor, bits: Tensor) -> Tensor:
    """Keep the top `bits` bits (8 or more: unchanged, 0 or fewer: black), as randaugment.posterize."""
    shift = 8 - _per_image(bits).clamp(0, 8).long()
    return (_levels(images) >> shift) << shift


def _solarize_lut(images: Tensor, threshold: Tensor) -> Tensor:
    levels = _levels(images)
    return torch.where(levels < _per_image(threshold), levels, 255 - levels)


def _solarize_add_lut(images: Tensor, add: Tensor) -> Tensor:
    levels = _levels(images)
    return torch.where(levels < 128, (levels + _per_image(add).long()).clamp(max=255), levels)


def _brightness_lut(images: Tensor, factor: Tensor) -> Tensor:
    """ImageEnhance.Brightness: blend with black."""
    return _blend(torch.zeros_like(_levels(images)), _levels(images), _per_image(factor)).long()


def _contrast_lut(images: Tensor, factor: Tensor) -> Tensor:
    """ImageEnhance.Contrast: blend with the image's mean grey, int(mean of the L image + 0.5)."""
    grey = _grey(images)
    mean = (grey.sum((1, 2, 3), dtype=torch.int64).double() / grey[0].numel() + 0.5).floor()
    return _blend(_per_image(mean).expand(-1, 1, 256), _levels(images), _per_image(factor)).long()


_LUTS: dict[Callable, Callable[[Tensor, Tensor], Tensor]] = {
    ra.auto_contrast: _auto_contrast_lut, ra.equalize: _equalize_lut, ra.invert: _invert_lut,
    ra.posterize: _posterize_lut, ra.solarize: _solarize_lut, ra.solarize_add: _solarize_add_lut,
    ra.brightness: _brightness_lut, ra.contrast: _contrast_lut,
}  # fmt: skip


def _apply_lut(images: Tensor, lut: Tensor) -> Tensor:
    """Each image's channel c through its table lut[b, c] ([B, 3, 256])."""
    lut = lut.to(torch.uint8).expand(images.shape[0], 3, 256)
    pixels = lut.gather(2, images.flatten(2).long())
    return pixels.view_as(images)


# --------------------------------------------------------------------------------------- blends with a degenerate

_DEGENERATES: dict[Callable, Callable[[Tensor], Tensor]] = {
    ra.color: _grey,  # ImageEnhance.Color: blend with the L image
    ra.sharpness: _smooth,  # ImageEnhance.Sharpness: blend with the SMOOTH image
}


# --------------------------------------------------------------------------------------------- geometric ops


def _identity(argument: Tensor) -> list[Tensor]:
    one, zero = torch.ones_like(argument), torch.zeros_like(argument)
    return [one, zero, zero, zero, one, zero]


def _rotate_matrix(degrees: Tensor, height: int, width: int) -> list[Tensor]:
    """Image.rotate's inverse affine about the centre: counter-clockwise degrees, matrix rounded to 15 decimals."""
    angle = -(torch.remainder(degrees, 360.0) * (math.pi / 180.0))
    cos, sin = torch.round(torch.cos(angle), decimals=15), torch.round(torch.sin(angle), decimals=15)
    sin_neg = torch.round(-torch.sin(angle), decimals=15)
    centre_x, centre_y = width / 2, height / 2
    shift_x = cos * -centre_x + sin * -centre_y + 0.0 + centre_x
    shift_y = sin_neg * -centre_x + cos * -centre_y + 0.0 + centre_y
    return [cos, sin, shift_x, sin_neg, cos, shift_y]


def _shear_x_matrix(factor: Tensor, height: int, width: int) -> list[Tensor]:
    matrix = _identity(factor)
    matrix[1] = factor
    return matrix


def _shear_y_matrix(factor: Tensor, height: int, width: int) -> list[Tensor]:
    matrix = _identity(factor)
    matrix[3] = factor
    return matrix


def _translate_x_matrix(fraction: Tensor, height: int, width: int) -> list[Tensor]:
    matrix = _identity(fraction)
    matrix[2] = fraction * width
    return matrix


def _translate_y_matrix(fraction: Tensor, height: int, width: int) -> list[Tensor]:
    matrix = _identity(fraction)
    matrix[5] = fraction * height
    return matrix


_MATRICES: dict[Callable, Callable[[Tensor, int, int], list[Tensor]]] = {
    ra.rotate: _rotate_matrix, ra.shear_x: _shear_x_matrix, ra.shear_y: _shear_y_matrix,
    ra.translate_x_rel: _translate_x_matrix, ra.translate_y_rel: _translate_y_matrix,
}  # fmt: skip


def _source_points(matrix: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Where each output pixel samples, float64 [B, H, W] x and y: Pillow's affine_transform, the output pixel
    centre (x + 0.5, y + 0.5) through the inverse coefficients (a, b, c, d, e, f) of `matrix` [B, 6]."""
    a, b, c, d, e, f = (column.view(-1, 1, 1) for column in matrix.unbind(1))
    out_x = (torch.arange(width, device=matrix.device, dtype=torch.float64) + 0.5).view(1, 1, width)
    out_y = (torch.arange(height, device=matrix.device, dtype=torch.float64) + 0.5).view(1, height, 1)
    return a * out_x + b * out_y + c, d * out_x + e * out_y + f


def _warp(images: Tensor, matrix: Tensor, bicubic: Tensor, fill: Fill) -> Tensor:
    """Pillow's Image.transform(AFFINE, bilinear or bicubic per image, fillcolor=fill) on a uint8 batch, by
    grid_sample: a source point outside [0, w) x [0, h) gets the fill (Pillow's test, in float64), one inside is
    interpolated from taps clamped to the edge (padding 'border'), then truncated as Pillow's C casts do. An
    identity matrix (argument 0) returns the image itself, as Pillow's copy does."""
    height, width = images.shape[-2:]
    matrix = matrix.to(torch.float64)
    src_x, src_y = _source_points(matrix, height, width)
    inside = (src_x >= 0) & (src_x < width) & (src_y >= 0) & (src_y < height)
    grid = torch.stack((src_x * (2.0 / width) - 1.0, src_y * (2.0 / height) - 1.0), dim=-1).float()
    pixels = images.float()
    samples = [
        F.grid_sample(pixels, grid, mode=mode, padding_mode="border", align_corners=False)
        for mode in ("bilinear", "bicubic")
    ]
    value = torch.where(bicubic.view(-1, 1, 1, 1), samples[1], samples[0])
    value = value.add_(TRUNCATE_SLACK).clamp_(0, 255).to(torch.uint8)  # the cast truncates
    filled = torch.stack([torch.full((), level, dtype=torch.uint8, device=images.device) for level in fill])
    warped = torch.where(inside.unsqueeze(1), value, filled.view(1, -1, 1, 1))
    identity = (matrix == torch.stack(_identity(matrix[:, 0]), dim=1)).all(1)
    return torch.where(identity.view(-1, 1, 1, 1), images, warped)


# ----------------------------------------------------------------------------------------------- op application


def apply_op(
    images: Tensor, name: str, argument: Tensor, bicubic: Tensor | None = None, fill: Fill = ra.IMAGENET_FILL
) -> Tensor:
    """Op `name` of `OPS` on every image of a uint8 [B, 3, H, W] batch, image b at `argument[b]` (float64 [B], as
    `op_argument` gives; ignored by argument-free ops); geometric ops resample bicubic where `bicubic[b]` (bool
    [B]; default bilinear) and fill with `fill`. The batched twin of `OPS[name].apply`."""
    function = OPS[name].apply
    argument = argument.to(images.device, torch.float64)
    if function in _LUTS:
        return _apply_lut(images, _LUTS[function](images, argument))
    if function in _DEGENERATES:
        return _blend(_DEGENERATES[function](images), images, argument.view(-1, 1, 1, 1))
    if bicubic is None:
        bicubic = torch.zeros(images.shape[0], dtype=torch.bool, device=images.device)
    matrix = torch.stack(_MATRICES[function](argument, *images.shape[-2:]), dim=1)
    return _warp(images, matrix, bicubic, fill)


def _layer(images: Tensor, names: Sequence[str], draws: AugmentDraws, layer: int, fill: Fill) -> Tensor:
    """One op layer: every image's drawn op (or none), each family of ops computed once for the whole batch."""
    batch, (height, width) = images.shape[0], images.shape[-2:]
    op_index, applied = draws.op_index[layer], draws.applied[layer]
    level, negate, bicubic = draws.level[layer], draws.negate[layer], draws.bicubic[layer]
    lut = _levels(images).expand(batch, 3, 256)
    lut_chosen = torch.zeros_like(applied)
    blends: dict[Callable, tuple[Tensor, Tensor]] = {}  # degenerate maker -> (factor, chosen)
    matrix = _identity(level)
    warp_chosen = torch.zeros_like(applied)
    for index, name in enumerate(names):
        chosen = applied & (op_index == index)
        argument = op_argument(name, level, negate)
        function = OPS[name].apply
        if function in _LUTS:
            lut = torch.where(chosen.view(-1, 1, 1), _LUTS[function](images, argument), lut)
            lut_chosen = lut_chosen | chosen
        elif function in _DEGENERATES:
            factor, any_chosen = blends.get(function, (torch.ones_like(level), torch.zeros_like(applied)))
            blends[function] = (torch.where(chosen, argument, factor), any_chosen | chosen)
        else:
            op_matrix = _MATRICES[function](argument, height, width)
            matrix = [torch.where(chosen, new, old) for new, old in zip(op_matrix, matrix, strict=True)]
            warp_chosen = warp_chosen | chosen

    def keep(chosen: Tensor, changed: Tensor, current: Tensor) -> Tensor:
        return torch.where(chosen.view(-1, 1, 1, 1), changed, current)

    out = keep(lut_chosen, _apply_lut(images, lut), images)
    for function, (factor, chosen) in blends.items():
        out = keep(chosen, _blend(_DEGENERATES[function](images), images, factor.view(-1, 1, 1, 1)), out)
    if any(OPS[name].geometric for name in names):
        out = keep(warp_chosen, _warp(images, torch.stack(matrix, dim=1), bicubic, fill), out)
    return out


def _layer_by_op(images: Tensor, names: Sequence[str], draws: AugmentDraws, layer: int, fill: Fill) -> Tensor:
    """One op layer as `_layer` computes it, each op run on the images that drew it only: what the CPU is quick
    at, where reading the draws back costs nothing (on a GPU it would wait for the stream, once per op)."""
    out = images.clone()
    chosen_ops = torch.where(draws.applied[layer], draws.op_index[layer], -1)
    for index, name in enumerate(names):
        rows = (chosen_ops == index).nonzero().flatten()
        if len(rows):
            argument = op_argument(name, draws.level[layer][rows], draws.negate[layer][rows])
            out[rows] = apply_op(images[rows], name, argument, draws.bicubic[layer][rows], fill)
    return out


def apply_augment(images: Tensor, policy: RandAugment, draws: AugmentDraws, by_op: bool | None = None) -> Tensor:
    """`policy` on a uint8 [B, 3, H, W] batch with the given draws (on the images' device). `by_op` (default: on a
    CPU) runs each op on the images that drew it, which reads the draws back; otherwise every op family runs on the
    whole batch and `torch.where` keeps each image's own (no host sync). The two give the same images."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images [B, 3, H, W], got {images.dtype} {list(images.shape)}")
    if draws.op_index.shape != (policy.num_ops, images.shape[0]):
        raise ValueError(f"draws for {list(draws.op_index.shape)} (ops, images), not {policy.num_ops} x {len(images)}")
    layer_of = _layer_by_op if (images.device.type == "cpu" if by_op is None else by_op) else _layer
    for layer in range(policy.num_ops):
        images = layer_of(images, policy.op_names, draws, layer, policy.fill)
    return images


def rand_augment_batch(images: Tensor, policy: str | RandAugment, generator: torch.Generator) -> Tensor:
    """timm's RandAugment on a uint8 [B, 3, H, W] batch on any device, each image drawn apart, as
    `RandAugment.__call__` does per Pillow image; returns a new uint8 batch of the same shape on the same device.

    `policy`: a timm policy string (parsed by `RandAugment.parse`: its grammar, its ConfigError) or a parsed
    RandAugment. `generator`: a torch.Generator on the images' device; one generator state, one output. No host
    sync: safe inside a CUDA stream's hot path (see the module docstring for what matches Pillow exactly).

    >>> images = torch.randint(0, 256, (8, 3, 224, 224), dtype=torch.uint8)
    >>> generator = torch.Generator(images.device).manual_seed(0)
    >>> rand_augment_batch(images, "rand-m9-mstd0.5-inc1", generator).shape
    torch.Size([8, 3, 224, 224])
    """
    if isinstance(policy, str):
        policy = RandAugment.parse(policy)
    if generator.device.type != images.device.type:
        raise ValueError(f"the generator is on {generator.device}, the images on {images.device}: draw on theirs")
    return apply_augment(images, policy, draw_augment(policy, images.shape[0], generator, images.device))


# ------------------------------------------------------------------------------------------------------- resize


def _host_flags(bicubic: Tensor | Sequence[bool], count: int) -> list[bool] | None:
    """`bicubic` as Python bools when the host knows them (a list, a CPU tensor); None for a device tensor."""
    if isinstance(bicubic, Tensor):
        if bicubic.device.type != "cpu":
            return None
        flags = [bool(flag) for flag in bicubic.numpy()]  # host memory: no device read
    else:
        flags = [bool(flag) for flag in bicubic]
    if len(flags) != count:
        raise ValueError(f"{count} crops but {len(flags)} interpolation flags")
    return flags


def _resize(crops: Tensor, size: int, mode: str) -> Tensor:
    """Pillow's resize as upstream Pillow runs it: a horizontal pass into a uint8 image (rounded half up, as its
    fixed point does, and clipped: bicubic overshoot is cut there), then a vertical pass."""
    pixels = crops.float()
    for height, width in ((crops.shape[-2], size), (size, size)):
        pixels = F.interpolate(pixels, size=(height, width), mode=mode, align_corners=False, antialias=True)
        pixels = (pixels + 0.5).floor().clamp(0, 255)
    return pixels.to(torch.uint8)


def resize_crops(crops: list[Tensor], size: int, bicubic: Tensor | Sequence[bool]) -> Tensor:
    """Ragged uint8 [3, h, w] crops (on one device) resized to one uint8 [B, 3, size, size] batch as Pillow's
    Image.resize does (antialiased, bicubic where `bicubic[i]`, else bilinear), rounded back to uint8.

    `bicubic` is host knowledge: a Python list or a CPU bool tensor. A bool tensor on the crops' device also works
    without a sync, at twice the cost (both filters run and torch.where picks)."""
    if not crops:
        raise ValueError("no crops to resize")
    flags = _host_flags(bicubic, len(crops))
    out = torch.empty((len(crops), 3, size, size), dtype=torch.uint8, device=crops[0].device)
    if flags is None:
        for i, crop in enumerate(crops):
            both = [_resize(crop.unsqueeze(0), size, mode)[0] for mode in ("bilinear", "bicubic")]
            out[i] = torch.where(bicubic[i], both[1], both[0])
        return out
    groups: dict[tuple[int, int, bool], list[int]] = {}  # same size and filter: one interpolate call
    for i, (crop, flag) in enumerate(zip(crops, flags, strict=True)):
        groups.setdefault((crop.shape[1], crop.shape[2], flag), []).append(i)
    for (_, _, flag), members in groups.items():
        resized = _resize(torch.stack([crops[i] for i in members]), size, "bicubic" if flag else "bilinear")
        for row, i in enumerate(members):
            out[i] = resized[row]
    return out
