"""Resumable run state shared by pretraining, attacks and defenses.

A run's state (model, optimiser, position) is written atomically with ``torch.save`` of tensors and plain
containers only, and read back with ``torch.load(weights_only=True)``. Ctrl-C and SIGTERM (a scheduler's
time limit) stop a loop at the end of its step (:class:`StopOnSignal`), so it saves before it leaves.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import torch

from encoder_guard.errors import CheckpointError


def save_state(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a kill during the very first save leaves nothing usable
        raise CheckpointError(f"cannot resume from {path} ({str(exc).splitlines()[0]}); delete it to start over") from exc


class StopOnSignal:
    """Context manager: SIGINT (Ctrl-C) and SIGTERM (a scheduler's time limit) set :attr:`requested`, so a loop
    stops at the end of its current step, saves and raises ``KeyboardInterrupt``; a second signal raises at
    once. Stopping between steps means a checkpoint never holds half an update."""

    def __enter__(self) -> "StopOnSignal":
        self.requested = False
        self.previous: dict[int, Any] = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay as they are
                break
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def check_run_dir(out: Path, checkpoint: Path, resume: bool) -> None:
    """Refuse to overwrite a run, or to resume one that does not exist."""
    from encoder_guard.errors import EncoderGuardError

    if checkpoint.exists() and not resume:
        raise EncoderGuardError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if resume and not checkpoint.exists():
        raise EncoderGuardError(f"nothing to resume: {checkpoint} does not exist; run without --resume to start")
