"""Fine-pruning: prune the last layer's dormant channels, then fine-tune the head.

- [0] Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural Networks, Liu, Dolan-Gavitt &
  Garg, RAID 2018, https://arxiv.org/abs/1805.12185

Backdoor behaviour tends to live in channels that clean inputs leave quiet. The classifier's features
are the last stage's channels, average-pooled, so pruning a last-layer channel is fixing its feature at
zero: the head's clamp does exactly that (``lo = hi = 0``). Channels are pruned in increasing order of
their mean activation on the clean set, as long as the clean accuracy stays within ``max_drop`` of the
start (and at most ``max_ratio`` of them); the head is then fine-tuned on the clean set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from downstream.classifier import Classifier
from downstream.features import cached_features
from encoder_guard.defenses.base import DEFENSES, Defense
from encoder_guard.defenses.tail import HeadTuner
from encoder_guard.threats import DownstreamData


@DEFENSES.register("fine-pruning")
class FinePruning(Defense):
    """Args:
        max_drop: the largest clean-accuracy loss (fraction) pruning may cause.
        max_ratio: the largest share of channels pruned.
        step: channels pruned per step of the search.
        epochs / lr / weight_decay / batch_size: head fine-tuning after pruning (Adam, standardised features).
    """

    level = "classifier"
    needs = "5% clean labelled images of the downstream training set"

    def __init__(self, max_drop: float = 0.05, max_ratio: float = 0.9, step: int = 4, epochs: int = 30,
                 lr: float = 0.01, weight_decay: float = 1e-4, batch_size: int = 256, seed: int = 0,
                 device: str = "cpu") -> None:
        super().__init__(seed, device)
        self.max_drop, self.max_ratio, self.step = max_drop, max_ratio, step
        self.epochs, self.lr, self.weight_decay, self.batch_size = epochs, lr, weight_decay, batch_size

    def defend(self, clf: Classifier, data: DownstreamData, out: Path | None,
               resume: bool) -> tuple[Classifier, dict[str, Any]]:
        clean = data.clean_set("fine-pruning")
        head = clf.head
        f = cached_features(clf.encoder, clean, device=self.device)
        y = clean.labels.long()

        def acc() -> float:
            with torch.no_grad():
                return float((head(f).argmax(1) == y).float().mean())

        start = acc()
        order = f.mean(0).argsort()  # dormant first
        pruned = 0
        for n in range(self.step, int(self.max_ratio * len(order)) + 1, self.step):
            lo, hi = head.lo.clone(), head.hi.clone()
            head.lo[order[:n]] = 0.0
            head.hi[order[:n]] = 0.0
            if start - acc() > self.max_drop:
                head.lo.copy_(lo)
                head.hi.copy_(hi)
                break
            pruned = n
        after_pruning = acc()
        tuner = HeadTuner(head, f, self.seed)
        alive = torch.ones(f.shape[1])
        alive[order[:pruned]] = 0  # pruned channels stay out of the fine-tuned head
        tuner.x = tuner.x * alive
        tuner.fit(lambda idx: F.cross_entropy(tuner.layer(tuner.x[idx]), y[idx]), self.epochs, self.lr,
                  self.weight_decay, self.batch_size, "fine-pruning")
        with torch.no_grad():
            tuner.layer.weight.mul_(alive)
        tuner.commit()
        return clf, {"pruned_channels": pruned, "channels": int(len(order)), "clean_acc_start": start,
                     "clean_acc_pruned": after_pruning, "clean_acc_final": acc()}
