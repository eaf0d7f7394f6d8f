"""PAD-FT: purify the downstream training set, clip activations, fine-tune the last layer.

- [0] PAD-FT: A Lightweight Defense for Backdoor Attacks via Data Purification and Fine-Tuning, Yukai Xu,
  Yujie Gu and Kouichi Sakurai, arXiv 2409.12072, 2024
- [1] Symmetric Cross Entropy for Robust Learning with Noisy Labels, Yisen Wang et al., ICCV 2019, arXiv 1908.06112

No clean data beyond the (possibly poisoned) training set the classifier was trained on, and only the last layer
changes. The three steps of [0]:

1. **Self-purification.** A fresh linear scorer is fitted on the training set's features with the symmetric
   cross-entropy (SCE = α·CE + β·RCE [1]). RCE's loss is bounded (``−log 0`` clipped to ``A``), so relabelled
   poisoned samples cannot pull the scorer toward the trigger the way plain CE does; they keep a high SCE. Per
   class, the ``keep`` share with the lowest SCE is kept as most-likely clean.
2. **Activation clipping.** Per feature dimension, bounds from the kept samples' ``[1 − q, q]`` quantiles
   (``clip_quantile``) go into the head's clamp: a trigger that drives some dimensions beyond what clean data
   ever shows is cut at the edge.
3. **Last-layer fine-tuning** on the kept samples, with the clamp in place: cross-entropy plus a consistency term
   (KL between the predictions on a feature and on the same feature with a ``mask`` share of its dimensions
   zeroed), which keeps the new head from leaning on a few dimensions.

Only [0]'s abstract is public and it has no official code, so every number here (the SCE weights, the kept
share, the quantile, the consistency weight and the schedule) is this toolkit's choice;
``docs/methods.md`` says so. ``pad-ft-guarded`` (:mod:`encoder_guard.defenses.padft_guarded`) adds a cluster
guard and a second, targeted pass to step 1, each with the measurement behind it.

The report gives the selection's precision and recall when the experiment knows the poisoned indices.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from downstream.classifier import Classifier
from downstream.features import cached_features
from encoder_guard.defenses.base import DEFENSES, Defense
from encoder_guard.defenses.tail import HeadTuner
from encoder_guard.mi.base import standardise
from encoder_guard.threats import DownstreamData


def symmetric_cross_entropy(logits: Tensor, y: Tensor, alpha: float = 0.1, beta: float = 1.0, log_zero: float = -4.0) -> Tensor:
    """Per-sample ``α·CE + β·RCE``; RCE = ``−Σ_k p_k log q_k`` with the one-hot ``q`` (``log 0 = log_zero``),
    i.e. ``−log_zero · (1 − p_y)``."""
    ce = F.cross_entropy(logits, y, reduction="none")
    p_y = logits.softmax(1).gather(1, y[:, None]).squeeze(1)
    return alpha * ce + beta * (-log_zero) * (1 - p_y)


def sce_logits(feats: Tensor, y: Tensor, num_classes: int, epochs: int = 1, lr: float = 0.01, batch_size: int = 512,
               alpha: float = 0.1, beta: float = 1.0, seed: int = 0, fit: Tensor | None = None) -> Tensor:
    """Logits of every sample under a linear scorer trained with SCE on ``(feats, y)`` (standardised inside;
    trained on the samples ``fit`` only when given)."""
    x = standardise(feats)
    xf, yf = (x, y) if fit is None else (x[fit], y[fit])
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():
        layer.weight.normal_(0, 0.01, generator=g)
        layer.bias.zero_()
    opt = torch.optim.Adam(layer.parameters(), lr=lr)
    for _ in range(epochs):
        for idx in torch.randperm(len(xf), generator=g).split(batch_size):
            loss = symmetric_cross_entropy(layer(xf[idx]), yf[idx], alpha, beta).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return layer(x)


def sce_scores(feats: Tensor, y: Tensor, num_classes: int, epochs: int = 1, lr: float = 0.01, batch_size: int = 512,
               alpha: float = 0.1, beta: float = 1.0, seed: int = 0, fit: Tensor | None = None) -> Tensor:
    """SCE of every sample under a linear scorer trained with SCE on ``(feats, y)`` (on the samples ``fit``
    only when given)."""
    logits = sce_logits(feats, y, num_classes, epochs, lr, batch_size, alpha, beta, seed, fit)
    return symmetric_cross_entropy(logits, y, alpha, beta)


def keep_lowest(scores: Tensor, y: Tensor, share: float) -> Tensor:
    """Sorted indices of the ``share`` of each class with the lowest scores."""
    kept = []
    for c in y.unique():
        members = (y == c).nonzero().flatten()
        n = max(1, round(share * len(members)))
        kept.append(members[scores[members].argsort()[:n]])
    return torch.cat(kept).sort().values


def selection_quality(kept: Tensor, poisoned: Tensor | None, n: int) -> dict[str, Any]:
    """How well the kept-as-clean set avoided the known poisoned samples (reported, never used by the defense)."""
    if poisoned is None or len(poisoned) == 0:
        return {"kept": int(len(kept)), "of": n}
    bad = torch.zeros(n, dtype=torch.bool)
    bad[poisoned] = True
    keep = torch.zeros(n, dtype=torch.bool)
    keep[kept] = True
    removed = ~keep
    caught = int((removed & bad).sum())
    return {"kept": int(keep.sum()), "of": n, "poisoned": int(bad.sum()), "poisoned_kept": int((keep & bad).sum()),
            "clean_precision": float((keep & ~bad).sum() / keep.sum().clamp_min(1)),
            "poison_recall": caught / int(bad.sum()),
            "removed_precision": caught / max(1, int(removed.sum()))}


@DEFENSES.register("pad-ft")
class PADFT(Defense):
    """Args:
        keep: share of each class kept as most-likely clean.
        score_epochs / score_lr: the SCE scorer's training (Adam, minibatches of ``batch_size``).
        sce_alpha / sce_beta: SCE's CE and RCE weights.
        clip_quantile: activation bounds from the kept features' ``[1 − q, q]`` quantiles (1.0: min/max;
            ``None``: no clipping).
        epochs / lr / weight_decay / batch_size: fine-tuning of the last layer (Adam, the rate annealed to 0).
        consistency: weight of the consistency term (0: off); ``mask``: share of dimensions masked for it.
        reinit: start the last layer from zero instead of the deployed weights.
    """

    level = "classifier"
    uses_clean = False
    needs = "the (possibly poisoned) labelled training set only"

    def __init__(self, keep: float = 0.5, score_epochs: int = 1, score_lr: float = 0.01, sce_alpha: float = 0.1,
                 sce_beta: float = 1.0, clip_quantile: float | None = 0.999, epochs: int = 20, lr: float = 0.01,
                 weight_decay: float = 1e-3, batch_size: int = 512, consistency: float = 1.0, mask: float = 0.2,
                 reinit: bool = False, seed: int = 0, device: str = "cpu") -> None:
        super().__init__(seed, device)
        if not 0 < keep <= 1:
            raise ValueError(f"keep must be in (0, 1], got {keep}")
        if clip_quantile is not None and not 0.5 < clip_quantile <= 1:
            raise ValueError(f"clip_quantile must be in (0.5, 1] or null, got {clip_quantile}")
        if consistency < 0 or not 0 <= mask < 1:
            raise ValueError(f"consistency must be >= 0 and mask in [0, 1), got {consistency} and {mask}")
        self.keep, self.score_epochs, self.score_lr, self.sce_alpha, self.sce_beta = keep, score_epochs, score_lr, sce_alpha, sce_beta
        self.clip_quantile, self.epochs, self.lr, self.weight_decay = clip_quantile, epochs, lr, weight_decay
        self.batch_size, self.consistency, self.mask, self.reinit = batch_size, consistency, mask, reinit

    def scorer(self) -> dict[str, Any]:
        """The SCE scorers' settings, as :func:`sce_logits` takes them."""
        return dict(epochs=self.score_epochs, lr=self.score_lr, batch_size=self.batch_size, alpha=self.sce_alpha,
                    beta=self.sce_beta, seed=self.seed)

    def select(self, feats: Tensor, y: Tensor, num_classes: int) -> tuple[Tensor, dict[str, Any]]:
        """Sorted indices of the samples kept as most-likely clean, and what the report adds about the choice."""
        return keep_lowest(sce_scores(feats, y, num_classes, **self.scorer()), y, self.keep), {}

    def defend(self, clf: Classifier, data: DownstreamData, out: Path | None,
               resume: bool) -> tuple[Classifier, dict[str, Any]]:
        feats = cached_features(clf.encoder, data.train, device=self.device)
        y = data.train.labels.long()
        kept, selection = self.select(feats, y, clf.num_classes)
        head = clf.head
        f, yk = feats[kept], y[kept]
        with torch.no_grad():
            if self.clip_quantile is not None:
                ordered = f.sort(0).values  # torch.quantile refuses inputs over 16M elements
                k = round((len(f) - 1) * (1 - self.clip_quantile))
                lo, hi = ordered[k], ordered[len(f) - 1 - k]
                head.lo.copy_(lo)
                head.hi.copy_(hi)
            if self.reinit:
                head.linear.weight.zero_()
                head.linear.bias.zero_()
        tuner = HeadTuner(head, f, self.seed)
        x, layer = tuner.x, tuner.layer

        def batch_loss(idx: Tensor) -> Tensor:
            logits = layer(x[idx])
            loss = F.cross_entropy(logits, yk[idx])
            if self.consistency > 0:
                masked = layer(x[idx] * (torch.rand(x[idx].shape, generator=tuner.generator) >= self.mask))
                loss = loss + self.consistency * F.kl_div(masked.log_softmax(1), logits.softmax(1).detach(),
                                                          reduction="batchmean")
            return loss

        tuner.fit(batch_loss, self.epochs, self.lr, self.weight_decay, self.batch_size, "PAD-FT", cosine=True)
        tuner.commit()
        report = {"selection": selection_quality(kept, data.poisoned, len(y)), **selection,
                  "clipped_dims": int(torch.isfinite(head.lo).sum())}
        return clf, report
