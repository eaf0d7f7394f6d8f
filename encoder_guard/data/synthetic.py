"""A small, seeded, learnable synthetic dataset for tests and smoke runs.

Each class is a fixed random low-frequency pattern; samples are the pattern shifted by a few pixels,
scaled in contrast and with pixel noise, so SSL and probes have real structure to find in seconds.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from encoder_guard.data.base import ImageDataset
from encoder_guard.data.registry import DATASETS


def make_synthetic(
    size: int = 512, num_classes: int = 4, channels: int = 1, image_size: int = 16, seed: int = 0, split: str = "train"
) -> ImageDataset:
    """Build ``size`` images of ``num_classes`` patterns (the patterns depend on ``seed`` only, not ``split``)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, channels, 4, 4, generator=g)
    patterns = F.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False)
    gs = torch.Generator().manual_seed(seed * 1000 + (0 if split == "train" else 1) + 7)
    labels = torch.arange(size) % num_classes
    labels = labels[torch.randperm(size, generator=gs)]
    imgs = patterns[labels]
    shifts = torch.randint(-2, 3, (size, 2), generator=gs)
    imgs = torch.stack([torch.roll(im, (int(s[0]), int(s[1])), dims=(1, 2)) for im, s in zip(imgs, shifts)])
    contrast = 0.6 + 0.4 * torch.rand(size, 1, 1, 1, generator=gs)
    imgs = (imgs - 0.5) * contrast + 0.5 + 0.08 * torch.randn(imgs.shape, generator=gs)
    images = (imgs.clamp(0, 1) * 255).round().to(torch.uint8)
    return ImageDataset(images, labels, [f"class{i}" for i in range(num_classes)], "synthetic", split)


@DATASETS.register("synthetic")
def load_synthetic(root: Path | None, split: str, image_size: int | None, download: bool) -> ImageDataset:
    n = 512 if split == "train" else 256
    return make_synthetic(size=n, image_size=image_size or 16, split=split)
