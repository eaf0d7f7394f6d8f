"""Optimisers (SGD, LARS, Adam) and the warm-up + cosine learning-rate schedule.

LARS is lightly's implementation ([0] You et al., 2017, https://arxiv.org/abs/1708.03888). The schedule is
a pure function of the step, so a resumed run sets exactly the learning rate it would have had.
"""

from __future__ import annotations

import math

import torch
from lightly.utils.lars import LARS
from torch import nn

from encoder_guard.registry import Registry

OPTIMIZERS: Registry = Registry("optimizer")


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm parameters (the SimCLR/BYOL convention)."""
    decay, no_decay = [], []
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


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, final_ratio: float = 0.0) -> float:
    """Linear warm-up to ``base_lr`` over ``warmup_steps``, then cosine decay to ``final_ratio * base_lr``."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    return base_lr * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
