"""SSL-Cleanse's mitigation: unlearn the trigger an encoder scan inverted.

- [0] SSL-Cleanse: Trojan Detection and Mitigation in Self-Supervised Learning, Mengxin Zheng, Jiaqi Xue, Zihao
  Wang, Xun Chen, Qian Lou, Lei Jiang and Xiaofeng Wang, ECCV 2024, arXiv 2303.09079

Why it works: the scan finds a small trigger that pulls every image toward one embedding. Fine-tuning the
encoder so that a stamped view embeds where the frozen original puts the same view unstamped, while clean views
keep their embeddings, removes that shortcut; to the extent the inverted trigger is the attacker's (or
activates the same features), the attacker's trigger loses its pull as well.

The encoder is fine-tuned from its own weights (``student_init: copy``) on the defender's clean images, taught
by a frozen copy of itself with the clone loss (``1 − cos``): the student sees a view stamped with the trigger
with probability ``trigger_p`` and the teacher the same view unstamped. The trigger is ``trigger`` (any trigger
file, e.g. the ``trigger.safetensors`` that ``encoder-guard scan`` writes) or, when none is given, the one
``scanner`` inverts here on the clean images (with ``scan`` settings).

Departures from the released mitigation code (``UCF-ML-Research/SSL-Cleanse``, ``mitigator/``):

- the pull on a stamped view goes to the frozen encoder's embedding of the same view unstamped, as the paper
  describes the unlearning, where the release pulls it toward the embedding of a separate fixed image;
- the clean views are kept by the clone loss against the frozen original, the release's BYOL loss with a frozen
  target reduced to its fixed point (no predictor or projection head);
- the schedule is this project's distillation loop (Adam, cosine rate, 20 epochs on the defender's 5%), not
  the release's 500 BYOL epochs over half the training set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from encoder_guard.defenses.base import DEFENSES
from encoder_guard.defenses.distill import Distillation, StudentNoise, ViewPerturbation, merged
from encoder_guard.encoders import Encoder
from encoder_guard.runs import get_logger
from encoder_guard.scan import build_scanner
from encoder_guard.threats import DefenseData
from encoder_guard.triggers import Trigger, load_trigger


class TriggerStamp:
    """Stamp ``trigger`` on each view with probability ``p`` (the student's copy; the teacher sees it clean)."""

    def __init__(self, trigger: Trigger, p: float) -> None:
        if not 0 < p <= 1:
            raise ValueError(f"trigger_p must be in (0, 1], got {p}")
        self.trigger, self.p = trigger, p

    @property
    def active(self) -> bool:
        return True

    def __call__(self, v: Tensor, g: torch.Generator) -> Tensor:
        rows = torch.rand(len(v), generator=g, device=v.device) < self.p
        if not bool(rows.any()):
            return v
        v = v.clone()
        v[rows] = self.trigger.apply(v[rows].float()).to(v.dtype)
        return v


@DEFENSES.register("ssl-cleanse")
class SSLCleanse(Distillation):
    """SSL-Cleanse's unlearning [0] with the scan's inverted trigger.

    Args:
        trigger: a trigger file to unlearn (``None``: invert one here with ``scanner``).
        trigger_p: the share of the student's views that carry the trigger.
        scanner: the registered scanner that inverts the trigger when ``trigger`` is ``None``.
        scan: that scanner's settings (its paper's defaults where unset).
        Others: those of :class:`~encoder_guard.defenses.distill.Distillation`.
    """

    needs = "5% clean unlabelled images (and the scan's trigger file, or the scan runs first)"

    def __init__(
        self,
        trigger: str | None = None,
        trigger_p: float = 0.5,
        scanner: str = "collapse",
        scan: dict[str, Any] | None = None,
        student_init: str = "copy",
        ssl: float = 0.0,
        clone: float = 1.0,
        attention: float = 0.0,
        schedule: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(student_init=student_init, ssl=ssl, clone=clone, attention=attention,
                         schedule=merged({"epochs": 20, "batch_size": 128, "lr": 1e-4}, schedule), **kwargs)
        if not 0 < trigger_p <= 1:
            raise ValueError(f"trigger_p must be in (0, 1], got {trigger_p}")
        if clone <= 0:
            raise ValueError("SSL-Cleanse unlearns through the clone loss; clone must be positive")
        if StudentNoise(**self.student_noise).active:
            raise ValueError("ssl-cleanse perturbs the student's views with its trigger alone; leave student_noise unset")
        self.trigger, self.trigger_p, self.scanner = trigger, float(trigger_p), scanner
        self.scan = dict(scan or {})
        self._stamp: TriggerStamp | None = None

    def perturbation(self) -> ViewPerturbation:
        assert self._stamp is not None, "defend() sets the trigger before distilling"
        return self._stamp

    def defend(self, encoder: Encoder, data: DefenseData, out: Path | None,
               resume: bool) -> tuple[nn.Module, dict[str, Any]]:
        if data.clean is None:
            raise ValueError("SSL-Cleanse needs clean images")
        trigger, found = self._trigger(encoder, data)
        self._stamp = TriggerStamp(trigger, self.trigger_p)
        student, report = super().defend(encoder, data, out, resume)
        return student, {"trigger": repr(trigger), **found, **report}

    def _trigger(self, encoder: Encoder, data: DefenseData) -> tuple[Trigger, dict[str, Any]]:
        if self.trigger is not None:
            return load_trigger(self.trigger), {"trigger_file": str(self.trigger)}
        assert data.clean is not None
        result = build_scanner(self.scanner, seed=self.seed, device=self.device, **self.scan).scan(
            encoder, data.clean.images)
        inv = result.trigger
        get_logger().info(f"{self.scanner}: inverted a trigger of size {inv.size:.4f} (success {inv.success:.3f})")
        scan = {"scanner": self.scanner, "score": result.score, "seconds": result.seconds, "trigger": inv.summary()}
        return inv.as_trigger(), {"scan": scan}
