"""Metrics of backdoor evaluation, as fractions in ``[0, 1]``.

- CA: accuracy on the clean test set.
- ASR: share of triggered test images whose true class is not the target that are classified as the
  target (MIMIC's code also counts target-class images; we do not).
- worst-class ASR: the largest share of triggered images sent to one class they do not belong to, for a
  set where the attacker's target is unknown or absent (another domain than the attacker's).
- RA: robust accuracy, share of triggered non-target images classified as their true class
  (BackdoorBench ``utils/metric.py``).
- DER: defense effectiveness rating, ``(max(0, ΔASR) - max(0, ΔCA) + 1) / 2`` (BackdoorBench).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor


def accuracy(pred: Tensor, labels: Tensor) -> float:
    """Share of ``pred == labels`` (``(N,)`` each)."""
    if len(labels) == 0:
        raise ValueError("accuracy of an empty set")
    return float((pred == labels).float().mean())


def attack_success_rate(pred_triggered: Tensor, labels: Tensor, target: int) -> float:
    """Share of non-target-class samples whose triggered prediction is ``target``."""
    keep = labels != target
    if not bool(keep.any()):
        raise ValueError(f"every test label is the target {target}: ASR is undefined")
    return float((pred_triggered[keep] == target).float().mean())


def worst_class_asr(pred_triggered: Tensor, labels: Tensor, num_classes: int) -> tuple[float, int]:
    """The share of triggered images of other classes classified as the single class that draws the most of
    them, and that class: ASR toward the worst target, for when no target is known."""
    best, cls = 0.0, 0
    for c in range(num_classes):
        keep = labels != c
        if bool(keep.any()):
            share = float((pred_triggered[keep] == c).float().mean())
            if share > best:
                best, cls = share, c
    return best, cls


def robust_accuracy(pred_triggered: Tensor, labels: Tensor, target: int) -> float:
    """Share of non-target-class samples still classified as their true class under the trigger."""
    keep = labels != target
    return float((pred_triggered[keep] == labels[keep]).float().mean())


def defense_effectiveness_rating(ca_bd: float, asr_bd: float, ca_def: float, asr_def: float) -> float:
    """BackdoorBench's DER in ``[0, 1]`` (0.5: no change; 1: ASR removed at no CA cost)."""
    return (max(0.0, asr_bd - asr_def) - max(0.0, ca_bd - ca_def) + 1) / 2


def compare_metrics(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """ΔCA and DER of a defense from the classifier's evaluations before and after it (``ca``, ``asr``)."""
    out = {"delta_ca": after["ca"] - before["ca"]}
    if "asr" in before and "asr" in after:
        out["der"] = defense_effectiveness_rating(before["ca"], before["asr"], after["ca"], after["asr"])
    return out
