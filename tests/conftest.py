"""Shared fixtures: a private feature cache for the test run, fixed threads, a tiny encoder, tiny configs."""

from __future__ import annotations

import pytest
import torch

from encoder_guard.config import load_config
from encoder_guard.encoders import Encoder, make_spec

torch.set_num_threads(1)  # tiny models: one thread is as fast and never oversubscribes the 2 cores


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENCODER_GUARD_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def tiny_cfg() -> dict:
    """fmnist-tiny shrunk to seconds: synthetic 16×16 data, batch 64, 2 epochs."""
    return load_config("fmnist-tiny", "pretrain", [
        "data.dataset=synthetic", "optim.batch_size=64", "optim.epochs=2", "optim.warmup_epochs=0.5",
        "train.threads=1",
    ])


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    """A seeded, untrained ResNet-10 for 16×16 grayscale images (one per test module, in eval mode)."""
    torch.manual_seed(0)
    return Encoder(make_spec("resnet10-tiny", in_chans=1, input_size=16)).eval()
