"""The attack contract: ``attack.run(encoder, data, out) -> AttackResult``.

Attacks that fine-tune an encoder (BadEncoder) take the clean encoder and the attacker's data and return
the backdoored encoder with its trigger; the run directory gets the encoder, the trigger (ours and, for
patches, BadEncoder's ``.npz``), the reference images and a report with the wall time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from encoder_guard.data import ImageDataset
from encoder_guard.encoders import Encoder
from encoder_guard.registry import Registry
from encoder_guard.triggers import Trigger


@dataclass
class AttackData:
    """What the attacker holds: unlabelled shadow images, reference images of the target class, a trigger."""

    shadow: ImageDataset
    references: Tensor  # (R, C, H, W) in [0, 1]
    trigger: Trigger
    target: int


@dataclass
class AttackResult:
    encoder: Encoder
    trigger: Trigger
    report: dict[str, Any] = field(default_factory=dict)


ATTACKS: Registry[type] = Registry("attack")
