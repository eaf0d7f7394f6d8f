"""ANP: adversarial neuron pruning, as its official code runs it.

- [0] Adversarial Neuron Pruning Purifies Backdoored Deep Models, Dongxian Wu and Yisen Wang, NeurIPS 2021,
  arXiv 2110.14430 (official code: github.com/csdongxian/ANP_backdoor)

Backdoor neurons are the ones whose small multiplicative perturbation collapses the model onto a class:
under adversarial perturbation of each neuron's gain and bias (relative size ``eps``), a backdoored
network starts predicting the target on clean inputs. ANP learns a mask ``m ∈ [0, 1]`` per neuron
(BatchNorm channel) of the whole network that keeps the clean loss low both unperturbed and under the
worst perturbation,

    min_m  α · L(m, 0) + (1 − α) · max_{δ, ξ} L(m + δ, 1 + ξ),

and prunes the neurons whose mask is at most ``threshold`` by zeroing their BatchNorm weight.

As in the official code: the perturbation starts uniform in ``[−ε, ε]`` and takes one signed gradient step of
size ``ε``; the network is in training mode while the masks are learnt (BatchNorm normalises with the batch's
statistics, which the official code lets drift and then discards by pruning the saved weights; here they are
put back); the views are random crops of the image zero-padded by 4 pixels; the clean data is 1% of the
training set; pruning zeroes the weight (γ) only, so a pruned neuron outputs its bias. The masks learn in
:class:`~encoder_guard.training.TrainLoop` (progress, NaN guard, checkpoints and resume).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from downstream.classifier import Classifier
from downstream.finetune import light_augment
from encoder_guard.data import take_subset
from encoder_guard.defenses.base import DEFENSES, Defense
from encoder_guard.encoders.encoder import TAP_MODULES, TAP_NAMES
from encoder_guard.errors import EncoderGuardError
from encoder_guard.threats import DownstreamData
from encoder_guard.training import Step, TrainLoop


class _Perturb:
    """Forward hook on a BatchNorm: ``y = γ x̂ + β`` becomes ``(m + δ) γ x̂ + (1 + ξ) β``."""

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        c = bn.num_features
        self.bn = bn
        self.mask = nn.Parameter(torch.ones(c))
        self.delta = torch.zeros(c, requires_grad=True)
        self.xi = torch.zeros(c, requires_grad=True)
        self.perturb = False
        self.handle = bn.register_forward_hook(self)

    def __call__(self, bn: nn.BatchNorm2d, inputs: tuple, y: Tensor) -> Tensor:
        beta = bn.bias.view(1, -1, 1, 1)
        gain = self.mask + self.delta if self.perturb else self.mask
        shift = 1 + self.xi if self.perturb else torch.ones_like(self.xi)
        return gain.view(1, -1, 1, 1) * (y - beta) + shift.view(1, -1, 1, 1) * beta


def _neurons(clf: Classifier, layers: str | None) -> list[nn.BatchNorm2d]:
    """The BatchNorm layers whose channels are ANP's neurons: the whole encoder, or the stages after ``layers``."""
    root: list[nn.Module] = [clf.encoder]
    if layers is not None:
        root = [clf.encoder.backbone.get_submodule(m) for m in TAP_MODULES[TAP_NAMES.index(layers) + 1 :]]
    return [m for r in root for m in r.modules() if isinstance(m, nn.BatchNorm2d)]


@DEFENSES.register("anp")
class ANP(Defense):
    """Args:
        layers: ``None`` (every BatchNorm channel of the network, the paper's) or a tap after which the stages'
            channels are the neurons.
        eps: relative size of the adversarial perturbation; alpha: weight of the unperturbed loss.
        steps / lr / batch_size: mask optimisation (SGD with momentum 0.9 on the masks, one signed ascent step on
            δ, ξ per batch).
        data_fraction: the share of the downstream training set the masks are learnt on, drawn from the clean
            labelled share (the paper's 1%).
        pad / hflip_p: the views (a random crop of the zero-padded image, a horizontal flip).
        threshold: neurons with mask at or below it are pruned (their BatchNorm weight set to zero).
        prune_ratio: prune this share of the neurons with the lowest masks instead (the paper's other rule).
    """

    level = "classifier"
    checkpoints = True
    needs = "1% clean labelled images of the downstream training set"

    def __init__(self, layers: str | None = None, eps: float = 0.4, alpha: float = 0.2, steps: int = 2000,
                 lr: float = 0.2, batch_size: int = 128, data_fraction: float = 0.01, pad: int = 4,
                 hflip_p: float = 0.0, threshold: float = 0.2, prune_ratio: float | None = None, seed: int = 0,
                 device: str = "cpu") -> None:
        super().__init__(seed, device)
        if steps < 1 or batch_size < 1 or lr <= 0 or eps < 0 or not 0 <= alpha <= 1 or not 0 < data_fraction <= 1:
            raise ValueError("steps, batch_size and lr must be positive, eps non-negative, alpha in [0, 1] and "
                             "data_fraction in (0, 1]")
        if not 0 <= threshold <= 1 or (prune_ratio is not None and not 0 <= prune_ratio <= 1):
            raise ValueError("threshold and prune_ratio are shares of the mask range and of the neurons: in [0, 1]")
        if pad < 0 or not 0 <= hflip_p <= 1:
            raise ValueError(f"pad must be >= 0 and hflip_p in [0, 1] (got {pad}, {hflip_p})")
        if layers is not None and layers not in TAP_NAMES[:-1]:
            raise ValueError(f"layers must be None (the whole network) or one of {', '.join(TAP_NAMES[:-1])}")
        self.layers, self.eps, self.alpha, self.steps, self.lr = layers, eps, alpha, steps, lr
        self.batch_size, self.data_fraction, self.pad, self.hflip_p = batch_size, data_fraction, pad, hflip_p
        self.threshold, self.prune_ratio = threshold, prune_ratio

    def defend(self, clf: Classifier, data: DownstreamData, out: Path | None,
               resume: bool) -> tuple[Classifier, dict[str, Any]]:
        clean = data.clean_set("ANP")
        assert out is not None  # Defense.__call__ gives a checkpointing defense a directory
        count = min(len(clean), max(1, round(self.data_fraction * len(data.train))))
        clean = take_subset(clean, None, count, False, self.seed)
        bns = _neurons(clf, self.layers)
        if not bns:
            raise EncoderGuardError(f"no BatchNorm channels after {self.layers}; choose an earlier tap or None")
        masks = self._learn_masks(clf, bns, clean.images, clean.labels.long(), out, resume)
        with torch.no_grad():
            flat = torch.cat(masks)
            if self.prune_ratio is None:
                off = flat <= self.threshold  # the official pruning script's test
            else:  # a fixed share: the lowest masks, ties broken by order
                off = torch.zeros(len(flat), dtype=torch.bool)
                off[flat.argsort(stable=True)[: int(self.prune_ratio * len(flat))]] = True
            for bn, o in zip(bns, off.split([b.num_features for b in bns])):
                bn.weight[o] = 0
        return clf, {"data": {**data.usage(), "images": count}, "neurons": len(flat), "pruned_neurons": int(off.sum()),
                     "mask_quantiles": {str(q): float(flat.quantile(q)) for q in (0.01, 0.1, 0.5)}}

    def _learn_masks(self, clf: Classifier, bns: list[nn.BatchNorm2d], images: Tensor, y: Tensor,
                     out: Path, resume: bool) -> list[Tensor]:
        """ANP's mask optimisation, resumable from ``out/checkpoints/anp.pt``; the classifier's weights and
        BatchNorm statistics are left as they were."""
        stats = {name: buf.clone() for name, buf in clf.named_buffers()}  # training mode moves them all
        hooks = [_Perturb(b) for b in bns]
        masks = nn.ParameterList([k.mask for k in hooks])  # what the loop checkpoints
        noise = [p for k in hooks for p in (k.delta, k.xi)]
        batch = min(self.batch_size, len(images))

        def step(_rows: Tensor, at: Step) -> tuple[Tensor, dict[str, float]]:
            clf.train()  # batch statistics, as in the official code
            idx = torch.randint(len(images), (batch,), generator=at.generator)  # drawn with replacement
            x = light_augment(images[idx].float().div(255), self.pad, self.hflip_p, at.generator)
            loss_adv = torch.zeros(())
            if self.eps > 0:  # without a perturbation the official code drops the robust term
                for k in hooks:  # inner maximisation: one signed step of size ε from a random start
                    with torch.no_grad():
                        k.delta.uniform_(-self.eps, self.eps, generator=at.generator)
                        k.xi.uniform_(-self.eps, self.eps, generator=at.generator)
                    k.perturb = True
                grads = torch.autograd.grad(F.cross_entropy(clf(x), y[idx]), noise)
                with torch.no_grad():
                    for p, grad in zip(noise, grads):
                        p.add_(self.eps * grad.sign())
                loss_adv = F.cross_entropy(clf(x), y[idx])
                for k in hooks:
                    k.perturb = False
            loss_nat = F.cross_entropy(clf(x), y[idx])
            loss = self.alpha * loss_nat + (1 - self.alpha) * loss_adv
            return loss, {"natural": loss_nat.item(), "perturbed": loss_adv.item()}

        def clip(_step: int, _total: int) -> None:
            with torch.no_grad():
                for m in masks:
                    m.clamp_(0, 1)

        # an "epoch" is a block of up to 100 batches (the official code reports every 500), so the log stays short
        per_block = next(d for d in range(min(100, self.steps), 0, -1) if self.steps % d == 0)
        loop = TrainLoop(masks, torch.optim.SGD(masks.parameters(), lr=self.lr, momentum=0.9),
                         epochs=self.steps // per_block, batch_size=batch, seed=self.seed,
                         checkpoint=out / "checkpoints" / "anp.pt", on_step_end=clip, desc="ANP masks",
                         advice="lower ANP's learning rate or perturbation (defense.lr, defense.eps)")
        try:
            loop.run(step, per_block * batch, resume=resume)
        finally:
            clf.eval()
            for k in hooks:
                k.handle.remove()
            with torch.no_grad():
                for name, buf in clf.named_buffers():
                    buf.copy_(stats[name])
        return [m.detach() for m in masks]
