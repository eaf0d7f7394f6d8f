"""The trigger contract: a deterministic function on ``[0, 1]`` image batches, saved as a small file.

Triggers act on float images ``(B, C, H, W)`` in ``[0, 1]`` *before* the encoder's normalisation, so that
the attack, every evaluation and every defense see exactly the same pixels. A trigger is fully described
by a few tensors and a JSON dict of parameters, which :mod:`encoder_guard.triggers.io` stores bit-exactly.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, ClassVar

import torch
from torch import Tensor

from encoder_guard.registry import Registry


class Trigger:
    """Base class. Subclasses set ``kind``, implement :meth:`apply`, :meth:`tensors` and :meth:`params`,
    and can be rebuilt with ``cls.from_state(tensors, params)``."""

    kind: ClassVar[str] = "trigger"

    def apply(self, x: Tensor) -> Tensor:
        """Triggered copies of ``x`` (float ``(B, C, H, W)`` in ``[0, 1]``), same shape, clipped to ``[0, 1]``."""
        raise NotImplementedError

    def __call__(self, x: Tensor) -> Tensor:
        return self.apply(x)

    def tensors(self) -> dict[str, Tensor]:
        return {}

    def params(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], params: dict[str, Any]) -> "Trigger":
        raise NotImplementedError

    def key(self) -> str:
        """Content hash (feature caches key triggered features by it)."""
        h = hashlib.sha256(self.kind.encode() + json.dumps(self.params(), sort_keys=True).encode())
        for name, t in sorted(self.tensors().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return f"{self.kind}-{h.hexdigest()[:16]}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.params().items())})"


TRIGGERS: Registry[type[Trigger]] = Registry("trigger")


def check_images(x: Tensor, channels: int | None, size: tuple[int, int] | None) -> None:
    if x.ndim != 4:
        raise ValueError(f"triggers take (B, C, H, W) batches, got shape {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"trigger made for {channels}-channel images, got {x.shape[1]} channels")
    if size is not None and tuple(x.shape[-2:]) != tuple(size):
        raise ValueError(f"trigger made for {size[0]}×{size[1]} images, got {x.shape[-2]}×{x.shape[-1]}; resize first")


def as_float(t: Tensor) -> Tensor:
    return t.detach().float().cpu()


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))
