"""Linear probe: one linear layer on standardised frozen features, trained to convergence.

Full-batch L-BFGS on the cross-entropy with a small L2 penalty: deterministic, no learning rate to tune,
and it stops on its own tolerance (solo-learn and BadEncoder train with SGD/Adam for many epochs; on
cached features the convex problem is solved directly instead).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class LinearProbe:
    """A fitted probe: ``predict`` standardises with the training statistics, then applies the layer."""

    mean: Tensor
    std: Tensor
    layer: nn.Linear

    @torch.no_grad()
    def logits(self, features: Tensor) -> Tensor:
        return self.layer((features.float() - self.mean) / self.std)

    def predict(self, features: Tensor) -> Tensor:
        return self.logits(features).argmax(dim=1)


def fit_linear_probe(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    weight_decay: float = 1e-4,
    max_iter: int = 500,
    seed: int = 0,
) -> LinearProbe:
    """Fit a multinomial logistic regression on ``(N, D)`` features.

    Args:
        features: training features (standardised inside; statistics kept for prediction).
        labels: ``(N,)`` int labels.
        num_classes: output size.
        weight_decay: L2 penalty on the weights (mean loss + ``weight_decay/2 · ||W||²``).
        max_iter: L-BFGS iterations at most (it stops earlier at tolerance).
        seed: initialisation seed.
    """
    x = features.float()
    mean = x.mean(dim=0)
    std = x.std(dim=0).clamp_min(1e-6)
    x = (x - mean) / std
    torch.manual_seed(seed)
    layer = nn.Linear(x.shape[1], num_classes)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    opt = torch.optim.LBFGS(layer.parameters(), lr=1.0, max_iter=max_iter, tolerance_grad=1e-6,
                            tolerance_change=1e-9, history_size=20, line_search_fn="strong_wolfe")
    y = labels.long()

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(layer(x), y) + 0.5 * weight_decay * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LinearProbe(mean, std, layer)
