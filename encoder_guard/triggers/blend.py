"""Blend triggers: mix the whole image with a pattern, ``(1 − α) · x + α · p``.

- [0] Targeted Backdoor Attacks on Deep Learning Systems Using Data Poisoning (Blended), Chen et al.,
  2017, https://arxiv.org/abs/1712.05526
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from encoder_guard.triggers.base import TRIGGERS, Trigger, as_float, check_images, seeded


@TRIGGERS.register("blend")
class BlendTrigger(Trigger):
    """Args:
        pattern: ``(C, H, W)`` image in ``[0, 1]`` (an image, or noise from :meth:`noise`).
        alpha: blend weight in ``(0, 1]`` (Blended used 0.2 for noise patterns).
    """

    kind = "blend"

    def __init__(self, pattern: Tensor, alpha: float = 0.2) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        pattern = as_float(pattern)
        if pattern.ndim != 3 or pattern.min() < 0 or pattern.max() > 1:
            raise ValueError("pattern must be (C, H, W) with values in [0, 1]")
        self.pattern, self.alpha = pattern, float(alpha)

    def apply(self, x: Tensor) -> Tensor:
        check_images(x, int(self.pattern.shape[0]), (int(self.pattern.shape[1]), int(self.pattern.shape[2])))
        return ((1 - self.alpha) * x + self.alpha * self.pattern.to(x.device, x.dtype)).clamp(0, 1)

    def tensors(self) -> dict[str, Tensor]:
        return {"pattern": self.pattern}

    def params(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "channels": int(self.pattern.shape[0]), "size": list(self.pattern.shape[1:])}

    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], params: dict[str, Any]) -> "BlendTrigger":
        return cls(tensors["pattern"], params["alpha"])

    @classmethod
    def noise(cls, image_size: int, channels: int, alpha: float = 0.2, seed: int = 0) -> "BlendTrigger":
        """Uniform noise pattern, seeded."""
        return cls(torch.rand(channels, image_size, image_size, generator=seeded(seed)), alpha)
