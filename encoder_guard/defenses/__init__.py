"""Defenses: one registry, one base class, two contracts by level (``encoder`` or ``classifier``, see ``defenses.base``)."""

from encoder_guard.defenses import (  # noqa: F401  (register the defenses)
    anp,
    clp,
    d3,
    d3_tail,
    fine_pruning,
    mimic,
    padft,
    padft_guarded,
    purifier,
    purifier_plus,
    ssl_baselines,
    ssl_cleanse,
    tac,
    yardsticks,
)
from encoder_guard.defenses.base import DEFENSES, Defense, DefenseResult, defense_level
from encoder_guard.threats import DefenseData, DownstreamData

__all__ = ["DEFENSES", "Defense", "DefenseData", "DefenseResult", "DownstreamData", "defense_level"]
