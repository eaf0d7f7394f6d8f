"""Patch triggers: paste a pattern through a mask, ``x · (1 − m) + p · m``.

BadNets' and BadEncoder's trigger (a white square in a corner) and SSL-Backdoor's patch are patches.

- [0] BadNets: Identifying Vulnerabilities in the Machine Learning Model Supply Chain, Tianyu Gu, Brendan
  Dolan-Gavitt and Siddharth Garg, 2017, arXiv 1708.06733
- [1] BadEncoder: Backdoor Attacks to Pre-trained Encoders in Self-Supervised Learning, Jia et al., IEEE S&P 2022,
  arXiv 2108.00352 (10×10 white square at
  rows/cols 21–30 of 32×32 images; 50×50 at 173–222 of 224×224)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from encoder_guard.triggers.base import TRIGGERS, Trigger, as_float, check_images, seeded


@TRIGGERS.register("patch")
class PatchTrigger(Trigger):
    """A pattern pasted through a mask.

    Args:
        mask: ``(1 | C, H, W)`` blending weights in ``[0, 1]`` (1 = take the pattern).
        pattern: ``(C, H, W)`` values in ``[0, 1]``.
    """

    kind = "patch"

    def __init__(self, mask: Tensor, pattern: Tensor) -> None:
        mask, pattern = as_float(mask), as_float(pattern)
        if mask.ndim != 3 or pattern.ndim != 3 or mask.shape[-2:] != pattern.shape[-2:]:
            raise ValueError(f"mask (1|C,H,W) and pattern (C,H,W) must share H, W; got {tuple(mask.shape)}, {tuple(pattern.shape)}")
        if mask.shape[0] not in (1, pattern.shape[0]):
            raise ValueError(f"mask has {mask.shape[0]} channels, pattern {pattern.shape[0]}")
        if mask.min() < 0 or mask.max() > 1 or pattern.min() < 0 or pattern.max() > 1:
            raise ValueError("mask and pattern values must lie in [0, 1]")
        self.mask, self.pattern = mask, pattern

    @property
    def channels(self) -> int:
        return int(self.pattern.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        return int(self.pattern.shape[1]), int(self.pattern.shape[2])

    def apply(self, x: Tensor) -> Tensor:
        check_images(x, self.channels, self.size)
        m = self.mask.to(x.device, x.dtype)
        return (x * (1 - m) + self.pattern.to(x.device, x.dtype) * m).clamp(0, 1)

    def tensors(self) -> dict[str, Tensor]:
        return {"mask": self.mask, "pattern": self.pattern}

    def params(self) -> dict[str, Any]:
        ys, xs = torch.nonzero(self.mask.amax(0) > 0, as_tuple=True)
        box = [int(ys.min()), int(xs.min()), int(ys.max()), int(xs.max())] if len(ys) else None
        return {"channels": self.channels, "size": list(self.size), "box": box}

    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], params: dict[str, Any]) -> "PatchTrigger":
        return cls(tensors["mask"], tensors["pattern"])

    @classmethod
    def square(
        cls,
        image_size: int,
        channels: int,
        size: int | None = None,
        position: tuple[int, int] | str = "bottom-right",
        pattern: str = "white",
        seed: int = 0,
        margin: int | None = None,
    ) -> "PatchTrigger":
        """A square patch.

        Args:
            image_size: side of the (square) images.
            channels: image channels.
            size: patch side; default ``round(10 / 32 · image_size)`` (BadEncoder's 10 px on 32 px).
            position: ``(row, col)`` of the top-left corner, or a corner name (``bottom-right``...).
            pattern: ``white``, ``random`` (a seeded binary pattern, as in SSL-Backdoor style patches) or
                ``checkerboard`` (alternating pixels, white at the patch's top-left).
            seed: seed of the random pattern.
            margin: distance from the image border for corner positions; default ``1`` pixel on 32-px
                images (BadEncoder's rows/cols 21–30), scaled with ``image_size``.
        """
        size = size or max(1, round(10 * image_size / 32))
        margin = margin if margin is not None else max(0, round(image_size / 32))
        if isinstance(position, str):
            far = image_size - margin - size
            corners = {"bottom-right": (far, far), "top-left": (margin, margin), "top-right": (margin, far),
                       "bottom-left": (far, margin), "center": ((image_size - size) // 2, (image_size - size) // 2)}
            if position not in corners:
                raise ValueError(f"position must be (row, col) or one of {', '.join(corners)}, got {position!r}")
            position = corners[position]
        r, c = int(position[0]), int(position[1])
        if r < 0 or c < 0 or r + size > image_size or c + size > image_size:
            raise ValueError(f"a {size}-px patch at ({r}, {c}) does not fit in {image_size}-px images")
        mask = torch.zeros(1, image_size, image_size)
        mask[:, r : r + size, c : c + size] = 1
        if pattern == "white":
            pat = torch.ones(channels, image_size, image_size)
        elif pattern == "random":
            pat = torch.zeros(channels, image_size, image_size)
            pat[:, r : r + size, c : c + size] = torch.randint(0, 2, (channels, size, size), generator=seeded(seed)).float()
        elif pattern == "checkerboard":
            ii = torch.arange(size)
            pat = torch.zeros(channels, image_size, image_size)
            pat[:, r : r + size, c : c + size] = ((ii.view(-1, 1) + ii.view(1, -1)) % 2 == 0).float()
        else:
            raise ValueError(f"pattern must be 'white', 'random' or 'checkerboard', got {pattern!r}")
        return cls(mask, pat * mask)
