"""PAD-FT: purify the downstream training set, clip activations, fine-tune the last layer.

- [0] PAD-FT: A Lightweight Defense for Backdoor Attacks via Data Purification and Fine-Tuning, Yukai Xu,
  Yujie Gu and Kouichi Sakurai, arXiv 2409.12072, 2024
- [1] Detecting Backdoor Attacks on Deep Neural Networks by Activation Clustering, Bryant Chen et al., AAAI
  SafeAI Workshop 2019, arXiv 1811.03728
- [2] Symmetric Cross Entropy for Robust Learning with Noisy Labels, Yisen Wang et al., ICCV 2019, arXiv 1908.06112

No clean data beyond the (possibly poisoned) training set the classifier was trained on. The preset is PAD-FT
with the additions marked below (``docs/methods.md`` gives the measurement behind each):

0. **Cluster guard** (an addition to [0], after Activation Clustering [1]).
   Each class's frozen features are split by 2-means; a class whose split is far cleaner than the
   others' (its silhouette at least ``cluster_ratio`` times the median class's) holds a second
   population, and its smaller cluster is set aside before any scoring. This is for the triggers step 1
   cannot see: a trigger that the scorer learns within its epoch (a Blended noise pattern, measured)
   gives its poisoned samples as low a loss as clean ones, but on a clean encoder those samples also
   sit together, away from their labelled class.
1. **Self-purification.** A fresh linear scorer is fitted on the training set's frozen features with the
   symmetric cross-entropy (SCE = α·CE + β·RCE [2]). RCE's loss is bounded
   (``−log 0`` clipped to ``A``), so relabelled poisoned samples cannot pull the scorer toward the trigger
   the way plain CE does; they keep a high SCE. Per class, the ``keep`` share with the lowest SCE is
   kept as most-likely clean. A second scorer, trained on that selection alone, then labels every sample.
   Where it disagrees with the given label the sample is either hard or relabelled. Hard samples' confusions
   concentrate on a few look-alike classes; relabelled ones come from every other class. So only the
   classes whose disagreements spread over most other classes (:func:`spread_classes`: the attack's
   target) lose their disagreed-with samples, and every other sample is kept (dropping the hard clean
   samples of every class costs 4–5 points of CA). When no class is flagged every class loses them. (A
   test of one-sided confusions misses pullover, dress and shirt: each is confused both ways with several
   classes.)
   **Trigger signature** (an addition to [0]). Some relabelled samples agree with their label even under
   that scorer, because the trigger already pushes their features toward the target on a clean encoder;
   at coat and bag 186 and 74 of 3,000 were enough for a fresh head to learn it (9.8% and 8.7% ASR).
   Their disagreeing siblings show what they share: in a flagged class, a linear detector learns the
   disagreeing samples (source image + trigger) against clean samples of the classes they are predicted
   as (source image alone) and the class's agreeing samples; whatever it scores above 1/2 joins the
   disagreeing ones, and it is refitted (``signature_rounds``). What separates an image stamped with the
   trigger from the image is the trigger, so the agreeing poisoned samples score high and the clean
   target samples do not. Only flagged classes are searched: in an unpoisoned class the same detector
   learns the class's confusions instead and takes 18–69% of it (measured).
   **Hidden sources** (an addition to [0]). The spread test's share says how many disagreements
   each source class owes the target's row. A source that shows far fewer has its stamped images agreeing
   with the label, and a scorer that never saw a target-labelled sample traces them back to it
   (:func:`hidden_sources`): on the 25-epoch encoder, 253 trousers with the patch, which the signature step
   missed (10.7% ASR without this step). Where clean target samples also go to that source (trousers for
   dress), only the missing count of them is dropped, those the scorer is surest of.
2. **Activation clipping.** Per feature dimension, bounds from the kept samples' ``[1 − q, q]``
   quantiles (``clip_quantile``) go into the head's clamp: a trigger that drives some dimensions beyond
   what clean data ever shows is cut at the edge.
3. **Last-layer fine-tuning** on the kept samples, with the clamp in place: CE plus a consistency term
   (KL between predictions on a feature and on the same feature under dropout-like masking), which
   keeps the new head from leaning on a few dimensions; its weight is 0 in the preset, because at 1 it
   cost 1.2 points of CA even with every poisoned sample removed. Weight decay shrinks what
   the kept data does not support — the directions the poisoned samples alone had asked for.

The report gives the selection's precision and recall when the experiment knows the poisoned indices.

Without the cluster guard (``cluster_ratio: null``, PAD-FT as published), a Blended noise trigger keeps 89–94%
of its poisoned samples through step 1 and 97% ASR.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from sklearn.metrics import silhouette_score
from torch import Tensor, nn

from downstream.classifier import Classifier
from downstream.features import cached_features
from encoder_guard.defenses.base import DEFENSES, Defense
from encoder_guard.defenses.tail import HeadTuner, fit_minibatches
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


def cluster_suspects(feats: Tensor, y: Tensor, num_classes: int, ratio: float, seed: int = 0,
                     sample: int = 2000) -> tuple[Tensor, dict[str, Any]]:
    """Mask of the samples in the smaller 2-means cluster of every class whose split stands out.

    A class's split is scored by its silhouette (on at most ``sample`` members, cosine geometry after
    centring); a class is flagged when its silhouette is at least ``ratio`` times the median over the
    classes. (A robust z-score was tried first: with ten classes the MAD is too small and too noisy a
    scale, and flagged a clean class on one seed.) Returns the mask and a report.
    """
    x = F.normalize(feats - feats.mean(0), dim=1).numpy()
    labels = y.numpy()
    sil: dict[int, float] = {}
    small: dict[int, np.ndarray] = {}
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) < 4:  # too few to split; left out of the median too
            continue
        split = KMeans(2, n_init=3, random_state=seed).fit_predict(x[idx])
        sil[c] = float(silhouette_score(x[idx], split, sample_size=min(sample, len(idx)), random_state=seed))
        small[c] = idx[split == np.argmin(np.bincount(split, minlength=2))]
    med = float(np.median(list(sil.values()))) if sil else 0.0
    flagged = [c for c, v in sil.items() if med > 0 and v >= ratio * med]
    mask = torch.zeros(len(y), dtype=torch.bool)
    for c in flagged:
        mask[torch.as_tensor(small[c])] = True
    return mask, {"silhouettes": [round(sil[c], 4) if c in sil else None for c in range(num_classes)],
                  "median": round(med, 4), "flagged_classes": flagged, "set_aside": int(mask.sum())}


def _disagreements(y: Tensor, pred: Tensor, num_classes: int) -> Tensor:
    """``n[c, k]``: samples labelled ``c`` that the scorer predicts as ``k ≠ c``."""
    n = torch.zeros(num_classes, num_classes)
    n.index_put_((y, pred), torch.ones(len(y)), accumulate=True)
    return n.fill_diagonal_(0)


def spread_classes(y: Tensor, pred: Tensor, num_classes: int, floor: float = 0.015,
                   ratio: float = 5.0) -> tuple[list[int], list[float]]:
    """Classes whose disagreements come from nearly every other class: the target of relabelled samples.

    A backdoor's poisoned samples are drawn from every other class and relabelled to the target, and the
    scorer sends most of them back to their source, so the target's row ``n[t, k]`` of the disagreement
    matrix holds about the poisoning rate of *every* source class ``k``. Natural confusions concentrate on a
    few look-alike classes (shirt on T-shirt, pullover, coat), so for a clean class the typical, i.e. median,
    other class contributes little. A class is flagged when its median share ``n[c, k] / n_k`` over the
    other classes is at least ``floor`` and ``ratio`` times the median class's (the second bound keeps a
    weak encoder, whose classes all spread, from flagging everything). Measured on Fashion-MNIST at 5%
    BadNets poisoning with the 9×9 square: 0.0–0.9% for the classes
    without poison, 5.6–6.6% for the target, whichever of the ten it is. Returns the flagged classes and
    every class's median share.
    """
    n = _disagreements(y, pred, num_classes)
    sizes = torch.bincount(y, minlength=num_classes).float().clamp_min(1)
    share = (n / sizes[None, :])[~torch.eye(num_classes, dtype=torch.bool)].view(num_classes, -1)
    typical = share.median(1).values
    flagged = (typical >= max(floor, ratio * typical.median().item())).nonzero().flatten()
    return flagged.tolist(), [round(v, 4) for v in typical.tolist()]


def signature_suspects(feats: Tensor, y: Tensor, pred: Tensor, target: int, rounds: int = 3, epochs: int = 30,
                       seed: int = 0) -> Tensor:
    """Mask of the samples labelled ``target`` that carry the trigger's feature signature.

    Starts from the samples ``pred`` disagrees with (relabelled images of other classes); each round
    fits a class-balanced logistic detector of them against clean samples of the classes they are
    predicted as (three per suspect, from the samples ``pred`` agrees with) and against the rest of the
    class, then adds whatever it scores above 1/2. Features are standardised inside.
    """
    g = torch.Generator().manual_seed(seed)
    x = standardise(feats)
    members = y == target
    flagged = members & (pred != target)
    for _ in range(rounds):
        pos = flagged.nonzero().flatten()
        if len(pos) == 0:
            break
        sources = pred[pos]
        neg = [(members & ~flagged).nonzero().flatten()]
        for j in sources.unique():
            pool = ((y == j) & (pred == j)).nonzero().flatten()
            neg.append(pool[torch.randperm(len(pool), generator=g)[: 3 * int((sources == j).sum())]])
        negs = torch.cat(neg)
        xs, ys = torch.cat([x[pos], x[negs]]), torch.cat([torch.ones(len(pos)), torch.zeros(len(negs))])
        layer = nn.Linear(x.shape[1], 1)
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
        balance = torch.tensor(len(negs) / len(pos))

        def batch_loss(idx: Tensor) -> Tensor:
            return F.binary_cross_entropy_with_logits(layer(xs[idx]).squeeze(1), ys[idx], pos_weight=balance)

        fit_minibatches(list(layer.parameters()), len(xs), batch_loss, epochs, 0.01, 512, "PAD-FT signature", g,
                        weight_decay=1e-3)
        with torch.no_grad():
            flagged = members & ((pred != target) | (layer(x).squeeze(1) > 0))
    return flagged


def hidden_sources(feats: Tensor, y: Tensor, pred: Tensor, num_classes: int, target: int, share: float,
                   first: Tensor, remaining: Tensor, scorer: dict[str, Any],
                   deficit: float = 0.5) -> tuple[Tensor, dict[int, int]]:
    """Mask of the ``target``-labelled samples hidden among the agreeing ones, by source class.

    The spread test's ``share`` estimates the share of every source class that was relabelled to the target,
    so a source ``k`` should show about ``share · n_k`` disagreements in the target's row. A source whose
    stamped images the second scorer already takes for the target shows far fewer: on the 25-epoch
    encoder, trousers with the 9×9 patch read as T-shirts, and 253 of them agreed with their label (10
    disagreements where 342 were expected). A scorer that never saw a
    target-labelled sample (fitted on ``first``'s other classes) sends them back to their source: it named
    trouser for 258 of the target's ``remaining`` samples, 253 of them poisoned. So for a source whose
    missing count is at least ``deficit`` of its expected count, the ``remaining`` samples that scorer
    assigns to it are candidates, and the missing count of them, most confidently assigned first, are
    dropped. The rank matters where clean target samples also go to that source, a look-alike: for dress,
    1,115 candidates of which 139 were trousers with the patch, and the 284 most confident held 127 of
    them, where a bound refusing sources with more than twice the missing count of candidates kept all 139.
    Returns the mask and the count taken from each source.
    """
    n = _disagreements(y, pred, num_classes)
    others = first[y[first] != target]
    logits = sce_logits(feats, y, num_classes, fit=others, **scorer)
    logits[:, target] = -float("inf")
    confidence, source = logits.log_softmax(1).max(1)
    sizes = torch.bincount(y, minlength=num_classes).float()
    found = torch.zeros(len(y), dtype=torch.bool)
    taken: dict[int, int] = {}
    for k in range(num_classes):
        expected = share * sizes[k].item()
        missing = expected - n[target, k].item()
        if k == target or not missing >= deficit * expected > 0:
            continue
        candidates = (remaining & (source == k)).nonzero().flatten()
        chosen = candidates[confidence[candidates].argsort(descending=True)[: math.ceil(missing)]]
        found[chosen] = True
        taken[k] = len(chosen)
    return found, taken


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
        score_epochs / score_lr: the SCE scorer's training (Adam, minibatches of 512).
        sce_alpha / sce_beta: SCE's CE and RCE weights.
        clip_quantile: activation bounds from the kept features' ``[1 − q, q]`` quantiles (1.0: min/max;
            ``None``: no clipping).
        epochs / lr / weight_decay / batch_size: fine-tuning of the last layer (Adam, the rate annealed to 0).
        consistency: weight of the consistency term; ``mask``: share of dimensions masked for it.
        reinit: start the last layer from zero instead of the deployed weights.
        cluster_ratio: a class whose 2-means silhouette is at least this multiple of the median class's has
            its smaller cluster set aside before scoring (``None``: no cluster guard, PAD-FT as published).
        second_pass: a second scorer, trained only on the first selection, labels every sample; in the classes
            :func:`spread_classes` flags (every class when it flags none) the samples it disagrees with are
            dropped, and every other sample is kept. A share per class cannot be right for the target class
            (relabelled samples inflate it), and the lowest-loss share alone starves the head of hard clean
            samples. ``False``: the first selection alone, as published.
        signature_rounds: with ``second_pass``, rounds of :func:`signature_suspects` in each flagged class
            (0: off).
        hidden_sources: with ``second_pass``, also drop the flagged class's samples that :func:`hidden_sources`
            traces to a source class with too few disagreements.
    """

    level = "classifier"
    uses_clean = False
    needs = "the (possibly poisoned) labelled training set only"

    def __init__(self, keep: float = 0.5, score_epochs: int = 1, score_lr: float = 0.01, sce_alpha: float = 0.1,
                 sce_beta: float = 1.0, clip_quantile: float | None = 0.999, epochs: int = 20, lr: float = 0.01,
                 weight_decay: float = 1e-3, batch_size: int = 512, consistency: float = 0.0, mask: float = 0.2,
                 reinit: bool = False, second_pass: bool = True, cluster_ratio: float | None = 1.6,
                 signature_rounds: int = 3, hidden_sources: bool = True, seed: int = 0, device: str = "cpu") -> None:
        super().__init__(seed, device)
        if signature_rounds < 0:
            raise ValueError(f"signature_rounds must be >= 0 (0: off), got {signature_rounds}")
        if not 0 < keep <= 1:
            raise ValueError(f"keep must be in (0, 1], got {keep}")
        if cluster_ratio is not None and cluster_ratio <= 1:
            raise ValueError(f"cluster_ratio must be > 1 (times the median class's silhouette) or null, got {cluster_ratio}")
        if clip_quantile is not None and not 0.5 < clip_quantile <= 1:
            raise ValueError(f"clip_quantile must be in (0.5, 1] or null, got {clip_quantile}")
        self.keep, self.score_epochs, self.score_lr, self.sce_alpha, self.sce_beta = keep, score_epochs, score_lr, sce_alpha, sce_beta
        self.clip_quantile, self.epochs, self.lr, self.weight_decay = clip_quantile, epochs, lr, weight_decay
        self.batch_size, self.consistency, self.mask, self.reinit = batch_size, consistency, mask, reinit
        self.second_pass, self.cluster_ratio = second_pass, cluster_ratio
        self.signature_rounds, self.hidden_sources = signature_rounds, hidden_sources

    def _dropped(self, feats: Tensor, y: Tensor, pred: Tensor, num_classes: int, first: Tensor,
                 scorer: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        """Mask of the samples the second pass removes (label ≠ ``pred``, in the flagged classes, with the
        samples carrying the trigger's signature and those traced to a hidden source; in every class when none
        is flagged) and the flag test's report. ``first`` is the first selection, ``scorer`` the scorers'
        settings."""
        dropped = pred != y
        flagged, evidence = spread_classes(y, pred, num_classes)
        report: dict[str, Any] = {"flagged_classes": flagged, "evidence": evidence, "signature_added": {},
                                  "hidden_added": {}}
        if not flagged:  # no evidence of where the poison is: every class loses its disagreed-with samples
            return dropped, report
        dropped &= torch.isin(y, torch.tensor(flagged, dtype=y.dtype))
        for c in flagged if self.signature_rounds > 0 else []:
            found = signature_suspects(feats, y, pred, c, self.signature_rounds, seed=self.seed)
            report["signature_added"][c] = int((found & ~dropped).sum())  # the agreeing samples it adds
            dropped |= found
        for c in flagged if self.hidden_sources else []:
            found, report["hidden_added"][c] = hidden_sources(feats, y, pred, num_classes, c, evidence[c], first,
                                                              (y == c) & ~dropped, scorer)
            dropped |= found
        return dropped, report

    def defend(self, clf: Classifier, data: DownstreamData, out: Path | None,
               resume: bool) -> tuple[Classifier, dict[str, Any]]:
        feats = cached_features(clf.encoder, data.train, device=self.device)
        y = data.train.labels.long()
        kw: dict[str, Any] = dict(epochs=self.score_epochs, lr=self.score_lr, batch_size=self.batch_size,
                                  alpha=self.sce_alpha, beta=self.sce_beta, seed=self.seed)
        suspect, guard = torch.zeros(len(y), dtype=torch.bool), None
        if self.cluster_ratio is not None:
            suspect, guard = cluster_suspects(feats, y, clf.num_classes, self.cluster_ratio, self.seed)
        fit = (~suspect).nonzero().flatten() if suspect.any() else None
        scores = sce_scores(feats, y, clf.num_classes, fit=fit, **kw).masked_fill(suspect, float("inf"))
        kept = keep_lowest(scores, y, self.keep)
        first, relabelled = len(kept), None
        if self.second_pass:  # a scorer that never saw the removed samples decides on every sample
            pred = sce_logits(feats, y, clf.num_classes, fit=kept, **kw).argmax(1)
            dropped, relabelled = self._dropped(feats, y, pred, clf.num_classes, kept, kw)
            kept = (~dropped & ~suspect).nonzero().flatten()
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
        report = {"selection": selection_quality(kept, data.poisoned, len(y)), "first_selection": first,
                  "cluster_guard": guard, "relabelled": relabelled, "clipped_dims": int(torch.isfinite(head.lo).sum())}
        return clf, report
