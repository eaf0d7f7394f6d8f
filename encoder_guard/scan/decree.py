"""DECREE: detect a backdoored encoder by inverting the smallest trigger that collapses its embeddings.

- [0] Detecting Backdoors in Pre-trained Encoders, Shiwei Feng, Guanhong Tao, Siyuan Cheng, Guangyu Shen,
  Xiangzhe Xu, Yingqi Liu, Kaiyuan Zhang, Shiqing Ma, Xiangyu Zhang, CVPR 2023, https://arxiv.org/abs/2303.15180

Why it works: a backdoored encoder maps every input that carries its trigger to (nearly) one embedding, so a
small patch suffices to make the embeddings of a whole batch point the same way. A clean encoder has no such
shortcut: the only way to make all its embeddings agree is to overwrite most of the image. DECREE searches for
the smallest mask (with any pattern) whose stamped batch reaches a mean pairwise cosine similarity above
``thres``, and reports its size as a fraction of the image (PL1). A **small** PL1 means backdoored; the cut-off
reported for DECREE is 0.1. A small encoder admits small triggers even when clean, so ``encoder-guard scan``
calibrates the decision against clean encoders' PL1 (:mod:`encoder_guard.scan.runner`).

Data: clean unlabelled images (the release uses 1,000 CIFAR-10 test images), no labels, no trigger knowledge.

Departures from the official code (``GiantSeaweed/DECREE``, ``main.py``):

- the trigger parameters are float32, not float64 (the encoder runs in float32 anyway; the map
  ``tanh(θ)/(2−ε) + 0.5`` then saturates a little earlier, which does not change the optimum);
- images are stamped in ``[0, 1]`` rather than ``[0, 255]``, since the encoder normalises internally; the
  regulariser is the same L1 norm of the broadcast mask;
- a final mini-batch of a single image (whose pairwise cosine is undefined) is joined to the one before it;
- ``max_seconds`` is an optional wall-time budget, checked at the end of each epoch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import trange

from encoder_guard.runs import get_logger
from encoder_guard.scan.base import (
    SCANNERS,
    Inversion,
    Scanner,
    check_positive,
    embed,
    mean_pairwise_cosine,
    sample_rows,
    stamp,
    to_tanh_space,
    unit_mean,
)

EPSILON = 1e-7  # keeps tanh(θ)/(2−ε) + 0.5 strictly inside (0, 1)
LAMBDA_INIT = 1e-3
LAMBDA_FACTOR = 5.0
LAMBDA_CAP = 1e5
PATIENCE = 5  # consecutive steps before λ moves; λ is reset after 2× this many successes below lambda_min


@dataclass
class _LambdaController:
    """DECREE's per-step, Neural-Cleanse-style weight on the mask norm.

    Six successes in a row multiply λ by 5 (up to 1e5), six failures divide it by 5 while λ ≥ ``lambda_min``,
    and more than ten successes in a row while λ < ``lambda_min`` put it back to its initial value.
    """

    lambda_min: float
    value: float = LAMBDA_INIT
    up: int = 0
    down: int = 0
    low_streak: int = 0
    raises: int = 0
    lowers: int = 0
    resets: int = 0
    low: float = LAMBDA_INIT
    high: float = LAMBDA_INIT

    def update(self, success: bool) -> None:
        if self.value < self.lambda_min and success:
            self.low_streak += 1
            if self.low_streak > 2 * PATIENCE:
                self.value, self.up, self.down = LAMBDA_INIT, 0, 0
                self.resets += 1
        else:
            self.low_streak = 0
        if success:
            self.up, self.down = self.up + 1, 0
        else:
            self.up, self.down = 0, self.down + 1
        if self.up > PATIENCE:
            if self.value < LAMBDA_CAP:
                self.value *= LAMBDA_FACTOR
                self.raises += 1
            self.up = 0
        elif self.down > PATIENCE:
            if self.value >= self.lambda_min:
                self.value /= LAMBDA_FACTOR
                self.lowers += 1
            self.down = 0
        self.low, self.high = min(self.low, self.value), max(self.high, self.value)

    def summary(self) -> dict[str, Any]:
        return {"initial": LAMBDA_INIT, "final": self.value, "min": self.low, "max": self.high,
                "raises": self.raises, "lowers": self.lowers, "resets": self.resets}


@dataclass
class _Best:
    """The smallest successful trigger so far, and the most collapsing one as a fallback."""

    l1: float = math.inf
    mask: Tensor | None = None
    pattern: Tensor | None = None
    similarity: float = -math.inf
    step: int = 0
    epoch: int = -1
    fallback: tuple[Tensor, Tensor, float, int] | None = None
    steps_since: int = 0  # steps since ``l1`` last improved, counted once a trigger exists


def trigger_from(theta_mask: Tensor, theta_pattern: Tensor) -> tuple[Tensor, Tensor]:
    """``(mask (H, W), pattern (C, H, W))`` in ``[0, 1]`` from their arctanh-space parameters."""
    mask = (torch.tanh(theta_mask) / (2 - EPSILON) + 0.5).clamp(0, 1)
    pattern = (torch.tanh(theta_pattern) / (2 - EPSILON) + 0.5).clamp(0, 1)
    return mask, pattern


def epoch_batches(n: int, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    """A seeded shuffle of ``range(n)`` cut into batches; a last batch of one image joins the one before."""
    order = torch.randperm(n, generator=generator)
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches[-2] = torch.cat([batches[-2], batches.pop()])
    return batches


@SCANNERS.register("decree")
class Decree(Scanner):
    """DECREE [0]: the smallest mask whose stamped batch has mean pairwise cosine similarity above ``thres``.

    - [0] Detecting Backdoors in Pre-trained Encoders, Feng et al., CVPR 2023, https://arxiv.org/abs/2303.15180

    The trigger ``x' = (1 − m)·x + m·p`` has one ``H×W`` mask shared by the channels and a ``C×H×W`` pattern, both
    optimised in arctanh space with Adam. The loss is ``−S + λ·‖m‖₁``: ``S`` the mean cosine similarity over the
    ``B(B−1)`` off-diagonal pairs of the stamped batch's embeddings, ``‖m‖₁`` the L1 norm of the mask broadcast
    to ``C×H×W``. λ adapts every step (see ``_LambdaController``). The best trigger is the one with the smallest
    ``‖m‖₁`` among the steps with ``S > thres``. The score is PL1 = that norm / ``(C·H·W)``, the mask's mean
    (in ``[0, 1]``; 1.0 if no step ever succeeded). **Small PL1 means backdoored** (``higher_is_suspicious`` is
    ``False``).

    Args:
        samples: clean images used, drawn without replacement (1,000 in the CIFAR-10 release).
        batch_size: images per step (128 in the release's CIFAR-10 run); ``S`` depends on it.
        lr: Adam's learning rate for the first ``lr_milestones[0]`` epochs.
        lr_milestones: epochs from which the rate is 0.1, then 0.05 ((200, 500) for ImageNet/CLIP in the release).
        thres: the mean pairwise cosine similarity a stamped batch must exceed to count as a success.
        lambda_min: λ is not lowered below this (1e-7 for ImageNet/CLIP/MoCo in the release).
        early_stop_patience: steps without a smaller trigger after which an epoch whose mean ``S`` exceeds
            ``thres`` ends the scan (35 for ImageNet/CLIP/MoCo in the release).
        max_epochs: the most epochs run.
        max_seconds: optional wall-time budget, checked at the end of each epoch.

    >>> from encoder_guard.encoders import Encoder, make_spec
    >>> enc = Encoder(make_spec("resnet10-tiny", input_size=16))
    >>> result = Decree(max_epochs=2, samples=32, batch_size=16).scan(enc, torch.rand(32, 1, 16, 16))
    >>> 0.0 <= result.score <= 1.0
    True
    """

    name = "decree"
    higher_is_suspicious = False
    cutoff = 0.1
    cutoff_source = "DECREE's reported cut-off"

    def __init__(self, seed: int = 0, device: str = "cpu", samples: int = 1000, batch_size: int = 128,
                 lr: float = 0.5, lr_milestones: tuple[int, int] = (30, 50), thres: float = 0.99,
                 lambda_min: float = 1e-5, early_stop_patience: int = 10, max_epochs: int = 1000,
                 max_seconds: float | None = None) -> None:
        super().__init__(seed=seed, device=device)
        check_positive(samples=samples, lr=lr, lambda_min=lambda_min, max_epochs=max_epochs, max_seconds=max_seconds)
        if batch_size < 2:
            raise ValueError(f"batch_size must be at least 2 (S averages pairs of images), got {batch_size}")
        if not -1.0 < thres < 1.0:
            raise ValueError(f"thres is a cosine similarity in (-1, 1), got {thres}")
        if len(lr_milestones) != 2 or not 0 <= lr_milestones[0] <= lr_milestones[1]:
            raise ValueError(f"lr_milestones must be two increasing epochs, got {lr_milestones!r}")
        if early_stop_patience < 0:
            raise ValueError(f"early_stop_patience must be ≥ 0, got {early_stop_patience}")
        self.samples, self.batch_size, self.lr = int(samples), int(batch_size), float(lr)
        self.lr_milestones = (int(lr_milestones[0]), int(lr_milestones[1]))
        self.thres, self.lambda_min = float(thres), float(lambda_min)
        self.early_stop_patience, self.max_epochs = int(early_stop_patience), int(max_epochs)
        self.max_seconds = None if max_seconds is None else float(max_seconds)

    def learning_rate(self, epoch: int) -> float:
        """The release's step schedule: ``lr``, then 0.1 from ``lr_milestones[0]``, then 0.05 from ``lr_milestones[1]``."""
        if epoch < self.lr_milestones[0]:
            return self.lr
        return 0.1 if epoch < self.lr_milestones[1] else 0.05

    def run(self, encoder: nn.Module, images: Tensor) -> tuple[float, Inversion, dict[str, Any]]:
        g = torch.Generator().manual_seed(self.seed)
        x = images[sample_rows(len(images), self.samples, g).to(images.device)]
        c, h, w = x.shape[1:]
        theta_m = to_tanh_space(torch.rand(h, w, generator=g), 2 - EPSILON).to(x.device).requires_grad_(True)
        theta_p = to_tanh_space(torch.rand(c, h, w, generator=g), 2 - EPSILON).to(x.device).requires_grad_(True)
        opt = torch.optim.Adam([theta_m, theta_p], lr=self.lr, betas=(0.5, 0.9))
        lam, best = _LambdaController(self.lambda_min), _Best()
        t0, step, stopped, epoch, mean_s = time.perf_counter(), 0, "epochs", 0, float("nan")
        bar = trange(self.max_epochs, desc="decree", unit="epoch", leave=False, mininterval=1.0)
        for epoch in bar:
            for group in opt.param_groups:
                group["lr"] = self.learning_rate(epoch)
            sims = []
            for idx in epoch_batches(len(x), self.batch_size, g):
                mask, pattern = trigger_from(theta_m, theta_p)
                s = mean_pairwise_cosine(encoder(stamp(x[idx.to(x.device)], mask, pattern)))
                l1 = c * mask.sum()
                loss = -s + lam.value * l1
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
                s_val, l1_val = float(s.detach()), float(l1.detach())
                sims.append(s_val)
                self._record(best, mask, pattern, s_val, l1_val, step, epoch)
                lam.update(s_val > self.thres)
            mean_s = sum(sims) / len(sims)
            bar.set_postfix(S=f"{mean_s:.3f}", lam=f"{lam.value:.0e}",
                            PL1=f"{best.l1 / (c * h * w):.4f}" if best.mask is not None else "-", refresh=False)
            get_logger().debug("decree epoch %d: S=%.4f λ=%.2e best PL1=%.4f", epoch, mean_s, lam.value,
                               best.l1 / (c * h * w) if best.mask is not None else 1.0)
            if mean_s > self.thres and best.steps_since > self.early_stop_patience:
                stopped = "early"
                break
            if self.max_seconds is not None and time.perf_counter() - t0 > self.max_seconds:
                stopped = "budget"
                break
        bar.close()
        trigger = self._deciding_trigger(encoder, x, best, c * h * w)
        found = best.mask is not None
        details = {"pl1": trigger.size, "found": found, "best_l1": best.l1 if found else None,
                   "best_step": best.step if found else None, "best_epoch": best.epoch if found else None,
                   "final_similarity": mean_s, "epochs": epoch + 1, "steps": step, "stopped": stopped,
                   "images": len(x), "lambda": lam.summary()}
        if not found:
            details["note"] = f"no step reached a mean pairwise cosine above {self.thres}; PL1 set to 1.0"
        get_logger().info("decree: PL1 %.4f after %d epochs (%s)", trigger.size, epoch + 1, stopped)
        return trigger.size, trigger, details

    def _record(self, best: _Best, mask: Tensor, pattern: Tensor, s: float, l1: float, step: int, epoch: int) -> None:
        """Keep the trigger of this step if it succeeded with a smaller mask; count steps since the last improvement."""
        if s > self.thres and l1 < best.l1:
            best.l1, best.mask, best.pattern = l1, mask.detach().clone(), pattern.detach().clone()
            best.similarity, best.step, best.epoch, best.steps_since = s, step, epoch, 0
        elif best.mask is not None:
            best.steps_since += 1
        if best.fallback is None or s > best.fallback[2]:
            best.fallback = (mask.detach().clone(), pattern.detach().clone(), s, step)

    def _deciding_trigger(self, encoder: nn.Module, x: Tensor, best: _Best, numel: int) -> Inversion:
        if best.mask is not None and best.pattern is not None:
            mask, pattern, s, step, size = best.mask, best.pattern, best.similarity, best.step, best.l1 / numel
        else:
            assert best.fallback is not None
            mask, pattern, s, step = best.fallback
            size = 1.0
        target = unit_mean(embed(encoder, stamp(x, mask, pattern)))
        return Inversion(mask, pattern, size, s, target, step)
