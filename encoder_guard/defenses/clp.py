"""CLP: data-free backdoor removal by channel Lipschitzness.

- [0] Data-free Backdoor Removal based on Channel Lipschitzness, Zheng et al., ECCV 2022,
  https://arxiv.org/abs/2208.03111

A trigger has to make a few channels respond enormously to a small input pattern: those channels are
unusually sensitive, and their sensitivity is visible in the weights alone. For each convolution
followed by BatchNorm, the channel's upper bound on its Lipschitz constant (UCLC) is the largest singular
value of its kernel scaled by the BatchNorm gain ``γ/σ``; channels whose UCLC exceeds
``mean + u · std`` of their layer are pruned (their BatchNorm output is set to zero). No data at all:
the defense a user can apply to a downloaded encoder before anything else.

``clp`` prunes an encoder; ``clp-classifier`` prunes a deployed classifier's encoder and keeps its head, the
setting of [0] (a network trained on poisoned data), e.g. under the fine-tune threat.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from downstream.classifier import Classifier
from encoder_guard.defenses.base import DEFENSES, Defense
from encoder_guard.encoders import Encoder
from encoder_guard.threats import DefenseData, DownstreamData


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, nn.Conv2d, nn.BatchNorm2d]]:
    """Each Conv2d directly followed (in module order) by the BatchNorm2d that normalises its output."""
    pairs, last = [], None
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            last = m
        elif isinstance(m, nn.BatchNorm2d) and last is not None and last.out_channels == m.num_features:
            pairs.append((name, last, m))
            last = None
    return pairs


@torch.no_grad()
def channel_lipschitz(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """``(C_out,)`` UCLC: spectral norm of each output channel's kernel ``(C_in, kh·kw)`` times ``|γ|/σ``."""
    assert bn.running_var is not None, "CLP reads BatchNorm's running statistics"
    gain = bn.weight.abs() / torch.sqrt(bn.running_var + bn.eps)
    w = conv.weight.flatten(2)  # (C_out, C_in/groups, kh*kw)
    return torch.linalg.matrix_norm(w, ord=2) * gain


@torch.no_grad()
def prune_by_lipschitz(model: nn.Module, u: float) -> dict[str, Any]:
    """Zero the BatchNorm output of every channel whose UCLC exceeds its layer's ``mean + u · std``, in place;
    returns the count pruned per layer and in all."""
    layers = {}
    for name, conv, bn in conv_bn_pairs(model):
        lips = channel_lipschitz(conv, bn)
        prune = lips > lips.mean() + u * lips.std()
        bn.weight[prune] = 0
        bn.bias[prune] = 0
        layers[name] = int(prune.sum())
    return {"pruned_channels": layers, "pruned_total": sum(layers.values())}


@DEFENSES.register("clp")
class CLP(Defense):
    """Args:
        u: pruning threshold in standard deviations above the layer's mean UCLC (the paper's default 3).
    """

    level = "encoder"
    uses_clean = False
    needs = "no data: the weights alone"

    def __init__(self, u: float = 3.0, seed: int = 0, device: str = "cpu") -> None:
        super().__init__(seed, device)
        if u <= 0:
            raise ValueError(f"u must be positive, got {u}")
        self.u = u

    def defend(self, encoder: Encoder, data: DefenseData, out: Path | None,
               resume: bool) -> tuple[Encoder, dict[str, Any]]:
        return encoder, prune_by_lipschitz(encoder.backbone, self.u)


@DEFENSES.register("clp-classifier")
class CLPClassifier(CLP):
    """CLP on a deployed classifier: its encoder's channels are pruned as :class:`CLP` prunes an encoder's, and
    the head is kept. Args: as :class:`CLP`."""

    level = "classifier"

    def defend(self, clf: Classifier, data: DownstreamData, out: Path | None,  # type: ignore[override]
               resume: bool) -> tuple[Classifier, dict[str, Any]]:
        return clf, prune_by_lipschitz(clf.encoder.backbone, self.u)
