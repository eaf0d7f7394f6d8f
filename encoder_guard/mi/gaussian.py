"""The cheap estimator: MI of the Gaussian with the samples' covariance, in closed form.

``I = ½ (log det Σx + log det Σy − log det Σ)`` — exact for jointly Gaussian data, and for any data a
measure of linear dependence (it equals ``−½ Σ log(1 − ρᵢ²)`` over the canonical correlations ρᵢ). No
training, milliseconds on thousands of samples; a shrinkage ``ridge`` (relative to the mean variance) keeps
the determinants finite when the dimension approaches the sample count.
"""

from __future__ import annotations

import torch
from torch import Tensor

from encoder_guard.mi.base import MI_ESTIMATORS, MIEstimator, check_pairs


def _logdet_cov(z: Tensor, ridge: float) -> Tensor:
    cov = torch.cov(z.T).reshape(z.shape[1], z.shape[1])
    cov = cov + ridge * cov.diagonal().mean().clamp_min(1e-12) * torch.eye(len(cov), dtype=cov.dtype)
    return torch.linalg.slogdet(cov).logabsdet


@MI_ESTIMATORS.register("gaussian")
class GaussianMI(MIEstimator):
    """Args: ridge: shrinkage added to each covariance's diagonal, relative to its mean variance."""

    def __init__(self, ridge: float = 1e-3) -> None:
        if ridge < 0:
            raise ValueError(f"ridge must be non-negative, got {ridge}")
        self.ridge = ridge

    def estimate(self, x: Tensor, y: Tensor) -> float:
        x, y = check_pairs(x, y)
        x, y = x.double(), y.double()
        x, y = (x - x.mean(0)) / x.std(0).clamp_min(1e-12), (y - y.mean(0)) / y.std(0).clamp_min(1e-12)
        value = 0.5 * (_logdet_cov(x, self.ridge) + _logdet_cov(y, self.ridge) - _logdet_cov(torch.cat([x, y], 1), self.ridge))
        return max(0.0, float(value))
