"""Mixup and CutMix: train on blends of image pairs with correspondingly blended labels.

Each batch is paired with itself reversed. Mixup (Zhang et al. 2018) averages the two images with a
weight ``lam ~ Beta(alpha, alpha)``; CutMix (Yun et al. 2019) pastes a box of the partner image
whose area is ``1 - lam`` of the image. The targets are the same blend of the two one-hot rows, so
the loss is a cross-entropy against probabilities (label smoothing, being linear, applies to the
blend). With both on, each batch uses one of them with equal odds, as in the DeiT recipe and timm's
``Mixup``. All draws come from torch's global generator, which training checkpoints save, so a
resumed run mixes exactly as the uninterrupted one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _box(height: int, width: int, lam: float) -> tuple[int, int, int, int]:
    """A box of area ``(1 - lam)`` of the image around a uniform random centre, clipped to the image:
    (top, bottom, left, right)."""
    ratio = math.sqrt(1.0 - lam)
    cy, cx = (int(torch.randint(size, ()).item()) for size in (height, width))
    half_h, half_w = int(height * ratio) // 2, int(width * ratio) // 2
    return max(cy - half_h, 0), min(cy + half_h, height), max(cx - half_w, 0), min(cx + half_w, width)


def mix_batch(
    images: torch.Tensor, labels: torch.Tensor, num_classes: int, mixup: float = 0.0, cutmix: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(blended images, blended soft targets) for a batch; ``mixup`` and ``cutmix`` are the Beta
    concentrations (0 turns one off). The images are not modified in place."""
    if mixup <= 0 and cutmix <= 0:
        raise ValueError("mix_batch needs mixup > 0 or cutmix > 0 (the Beta concentration, e.g. 0.8 and 1.0)")
    use_cutmix = cutmix > 0 and (mixup <= 0 or bool(torch.rand(()) < 0.5))
    alpha = cutmix if use_cutmix else mixup
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    partner = images.flip(0)
    if use_cutmix:
        top, bottom, left, right = _box(images.shape[-2], images.shape[-1], lam)
        images = images.clone()
        images[..., top:bottom, left:right] = partner[..., top:bottom, left:right]
        lam = 1.0 - (bottom - top) * (right - left) / (images.shape[-2] * images.shape[-1])  # the box as clipped
    else:
        images = images * lam + partner * (1.0 - lam)
    targets = F.one_hot(labels, num_classes).float()
    return images, targets * lam + targets.flip(0) * (1.0 - lam)
