"""The defense contracts, one per level a defense acts on (the class attribute ``level``).

- ``level = "encoder"`` (MIMIC, Purifier, CLP, ...): ``run(encoder, data: DefenseData, out, resume) ->
  DefenseResult``. Takes a possibly backdoored encoder and the clean unlabelled data its threat model grants,
  and returns a defended encoder (loadable like any other checkpoint).
- ``level = "classifier"`` (PAD-FT, D3, TAC, ANP, fine-pruning): ``run(classifier, data: DownstreamData,
  out, resume) -> DefenseResult``. Takes the downstream classifier (encoder + linear head) and what a
  downstream defender holds — the labelled set the classifier was trained on, possibly poisoned, and/or a
  small clean labelled set — and returns a defended classifier.

Either way the result carries a report of what the defense did, the data it used and its wall time.
``encoder_guard.defenses.runner.run_defense`` wraps any registered defense in a run directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from encoder_guard.data import ImageDataset
from encoder_guard.registry import Registry


@dataclass
class DefenseData:
    """What the defender holds: clean images (labels are used only by label-using defenses)."""

    clean: ImageDataset | None  # None for data-free defenses (CLP)
    pretraining_size: int  # size of the set ``clean`` was drawn from, for the "x% of the data" figure

    def usage(self) -> dict[str, Any]:
        if self.clean is None:
            return {"dataset": None, "images": 0, "share_of_pretraining_set": 0.0}
        return {"dataset": self.clean.name, "images": len(self.clean),
                "share_of_pretraining_set": len(self.clean) / max(1, self.pretraining_size)}


@dataclass
class DownstreamData:
    """What a downstream defender holds.

    ``train`` is the labelled set the classifier was trained on (poisoned under the downstream threat);
    ``clean`` a small clean labelled set held aside (``None`` when the threat model grants none);
    ``poisoned`` the indices of poisoned samples in ``train`` when an experiment knows them — used only to
    report how well a defense's own selection found them, never by the defense itself.
    """

    train: ImageDataset
    clean: ImageDataset | None
    poisoned: Any = None
    pretraining_size: int = 0

    def usage(self) -> dict[str, Any]:
        return {"train_dataset": self.train.name, "train_images": len(self.train),
                "clean_images": 0 if self.clean is None else len(self.clean),
                "images": 0 if self.clean is None else len(self.clean),
                "share_of_train_set": 0.0 if self.clean is None else len(self.clean) / max(1, len(self.train))}


@dataclass
class DefenseResult:
    encoder: nn.Module  # an Encoder for encoder-level defenses, a downstream Classifier for the others
    report: dict[str, Any] = field(default_factory=dict)


DEFENSES: Registry[type] = Registry("defense")


def defense_level(name: str) -> str:
    """``encoder`` or ``classifier``: which contract the registered defense ``name`` follows."""
    obj = DEFENSES.get(name)
    return getattr(getattr(obj, "func", obj), "level", "encoder")
