"""The downstream side of a defense: the deployed classifier, the defender's data, the test set.

A downstream classifier is an encoder with a linear head trained on a labelled downstream set. It is
backdoored in one of two ways, and every defense is judged under both (DESIGN.md, "Threat models"):

- **A** (``poison_rate: 0``): a backdoored encoder under a probe trained on a clean downstream set;
- **B** (``poison_rate > 0``): a clean encoder under a probe trained on a BadNets-poisoned downstream set.

The ``downstream`` config section says which: the dataset, the trigger and target that ASR is measured
with (and that BadNets stamps), the poisoned share, and the defender's clean labelled share (5% of the
downstream training set by default, drawn class-balanced from its *unpoisoned* images).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from downstream.classifier import Classifier, fit_classifier, load_head
from downstream.evaluate import evaluate_classifier
from downstream.metrics import defense_effectiveness_rating
from encoder_guard.adapt import adapt_dataset
from encoder_guard.data import ImageDataset, load_dataset
from encoder_guard.data.subsets import take_subset
from encoder_guard.defenses.base import DownstreamData
from encoder_guard.encoders import Encoder
from encoder_guard.errors import EncoderGuardError
from encoder_guard.triggers import Trigger
from encoder_guard.triggers.factory import build_trigger

MAX_CLEAN_SHARE = 0.05  # D3's budget: 5% of the downstream training set


@dataclass
class Downstream:
    """Everything of a downstream experiment except the classifier."""

    data: DownstreamData
    test: ImageDataset
    trigger: Trigger | None
    target: int | None

    def evaluate(self, clf: Classifier) -> dict[str, Any]:
        key = self.trigger.key() if self.trigger is not None else None
        return evaluate_classifier(clf, self.test, self.trigger, key, self.target)


def downstream_setup(cfg: dict[str, Any], encoder: Encoder, seed: int, clean: bool = True) -> Downstream:
    """Build the downstream data of ``cfg["downstream"]`` for ``encoder`` (resized/converted to its input).

    ``clean``: draw the defender's clean labelled share (defenses that use none skip it, so their
    report says 0 clean images).
    """
    d = cfg.get("downstream") or {}
    name, root = d.get("dataset", "fashion-mnist"), d.get("root")
    train, _ = adapt_dataset(load_dataset(name, "train", root), encoder.spec)
    test, _ = adapt_dataset(load_dataset(name, "test", root), encoder.spec)
    if d.get("train_fraction") is not None or d.get("train_count") is not None:
        train = take_subset(train, d.get("train_fraction"), d.get("train_count"), True, seed)
    trigger, target = None, d.get("target")
    if d.get("trigger"):
        spec = d["trigger"] if isinstance(d["trigger"], dict) else {"file": d["trigger"]}
        trigger = build_trigger(spec, encoder.spec.input_size, encoder.spec.in_chans)
        if target is None:
            raise EncoderGuardError("downstream.trigger needs downstream.target (the attack's target class)")
        if not 0 <= int(target) < test.num_classes:
            raise EncoderGuardError(f"downstream.target {target} is not a class of {name} (0..{test.num_classes - 1})")
        target = int(target)
    holdout = None
    if clean:
        share = float(d.get("clean_fraction", MAX_CLEAN_SHARE))
        if share > MAX_CLEAN_SHARE + 1e-9 and not d.get("allow_more", False):
            raise EncoderGuardError(f"downstream.clean_fraction {share} exceeds the threat model's {MAX_CLEAN_SHARE:.0%}; "
                                    "lower it or pass --set downstream.allow_more=true")
        holdout = take_subset(train, share, None, True, seed + 1)
    rate = float(d.get("poison_rate") or 0.0)
    poisoned = None
    if rate > 0:
        if trigger is None:
            raise EncoderGuardError("downstream.poison_rate > 0 needs downstream.trigger and downstream.target")
        from encoder_guard.attacks.poison import poison_downstream

        p = poison_downstream(train, trigger, target, rate, seed)
        train, poisoned = p.dataset, p.indices
    return Downstream(DownstreamData(train, holdout, poisoned, len(train)), test, trigger, target)


def deployed_classifier(cfg: dict[str, Any], encoder: Encoder, ds: Downstream, seed: int) -> Classifier:
    """The classifier under defense: ``downstream.head`` if given, else a linear probe on the training set."""
    head = (cfg.get("downstream") or {}).get("head")
    if head:
        return Classifier(encoder, load_head(head, encoder.feature_dim))
    return fit_classifier(encoder, ds.data.train, seed=seed)


def compare_metrics(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """ΔCA and DER of a defense from the before/after evaluations of :meth:`Downstream.evaluate`."""
    out = {"delta_ca": after["ca"] - before["ca"]}
    if "asr" in before and "asr" in after:
        out["der"] = defense_effectiveness_rating(before["ca"], before["asr"], after["ca"], after["asr"])
    return out


def selection_quality(kept: torch.Tensor, poisoned: torch.Tensor | None, n: int) -> dict[str, Any]:
    """How well a defense's kept-as-clean set avoided the known poisoned samples (never used by the defense)."""
    if poisoned is None or len(poisoned) == 0:
        return {"kept": int(len(kept)), "of": n}
    bad = torch.zeros(n, dtype=torch.bool)
    bad[poisoned] = True
    keep = torch.zeros(n, dtype=torch.bool)
    keep[kept] = True
    removed = ~keep
    caught = int((removed & bad).sum())
    return {"kept": int(keep.sum()), "of": n, "poisoned": int(bad.sum()), "poisoned_kept": int((keep & bad).sum()),
            "clean_precision": float((keep & ~bad).sum() / keep.sum().clamp_min(1)),
            "poison_recall": caught / int(bad.sum()),
            "removed_precision": caught / max(1, int(removed.sum()))}
