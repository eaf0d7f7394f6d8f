"""The contract every SSL method fulfils, so one trainer runs them all (solo-learn's ``BaseMethod`` idea).

A method owns the encoder and its heads; the trainer gives it the augmented views and the schedule
position, and saves whatever is in its ``state_dict``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from encoder_guard.encoders import Encoder
from encoder_guard.registry import Registry


class SSLMethod(nn.Module):
    """Base class: holds ``encoder``; subclasses add heads and ``loss``.

    Attributes:
        views: how many augmented views per image the method takes (and their augmentation presets).
    """

    views: int = 2

    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        self.encoder = encoder

    def loss(self, views: list[Tensor]) -> Tensor:
        """The training loss for a list of ``(B, C, H, W)`` views in ``[0, 1]``."""
        raise NotImplementedError

    def forward(self, views: list[Tensor]) -> Tensor:
        """DDP hooks gradient sync on ``forward``: the loss is computed through it."""
        return self.loss(views)

    @staticmethod
    def full_precision(z: Tensor) -> torch.autocast:
        """A context that computes the loss on ``z``'s device outside mixed precision.

        Under bf16 autocast, NT-Xent's similarity logits would keep 8 mantissa bits (a step of 0.03 at
        the logit 1/τ = 5); the encoder and heads run in bf16, the loss in fp32.
        """
        return torch.autocast(z.device.type, enabled=False)

    def on_step_end(self, step: int, total_steps: int) -> None:
        """Called after each optimiser step (momentum updates live here)."""

    def hparams(self) -> dict[str, Any]:
        return {}


SSL_METHODS: Registry[type[SSLMethod]] = Registry("ssl method")
