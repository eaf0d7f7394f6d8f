"""Fit a dataset to an encoder's input: resize to its input size and match its channels.

Downstream sets rarely match the pretraining set (a CIFAR-10 encoder judged on STL-10 or GTSRB), so
evaluation resizes to the encoder's ``input_size`` and converts grayscale↔RGB as needed, and says so.
"""

from __future__ import annotations

import torch

from encoder_guard.data import ImageDataset
from encoder_guard.data.transforms import resize_uint8
from encoder_guard.encoders import EncoderSpec


def adapt_dataset(ds: ImageDataset, spec: EncoderSpec) -> tuple[ImageDataset, list[str]]:
    """``ds`` resized and channel-converted for ``spec``, with a list of what was changed."""
    images, notes = ds.images, []
    if ds.channels != spec.in_chans:
        if ds.channels == 1:
            images = images.repeat(1, spec.in_chans, 1, 1)
        elif spec.in_chans == 1 and ds.channels == 3:
            w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            images = (images.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
        else:
            from encoder_guard.errors import EncoderGuardError

            raise EncoderGuardError(f"cannot convert {ds.channels}-channel images for a {spec.in_chans}-channel encoder")
        notes.append(f"channels {ds.channels}→{spec.in_chans}")
    if images.shape[-1] != spec.input_size:
        notes.append(f"resized {images.shape[-1]}→{spec.input_size}")
        images = resize_uint8(images, spec.input_size)
    if not notes:
        return ds, notes
    return ImageDataset(images, ds.labels, ds.classes, ds.name, ds.split, dict(ds.meta, adapted=notes)), notes
