"""CTRL-style frequency trigger: raise chosen DCT coefficients of the chroma (or luminance) channels.

- [0] An Embarrassingly Simple Backdoor Attack on Self-supervised Learning (CTRL), Li et al., ICCV 2023,
  https://arxiv.org/abs/2210.07346

The reference recipe: convert RGB to YCrCb, take the orthonormal 2-D DCT of each ``window``×``window``
block (the whole 32×32 image on CIFAR-10), add ``magnitude`` (on the 0–255 scale) at frequencies
(15, 15) and (31, 31) of channels Cr and Cb, invert, convert back and clip. **Grayscale adaptation**
(Fashion-MNIST): there is no chroma, so the single channel is perturbed at the given frequencies of its
own DCT; with a 28-pixel window the default frequencies become (13, 13) and (27, 27), the same relative
positions (mid and highest frequency).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

from encoder_guard.triggers.base import TRIGGERS, Trigger, check_images


def dct_matrix(n: int) -> Tensor:
    """Orthonormal DCT-II matrix ``D`` (``D @ x`` transforms a length-``n`` signal; ``D.T`` inverts)."""
    k = torch.arange(n, dtype=torch.float64).view(-1, 1)
    i = torch.arange(n, dtype=torch.float64).view(1, -1)
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2 / n)
    d[0] /= math.sqrt(2)
    return d


def rgb_to_ycrcb(x: Tensor) -> Tensor:
    """OpenCV's YCrCb on the 0–255 scale (CTRL uses ``cv2.COLOR_RGB2YCrCb``)."""
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    return torch.stack([y, (r - y) * 0.713 + 128, (b - y) * 0.564 + 128], dim=1)


def ycrcb_to_rgb(x: Tensor) -> Tensor:
    y, cr, cb = x[:, 0], x[:, 1] - 128, x[:, 2] - 128
    return torch.stack([y + 1.403 * cr, y - 0.714 * cr - 0.344 * cb, y + 1.773 * cb], dim=1)


@TRIGGERS.register("ctrl")
class CTRLTrigger(Trigger):
    """Args:
        image_size: side of the square images.
        channels: 3 (perturb Cr and Cb by default) or 1 (perturb the image itself).
        magnitude: added to each chosen coefficient, 0–255 scale (CTRL: 100 on CIFAR-10).
        window: DCT block side; must divide ``image_size`` (default: ``min(image_size, 32)``).
        frequencies: ``(u, v)`` positions inside a block (default: the middle and the last diagonal
            frequency, CTRL's (15, 15) and (31, 31) for 32-pixel windows).
        perturb_channels: which channels of the working space (YCrCb for RGB) get the bump.
    """

    kind = "ctrl"

    def __init__(
        self,
        image_size: int,
        channels: int = 3,
        magnitude: float = 100.0,
        window: int | None = None,
        frequencies: Sequence[Sequence[int]] | None = None,
        perturb_channels: Sequence[int] | None = None,
    ) -> None:
        window = window or min(image_size, 32)
        if image_size % window:
            raise ValueError(f"window {window} must divide image_size {image_size}")
        if channels not in (1, 3):
            raise ValueError(f"CTRL works on 1- or 3-channel images, got {channels}")
        frequencies = [tuple(map(int, f)) for f in (frequencies or [(window // 2 - 1, window // 2 - 1), (window - 1, window - 1)])]
        if any(not (0 <= u < window and 0 <= v < window) for u, v in frequencies):
            raise ValueError(f"frequencies {frequencies} must lie inside a {window}×{window} block")
        self.image_size, self.channels, self.magnitude, self.window = int(image_size), channels, float(magnitude), window
        self.frequencies = frequencies
        self.perturb_channels = list(perturb_channels) if perturb_channels is not None else ([1, 2] if channels == 3 else [0])
        self._delta = self._pixel_delta()

    def _pixel_delta(self) -> Tensor:
        """The trigger is linear before clipping: its effect in pixel space (working colour space, 0–255)."""
        w, n = self.window, self.image_size
        coef = torch.zeros(w, w, dtype=torch.float64)
        for u, v in self.frequencies:
            coef[u, v] += self.magnitude
        d = dct_matrix(w)
        block = d.T @ coef @ d  # inverse 2-D DCT of the bump
        tile = block.repeat(n // w, n // w)
        delta = torch.zeros(self.channels, n, n, dtype=torch.float64)
        for c in self.perturb_channels:
            delta[c] = tile
        return delta.float()

    def apply(self, x: Tensor) -> Tensor:
        check_images(x, self.channels, (self.image_size, self.image_size))
        delta = self._delta.to(x.device, x.dtype)
        if self.channels == 3:
            work = rgb_to_ycrcb(x * 255) + delta
            return (ycrcb_to_rgb(work) / 255).clamp(0, 1)
        return (x + delta / 255).clamp(0, 1)

    def params(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "channels": self.channels, "magnitude": self.magnitude,
                "window": self.window, "frequencies": [list(f) for f in self.frequencies],
                "perturb_channels": self.perturb_channels}

    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], params: dict[str, Any]) -> "CTRLTrigger":
        return cls(**params)
