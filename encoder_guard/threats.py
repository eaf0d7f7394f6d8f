"""The three threat models, and what each grants a defender.

A downstream classifier is an encoder with a linear head trained on a labelled downstream set. It is
backdoored in one of three ways:

- **a backdoored encoder** (``downstream.poison_rate: 0``): BadEncoder or poisoned pretraining planted the
  backdoor in the encoder; the probe is trained on a clean downstream set;
- **a poisoned probe** (``downstream.poison_rate > 0``, ``downstream.victim: probe``): a clean, frozen encoder
  under a probe trained on a BadNets-poisoned downstream set (``poison_rate`` of it stamped with the trigger
  and relabelled); the backdoor lives in one linear layer;
- **a poisoned fine-tune** (``downstream.poison_rate > 0``, ``downstream.victim: finetune``): the victim
  fine-tunes encoder and head end to end on the poisoned set (the recipe in ``downstream.finetune``); the
  backdoor lives in the whole network, the setting of the downstream defenses' papers.

An encoder-level defender holds a little clean unlabelled data (:func:`defense_data`: a seeded share of the
encoder's pretraining set, at most 5%); a classifier-level defender holds the training set the classifier
was trained on (poisoned under the last two threats) and a clean labelled share of it (:func:`downstream_setup`:
5% by default, drawn class-balanced from its unpoisoned images).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from downstream.classifier import Classifier, fit_classifier, load_head
from downstream.evaluate import evaluate_classifier
from downstream.finetune import FinetuneConfig, finetuned_victim
from encoder_guard.adapt import adapt_dataset
from encoder_guard.data import ImageDataset, load_dataset
from encoder_guard.data.subsets import take_subset
from encoder_guard.encoders import Encoder
from encoder_guard.errors import EncoderGuardError
from encoder_guard.triggers import Trigger, build_trigger
from encoder_guard.triggers.poison import poison_downstream

MAX_SHARE = 0.05  # the clean-data budget of both threat models: 5% of the set the data is drawn from


@dataclass
class DefenseData:
    """What an encoder-level defender holds: clean images (labels unused), or none for data-free defenses."""

    clean: ImageDataset | None
    pretraining_size: int  # size of the set ``clean`` was drawn from, for the "x% of the data" figure

    def usage(self) -> dict[str, Any]:
        if self.clean is None:
            return {"dataset": None, "images": 0, "share_of_pretraining_set": 0.0}
        return {"dataset": self.clean.name, "images": len(self.clean),
                "share_of_pretraining_set": len(self.clean) / max(1, self.pretraining_size)}


@dataclass
class DownstreamData:
    """What a downstream defender holds.

    ``train`` is the labelled set the classifier was trained on (poisoned under the second threat);
    ``clean`` a small clean labelled set held aside (``None`` when the defense uses none); ``poisoned`` the
    indices of poisoned samples in ``train`` when an experiment knows them, used only to report how well a
    defense's own selection found them, never by the defense itself.
    """

    train: ImageDataset
    clean: ImageDataset | None
    poisoned: Any = None

    def clean_set(self, defense: str, what: str = "a small clean labelled set") -> ImageDataset:
        """The clean labelled share, or a one-line error naming ``defense`` and the setting that provides it."""
        if self.clean is None or len(self.clean) == 0:
            raise EncoderGuardError(f"{defense} needs {what}; set downstream.clean_fraction (default 0.05)")
        return self.clean

    def usage(self) -> dict[str, Any]:
        clean = 0 if self.clean is None else len(self.clean)
        return {"train_dataset": self.train.name, "train_images": len(self.train), "clean_images": clean,
                "images": clean, "share_of_train_set": clean / max(1, len(self.train))}


def defense_data(cfg: dict[str, Any], encoder: Encoder, seed: int) -> DefenseData:
    """The encoder-level defender's clean images (``data`` config section): a seeded share of the
    pretraining set, at most 5% unless ``data.allow_more``."""
    d = cfg["data"]
    full = load_dataset(d["dataset"], d.get("split", "train"), d.get("root"), encoder.spec.input_size)
    if full.channels != encoder.spec.in_chans:
        raise EncoderGuardError(f"{full.name} has {full.channels}-channel images but the encoder takes "
                                f"{encoder.spec.in_chans}; use the encoder's pretraining data")
    clean = take_subset(full, d.get("fraction"), d.get("count"), bool(d.get("balanced", False)), seed)
    if len(clean) > MAX_SHARE * len(full) + 1 and not d.get("allow_more", False):
        raise EncoderGuardError(
            f"{len(clean):,} clean images are {len(clean) / len(full):.1%} of {full.name}/{full.split}; the threat model "
            f"grants at most {MAX_SHARE:.0%}. Lower data.fraction/data.count, or pass --set data.allow_more=true"
        )
    return DefenseData(clean, len(full))


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
    """The downstream data of ``cfg["downstream"]`` for ``encoder`` (resized/converted to its input).

    ``clean``: draw the defender's clean labelled share (defenses that use none skip it, so their report
    says 0 clean images).
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
        share = float(d.get("clean_fraction", MAX_SHARE))
        if share > MAX_SHARE + 1e-9 and not d.get("allow_more", False):
            raise EncoderGuardError(f"downstream.clean_fraction {share} exceeds the threat model's {MAX_SHARE:.0%}; "
                                    "lower it or pass --set downstream.allow_more=true")
        holdout = take_subset(train, share, None, True, seed + 1)
    rate = float(d.get("poison_rate") or 0.0)
    poisoned = None
    if rate > 0:
        if trigger is None or target is None:
            raise EncoderGuardError("downstream.poison_rate > 0 needs downstream.trigger and downstream.target")
        p = poison_downstream(train, trigger, target, rate, seed)
        train, poisoned = p.dataset, p.indices
    return Downstream(DownstreamData(train, holdout, poisoned), test, trigger, target)


VICTIMS = ("probe", "finetune")


def victim_of(cfg: dict[str, Any]) -> str:
    """How the deployed classifier is trained (``downstream.victim``): ``probe`` or ``finetune``."""
    victim = (cfg.get("downstream") or {}).get("victim") or "probe"
    if victim not in VICTIMS:
        raise EncoderGuardError(f"downstream.victim must be one of {', '.join(VICTIMS)}, not {victim!r}")
    return str(victim)


def deployed_classifier(cfg: dict[str, Any], encoder: Encoder, ds: Downstream, seed: int) -> Classifier:
    """The classifier under defense: ``downstream.head`` if given, else a linear probe on the training set,
    fine-tuned end to end on it under ``downstream.victim: finetune``."""
    d = cfg.get("downstream") or {}
    if d.get("head"):
        return Classifier(encoder, load_head(d["head"], encoder.feature_dim))
    if victim_of(cfg) == "finetune":
        return finetuned_victim(encoder, ds.data.train, FinetuneConfig.from_dict(d.get("finetune")), seed)
    return fit_classifier(encoder, ds.data.train, seed=seed)
