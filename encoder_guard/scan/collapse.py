"""Fixed-budget collapse: how far a trigger of a fixed size and shape can pull an encoder's embeddings together.

This project's scanner. DECREE [0] asks how *small* a trigger can be while the stamped embeddings reach a
collapse threshold. On a small encoder a clean one admits a universal patch about as small as a backdoor's
trigger (the ``fmnist-tiny`` pair gives DECREE's PL1 0.221 clean and 0.227 backdoored), so size alone does not
separate them. What does separate them is how far a trigger of a *given* budget collapses the embeddings: a
BadEncoder-style backdoor was trained to send every triggered input to one embedding, so a trigger of its shape
and size collapses a backdoored encoder further than any trigger of that budget collapses a clean one. The scan
fixes the budget and measures what is left, ``1 − S`` on held-out images (``S`` the mean pairwise cosine of the
stamped images' embeddings, DECREE's statistic).

Probes (each a mask fixed in advance and a free pattern ``p`` in ``[0, 1]``, stamped ``(1 − m)·x + m·p``):

- **blend**: ``m = blend_alpha`` everywhere, the shape of blended triggers (and, to first order, of additive
  frequency triggers such as CTRL);
- **windows**: ``m = 1`` on a square of side ``window`` × the image side, at every position of a grid of stride
  ``stride`` × the side (the far edges included), the shape of patch triggers wherever they sit.

Each pattern starts uniform at random and is optimised by Adam to maximise ``S`` on batches of the ``samples``
scan images, projected back to ``[0, 1]`` after each step. The windows are screened with ``screen_steps`` steps
each and the ``refine`` most collapsing go on to ``steps`` steps, as the blend probe does. ``S`` is then measured
on ``holdout`` other images. The score is the smallest ``1 − S`` over the probes (**small means backdoored**), and
its probe's mask and pattern are the trigger. The score's scale depends on the architecture and the data, so the
decision needs clean encoders' scores as a reference (``encoder-guard scan --reference``).

- [0] Detecting Backdoors in Pre-trained Encoders, Shiwei Feng et al., CVPR 2023, https://arxiv.org/abs/2303.15180
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from encoder_guard.runs import get_logger
from encoder_guard.scan.base import SCANNERS, Inversion, Scanner, check_positive, embed, mean_pairwise_cosine, stamp, unit_mean

STARTS = ("uniform", "ones")


def grid(side: int, window: int, stride: int) -> list[int]:
    """Window origins along one side: every ``stride`` pixels, and the far edge."""
    return sorted({*range(0, side - window + 1, stride), side - window})


@SCANNERS.register("collapse")
class BudgetCollapse(Scanner):
    """Fixed-budget collapse: the smallest ``1 − S`` a blend or a window trigger of fixed size reaches.

    Args:
        blend_alpha: the blend probe's opacity (0 turns the probe off).
        window: the window probes' side as a share of the image side (0 turns them off).
        stride: the window grid's step as a share of the image side.
        samples: scan images the patterns are optimised on; ``holdout``: other scan images ``S`` is measured on.
        batch_size: images per optimisation step.
        lr: Adam's learning rate on the patterns.
        screen_steps / steps: steps of every window / of the ``refine`` best windows and the blend probe.
        screen_batch: images per screening step.
        starts: the window patterns' starting points, each screened: ``uniform`` (random) and ``ones`` (white,
            where a backdoor's response to its trigger is sharp and a random start does not find it).
    """

    name = "collapse"
    higher_is_suspicious = False
    cutoff = 0.09  # between the fmnist-tiny dev population's backdoored (≤ 0.067) and clean (≥ 0.120) scores
    cutoff_source = "fixed on the fmnist-tiny dev population"

    def __init__(self, seed: int = 0, device: str = "cpu", blend_alpha: float = 0.1, window: float = 0.32,
                 stride: float = 0.11, samples: int = 1000, holdout: int = 500, batch_size: int = 64,
                 lr: float = 0.05, screen_steps: int = 15, steps: int = 80, refine: int = 4, screen_batch: int = 32,
                 starts: tuple[str, ...] = ("uniform", "ones")) -> None:
        super().__init__(seed=seed, device=device)
        check_positive(samples=samples, holdout=holdout, lr=lr, steps=steps, refine=refine, stride=stride)
        if not 0 <= blend_alpha <= 1 or not 0 <= window <= 1 or blend_alpha == window == 0:
            raise ValueError(f"blend_alpha and window are shares in [0, 1], one of them positive; got {blend_alpha}, "
                             f"{window}")
        if batch_size < 2:
            raise ValueError(f"batch_size must be at least 2 (S averages pairs of images), got {batch_size}")
        if not 0 < screen_steps <= steps:
            raise ValueError(f"screen_steps must be in (0, steps], got {screen_steps}")
        if not starts or set(starts) - set(STARTS):
            raise ValueError(f"starts must be some of {STARTS}, got {starts!r}")
        self.blend_alpha, self.window, self.stride = float(blend_alpha), float(window), float(stride)
        self.samples, self.holdout, self.batch_size = int(samples), int(holdout), int(batch_size)
        self.lr, self.screen_steps, self.steps, self.refine = float(lr), int(screen_steps), int(steps), int(refine)
        self.screen_batch, self.starts = int(screen_batch), tuple(starts)

    def masks(self, h: int, w: int) -> dict[str, Tensor]:
        """The probes' masks by name (``blend``, ``window@y,x``)."""
        out: dict[str, Tensor] = {}
        if self.blend_alpha > 0:
            out["blend"] = torch.full((h, w), self.blend_alpha)
        if self.window > 0:
            side = max(1, round(self.window * min(h, w)))
            step = max(1, round(self.stride * min(h, w)))
            for y in grid(h, side, step):
                for x in grid(w, side, step):
                    m = torch.zeros(h, w)
                    m[y : y + side, x : x + side] = 1
                    for start in self.starts:
                        out[f"window@{y},{x}/{start}"] = m
        return out

    def run(self, encoder: nn.Module, images: Tensor) -> tuple[float, Inversion, dict[str, Any]]:
        g = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(images), generator=g).to(images.device)
        n_fit = min(self.samples, max(2, len(images) // 2))
        fit, held = images[order[:n_fit]], images[order[n_fit : n_fit + self.holdout]]
        if len(held) < 2:
            held = fit
        c, h, w = images.shape[1:]
        masks = {k: m.to(images.device) for k, m in self.masks(h, w).items()}
        patterns = {k: (torch.ones(c, h, w) if k.endswith("/ones") else torch.rand(c, h, w, generator=g)).to(images.device)
                    for k in masks}
        windows = [k for k in masks if k != "blend"]
        total = (len(windows) * self.screen_steps + min(self.refine, len(windows)) * (self.steps - self.screen_steps)
                 + (self.steps if "blend" in masks else 0))
        bar = tqdm(total=total, desc="collapse", unit="step", leave=False, mininterval=1.0)
        screened = {k: self._optimise(encoder, fit, masks[k], patterns[k], self.screen_steps, self.screen_batch, g, bar)
                    for k in windows}
        best = sorted(windows, key=lambda k: -screened[k])[: self.refine]
        for k in best:
            self._optimise(encoder, fit, masks[k], patterns[k], self.steps - self.screen_steps, self.batch_size, g, bar)
        if "blend" in masks:
            self._optimise(encoder, fit, masks["blend"], patterns["blend"], self.steps, self.batch_size, g, bar)
            best = ["blend", *best]
        bar.close()
        held_z = {k: embed(encoder, stamp(held, masks[k], patterns[k])) for k in best}
        held_s = {k: float(mean_pairwise_cosine(z)) for k, z in held_z.items()}
        deciding = max(held_s, key=lambda k: held_s[k])
        score = 1.0 - held_s[deciding]
        mask, pattern = masks[deciding], patterns[deciding]
        trigger = Inversion(mask, pattern, float(mask.mean()), held_s[deciding], unit_mean(held_z[deciding]), total)
        details = {"residual": score, "probe": deciding, "similarity": held_s,
                   "screened": {k: round(v, 4) for k, v in screened.items()}, "images": n_fit, "holdout": len(held),
                   "clean_similarity": float(mean_pairwise_cosine(embed(encoder, held)))}
        get_logger().info("collapse: 1 − S %.4f at %s", score, deciding)
        return score, trigger, details

    def _optimise(self, encoder: nn.Module, x: Tensor, mask: Tensor, pattern: Tensor, steps: int, batch: int,
                  g: torch.Generator, bar: tqdm) -> float:
        """Raise ``S`` of ``x`` stamped with ``(mask, pattern)`` for ``steps`` steps (``pattern`` updated in place);
        returns the mean ``S`` of the last quarter of the steps."""
        if steps <= 0:
            return float("nan")
        p = pattern.clone().requires_grad_(True)
        opt = torch.optim.Adam([p], lr=self.lr)
        last: list[float] = []
        for i in range(steps):
            idx = torch.randint(0, len(x), (min(batch, len(x)),), generator=g).to(x.device)
            s = mean_pairwise_cosine(encoder(stamp(x[idx], mask, p)))
            opt.zero_grad()
            (-s).backward()
            opt.step()
            with torch.no_grad():
                p.clamp_(0, 1)
            if i >= steps - max(1, steps // 4):
                last.append(float(s.detach()))
            bar.update()
        pattern.copy_(p.detach())
        return sum(last) / len(last)
