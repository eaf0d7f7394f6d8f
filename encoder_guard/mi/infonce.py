"""InfoNCE: the contrastive lower bound ``I ≥ log B − L_NCE``, capped at ``log B``.

- [0] Representation Learning with Contrastive Predictive Coding, van den Oord et al., 2018,
  https://arxiv.org/abs/1807.03748
- [1] On Variational Bounds of Mutual Information, Poole et al., ICML 2019, https://arxiv.org/abs/1905.06922

A separable critic ``g(x)ᵀh(y)`` scores all B×B pairs of a batch with one matrix product; the bound is low
variance but cannot exceed ``log B`` ([1] §2.3), so use batches larger than ``exp(I)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from encoder_guard.mi.base import MI_ESTIMATORS, NeuralEstimator, batched, mlp


class _Separable(nn.Module):
    def __init__(self, d1: int, d2: int, hidden: int, embed: int = 32) -> None:
        super().__init__()
        self.g, self.h = mlp(d1, hidden, embed), mlp(d2, hidden, embed)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.g(x) @ self.h(y).T  # (B, B) scores, positives on the diagonal


def _nce(scores: Tensor) -> Tensor:
    return math.log(len(scores)) - F.cross_entropy(scores, torch.arange(len(scores)))


@MI_ESTIMATORS.register("infonce")
class InfoNCE(NeuralEstimator):
    """Args: see ``NeuralEstimator``; the held-out bound uses batches of ``batch_size``."""

    def critic(self, d1: int, d2: int) -> nn.Module:
        return _Separable(d1, d2, self.hidden)

    def train_loss(self, critic: nn.Module, x: Tensor, y: Tensor, y_shuffled: Tensor) -> Tensor:
        return -_nce(critic(x, y))

    def bound(self, critic: nn.Module, x: Tensor, y: Tensor, g: torch.Generator) -> Tensor:
        return batched(lambda a, b: _nce(critic(a, b)), x, y, min(self.batch_size, len(x)))
