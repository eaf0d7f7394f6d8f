"""D3: distance-driven detoxification of a downstream classifier, as its official code runs it.

- [0] Backdoor Mitigation by Distance-Driven Detoxification, Shaokui Wei, Jiayin Liu and Hongyuan Zha, ICCV 2025,
  arXiv 2411.09585 (official code: github.com/shawkui/Distance_Driven_Detoxification)

Plain fine-tuning on clean data stays near the poisoned weights, in a region where the clean loss and the
backdoor's are both low. D3 instead moves the classifier's last layer as far as it can from its deployed value
``W⁰`` while every clean sample keeps its loss under ``ε``:

    minimise  λ · mean_i max(0, CE_i − ε)  −  ‖W − W⁰‖₂     (divided by λ + 1 when λ > 1),

by SGD over **all** of the model's weights, with the last layer re-initialised at the start (uniform in
[−0.5, 0.5], rescaled to ``‖W⁰‖``) and projected back onto the sphere of radius ``‖W⁰‖`` after every step, so
that it rotates away instead of growing. Settings of the official code: λ 0.5, ε 0.1, 100 epochs of batches of
256 from 5% clean labelled data, SGD at 0.01 with momentum 0.9 and no weight decay, the rate annealed by a
cosine over the epochs, BatchNorm in training mode, random crops of the image padded by 4 pixels (and
horizontal flips on CIFAR-10 only). The layer's bias is neither in the distance nor projected.

``d3-tail`` (:mod:`encoder_guard.defenses.d3_tail`) is this project's faster variant on cached activations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from downstream.classifier import Classifier
from downstream.finetune import light_augment
from encoder_guard.defenses.base import DEFENSES, Defense
from encoder_guard.threats import DownstreamData
from encoder_guard.training import Step, TrainLoop, cosine_lr

INITS = ("random", "near", "far")


@torch.no_grad()
def _onto_sphere(weight: Tensor, radius: Tensor) -> None:
    """Rescale ``weight`` in place to norm ``radius``."""
    weight.mul_(radius / weight.norm().clamp_min(1e-12))


@DEFENSES.register("d3")
class D3(Defense):
    """Args:
        epochs / batch_size / lr / momentum / weight_decay: SGD over every weight, cosine over the epochs.
        penalty: λ, the weight of the clean-loss hinge (constant).
        epsilon: ε, the per-sample clean-loss bound.
        init: the last layer's start: ``random`` (uniform, rescaled to ``‖W⁰‖``; the official default),
            ``near`` (``W⁰`` itself) or ``far`` (``−W⁰``).
        bn_train: BatchNorm in training mode (its statistics follow the clean batches), as in the official code.
        pad / hflip_p: the views: a random crop of the image zero-padded by ``pad`` pixels, a horizontal flip
            with probability ``hflip_p``.
    """

    level = "classifier"
    checkpoints = True
    needs = "5% clean labelled images of the downstream training set"

    def __init__(self, epochs: int = 100, batch_size: int = 256, lr: float = 0.01, momentum: float = 0.9,
                 weight_decay: float = 0.0, penalty: float = 0.5, epsilon: float = 0.1, init: str = "random",
                 bn_train: bool = True, pad: int = 4, hflip_p: float = 0.0, seed: int = 0, device: str = "cpu") -> None:
        super().__init__(seed, device)
        if epochs < 1 or batch_size < 1 or lr <= 0 or penalty <= 0 or epsilon < 0:
            raise ValueError("epochs, batch_size, lr and penalty must be positive and epsilon non-negative")
        if init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, not {init!r}")
        self.epochs, self.batch_size, self.lr, self.momentum = epochs, batch_size, lr, momentum
        self.weight_decay, self.penalty, self.epsilon, self.init = weight_decay, penalty, epsilon, init
        self.bn_train, self.pad, self.hflip_p = bn_train, pad, hflip_p

    def defend(self, clf: Classifier, data: DownstreamData, out: Path | None,
               resume: bool) -> tuple[Classifier, dict[str, Any]]:
        clean = data.clean_set("D3")
        assert out is not None  # Defense.__call__ gives a checkpointing defense a directory
        weight = clf.head.linear.weight
        initial = weight.detach().clone()
        radius = initial.norm()
        if not resume or not (out / "checkpoints" / "d3.pt").exists():
            self._start(weight, initial, radius)
        for p in clf.parameters():
            p.requires_grad_(True)
        opt = torch.optim.SGD(clf.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        batch = min(self.batch_size, len(clean))
        per_epoch = max(1, len(clean) // batch)
        labels = clean.labels.long()

        def step(rows: Tensor, at: Step) -> tuple[Tensor, dict[str, float]]:
            clf.train(self.bn_train)
            x = light_augment(clean.images[rows].float().div(255), self.pad, self.hflip_p, at.generator)
            ce = F.cross_entropy(clf(x), labels[rows], reduction="none")
            hinge = F.relu(ce - self.epsilon).mean()
            distance = (weight - initial).norm()
            loss = self.penalty * hinge - distance
            if self.penalty > 1:
                loss = loss / (self.penalty + 1)
            return loss, {"ce": float(ce.detach().mean()), "distance": float(distance.detach() / radius)}

        def project(_step: int, _total: int) -> None:
            _onto_sphere(weight, radius)

        def cosine_by_epoch(s: int) -> float:  # the official code steps its cosine once per epoch
            return cosine_lr(s // per_epoch, self.epochs, self.lr)

        loop = TrainLoop(clf, opt, epochs=self.epochs, batch_size=batch, seed=self.seed,
                         checkpoint=out / "checkpoints" / "d3.pt", checkpoint_every=10, lr=cosine_by_epoch,
                         on_step_end=project, desc="D3", advice="lower D3's learning rate (defense.lr)")
        history = loop.run(step, len(clean), resume=resume)
        with torch.no_grad():  # Defense.__call__ puts the classifier back in eval mode, frozen
            moved = float((weight - initial).norm() / radius)
        return clf, {"history": history, "relative_weight_distance": moved}

    def _start(self, weight: Tensor, initial: Tensor, radius: Tensor) -> None:
        """The last layer's starting point (``init``), on the sphere of radius ``‖W⁰‖``."""
        with torch.no_grad():
            if self.init == "random":
                g = torch.Generator().manual_seed(self.seed)
                weight.copy_(torch.rand(weight.shape, generator=g) - 0.5)
            elif self.init == "far":
                weight.copy_(-initial)
        _onto_sphere(weight, radius)
