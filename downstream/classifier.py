"""The downstream classifier: an encoder and a linear head, the model a downstream user deploys.

Encoder-level defenses (MIMIC, Purifier+) return an encoder; downstream defenses (PAD-FT, D3, TAC, ANP,
fine-pruning, Purifier) return a classifier. The head works on the encoder's raw pooled features: the linear
probe's standardisation is folded into its weights, and an optional per-dimension clamp (PAD-FT's
activation clipping) sits in front of it. Saved as ``head.safetensors`` next to the encoder's checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from downstream.linear import LinearProbe
from encoder_guard.encoders import Encoder, load_encoder, save_encoder
from encoder_guard.errors import CheckpointError

HEAD_FILE = "head.safetensors"
ENCODER_FILE = "encoder.safetensors"


class Head(nn.Module):
    """``linear(clamp(features, lo, hi))``; without bounds the clamp is the identity."""

    lo: Tensor
    hi: Tensor

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, num_classes)
        self.register_buffer("lo", torch.full((dim,), -torch.inf))
        self.register_buffer("hi", torch.full((dim,), torch.inf))

    @property
    def clipped(self) -> bool:
        return bool(torch.isfinite(self.lo).any() or torch.isfinite(self.hi).any())

    def clamp(self, features: Tensor) -> Tensor:
        return torch.maximum(torch.minimum(features, self.hi), self.lo)

    def forward(self, features: Tensor) -> Tensor:
        return self.linear(self.clamp(features))

    @staticmethod
    def feature_stats(x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and a floored std of ``x``: a dimension that is (nearly) constant on a small defense set
        must not get a tiny scale, or folding back (``W / std``) would blow its weight up."""
        std = x.std(0)
        return x.mean(0), std.clamp_min(max(1e-6, 1e-2 * float(std.mean())))

    def standardised(self, mean: Tensor, std: Tensor) -> nn.Linear:
        """A copy of the layer acting on ``(features − mean) / std``: defenses fine-tune it there, where one
        learning rate and weight decay suit any encoder, then write it back with :meth:`load_standardised`."""
        layer = nn.Linear(self.linear.in_features, self.linear.out_features)
        with torch.no_grad():
            layer.weight.copy_(self.linear.weight * std)
            layer.bias.copy_(self.linear.bias + self.linear.weight @ mean)
        return layer

    @torch.no_grad()
    def load_standardised(self, layer: nn.Linear, mean: Tensor, std: Tensor) -> None:
        self.linear.weight.copy_(layer.weight / std)
        self.linear.bias.copy_(layer.bias - self.linear.weight @ mean)

    @classmethod
    def from_probe(cls, probe: LinearProbe) -> "Head":
        """Fold ``(f − mean) / std`` into the layer: ``W' = W / std``, ``b' = b − W' · mean``."""
        w = probe.layer.weight.detach() / probe.std
        head = cls(w.shape[1], w.shape[0])
        with torch.no_grad():
            head.linear.weight.copy_(w)
            head.linear.bias.copy_(probe.layer.bias.detach() - w @ probe.mean)
        return head


class Classifier(nn.Module):
    """Images in ``[0, 1]`` → logits, through ``encoder`` then ``head``."""

    def __init__(self, encoder: Encoder, head: Head) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head

    @property
    def num_classes(self) -> int:
        return self.head.linear.out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))


def save_classifier(clf: Classifier, directory: str | os.PathLike) -> Path:
    """Write ``DIR/encoder.safetensors`` and ``DIR/head.safetensors``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_encoder(clf.encoder, d / ENCODER_FILE)
    tensors = {k: v.detach().cpu().contiguous() for k, v in clf.head.state_dict().items()}
    meta = {"format": "encoder_guard.head", "num_classes": str(clf.num_classes), "dim": str(clf.head.linear.in_features)}
    save_file(tensors, str(d / HEAD_FILE), metadata=meta)
    return d


def load_head(path: str | os.PathLike, feature_dim: int | None = None) -> Head:
    """Read a head saved by :func:`save_classifier` (safetensors only: nothing is unpickled)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"no head file at {p}; pass the head.safetensors a defense or `evaluate` wrote")
    try:
        tensors = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{p} is not a readable safetensors head ({exc})") from None
    if set(tensors) != {"linear.weight", "linear.bias", "lo", "hi"}:
        raise CheckpointError(f"{p} is not an encoder_guard head: keys {sorted(tensors)}")
    n, dim = tensors["linear.weight"].shape
    if feature_dim is not None and dim != feature_dim:
        raise CheckpointError(f"the head in {p} takes {dim}-d features but the encoder gives {feature_dim}-d; "
                              "pair it with the encoder it was trained on")
    head = Head(dim, n)
    head.load_state_dict(tensors)
    return head


def load_classifier(directory: str | os.PathLike) -> Classifier:
    d = Path(directory)
    encoder = load_encoder(d / ENCODER_FILE)
    return Classifier(encoder, load_head(d / HEAD_FILE, encoder.feature_dim))


def fit_classifier(encoder: Encoder, train, weight_decay: float = 1e-4, seed: int = 0, cache: bool = True) -> Classifier:
    """The downstream classifier of the protocol: a linear probe on ``train``'s frozen features.

    ``train`` may be poisoned (BadNets): that is how the downstream threat model backdoors a probe on a
    clean encoder.
    """
    from downstream.features import cached_features
    from downstream.linear import fit_linear_probe

    feats = cached_features(encoder, train, cache=cache)
    n_cls = max(train.num_classes, int(train.labels.max()) + 1)
    return Classifier(encoder, Head.from_probe(fit_linear_probe(feats, train.labels, n_cls, weight_decay, seed=seed)))
