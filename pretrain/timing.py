"""Seconds per pretraining step on this machine, timed on random views (no data, no augmentation).

The batched tensor augmentation adds next to nothing to a step (``benchmarks/throughput.py``: the real
loop runs at 1.03× the raw step), so this predicts how long an epoch takes before one is run: the demo
sizes its schedule by it, and the throughput benchmark reports it.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from encoder_guard.encoders import Encoder, make_spec
from encoder_guard.utils import autocast, resolve_precision
from pretrain.trainer import build_method


def step_seconds(cfg: dict[str, Any], batch: int, steps: int, size: int, chans: int, warmup: int = 3) -> float:
    """Forward, backward and an SGD step of ``cfg``'s method and encoder on CPU, with its ``train.precision``
    and ``train.channels_last``; the mean over ``steps`` after ``warmup`` untimed ones. Leaves the global
    random state as it found it."""
    cpu = torch.device("cpu")
    precision = resolve_precision(cfg["train"].get("precision"), cpu)
    layout = torch.channels_last if cfg["train"].get("channels_last") else torch.contiguous_format
    with torch.random.fork_rng(devices=[]):
        method = build_method(cfg, Encoder(make_spec(cfg["model"]["backbone"], in_chans=chans, input_size=size)))
        method = method.to(memory_format=layout)
        opt = torch.optim.SGD(method.parameters(), lr=0.01, momentum=0.9)
        views = [torch.rand(batch, chans, size, size).contiguous(memory_format=layout) for _ in range(2)]

        def step() -> None:
            with autocast(cpu, precision):
                loss = method(views)
            opt.zero_grad()
            loss.backward()
            opt.step()

        for _ in range(warmup):
            step()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
    return (time.perf_counter() - t0) / steps
