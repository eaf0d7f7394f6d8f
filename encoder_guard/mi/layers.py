"""Per-layer MI: how much each stage's activation says about the encoder's final features.

MIMIC ([0]) uses it on the (possibly backdoored) teacher to decide how strongly each stage's attention is
distilled. Stage maps are large (the reference flattened 64×32×32 maps into a 66k-wide MLP input); here
each map is average-pooled to ``pool × pool`` cells and flattened (``C·pool²`` inputs). With ``pool=1``
the last stage is the pooled final feature itself; ``benchmarks/layer_mi.py`` measures what the pooling
size costs and changes.

- [0] Mutual Information Guided Backdoor Mitigation for Pre-Trained Encoders, Han et al., IEEE TIFS 2025
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from encoder_guard.encoders import Encoder
from encoder_guard.mi.base import MIEstimator


@dataclass
class LayerMI:
    """MI of one tap with the final features, and what it was computed on."""

    tap: str
    channels: int
    spatial: int
    inputs: int
    mi: float
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def tap_samples(encoder: Encoder, images: Tensor, taps: Sequence[int | str], pool: int,
                batch_size: int = 512) -> tuple[Tensor, list[Tensor]]:
    """Final features ``(N, D)`` and, per tap, pooled-and-flattened activations ``(N, C·pool²)``."""
    was_training = encoder.training
    encoder.eval()
    finals: list[Tensor] = []
    maps: list[list[Tensor]] = [[] for _ in taps]
    for batch in images.split(batch_size):
        final, feats = encoder.forward_intermediates(batch, taps)
        finals.append(final)
        for store, f in zip(maps, feats):
            store.append(F.adaptive_avg_pool2d(f, min(pool, f.shape[-1])).flatten(1))
    encoder.train(was_training)
    return torch.cat(finals), [torch.cat(m) for m in maps]


def layer_mutual_information(
    encoder: Encoder,
    images: Tensor,
    estimator: MIEstimator,
    taps: Sequence[int | str] = ("layer1", "layer2", "layer3", "layer4"),
    pool: int = 2,
) -> list[LayerMI]:
    """MI between each tap's activation and the final features on ``images`` (float ``[0, 1]``, N×C×H×W)."""
    if pool < 1:
        raise ValueError(f"pool must be >= 1, got {pool}")
    final, maps = tap_samples(encoder, images, taps, pool)
    out = []
    for m, i in zip(maps, encoder.tap_indices(taps)):
        info = encoder.feature_info[i]
        t0 = time.perf_counter()
        value = estimator.estimate(m, final)
        side = int(round(encoder.spec.input_size / info["reduction"]))
        out.append(LayerMI(info["name"], info["num_chs"], side, m.shape[1], value, time.perf_counter() - t0))
    return out


REFERENCE_BASE, REFERENCE_SPREAD = 1000.0, 10000.0  # MIMIC's public code: base_opt and momentum_opt


def mi_weights(values: Sequence[float], scheme: str = "mi") -> list[float]:
    """Stage weights from per-stage MI (negative estimates count as 0).

    ``"mi"``: proportional to MI, mean 1. ``"uniform"``: all 1 (the ablation). ``"reference"``: MIMIC's public
    code, ``1000 + 10000 · I_l / Σ I`` (meant for an attention term averaged over positions).
    """
    if scheme not in ("mi", "uniform", "reference"):
        raise ValueError(f"stage weight scheme must be 'mi', 'uniform' or 'reference', not {scheme!r}")
    if scheme == "uniform":
        return [1.0] * len(values)
    clipped = [max(0.0, v) for v in values]
    total = sum(clipped)
    if scheme == "reference":
        return [REFERENCE_BASE + (REFERENCE_SPREAD * v / total if total > 0 else 0.0) for v in clipped]
    if total <= 0:
        return [1.0] * len(values)
    return [len(values) * v / total for v in clipped]
