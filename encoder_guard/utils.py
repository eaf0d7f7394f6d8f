"""Seeding and device selection, done once here rather than in every command."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str | None = "auto") -> torch.device:
    """``auto`` picks CUDA when present (``LOCAL_RANK`` chooses the GPU under torchrun), else CPU."""
    if name in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device(name)


def step_generator(seed: int, *keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from ``seed`` and integer keys (step, rank...): same keys, same numbers."""
    mixed = seed
    for k in keys:
        mixed = (mixed * 1_000_003 + int(k) + 0x9E3779B9) % (2**63 - 1)
    return torch.Generator(device=device).manual_seed(mixed)


def seeded_choice(items: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """``count`` distinct entries of ``items`` chosen by ``seed`` (all of them if fewer)."""
    g = torch.Generator().manual_seed(seed)
    return items[torch.randperm(len(items), generator=g)[: min(count, len(items))]]
