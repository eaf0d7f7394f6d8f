"""Attacks on encoders (BadEncoder) and on data (poisoned pretraining and downstream sets)."""

from encoder_guard.attacks import badencoder  # noqa: F401  (register)
from encoder_guard.attacks.base import ATTACKS, AttackData, AttackResult

__all__ = ["ATTACKS", "AttackData", "AttackResult"]
