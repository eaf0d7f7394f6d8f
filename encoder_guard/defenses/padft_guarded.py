"""``pad-ft-guarded``: PAD-FT with a cluster guard and a targeted second pass in its self-purification.

- [0] PAD-FT: A Lightweight Defense for Backdoor Attacks via Data Purification and Fine-Tuning, Yukai Xu,
  Yujie Gu and Kouichi Sakurai, arXiv 2409.12072, 2024
- [1] Detecting Backdoor Attacks on Deep Neural Networks by Activation Clustering, Bryant Chen et al., AAAI
  SafeAI Workshop 2019, arXiv 1811.03728

PAD-FT's selection keeps the lowest-SCE share of every class (:mod:`encoder_guard.defenses.padft`). That misses
two kinds of poisoned samples, and a fixed share is wrong for the target class, whose relabelled samples inflate
it. This variant changes only the selection (``docs/methods.md`` gives the measurement behind each step); the
clipping and last-layer fine-tuning are PAD-FT's, with the consistency term off (at weight 1 it cost 1.2 points
of CA with every poisoned sample removed):

0. **Cluster guard** (after Activation Clustering [1]). Each class's frozen features are split by 2-means; a
   class whose split is far cleaner than the others' (its silhouette at least ``cluster_ratio`` times the
   median class's) holds a second population, and its smaller cluster is set aside before any scoring. This is
   for the triggers the SCE scorer learns within its epoch (a Blended noise pattern, measured): they give their
   poisoned samples as low a loss as clean ones, but on a clean encoder those samples also sit together, away
   from their labelled class.
1. **Second pass.** A second scorer, trained on the first selection alone, labels every sample. Where it
   disagrees with the given label the sample is either hard or relabelled. Hard samples' confusions concentrate
   on a few look-alike classes; relabelled ones come from every other class. So only the classes whose
   disagreements spread over most other classes (:func:`spread_classes`: the attack's target) lose their
   disagreed-with samples, and every other sample is kept (dropping the hard clean samples of every class costs
   4–5 points of CA). When no class is flagged every class loses them.
2. **Trigger signature.** Some relabelled samples agree with their label even under that scorer, because the
   trigger already pushes their features toward the target on a clean encoder; at coat and bag 186 and 74 of
   3,000 were enough for a fresh head to learn it (9.8% and 8.7% ASR). Their disagreeing siblings show what they
   share: in a flagged class, a linear detector learns the disagreeing samples (source image + trigger) against
   clean samples of the classes they are predicted as (source image alone) and the class's agreeing samples;
   whatever it scores above 1/2 joins the disagreeing ones, and it is refitted (``signature_rounds``). Only
   flagged classes are searched: in an unpoisoned class the same detector learns the class's confusions instead
   and takes 18–69% of it (measured).
3. **Hidden sources.** The spread test's share says how many disagreements each source class owes the target's
   row. A source that shows far fewer has its stamped images agreeing with the label, and a scorer that never
   saw a target-labelled sample traces them back to it (:func:`hidden_sources`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from sklearn.metrics import silhouette_score
from torch import Tensor, nn

from encoder_guard.defenses.base import DEFENSES
from encoder_guard.defenses.padft import PADFT, keep_lowest, sce_logits, sce_scores
from encoder_guard.defenses.tail import fit_minibatches
from encoder_guard.mi.base import standardise


def cluster_suspects(feats: Tensor, y: Tensor, num_classes: int, ratio: float, seed: int = 0,
                     sample: int = 2000) -> tuple[Tensor, dict[str, Any]]:
    """Mask of the samples in the smaller 2-means cluster of every class whose split stands out.

    A class's split is scored by its silhouette (on at most ``sample`` members, cosine geometry after
    centring); a class is flagged when its silhouette is at least ``ratio`` times the median over the
    classes. (Not a robust z-score: with ten classes the MAD is too small and too noisy a scale, and it
    flagged a clean class on one seed.) Returns the mask and a report.
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


@DEFENSES.register("pad-ft-guarded")
class PADFTGuarded(PADFT):
    """Args (besides :class:`~encoder_guard.defenses.padft.PADFT`'s, whose ``consistency`` defaults to 0 here):
        cluster_ratio: a class whose 2-means silhouette is at least this multiple of the median class's has
            its smaller cluster set aside before scoring (``None``: no cluster guard).
        second_pass: a second scorer, trained only on the first selection, labels every sample; in the classes
            :func:`spread_classes` flags (every class when it flags none) the samples it disagrees with are
            dropped, and every other sample is kept. ``False``: the first selection alone.
        signature_rounds: with ``second_pass``, rounds of :func:`signature_suspects` in each flagged class
            (0: off).
        hidden_sources: with ``second_pass``, also drop the flagged class's samples that :func:`hidden_sources`
            traces to a source class with too few disagreements.
    """

    def __init__(self, *, second_pass: bool = True, cluster_ratio: float | None = 1.6, signature_rounds: int = 3,
                 hidden_sources: bool = True, consistency: float = 0.0, **kwargs: Any) -> None:
        super().__init__(consistency=consistency, **kwargs)
        if signature_rounds < 0:
            raise ValueError(f"signature_rounds must be >= 0 (0: off), got {signature_rounds}")
        if cluster_ratio is not None and cluster_ratio <= 1:
            raise ValueError(f"cluster_ratio must be > 1 (times the median class's silhouette) or null, got {cluster_ratio}")
        self.second_pass, self.cluster_ratio = second_pass, cluster_ratio
        self.signature_rounds, self.hidden_sources = signature_rounds, hidden_sources

    def _dropped(self, feats: Tensor, y: Tensor, pred: Tensor, num_classes: int,
                 first: Tensor) -> tuple[Tensor, dict[str, Any]]:
        """Mask of the samples the second pass removes (label ≠ ``pred``, in the flagged classes, with the
        samples carrying the trigger's signature and those traced to a hidden source; in every class when none
        is flagged) and the flag test's report. ``first`` is the first selection."""
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
                                                              (y == c) & ~dropped, self.scorer())
            dropped |= found
        return dropped, report

    def select(self, feats: Tensor, y: Tensor, num_classes: int) -> tuple[Tensor, dict[str, Any]]:
        suspect, guard = torch.zeros(len(y), dtype=torch.bool), None
        if self.cluster_ratio is not None:
            suspect, guard = cluster_suspects(feats, y, num_classes, self.cluster_ratio, self.seed)
        fit = (~suspect).nonzero().flatten() if suspect.any() else None
        scores = sce_scores(feats, y, num_classes, fit=fit, **self.scorer()).masked_fill(suspect, float("inf"))
        kept = keep_lowest(scores, y, self.keep)
        first, relabelled = len(kept), None
        if self.second_pass:  # a scorer that never saw the removed samples decides on every sample
            pred = sce_logits(feats, y, num_classes, fit=kept, **self.scorer()).argmax(1)
            dropped, relabelled = self._dropped(feats, y, pred, num_classes, kept)
            kept = (~dropped & ~suspect).nonzero().flatten()
        return kept, {"first_selection": first, "cluster_guard": guard, "relabelled": relabelled}
