"""Deterministic tensor transforms shared by loaders and evaluation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def resize_uint8(images: Tensor, size: int) -> Tensor:
    """Resize ``uint8 (N, C, H, W)`` images to ``size``×``size`` (bilinear, antialiased), in chunks."""
    out = []
    for chunk in images.split(4096):
        x = F.interpolate(chunk.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(x.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out) if out else images.new_zeros((0, images.shape[1], size, size))


def pil_to_uint8(img, size: int | None, channels: int = 3) -> Tensor:
    """A PIL image as ``uint8 (C, H, W)``, converted to ``channels`` and resized if ``size`` is given."""
    import numpy as np

    img = img.convert("L" if channels == 1 else "RGB")
    if size is not None and img.size != (size, size):
        from PIL import Image

        img = img.resize((size, size), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)
