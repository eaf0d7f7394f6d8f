"""Defenses: one registry, one contract (``run(encoder, data, out, resume) -> DefenseResult``)."""

from encoder_guard.defenses import mimic, purifier  # noqa: F401  (register mimic, finetune, distill, nad, purifier, purifier-plus)
from encoder_guard.defenses.base import DEFENSES, DefenseData, DefenseResult

__all__ = ["DEFENSES", "DefenseData", "DefenseResult"]
