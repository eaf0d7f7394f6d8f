"""ANP: adversarial neuron pruning.

- [0] Adversarial Neuron Pruning Purifies Backdoored Deep Models, Dongxian Wu and Yisen Wang, NeurIPS 2021,
  arXiv 2110.14430

Backdoor neurons are the ones whose small multiplicative perturbation collapses the model onto a class:
under adversarial perturbation of each neuron's gain and bias (relative size ``eps``), a backdoored
network starts predicting the target on clean inputs. ANP learns a mask ``m ∈ [0, 1]`` per neuron
(BatchNorm channel) that keeps clean loss low both unperturbed and under the worst perturbation,

    min_m  α · L(m, 0) + (1 − α) · max_{|δ|,|ξ| ≤ ε} L(m + δ, 1 + ξ),

and prunes the neurons whose mask falls below ``threshold``. Here the neurons are the BatchNorm
channels of the stages after ``layers`` (the encoder's last stage by default), optimised on cached
activations of a small clean labelled set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from downstream.classifier import Classifier
from encoder_guard.defenses.base import DEFENSES, Defense
from encoder_guard.defenses.tail import Tail
from encoder_guard.errors import EncoderGuardError
from encoder_guard.threats import DownstreamData


class _Perturb:
    """Forward hook on a BatchNorm: ``y = γ x̂ + β`` becomes ``(m + δ) γ x̂ + (1 + ξ) β``."""

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        c = bn.num_features
        self.bn = bn
        self.mask = torch.ones(c, requires_grad=True)
        self.delta = torch.zeros(c, requires_grad=True)
        self.xi = torch.zeros(c, requires_grad=True)
        self.perturb = False
        self.handle = bn.register_forward_hook(self)

    def __call__(self, bn: nn.BatchNorm2d, inputs: tuple, y: Tensor) -> Tensor:
        beta = bn.bias.view(1, -1, 1, 1)
        gain = self.mask + self.delta if self.perturb else self.mask
        shift = 1 + self.xi if self.perturb else torch.ones_like(self.xi)
        return gain.view(1, -1, 1, 1) * (y - beta) + shift.view(1, -1, 1, 1) * beta


@DEFENSES.register("anp")
class ANP(Defense):
    """Args:
        layers: the tap after which the stages' BatchNorm channels are the neurons (default ``layer3``).
        eps: relative size of the adversarial perturbation; alpha: weight of the unperturbed loss.
        steps / lr / batch_size: mask optimisation (SGD on the mask, one signed ascent step on δ, ξ).
        threshold: neurons with mask below it are pruned (γ and β set to zero).
        prune_ratio: prune this share of the neurons with the lowest masks instead (the paper's other rule).
    """

    level = "classifier"
    needs = "5% clean labelled images of the downstream training set"

    def __init__(self, layers: str = "layer3", eps: float = 0.4, alpha: float = 0.2, steps: int = 300,
                 lr: float = 0.2, batch_size: int = 128, threshold: float = 0.2, prune_ratio: float | None = None,
                 seed: int = 0, device: str = "cpu") -> None:
        super().__init__(seed, device)
        self.layers, self.eps, self.alpha, self.steps, self.lr = layers, eps, alpha, steps, lr
        self.batch_size, self.threshold, self.prune_ratio = batch_size, threshold, prune_ratio

    def defend(self, clf: Classifier, data: DownstreamData, out: Path | None,
               resume: bool) -> tuple[Classifier, dict[str, Any]]:
        clean = data.clean_set("ANP")
        tail = Tail(clf, self.layers)
        h, y = tail.inputs(clean.images), clean.labels.long()
        for p in clf.parameters():
            p.requires_grad_(False)
        hooks = [_Perturb(m) for s in tail.stages() for m in s.modules() if isinstance(m, nn.BatchNorm2d)]
        if not hooks:
            raise EncoderGuardError(f"no BatchNorm channels after {self.layers}; choose an earlier tap")
        opt = torch.optim.SGD([k.mask for k in hooks], lr=self.lr, momentum=0.9)
        g = torch.Generator().manual_seed(self.seed)
        try:
            for _ in range(self.steps):
                idx = torch.randint(len(h), (min(self.batch_size, len(h)),), generator=g)
                # inner maximisation: one signed step to the edge of the ε-box, from a random start
                for k in hooks:
                    with torch.no_grad():
                        k.delta.uniform_(-self.eps, self.eps, generator=g)
                        k.xi.uniform_(-self.eps, self.eps, generator=g)
                    k.perturb = True
                adv = F.cross_entropy(tail.logits(h[idx]), y[idx])
                grads = torch.autograd.grad(-adv, [p for k in hooks for p in (k.delta, k.xi)])
                with torch.no_grad():
                    for i, k in enumerate(hooks):
                        k.delta.sub_(self.eps * grads[2 * i].sign()).clamp_(-self.eps, self.eps)
                        k.xi.sub_(self.eps * grads[2 * i + 1].sign()).clamp_(-self.eps, self.eps)
                loss_adv = F.cross_entropy(tail.logits(h[idx]), y[idx])
                for k in hooks:
                    k.perturb = False
                loss_nat = F.cross_entropy(tail.logits(h[idx]), y[idx])
                loss = self.alpha * loss_nat + (1 - self.alpha) * loss_adv
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    for k in hooks:
                        k.mask.clamp_(0, 1)
        finally:
            for k in hooks:
                k.handle.remove()
        pruned = 0
        with torch.no_grad():
            masks = torch.cat([k.mask for k in hooks])
            if self.prune_ratio is None:
                offs = (masks < self.threshold).split([k.bn.num_features for k in hooks])
            else:  # prune a fixed share: the lowest masks, ties broken by order
                flat = torch.zeros(len(masks), dtype=torch.bool)
                flat[masks.argsort(stable=True)[: int(self.prune_ratio * len(masks))]] = True
                offs = flat.split([k.bn.num_features for k in hooks])
            for k, off in zip(hooks, offs):
                k.bn.weight[off] = 0
                k.bn.bias[off] = 0
                pruned += int(off.sum())
        return clf, {"neurons": sum(k.bn.num_features for k in hooks), "pruned_neurons": pruned}
