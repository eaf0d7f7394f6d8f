"""The defense contract: ``defense.run(encoder, data, out, resume) -> DefenseResult``.

A defense takes a possibly backdoored encoder and the clean data its threat model grants, and returns a
defended encoder (loadable like any other checkpoint) with a report of what it did, the data it used and
its wall time. ``encoder_guard.defenses.runner.run_defense`` wraps any registered defense in a run directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from encoder_guard.data import ImageDataset
from encoder_guard.encoders import Encoder
from encoder_guard.registry import Registry


@dataclass
class DefenseData:
    """What the defender holds: clean images (labels are used only by label-using defenses)."""

    clean: ImageDataset
    pretraining_size: int  # size of the set ``clean`` was drawn from, for the "x% of the data" figure

    def usage(self) -> dict[str, Any]:
        return {"dataset": self.clean.name, "images": len(self.clean),
                "share_of_pretraining_set": len(self.clean) / max(1, self.pretraining_size)}


@dataclass
class DefenseResult:
    encoder: Encoder
    report: dict[str, Any] = field(default_factory=dict)


DEFENSES: Registry[type] = Registry("defense")
