"""The estimator contract: ``estimator.estimate(x, y) -> nats``, and what the neural estimators share.

Neural estimators (MINE, InfoNCE) train a critic on a random 80% of the pairs and report the bound on the
held-out 20%: a critic evaluated on the pairs it was fitted to over-estimates MI by memorising them.
Inputs are standardised per dimension first (MI is invariant to it; optimisation is not).
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Any, Callable

import torch
from torch import Tensor, nn

from encoder_guard.registry import Registry

MI_ESTIMATORS: Registry[type] = Registry("MI estimator")


class MIEstimator(ABC):
    """Estimates I(X; Y) in nats from paired samples."""

    @abstractmethod
    def estimate(self, x: Tensor, y: Tensor) -> float:
        """MI between the rows of ``x`` (B, d1) and ``y`` (B, d2), paired by index."""

    def hparams(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v}' for k, v in self.hparams().items())})"


def build_estimator(name: str, **kwargs: Any) -> MIEstimator:
    """The registered estimator ``name`` with the settings it takes; settings it has no use for (``steps`` for
    the closed-form Gaussian estimator) are left out, so one config can switch estimators."""
    cls = MI_ESTIMATORS.get(name)
    accepted: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            params = inspect.signature(vars(klass)["__init__"]).parameters
            accepted |= {k for k, p in params.items() if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD}
    return cls(**{k: v for k, v in kwargs.items() if k in accepted})


def check_pairs(x: Tensor, y: Tensor, minimum: int = 10) -> tuple[Tensor, Tensor]:
    if x.ndim != 2 or y.ndim != 2:
        raise ValueError(f"MI estimators take (B, d) samples; got shapes {tuple(x.shape)} and {tuple(y.shape)}")
    if len(x) != len(y):
        raise ValueError(f"x and y must pair row by row; got {len(x)} and {len(y)} rows")
    if len(x) < minimum:
        raise ValueError(f"need at least {minimum} pairs to estimate MI, got {len(x)}")
    return x.detach().float().cpu(), y.detach().float().cpu()


def standardise(t: Tensor) -> Tensor:
    return (t - t.mean(0)) / t.std(0).clamp_min(1e-6)


def mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


class NeuralEstimator(MIEstimator):
    """Train a critic by minibatch Adam on 80% of the pairs; evaluate the bound on the other 20%."""

    def __init__(self, hidden: int = 128, steps: int = 1000, batch_size: int = 256, lr: float = 1e-3,
                 holdout: float = 0.2, seed: int = 0) -> None:
        if steps < 1 or batch_size < 2 or not 0 < holdout < 1:
            raise ValueError("steps >= 1, batch_size >= 2 and 0 < holdout < 1 are required")
        self.hidden, self.steps, self.batch_size, self.lr, self.holdout, self.seed = hidden, steps, batch_size, lr, holdout, seed

    @abstractmethod
    def critic(self, d1: int, d2: int) -> nn.Module: ...

    @abstractmethod
    def train_loss(self, critic: nn.Module, x: Tensor, y: Tensor, y_shuffled: Tensor) -> Tensor: ...

    @abstractmethod
    def bound(self, critic: nn.Module, x: Tensor, y: Tensor, g: torch.Generator) -> Tensor: ...

    def estimate(self, x: Tensor, y: Tensor) -> float:
        x, y = check_pairs(x, y, minimum=20)
        x, y = standardise(x), standardise(y)
        g = torch.Generator().manual_seed(self.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            perm = torch.randperm(len(x), generator=g)
            n_test = max(2, int(len(x) * self.holdout))
            test, train = perm[:n_test], perm[n_test:]
            critic = self.critic(x.shape[1], y.shape[1])
            opt = torch.optim.Adam(critic.parameters(), lr=self.lr)
            bs = min(self.batch_size, len(train))
            for _ in range(self.steps):
                idx = train[torch.randint(len(train), (bs,), generator=g)]
                shuffled = idx[torch.randperm(bs, generator=g)]
                loss = self.train_loss(critic, x[idx], y[idx], y[shuffled])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            with torch.no_grad():
                return float(self.bound(critic.eval(), x[test], y[test], g))


def batched(fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor, size: int) -> Tensor:
    """Mean of ``fn`` over consecutive batches of ``size`` pairs (the last partial one dropped if others exist)."""
    n = max(1, len(x) // size)
    return torch.stack([fn(x[i * size : (i + 1) * size], y[i * size : (i + 1) * size]) for i in range(n)]).mean()
