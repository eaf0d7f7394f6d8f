"""Purifier: auxiliary heads choose per-class channel masks inside a downstream classifier.

- [0] Purifier: Plug-and-play Backdoor Mitigation for Pre-trained Models via Anomaly Activation
  Suppression, Xiaoyu Zhang et al., ACM Multimedia 2022, DOI 10.1145/3503161.3548065

Purifier (``purifier``) is [0]'s design as published in its public code: a classifier-level defense that
needs the downstream classifier and a small clean labelled set (5% of the downstream training set). The
label-free, encoder-level activation alignment of the follow-up, Purifier+, is ``defenses.purifier_plus``.
A :class:`ClassMask` plug-in sits on each chosen stage output: an auxiliary linear head on the pooled map
predicts the class, and that class's mask (one value in ``[0, 1]`` per channel) scales the map. A backdoor
needs channels that clean inputs of the class it is stamped on do not use; a mask that keeps only what each
class needs cuts them, whatever the trigger looks like.

Training, on the clean labelled share only (encoder and linear head frozen, BatchNorm statistics kept):

1. **heads first**: the auxiliary heads alone, cross-entropy on the true labels (masks still 1, so the
   classifier is unchanged), ``head_epochs``;
2. **then all**: heads and masks together, ``epochs``, with
   ``CE(classifier) + aux_weight · Σ CE(aux heads) + sparsity · mean(mask)``; masks are kept in
   ``[0, 1]`` after every step. The sparsity term is what switches unneeded channels off.

Inputs at the stage before the first plug-in are computed once (``defenses.tail``); each step runs only
the stages after it. The plug-ins are saved with the encoder, so the defended classifier loads like any
other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from downstream.classifier import Classifier
from encoder_guard.defenses.base import DEFENSES, Defense
from encoder_guard.defenses.tail import Tail, fit_minibatches
from encoder_guard.encoders.encoder import TAP_NAMES
from encoder_guard.encoders.plugins import ClassMask
from encoder_guard.errors import EncoderGuardError
from encoder_guard.threats import DownstreamData

PLUGGABLE = TAP_NAMES[1:]  # a plug-in needs a stage before it to cache inputs at


@DEFENSES.register("purifier")
class Purifier(Defense):
    """Purifier (ACM MM 2022): class-conditional channel masks learnt with auxiliary heads on clean labelled data.

    Args:
        taps: stage outputs that get a class-conditional mask (``layer1`` … ``layer4``).
        head_epochs: epochs of auxiliary-head training before the masks move.
        epochs: epochs of joint training of heads and masks.
        sparsity: weight of the mean mask value in the loss (higher: fewer channels kept per class).
        aux_weight: weight of the auxiliary heads' cross-entropy during joint training.
        lr / batch_size: Adam over minibatches of the clean set.
    """

    level = "classifier"
    needs = "5% clean labelled images of the downstream training set"

    def __init__(self, taps: Sequence[str] = ("layer4",), head_epochs: int = 20, epochs: int = 40,
                 sparsity: float = 0.5, aux_weight: float = 1.0, lr: float = 0.01, batch_size: int = 128,
                 seed: int = 0, device: str = "cpu") -> None:
        super().__init__(seed, device)
        bad = [t for t in taps if t not in PLUGGABLE]
        if bad or not taps:
            raise ValueError(f"taps must be a non-empty list from {', '.join(PLUGGABLE)}; got {list(taps)}")
        if head_epochs < 0 or epochs < 1 or lr <= 0 or sparsity < 0 or aux_weight < 0:
            raise ValueError("need head_epochs >= 0, epochs >= 1, lr > 0, sparsity >= 0, aux_weight >= 0")
        self.taps = sorted(set(taps), key=TAP_NAMES.index)
        self.head_epochs, self.epochs, self.sparsity, self.aux_weight = head_epochs, epochs, sparsity, aux_weight
        self.lr, self.batch_size = lr, batch_size

    def defend(self, clf: Classifier, data: DownstreamData, out: Path | None,
               resume: bool) -> tuple[Classifier, dict[str, Any]]:
        clean = data.clean_set("Purifier")
        enc = clf.encoder
        taken = [t for t in self.taps if t in enc.plugins]
        if taken:
            raise EncoderGuardError(f"the encoder already has plug-ins at {', '.join(taken)}; defend the original encoder")
        y = clean.labels.long()
        classes = clf.head.linear.out_features
        channels = {t["name"]: t["num_chs"] for t in enc.feature_info}
        tail = Tail(clf, TAP_NAMES[TAP_NAMES.index(self.taps[0]) - 1])
        h = tail.inputs(clean.images)  # at the stage before the first plug-in: unaffected by them
        masks = {}
        for tap in self.taps:
            masks[tap] = ClassMask(channels[tap], classes)
            enc.attach(tap, masks[tap])
        clf.eval()  # BatchNorm keeps its statistics; only the plug-ins' tensors get gradients, in _train
        for p in clf.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            ca0 = float((tail.logits(h).argmax(1) == y).float().mean())
        g = torch.Generator().manual_seed(self.seed)
        for m in masks.values():  # a seeded init, so that runs repeat exactly
            with torch.no_grad():
                m.aux.weight.normal_(0, 0.01, generator=g)
                m.aux.bias.zero_()
        aux_params = [p for m in masks.values() for p in m.aux.parameters()]
        self._train(tail, h, y, masks, aux_params, self.head_epochs, joint=False, generator=g)
        self._train(tail, h, y, masks, aux_params + [m.mask for m in masks.values()], self.epochs, joint=True, generator=g)
        with torch.no_grad():
            logits = tail.logits(h)
            ca1 = float((logits.argmax(1) == y).float().mean())
            layers = {tap: self._describe(m, y) for tap, m in masks.items()}
        return clf, {"holdout_accuracy_before": ca0, "holdout_accuracy_after": ca1,  # on the defender's clean share
                     "layers": layers}

    def _train(self, tail: Tail, h: torch.Tensor, y: torch.Tensor, masks: dict[str, ClassMask], params: list[nn.Parameter],
               epochs: int, joint: bool, generator: torch.Generator) -> None:
        if epochs == 0:
            return

        def batch_loss(idx: torch.Tensor) -> torch.Tensor:
            logits = tail.logits(h[idx])  # sets each mask's aux_logits
            aux = torch.stack([F.cross_entropy(_aux(m), y[idx]) for m in masks.values()]).sum()
            if not joint:
                return aux
            sparse = torch.stack([m.mask.mean() for m in masks.values()]).sum() / len(masks)
            return F.cross_entropy(logits, y[idx]) + self.aux_weight * aux + self.sparsity * sparse

        @torch.no_grad()
        def project() -> None:
            for m in masks.values():
                m.mask.clamp_(0, 1)

        for p in params:
            p.requires_grad_(True)
        fit_minibatches(params, len(h), batch_loss, epochs, self.lr, self.batch_size,
                        "purifier " + ("masks" if joint else "heads"), generator, after_step=project)
        for p in params:
            p.requires_grad_(False)

    @staticmethod
    def _describe(m: ClassMask, y: torch.Tensor) -> dict:
        kept = (m.mask > 0.5).sum(1)
        return {"channels": m.channels, "aux_accuracy": float((_aux(m).argmax(1) == y).float().mean()),
                "channels_kept_per_class": kept.tolist(), "mean_mask": float(m.mask.mean())}


def _aux(mask: ClassMask) -> torch.Tensor:
    """The auxiliary head's logits of the mask's last forward pass."""
    assert mask.aux_logits is not None, "the mask has not seen an input yet"
    return mask.aux_logits
