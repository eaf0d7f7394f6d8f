"""MINE: the Donsker–Varadhan lower bound with a neural statistics network.

- [0] Mutual Information Neural Estimation, Belghazi et al., ICML 2018, https://arxiv.org/abs/1801.04062

``I(X; Y) ≥ E_P[T(x, y)] − log E_{P_X ⊗ P_Y}[exp T(x, y')]`` with ``T`` an MLP on the concatenated pair and
marginal samples made by shuffling ``y`` within the batch. The minibatch gradient of the log term is
biased; ``ema`` > 0 replaces its denominator by a moving average of ``E[exp T]`` ([0] §3.2), which is the
"bias correction" the paper recommends. MIMIC uses this estimator per stage of the teacher.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from encoder_guard.mi.base import MI_ESTIMATORS, NeuralEstimator, mlp


class _Concat(nn.Module):
    def __init__(self, d1: int, d2: int, hidden: int) -> None:
        super().__init__()
        self.net = mlp(d1 + d2, hidden, 1)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.net(torch.cat([x, y], dim=1)).squeeze(1)


def _log_mean_exp(t: Tensor) -> Tensor:
    return torch.logsumexp(t, dim=0) - math.log(len(t))


@MI_ESTIMATORS.register("mine")
class MINE(NeuralEstimator):
    """Args: hidden, steps, batch_size, lr, holdout, seed (see ``NeuralEstimator``); ema: moving-average rate
    of the bias correction (0 = the plain, biased DV gradient)."""

    def __init__(self, ema: float = 0.01, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0 <= ema < 1:
            raise ValueError(f"ema must be in [0, 1), got {ema}")
        self.ema = ema
        self._running: Tensor | None = None

    def critic(self, d1: int, d2: int) -> nn.Module:
        self._running = None
        return _Concat(d1, d2, self.hidden)

    def train_loss(self, critic: nn.Module, x: Tensor, y: Tensor, y_shuffled: Tensor) -> Tensor:
        joint, marginal = critic(x, y), critic(x, y_shuffled)
        if self.ema == 0:
            return -(joint.mean() - _log_mean_exp(marginal))
        # gradient of log E[e^T] is E[∇T e^T] / E[e^T]; use a moving average for the denominator
        mean_exp = marginal.exp().mean()
        self._running = mean_exp.detach() if self._running is None else (1 - self.ema) * self._running + self.ema * mean_exp.detach()
        return -(joint.mean() - mean_exp / self._running)

    def bound(self, critic: nn.Module, x: Tensor, y: Tensor, g: torch.Generator) -> Tensor:
        shuffled = y[torch.randperm(len(y), generator=g)]
        return critic(x, y).mean() - _log_mean_exp(critic(x, shuffled))
