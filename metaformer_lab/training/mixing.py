"""Mixup / CutMix on a batch with soft targets, as timm's `Mixup` in `batch` mode (the paper's recipe).

One lambda per batch; the batch is mixed with itself reversed; label smoothing is folded into the targets.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    return F.one_hot(labels, num_classes).float() * (1.0 - smoothing) + off


def cutmix_box(height: int, width: int, lam: float) -> tuple[int, int, int, int]:
    """A random box covering about 1 - lam of the image, clipped to it (timm's `rand_bbox`)."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = torch.randint(0, height, ()).item(), torch.randint(0, width, ()).item()
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return y0, y1, x0, x1


def mix_batch(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    smoothing: float,
    mixup_alpha: float,
    cutmix_alpha: float,
    prob: float,
    switch_prob: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (mixed images, soft targets). With both alphas 0 or no draw under `prob`, only smoothing applies."""
    lam = 1.0
    use_cutmix = False
    if (mixup_alpha > 0 or cutmix_alpha > 0) and torch.rand(()).item() < prob:
        use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or torch.rand(()).item() < switch_prob)
        alpha = cutmix_alpha if use_cutmix else mixup_alpha
        lam = torch.distributions.Beta(alpha, alpha).sample().item()
    targets = smooth_one_hot(labels, num_classes, smoothing)
    if lam == 1.0:
        return images, targets
    flipped = images.flip(0)
    if use_cutmix:
        y0, y1, x0, x1 = cutmix_box(images.shape[-2], images.shape[-1], lam)
        images = images.clone()
        images[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (images.shape[-2] * images.shape[-1])  # the box as actually cut
    else:
        images = images * lam + flipped * (1.0 - lam)
    return images, targets * lam + targets.flip(0) * (1.0 - lam)
