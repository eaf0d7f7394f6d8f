"""Warping triggers: resample the image along a fixed, smooth displacement field (no patch, no added pattern).

- [0] WaNet - Imperceptible Warping-based Backdoor Attack, Nguyen and Tran, ICLR 2021,
  https://arxiv.org/abs/2102.10369

WaNet's field: a ``k×k×2`` grid drawn uniformly in ``[-1, 1]``, divided by its mean absolute value,
upsampled bicubically to the image, scaled by ``strength / H`` and added to the identity sampling grid
(clamped to ``[-1, 1]``); the triggered image is ``grid_sample`` of the input on that grid. The paper's
settings are ``k = 4`` and ``strength = 0.5``. A triggered image differs from its source by a sub-pixel
smooth deformation, which is why a defense that looks for a localised or additive pattern does not see it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from encoder_guard.triggers.base import TRIGGERS, Trigger, as_float, check_images, seeded


@TRIGGERS.register("warp")
class WarpTrigger(Trigger):
    """Args:
        grid: ``(H, W, 2)`` sampling grid in ``[-1, 1]`` for ``F.grid_sample`` (``align_corners=True``).
        channels: image channels the trigger is made for.
    """

    kind = "warp"

    def __init__(self, grid: Tensor, channels: int) -> None:
        grid = as_float(grid)
        if grid.ndim != 3 or grid.shape[-1] != 2 or grid.shape[0] != grid.shape[1]:
            raise ValueError(f"grid must be (H, H, 2), got {tuple(grid.shape)}")
        if grid.abs().max() > 1:
            raise ValueError("grid values must lie in [-1, 1]")
        if channels < 1:
            raise ValueError(f"channels must be positive, got {channels}")
        self.grid, self.channels = grid, int(channels)

    def apply(self, x: Tensor) -> Tensor:
        size = int(self.grid.shape[0])
        check_images(x, self.channels, (size, size))
        grid = self.grid.to(x.device, x.dtype).expand(x.shape[0], -1, -1, -1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True).clamp(0, 1)

    def tensors(self) -> dict[str, Tensor]:
        return {"grid": self.grid}

    def params(self) -> dict[str, Any]:
        return {"channels": self.channels, "image_size": int(self.grid.shape[0])}

    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], params: dict[str, Any]) -> "WarpTrigger":
        return cls(tensors["grid"], int(params["channels"]))

    @classmethod
    def wanet(cls, image_size: int, channels: int, k: int = 4, strength: float = 0.5, seed: int = 0) -> "WarpTrigger":
        """WaNet's seeded field: ``k×k`` control points, displacement ``strength`` (in WaNet's units)."""
        if not 2 <= k <= image_size:
            raise ValueError(f"k (control points per side) must be in [2, {image_size}], got {k}")
        if strength <= 0:
            raise ValueError(f"strength must be positive, got {strength}")
        control = torch.rand(1, 2, k, k, generator=seeded(seed)) * 2 - 1
        return cls(wanet_grid(control, image_size, strength)[0], channels)


def wanet_grid(control: Tensor, image_size: int, strength: float | Tensor) -> Tensor:
    """WaNet's sampling grids ``(B, H, H, 2)`` from control points ``(B, 2, k, k)`` in ``[-1, 1]``: each field
    divided by its mean absolute value, upsampled bicubically, scaled by ``strength / H`` (a float or one per
    sample, ``(B, 1, 1, 1)``) and added to the identity grid, clamped to ``[-1, 1]``."""
    control = control / control.abs().mean(dim=(1, 2, 3), keepdim=True)
    field = F.interpolate(control, size=image_size, mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    eye = torch.eye(2, 3, device=control.device, dtype=control.dtype)[None].expand(len(control), -1, -1)
    identity = F.affine_grid(eye, [len(control), 1, image_size, image_size], align_corners=True)
    return (identity + strength * field / image_size).clamp(-1, 1)
