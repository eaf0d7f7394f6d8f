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


PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(name: str | None, device: torch.device) -> str:
    """``fp32`` or ``bf16``; ``auto`` picks bf16 only where the hardware runs it natively.

    On CPUs with AVX512-BF16 or AMX, oneDNN's bf16 convolutions make a small ResNet's SimCLR step about
    1.9× faster than fp32 (``benchmarks/throughput.py``); elsewhere bf16 is emulated and slower, so
    ``auto`` keeps fp32 there.
    """
    name = name or "fp32"
    if name not in PRECISIONS:
        raise ValueError(f"precision must be auto, fp32 or bf16, got {name!r}")
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    native = [getattr(torch.cpu, f, lambda: False) for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return "bf16" if device.type == "cpu" and any(f() for f in native) else "fp32"


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """The mixed-precision context for ``precision`` (``fp32``: a disabled autocast)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


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
