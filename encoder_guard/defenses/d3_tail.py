"""``d3-tail``: this project's variant of D3 (distance-driven detoxification) on a classifier's tail.

- [0] Backdoor Mitigation by Distance-Driven Detoxification, Shaokui Wei, Jiayin Liu and Hongyuan Zha, ICCV 2025,
  arXiv 2411.09585

A backdoor lives in weight directions that clean data does not constrain: the clean task only pins
down the weights' projection on what clean inputs exercise. D3 therefore pushes the chosen weights as
far as it can from their (possibly poisoned) values while holding the clean loss of every clean sample
under a bound ε:

    minimise  λ · mean_i ReLU(CE_i − ε)  −  ‖W − W⁰‖₂,     then rescale each weight tensor to ‖W⁰‖,

so the weights rotate rather than grow (growth would be a cheap way to move far without changing the
function). λ rises by dual ascent while the mean clean loss exceeds ε. A recovery phase of plain
clean-loss descent from the far point follows (``recover_steps``, 600; norms still fixed): it settles the
rotated weights back onto the clean task without pulling them toward W⁰ (the relative distance stays where
the first phase left it). Under BadNets poisoning 600 steps cost less CA than 200 at the same ASR, and take
BadNets' 3×3 patch under 2% where 200 do not; under a backdoored
encoder, a shorter recovery leaves a lower ASR only by leaving the classifier unrecovered. Labels of a
small clean set (5% by default) are what it needs; nothing about the trigger.

It departs from [0] as its official code runs it (``d3``, :mod:`encoder_guard.defenses.d3`; ``docs/methods.md``):
it trains the tail from the deployed weights rather than the whole model with a re-initialised last layer,
bounds the batch-mean loss, raises λ by dual ascent, sets ε from the starting loss and adds the recovery phase.
Cached activations make it a matter of seconds on a CPU.

Weights: ``layers = head`` changes only the linear head (the classifier's last layer); a tap name
(e.g. ``layer3``) also changes every stage after it. ε is ``epsilon`` if given, else
``epsilon_scale`` × the classifier's mean clean loss before the defense.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, cast

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import trange

from downstream.classifier import Classifier
from encoder_guard.defenses.base import DEFENSES, Defense
from encoder_guard.defenses.tail import Tail
from encoder_guard.errors import TrainingDivergedError
from encoder_guard.threats import DownstreamData


@DEFENSES.register("d3-tail")
class D3Tail(Defense):
    """Args:
        layers: ``head`` or the tap after which every stage (and the head) is detoxified.
        epsilon: the per-sample clean-loss bound (``None``: ``epsilon_scale`` × initial mean clean loss).
        epsilon_scale: see ``epsilon``.
        penalty: λ, the weight of the clean-loss violation.
        steps / lr / batch_size: Adam on the objective above, minibatches of the clean set.
        per_sample: bound every sample's loss (hinge per sample) instead of the mean.
        dual_lr: step of the dual ascent that raises λ while the mean clean loss exceeds ε.
        recover_steps: clean-loss steps after the distance phase (0: none).
    """

    level = "classifier"
    needs = "5% clean labelled images of the downstream training set"

    def __init__(self, layers: str = "layer3", epsilon: float | None = None, epsilon_scale: float = 1.0,
                 penalty: float = 1.0, steps: int = 500, lr: float = 0.005, batch_size: int = 256, per_sample: bool = False,
                 dual_lr: float = 10.0, recover_steps: int = 600, seed: int = 0, device: str = "cpu") -> None:
        super().__init__(seed, device)
        if penalty <= 0 or steps < 1 or lr <= 0:
            raise ValueError("penalty, steps and lr must be positive")
        self.layers, self.epsilon, self.epsilon_scale, self.penalty = layers, epsilon, epsilon_scale, penalty
        self.steps, self.lr, self.batch_size = steps, lr, batch_size
        self.per_sample, self.dual_lr, self.recover_steps = per_sample, dual_lr, recover_steps

    def defend(self, clf: Classifier, data: DownstreamData, out: Path | None,
               resume: bool) -> tuple[Classifier, dict[str, Any]]:
        clean = data.clean_set("d3-tail")
        tail = Tail(clf, self.layers)
        h, y = tail.inputs(clean.images), clean.labels.long()
        tail.freeze_rest()
        weights = list(tail.parameters(weights_only=True))
        initial = [w.detach().clone() for w in weights]
        norms = [w.norm() for w in initial]
        total_norm = torch.sqrt(_total(w0.pow(2).sum() for w0 in initial))
        penalty = self.penalty
        with torch.no_grad():
            loss0 = float(F.cross_entropy(tail.logits(h), y))
        eps = self.epsilon if self.epsilon is not None else self.epsilon_scale * loss0
        opt = torch.optim.Adam(list(tail.parameters()), lr=self.lr)
        g = torch.Generator().manual_seed(self.seed)
        bar = trange(self.steps + self.recover_steps, desc="d3-tail", unit="step", mininterval=1.0, leave=False)
        for step in bar:
            idx = torch.randint(len(h), (min(self.batch_size, len(h)),), generator=g)
            ce = F.cross_entropy(tail.logits(h[idx]), y[idx], reduction="none")
            if step < self.steps:  # distance phase: move away while the clean loss stays under ε
                dist = torch.sqrt(_total((w - w0).pow(2).sum() for w, w0 in zip(weights, initial)) + 1e-12) / total_norm
                violation = F.relu(ce - eps).mean() if self.per_sample else F.relu(ce.mean() - eps)
                loss = penalty * violation - dist
                penalty = max(0.0, penalty + self.dual_lr * float(ce.detach().mean() - eps))  # dual ascent on λ
            else:  # recovery phase: clean-loss descent from the far point
                loss = ce.mean()
            if not torch.isfinite(loss):
                raise TrainingDivergedError("d3-tail's objective became NaN/inf; lower its lr (defense.lr)")
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():  # rotate, never grow: every weight tensor back to its original norm
                for w, n in zip(weights, norms):
                    w.mul_(n / w.norm().clamp_min(1e-12))
            bar.set_postfix(ce=f"{ce.mean().item():.3f}", refresh=False)
        with torch.no_grad():
            loss1 = float(F.cross_entropy(tail.logits(h), y))
            rel = float(torch.sqrt(_total((w - w0).pow(2).sum() for w, w0 in zip(weights, initial)))
                        / torch.sqrt(_total(w0.pow(2).sum() for w0 in initial)))
        report = {"epsilon": eps, "clean_loss_before": loss0, "clean_loss_after": loss1,
                  "relative_weight_distance": rel, "weights": sum(w.numel() for w in weights)}
        return clf, report


def _total(terms: Iterable[Tensor]) -> Tensor:
    """``sum(terms)`` (Python's, left to right from 0), typed as the tensor it is."""
    return cast(Tensor, sum(terms))
