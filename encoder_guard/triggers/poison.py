"""Data poisoning: triggered target-class images in an unlabelled pretraining set, and BadNets-style
triggered-and-relabelled images in a labelled downstream set.

- [0] SSL-Backdoor: Backdoor Attacks on Self-Supervised Learning, Saha et al., CVPR 2022,
  https://arxiv.org/abs/2105.10123 (patch on target-category images of the pretraining data)
- [1] An Embarrassingly Simple Backdoor Attack on Self-supervised Learning (CTRL), Changjiang Li et al., ICCV 2023,
  arXiv 2210.07346 (frequency trigger, ~1% of the data)
- [2] BadNets: Identifying Vulnerabilities in the Machine Learning Model Supply Chain, Gu et al., 2017,
  arXiv 1708.06733 (downstream: stamp and relabel)

``rate`` is the poisoned share of the **whole** set, as in [0] and [1]: for pretraining the poisoned
images are drawn from the target class only (so 1% of Fashion-MNIST is 600 of the 6,000 target images);
for BadNets they are drawn from the non-target classes and relabelled as the target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from encoder_guard.data import ImageDataset
from encoder_guard.errors import EncoderGuardError
from encoder_guard.triggers import Trigger
from encoder_guard.utils import seeded_choice


@dataclass
class Poisoned:
    dataset: ImageDataset
    indices: torch.Tensor  # positions in the dataset that carry the trigger

    def report(self) -> dict:
        return {"poisoned": len(self.indices), "size": len(self.dataset), "indices": self.indices.tolist()}


def _stamp(ds: ImageDataset, idx: torch.Tensor, trigger: Trigger, chunk: int = 2048) -> torch.Tensor:
    images = ds.images.clone()
    for start in range(0, len(idx), chunk):
        sel = idx[start : start + chunk]
        x = trigger.apply(images[sel].float().div(255))
        images[sel] = (x * 255).round().clamp(0, 255).to(torch.uint8)
    return images


def _count(rate: float, n: int) -> int:
    if not 0 < rate <= 1:
        raise EncoderGuardError(f"poison rate must be in (0, 1], got {rate}")
    return max(1, round(rate * n))


def poison_pretraining(ds: ImageDataset, trigger: Trigger, target: int, rate: float, seed: int = 0) -> Poisoned:
    """Stamp ``trigger`` on ``rate·len(ds)`` target-class images (labels are kept: SSL ignores them)."""
    members = (ds.labels == target).nonzero().flatten()
    want = _count(rate, len(ds))
    if len(members) == 0:
        raise EncoderGuardError(f"the pretraining set has no images of target class {target}")
    if want > len(members):
        raise EncoderGuardError(f"rate {rate} asks for {want} poisoned images but class {target} has {len(members)}; lower poison.rate")
    idx = seeded_choice(members, want, seed).sort().values
    return Poisoned(ImageDataset(_stamp(ds, idx, trigger), ds.labels, ds.classes, ds.name, ds.split, dict(ds.meta, poisoned=True)), idx)


def poison_downstream(ds: ImageDataset, trigger: Trigger, target: int, rate: float, seed: int = 0) -> Poisoned:
    """BadNets: stamp ``trigger`` on ``rate·len(ds)`` non-target images and relabel them ``target``."""
    candidates = (ds.labels != target).nonzero().flatten()
    want = _count(rate, len(ds))
    if want > len(candidates):
        raise EncoderGuardError(f"rate {rate} asks for {want} poisoned images but only {len(candidates)} are not of class {target}")
    idx = seeded_choice(candidates, want, seed).sort().values
    labels = ds.labels.clone()
    labels[idx] = target
    return Poisoned(ImageDataset(_stamp(ds, idx, trigger), labels, ds.classes, ds.name, ds.split, dict(ds.meta, poisoned=True)), idx)
