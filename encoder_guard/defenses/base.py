"""The defense contract: one base class, two levels a defense acts on (the class attribute ``level``).

- ``level = "encoder"`` (MIMIC, Purifier+, CLP, ...): ``defense(encoder, data: DefenseData) -> DefenseResult``
  takes a possibly backdoored encoder and the clean unlabelled images its threat model grants, and returns
  a defended encoder (loadable like any other checkpoint).
- ``level = "classifier"`` (PAD-FT, D3, TAC, ANP, fine-pruning, Purifier):
  ``defense(classifier, data: DownstreamData) -> DefenseResult`` takes the deployed classifier (encoder +
  linear head) and what a downstream defender holds (the labelled set the classifier was trained on,
  possibly poisoned, and/or a small clean labelled set), and returns a defended classifier.

:meth:`Defense.__call__` does the chores every defense shares, once: it works on a frozen copy (the caller's
model is never modified), seeds the global generators from ``seed`` inside a forked random state, times the
run, and adds the hyperparameters, the data used and the wall time to the report. A subclass implements
:meth:`Defense.defend` with the algorithm alone. Hyperparameters are typed keyword arguments of the
subclass's ``__init__`` whose defaults are the registered preset; :meth:`Defense.hparams` gives them back,
so ``cls(**defense.hparams())`` rebuilds the same defense.
"""

from __future__ import annotations

import copy
import inspect
import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from encoder_guard.registry import Registry
from encoder_guard.threats import DefenseData, DownstreamData


@dataclass
class DefenseResult:
    model: nn.Module  # an Encoder for encoder-level defenses, a downstream Classifier for the others
    report: dict[str, Any] = field(default_factory=dict)


class Defense(ABC):
    """Base class of every registered defense.

    Class attributes:
        level: ``encoder`` or ``classifier`` (which contract, see the module docstring).
        uses_clean: whether it needs clean data (``False``: data-free, or only the poisoned training set).
        needs: one line on the data the method needs, shown by ``encoder-guard defend --help``.
        checkpoints: whether :meth:`defend` writes checkpoints under ``out`` (then it always gets a directory: a
            library call without one runs in a temporary directory, from the start).
    """

    level: ClassVar[str] = "encoder"
    uses_clean: ClassVar[bool] = True
    needs: ClassVar[str] = "5% clean unlabelled images"
    checkpoints: ClassVar[bool] = False

    def __init__(self, seed: int = 0, device: str = "cpu") -> None:
        self.seed, self.device = seed, device

    def __call__(self, model: nn.Module, data: DefenseData | DownstreamData, out: str | Path | None = None,
                 resume: bool = False) -> DefenseResult:
        """Defend a frozen copy of ``model`` with ``data``; ``out`` holds checkpoints of defenses that train."""
        t0 = time.perf_counter()
        model = copy.deepcopy(model).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        with torch.random.fork_rng(devices=[]), tempfile.TemporaryDirectory() as tmp:
            torch.manual_seed(self.seed)
            if out is None and self.checkpoints:  # checkpoints need a place; this one goes with the call
                out, resume = tmp, False
            defended, report = self.defend(model, data, Path(out) if out is not None else None, resume)
        defended.eval()
        for p in defended.parameters():
            p.requires_grad_(False)
        report = {"hparams": self.hparams(), "data": data.usage(), **report,
                  "wall_seconds_since_resume": time.perf_counter() - t0}
        return DefenseResult(defended, report)

    @abstractmethod
    def defend(self, model: Any, data: Any, out: Path | None, resume: bool) -> tuple[nn.Module, dict[str, Any]]:
        """The algorithm: the defended model (built from the frozen copy ``model``) and what the report adds."""

    @classmethod
    def hparam_names(cls) -> list[str]:
        """The hyperparameters ``__init__`` takes (besides ``seed`` and ``device``), through the ``**kwargs``
        a subclass passes on to its parent."""
        names: list[str] = []
        for klass in cls.__mro__:
            init = vars(klass).get("__init__")
            if init is None:
                continue
            params = inspect.signature(init).parameters.values()
            names += [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD or p.kind is p.KEYWORD_ONLY
                      if p.name not in ("self", "seed", "device") and p.name not in names]
            if not any(p.kind is p.VAR_KEYWORD for p in params):
                break
        return names

    def hparams(self) -> dict[str, Any]:
        """The hyperparameters as ``__init__`` takes them (``seed`` included, ``device`` left out)."""
        return {name: getattr(self, name) for name in [*self.hparam_names(), "seed"]}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.hparams().items())})"


DEFENSES: Registry[type[Defense]] = Registry("defense")


def defense_level(name: str) -> str:
    """``encoder`` or ``classifier``: which contract the registered defense ``name`` follows."""
    return DEFENSES.get(name).level
