"""Random erasing as the official recipe ran it: timm's `RandomErasing(0.25, mode="pixel", device=...)` in the
prefetching loader, on the normalized batch on the device, after mixup / cutmix.

Per image, with probability `probability`: one box of area 2% to 1/3 of the image and a log-uniform aspect ratio
in 0.3 to 1/0.3, up to 10 tries to fit it strictly inside, filled with per-pixel N(0, 1) noise (in the normalized
space, so the noise has the data's scale).
"""

from __future__ import annotations

import math
import random

import torch


class RandomErasing:
    def __init__(
        self, probability: float, min_area: float = 0.02, max_area: float = 1 / 3, min_aspect: float = 0.3,
        attempts: int = 10,
    ) -> None:  # fmt: skip
        self.probability, self.min_area, self.max_area, self.attempts = probability, min_area, max_area, attempts
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))

    def box(self, height: int, width: int, rng: random.Random) -> tuple[int, int, int, int] | None:
        """(top, left, h, w) of one box, or None when no try fits (timm's `_erase` for one image, count 1)."""
        for _ in range(self.attempts):
            area = rng.uniform(self.min_area, self.max_area) * height * width
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if w < width and h < height:
                return rng.randint(0, height - h), rng.randint(0, width - w), h, w
        return None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Erase in place a box in each image of [N, C, H, W] `images` with the probability; returns them."""
        rng = random.Random(torch.randint(2**62, ()).item())  # from torch's stream: seeded and resumed with the run
        channels, height, width = images.shape[1:]
        for image in images:
            if rng.random() >= self.probability:
                continue
            if (box := self.box(height, width, rng)) is not None:
                top, left, h, w = box
                image[:, top : top + h, left : left + w] = torch.randn(
                    channels, h, w, dtype=images.dtype, device=images.device
                )
        return images
