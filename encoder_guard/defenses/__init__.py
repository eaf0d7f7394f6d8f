"""Defenses: one registry, two contracts by level (``encoder`` or ``classifier``, see ``defenses.base``)."""

from encoder_guard.defenses import anp, clp, d3, fine_pruning, mimic, padft, purifier, purifier_cc, tac  # noqa: F401  (register the defenses)
from encoder_guard.defenses.base import DEFENSES, DefenseData, DefenseResult, DownstreamData, defense_level

__all__ = ["DEFENSES", "DefenseData", "DefenseResult", "DownstreamData", "defense_level"]
