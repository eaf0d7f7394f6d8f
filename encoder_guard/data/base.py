"""The one image convention of encoder_guard.

Datasets hold images in memory as ``uint8`` tensors of shape ``(N, C, H, W)``; models receive float
tensors in ``[0, 1]`` and normalise inside the :class:`~encoder_guard.encoders.Encoder`. Triggers are
applied on those ``[0, 1]`` tensors, before normalisation, so an attack and its evaluation see the
same pixels whatever the encoder's mean and std.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset


@dataclass
class ImageDataset(Dataset):
    """Images and labels in memory.

    Attributes:
        images: ``uint8`` tensor ``(N, C, H, W)``.
        labels: ``int64`` tensor ``(N,)``; ``-1`` marks unlabelled images (STL-10's unlabeled split).
        classes: class names, index = label.
        name: registry name of the source dataset.
        split: the split it came from.
    """

    images: Tensor
    labels: Tensor
    classes: list[str]
    name: str = "custom"
    split: str = "train"
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if len(self.labels) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        self.labels = self.labels.long()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index].float().div_(255), int(self.labels[index])

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, indices: Sequence[int] | Tensor) -> "ImageDataset":
        idx = torch.as_tensor(indices, dtype=torch.long)
        meta = dict(self.meta, parent_indices=idx.tolist())
        return ImageDataset(self.images[idx], self.labels[idx], self.classes, self.name, self.split, meta)

    def float_images(self, start: int = 0, stop: int | None = None) -> Tensor:
        """A slice of the images as float ``[0, 1]`` (what encoders take)."""
        return self.images[start:stop].float().div_(255)

    def describe(self) -> dict:
        return {
            "dataset": self.name,
            "split": self.split,
            "size": len(self),
            "channels": self.channels,
            "image_size": self.image_size,
            "num_classes": self.num_classes,
        }
