"""RandAugment as timm implements it (`timm/data/auto_augment.py`), the policy behind the official PoolFormer
recipe's `--aa rand-m9-mstd0.5-inc1`, written here on Pillow and Python's `random`.

Why not import it: timm and torchvision cannot be installed next to the CPU build of torch this project uses, and
kornia's RandAugment is a different policy (other ops, ranges and magnitude handling). Everything below follows
timm: `n` ops per image drawn uniformly with replacement from 15 ops, each applied with probability `p` (skipped when
`random() > p`), magnitude `m` plus Gaussian noise of std `mstd` per op call (uniform on [0, m] when `mstd` is
`inf` or above 100), clipped to [0, mmax]; the level-to-argument mappings of `OPS`; geometric ops fill
with the ImageNet mean pixel and resample bilinear or bicubic at random (timm's `random` train interpolation,
the official train.py's default). All randomness is drawn from the `random.Random` passed in, so one rng state
always gives one output.

Deliberate differences from timm's parser: `inc0` selects the non-increasing ops (timm tests `bool("0")`, which is
true, so its `inc0` means `inc1`); `m` and `mmax` may be fractional (timm calls `int()` on them); `mstdinf` is
accepted (timm silently ignores a section without a digit); unknown, repeated or malformed sections and the `t`
(weighted transform set) section raise `ConfigError` instead of being skipped or asserted.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image, ImageEnhance, ImageOps

from metaformer_lab.registry import ConfigError

LEVEL_DENOM = 10.0  # magnitude m maps to the fraction m / LEVEL_DENOM of each op's full range
IMAGENET_FILL = (124, 116, 104)  # round(255 * IMAGENET_DEFAULT_MEAN), timm's `img_mean` for geometric ops
RESAMPLE = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)  # timm's 'random' interpolation
EXAMPLE = "rand-m9-mstd0.5-inc1"

Fill = tuple[int, int, int]
LevelToArg = Callable[[float, random.Random], tuple]


# ----------------------------------------------------------------------------------------------- image functions


def auto_contrast(img: Image.Image) -> Image.Image:
    """Stretch each channel to the full 0-255 range."""
    return ImageOps.autocontrast(img)


def equalize(img: Image.Image) -> Image.Image:
    """Histogram-equalize each channel."""
    return ImageOps.equalize(img)


def invert(img: Image.Image) -> Image.Image:
    """255 - pixel."""
    return ImageOps.invert(img)


def posterize(img: Image.Image, bits: int) -> Image.Image:
    """Keep the `bits` most significant bits of each channel (8 or more: unchanged, 0 or less: black).

    A LUT rather than ImageOps.posterize: Pillow 13 rejects bits=0, which timm's PosterizeIncreasing passes at
    magnitude 10 (reachable from m9 with mstd0.5); older Pillow, as timm ran on, returned black there.
    """
    if bits >= 8:
        return img
    mask = ~(2 ** (8 - max(bits, 0)) - 1) & 0xFF
    return img.point([i & mask for i in range(256)] * len(img.getbands()))


def solarize(img: Image.Image, threshold: int) -> Image.Image:
    """Invert the pixels at or above `threshold` (256: unchanged)."""
    return ImageOps.solarize(img, threshold)


def solarize_add(img: Image.Image, add: int, threshold: int = 128) -> Image.Image:
    """Add `add` (saturating at 255) to the pixels below `threshold`; only L and RGB images, as timm."""
    if img.mode not in ("L", "RGB"):
        return img
    lut = [min(255, i + add) if i < threshold else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


def color(img: Image.Image, factor: float) -> Image.Image:
    """Blend with the greyscale image: 0 grey, 1 unchanged, above 1 more saturated."""
    return ImageEnhance.Color(img).enhance(factor)


def contrast(img: Image.Image, factor: float) -> Image.Image:
    """Blend with the mean grey: 0 flat, 1 unchanged."""
    return ImageEnhance.Contrast(img).enhance(factor)


def brightness(img: Image.Image, factor: float) -> Image.Image:
    """Blend with black: 0 black, 1 unchanged."""
    return ImageEnhance.Brightness(img).enhance(factor)


def sharpness(img: Image.Image, factor: float) -> Image.Image:
    """Blend with a smoothed image: 0 smoothed, 1 unchanged, above 1 sharpened."""
    return ImageEnhance.Sharpness(img).enhance(factor)


def rotate(img: Image.Image, degrees: float, fill: Fill, resample: Image.Resampling) -> Image.Image:
    """Rotate counter-clockwise about the centre, same size; uncovered pixels get `fill`."""
    return img.rotate(degrees, resample=resample, fillcolor=fill)


def _affine(img: Image.Image, coeffs: tuple[float, ...], fill: Fill, resample: Image.Resampling) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, coeffs, resample, fillcolor=fill)


def shear_x(img: Image.Image, factor: float, fill: Fill, resample: Image.Resampling) -> Image.Image:
    """Output (x, y) samples input (x + factor * y, y)."""
    return _affine(img, (1, factor, 0, 0, 1, 0), fill, resample)


def shear_y(img: Image.Image, factor: float, fill: Fill, resample: Image.Resampling) -> Image.Image:
    """Output (x, y) samples input (x, factor * x + y)."""
    return _affine(img, (1, 0, 0, factor, 1, 0), fill, resample)


def translate_x_rel(img: Image.Image, fraction: float, fill: Fill, resample: Image.Resampling) -> Image.Image:
    """Output (x, y) samples input (x + fraction * width, y): positive moves the content left."""
    return _affine(img, (1, 0, fraction * img.width, 0, 1, 0), fill, resample)


def translate_y_rel(img: Image.Image, fraction: float, fill: Fill, resample: Image.Resampling) -> Image.Image:
    """Output (x, y) samples input (x, y + fraction * height): positive moves the content up."""
    return _affine(img, (1, 0, 0, 0, 1, fraction * img.height), fill, resample)


# ---------------------------------------------------------------------------------------- level -> op arguments


def _random_sign(value: float, rng: random.Random) -> float:
    return -value if rng.random() > 0.5 else value


def rotate_arg(level: float, rng: random.Random) -> tuple[float]:
    """Degrees: +-30 * level / 10."""
    return (_random_sign(level / LEVEL_DENOM * 30.0, rng),)


def shear_arg(level: float, rng: random.Random) -> tuple[float]:
    """Shear factor: +-0.3 * level / 10."""
    return (_random_sign(level / LEVEL_DENOM * 0.3, rng),)


def translate_rel_arg(level: float, rng: random.Random) -> tuple[float]:
    """Fraction of the width or height: +-0.45 * level / 10 (timm's default `translate_pct`)."""
    return (_random_sign(level / LEVEL_DENOM * 0.45, rng),)


def enhance_arg(level: float, rng: random.Random) -> tuple[float]:
    """Enhance factor of the non-increasing ops: 0.1 + 1.8 * level / 10 (1.0, no change, at level 5)."""
    return (level / LEVEL_DENOM * 1.8 + 0.1,)


def enhance_increasing_arg(level: float, rng: random.Random) -> tuple[float]:
    """Enhance factor 1 +- 0.9 * level / 10, at least 0.1: stronger with the level in either direction."""
    return (max(0.1, 1.0 + _random_sign(level / LEVEL_DENOM * 0.9, rng)),)


def posterize_arg(level: float, rng: random.Random) -> tuple[int]:
    """Bits kept: int(4 * level / 10), 0 to 4 (fewer bits, i.e. stronger, at low levels)."""
    return (int(level / LEVEL_DENOM * 4),)


def posterize_increasing_arg(level: float, rng: random.Random) -> tuple[int]:
    """Bits kept: 4 - int(4 * level / 10), 4 down to 0."""
    return (4 - posterize_arg(level, rng)[0],)


def solarize_arg(level: float, rng: random.Random) -> tuple[int]:
    """Threshold: int(256 * level / 10) capped at 256 (inverts more, i.e. stronger, at low levels)."""
    return (min(256, int(level / LEVEL_DENOM * 256)),)


def solarize_increasing_arg(level: float, rng: random.Random) -> tuple[int]:
    """Threshold: 256 - int(256 * level / 10), 256 (no change) down to 0."""
    return (256 - solarize_arg(level, rng)[0],)


def solarize_add_arg(level: float, rng: random.Random) -> tuple[int]:
    """Amount added below 128: int(110 * level / 10) capped at 128."""
    return (min(128, int(level / LEVEL_DENOM * 110)),)


# ------------------------------------------------------------------------------------------------------ op table


@dataclass(frozen=True)
class Op:
    """One RandAugment op: the image function, its level-to-argument mapping (None: takes no argument) and whether
    it is geometric (then it also gets the fill colour and a random resample filter)."""

    apply: Callable[..., Image.Image]
    level_to_arg: LevelToArg | None = None
    geometric: bool = False


OPS: dict[str, Op] = {
    "AutoContrast": Op(auto_contrast),
    "Equalize": Op(equalize),
    "Invert": Op(invert),
    "Rotate": Op(rotate, rotate_arg, geometric=True),
    "Posterize": Op(posterize, posterize_arg),
    "PosterizeIncreasing": Op(posterize, posterize_increasing_arg),
    "Solarize": Op(solarize, solarize_arg),
    "SolarizeIncreasing": Op(solarize, solarize_increasing_arg),
    "SolarizeAdd": Op(solarize_add, solarize_add_arg),
    "Color": Op(color, enhance_arg),
    "ColorIncreasing": Op(color, enhance_increasing_arg),
    "Contrast": Op(contrast, enhance_arg),
    "ContrastIncreasing": Op(contrast, enhance_increasing_arg),
    "Brightness": Op(brightness, enhance_arg),
    "BrightnessIncreasing": Op(brightness, enhance_increasing_arg),
    "Sharpness": Op(sharpness, enhance_arg),
    "SharpnessIncreasing": Op(sharpness, enhance_increasing_arg),
    "ShearX": Op(shear_x, shear_arg, geometric=True),
    "ShearY": Op(shear_y, shear_arg, geometric=True),
    "TranslateXRel": Op(translate_x_rel, translate_rel_arg, geometric=True),
    "TranslateYRel": Op(translate_y_rel, translate_rel_arg, geometric=True),
}

# timm's _RAND_TRANSFORMS (inc0, the default) and _RAND_INCREASING_TRANSFORMS (inc1), in timm's order
RAND_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color", "Contrast",
    "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)  # fmt: skip
RAND_INCREASING_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
    "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
    "TranslateXRel", "TranslateYRel",
)  # fmt: skip
def level_to_arg(name: str, level: float, rng: random.Random) -> tuple:
    """The arguments op `name` gets at magnitude `level` (after noise and clipping); () for argument-free ops."""
    mapping = OPS[name].level_to_arg
    return () if mapping is None else mapping(level, rng)


# ------------------------------------------------------------------------------------------------------- policy


def _non_negative(value: str) -> float:
    number = float(value)
    if not 0.0 <= number < math.inf:
        raise ValueError(value)
    return number


def _positive(value: str) -> float:
    number = _non_negative(value)
    if number == 0.0:
        raise ValueError(value)
    return number


def _count(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError(value)
    return number


def _std(value: str) -> float:
    if value == "inf":
        return math.inf
    number = _non_negative(value)
    return math.inf if number > 100 else number  # timm: mstd above 100 means uniform sampling


def _flag(value: str) -> bool:
    if value not in ("0", "1"):
        raise ValueError(value)
    return value == "1"


def _probability(value: str) -> float:
    number = float(value)
    if not 0.0 <= number <= 1.0:
        raise ValueError(value)
    return number


# section key -> (RandAugment field, value parser)
_SECTIONS: dict[str, tuple[str, Callable[[str], object]]] = {
    "m": ("magnitude", _non_negative),
    "n": ("num_ops", _count),
    "mstd": ("magnitude_std", _std),
    "mmax": ("magnitude_max", _positive),
    "inc": ("increasing", _flag),
    "p": ("prob", _probability),
}
_SECTION = re.compile(r"(?P<key>[a-z]+)(?P<value>\d+(?:\.\d*)?|inf)")  # plain decimals only
_GRAMMAR = (
    "'rand' then '-'-separated sections, each at most once: m<magnitude, default 10>, n<ops per image, default 2>, "
    "mstd<magnitude std or inf, default 0>, mmax<magnitude clip, default 10>, inc<0|1, default 0>, "
    f"p<op probability, default 0.5>; e.g. {EXAMPLE}"
)


@dataclass(frozen=True)
class RandAugment:
    """timm's RandAugment: `num_ops` ops drawn with replacement, each applied with probability `prob`."""

    magnitude: float = LEVEL_DENOM
    num_ops: int = 2
    magnitude_std: float = 0.0
    magnitude_max: float = LEVEL_DENOM
    increasing: bool = False
    prob: float = 0.5
    fill: Fill = IMAGENET_FILL

    @classmethod
    def parse(cls, policy: str, fill: Fill = IMAGENET_FILL, key: str = "data.rand_augment") -> RandAugment:
        """The policy of a timm config string such as `rand-m9-mstd0.5-inc1`; ConfigError(key, policy) if bad."""

        def bad(problem: str) -> ConfigError:
            return ConfigError(key, policy, f"{problem}; expected {_GRAMMAR}")

        if not isinstance(policy, str):
            raise bad("not a string")
        head, *sections = policy.split("-")
        if head != "rand":
            raise bad("must start with 'rand'")
        settings: dict[str, object] = {}
        for section in sections:
            match = _SECTION.fullmatch(section)
            if match is None or match["key"] not in _SECTIONS:
                raise bad(f"unknown section {section!r}")
            field, parse_value = _SECTIONS[match["key"]]
            if field in settings:
                raise bad(f"section {match['key']!r} given twice")
            try:
                settings[field] = parse_value(match["value"])
            except ValueError:
                raise bad(f"bad value in section {section!r}") from None
        return cls(**settings, fill=tuple(fill))  # type: ignore[arg-type]

    @property
    def op_names(self) -> tuple[str, ...]:
        """The 15 ops drawn from: timm's increasing set for inc1, the plain set otherwise."""
        return RAND_INCREASING_OPS if self.increasing else RAND_OPS

    def choose_ops(self, rng: random.Random) -> list[str]:
        """`num_ops` op names, uniformly and with replacement (the same op may come twice)."""
        names = self.op_names
        return [names[rng.randrange(len(names))] for _ in range(self.num_ops)]

    def sample_magnitude(self, rng: random.Random) -> float:
        """One op call's magnitude: m, m + N(0, mstd) or U(0, m) for mstd inf, clipped to [0, mmax]."""
        magnitude = self.magnitude
        if self.magnitude_std == math.inf:
            magnitude = rng.uniform(0.0, magnitude)
        elif self.magnitude_std > 0:
            magnitude = rng.gauss(magnitude, self.magnitude_std)
        return max(0.0, min(magnitude, self.magnitude_max))

    def apply_op(self, image: Image.Image, name: str, rng: random.Random) -> Image.Image:
        """Op `name` as one timm AugmentOp call: skipped if random() > prob, else at a freshly sampled magnitude."""
        if self.prob < 1.0 and rng.random() > self.prob:
            return image
        op = OPS[name]
        args = level_to_arg(name, self.sample_magnitude(rng), rng)  # timm samples m even for argument-free ops
        if op.geometric:
            return op.apply(image, *args, fill=self.fill, resample=rng.choice(RESAMPLE))
        return op.apply(image, *args)

    def __call__(self, image: Image.Image, rng: random.Random) -> Image.Image:
        """The augmented image (possibly `image` itself, when every op was skipped)."""
        for name in self.choose_ops(rng):
            image = self.apply_op(image, name, rng)
        return image
