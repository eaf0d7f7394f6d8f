"""User-facing errors.

Every error a user can cause (a wrong path, an unknown name, a checkpoint for another architecture, a
file that cannot be loaded safely) is an :class:`EncoderGuardError` whose message names the problem and
the fix in one line. The CLI prints that line and exits non-zero; library users can catch the class.
"""

from __future__ import annotations


class EncoderGuardError(Exception):
    """A problem with the user's input, explained in one line that says how to fix it."""


class CheckpointError(EncoderGuardError):
    """A checkpoint is missing, corrupt, unsafe to load or does not fit the architecture."""


class DatasetNotFoundError(EncoderGuardError):
    """A dataset is not on disk where we looked."""


class TrainingDivergedError(EncoderGuardError):
    """A loss became NaN or infinite; the last good checkpoint is kept."""
