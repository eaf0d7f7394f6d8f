"""The yardsticks of a downstream defender: what anyone holding clean labelled data tries first.

A classifier-level defense is worth its name only if it beats these on the same data budget:

- ``refit-head``: throw the deployed head away and fit a new linear probe on the clean labelled share's
  features of the deployed encoder. Removes a backdoor that lives in the head alone (a poisoned probe over a
  clean encoder); leaves one that lives in the encoder.
- ``finetune-all``: fine-tune the whole deployed classifier on the clean labelled share
  (``downstream.finetune``'s recipe, more epochs for the smaller set). Standard fine-tuning, the baseline of
  every classifier-level backdoor defense paper (e.g. Fine-Pruning, Liu et al., RAID 2018, arXiv 1805.12185).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from downstream.classifier import Classifier, fit_classifier
from downstream.finetune import FinetuneConfig, finetune_classifier
from encoder_guard.defenses.base import DEFENSES, Defense
from encoder_guard.threats import DownstreamData


@DEFENSES.register("refit-head")
class RefitHead(Defense):
    """Args:
        weight_decay: L2 of the new linear probe (the evaluation protocol's).
    """

    level = "classifier"
    needs = "5% clean labelled images of the downstream training set"

    def __init__(self, weight_decay: float = 1e-4, seed: int = 0, device: str = "cpu") -> None:
        super().__init__(seed, device)
        self.weight_decay = weight_decay

    def defend(self, clf: Classifier, data: DownstreamData, out: Path | None,
               resume: bool) -> tuple[Classifier, dict[str, Any]]:
        clean = data.clean_set("refit-head")
        return fit_classifier(clf.encoder, clean, self.weight_decay, self.seed), {}


@DEFENSES.register("finetune-all")
class FinetuneAll(Defense):
    """Args:
        epochs / lr / head_lr_ratio / weight_decay / batch_size / pad / hflip_p: the fine-tuning recipe
        (``downstream.finetune``), on the clean share only.
    """

    level = "classifier"
    needs = "5% clean labelled images of the downstream training set"

    def __init__(self, epochs: int = 10, lr: float = 0.01, head_lr_ratio: float = 10.0, weight_decay: float = 5e-4,
                 batch_size: int = 128, pad: int = 2, hflip_p: float = 0.0, seed: int = 0, device: str = "cpu") -> None:
        super().__init__(seed, device)
        self.epochs, self.lr, self.head_lr_ratio, self.weight_decay = epochs, lr, head_lr_ratio, weight_decay
        self.batch_size, self.pad, self.hflip_p = batch_size, pad, hflip_p
        self.recipe  # checks the values now rather than at the first step

    def defend(self, clf: Classifier, data: DownstreamData, out: Path | None,
               resume: bool) -> tuple[Classifier, dict[str, Any]]:
        clean = data.clean_set("finetune-all")
        return finetune_classifier(clf, clean, self.recipe, self.seed, desc="finetune-all"), {}

    @property
    def recipe(self) -> FinetuneConfig:
        return FinetuneConfig(epochs=self.epochs, lr=self.lr, head_lr_ratio=self.head_lr_ratio,
                              weight_decay=self.weight_decay, batch_size=self.batch_size, pad=self.pad,
                              hflip_p=self.hflip_p)
