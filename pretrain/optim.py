"""Optimisers for pretraining, by name: SGD, LARS and Adam(W).

The learning-rate schedule is :func:`encoder_guard.training.cosine_lr`. LARS is lightly's implementation:

- [0] Large Batch Training of Convolutional Networks, You, Gitman and Ginsburg, 2017, arXiv 1708.03888
"""

from __future__ import annotations

import torch
from lightly.utils.lars import LARS
from torch import nn

from encoder_guard.registry import Registry

OPTIMIZERS: Registry = Registry("optimizer")


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm parameters (the SimCLR/BYOL convention)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@OPTIMIZERS.register("sgd")
def sgd(model: nn.Module, lr: float, weight_decay: float, momentum: float = 0.9) -> torch.optim.Optimizer:
    return torch.optim.SGD(_param_groups(model, weight_decay), lr=lr, momentum=momentum)


@OPTIMIZERS.register("lars")
def lars(model: nn.Module, lr: float, weight_decay: float, momentum: float = 0.9) -> torch.optim.Optimizer:
    return LARS(_param_groups(model, weight_decay), lr=lr, momentum=momentum)


@OPTIMIZERS.register("adam")
def adam(model: nn.Module, lr: float, weight_decay: float, momentum: float = 0.9) -> torch.optim.Optimizer:
    return torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=(momentum, 0.999))
