"""SSL-Cleanse's detector: one inverted trigger per embedding cluster, and an outlier test on their sizes.

- [0] SSL-Cleanse: Trojan Detection and Mitigation in Self-Supervised Learning, Mengxin Zheng, Jiaqi Xue,
  Zihao Wang, Xun Chen, Qian Lou, Lei Jiang, Xiaofeng Wang, ECCV 2024, https://arxiv.org/abs/2303.09079
- [1] Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural Networks, Wang et al.,
  IEEE S&P 2019 (the MAD anomaly index)

Why it works: without labels, the clusters of the encoder's embeddings stand in for classes. A backdoor
sends every triggered input to one target embedding, which lies in one cluster; for that cluster a small
trigger suffices to move inputs from every other cluster into it, while for the other clusters the smallest
such trigger has to overwrite much of the image. So the target cluster's trigger is an outlier on the small
side, and its robust z-score (the MAD anomaly index [1]) is large. **A large index means backdoored**
(``higher_is_suspicious`` is ``True``); the release logs the index without a cut-off, Neural Cleanse flags
above 2, and ``encoder-guard scan`` calibrates it against clean encoders (:mod:`encoder_guard.scan.runner`).

Data: clean unlabelled images (the detector clusters their embeddings), no labels, no trigger knowledge.

The trigger size: the release's final version measures ``mean(m·p)`` (the default, ``regularizer="mask-pattern"``),
its first version (and the DECREE-style baseline shipped beside it) ``mean(m)`` (``regularizer="mask"``). Under
``mean(m·p)`` a black pattern costs nothing whatever its area, so wherever a dark patch can move images into a
cluster, that cluster's size is near 0 and hides a bright backdoor trigger; ``mean(m)`` measures the area alone.

Choosing K: the paper chooses the number of clusters with a sliding-window kneedle (SWK) over the k-means SSE
curve; that algorithm is not in the released code, so ``clusters`` is a plain setting (the release marks K = 10
for CIFAR-10 and K = 100 for ImageNet-100, the class counts).

Departures from the official code (``UCF-ML-Research/SSL-Cleanse``, ``detector/core``):

- the anomaly index is the standard one, ``|min r − median| / (1.4826 · MAD)`` with the median of an even
  count the mean of the two middle values; the release divides by 0.6745 as well (applying the consistency
  constant twice), so its index is 0.6745× this one, and its ``torch.median`` takes the lower middle value;
- images are stamped in ``[0, 1]`` before the encoder's normalisation (the release stamps the normalised
  pattern onto normalised images, which is the same map), and the scan images are drawn without replacement;
- the 1-NN uses cosine similarity by default (``knn_metric="euclidean"`` is the release's distance on raw
  embeddings); the hit rate is measured with the trigger after the epoch's last step;
- ``max_seconds`` is an optional wall-time budget, shared out over the clusters still to invert.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import trange

from encoder_guard.runs import get_logger
from encoder_guard.scan.base import (
    SCANNERS,
    Inversion,
    Scanner,
    check_positive,
    embed,
    sample_rows,
    stamp,
    to_tanh_space,
    unit_mean,
)
from encoder_guard.utils import step_generator

KNN_METRICS = ("cosine", "euclidean")
REGULARIZERS = ("mask-pattern", "mask")


def anomaly_index(sizes: Tensor) -> tuple[float, float, float]:
    """Neural Cleanse's MAD anomaly index of the smallest value in ``sizes`` ``(K,)``.

    Returns:
        ``(index, median, mad)`` with ``mad = 1.4826 · median(|r − median|)`` and
        ``index = |min r − median| / mad`` (0 when every value equals the median, ``inf`` when only the MAD is 0).
    """
    r = sizes.double().cpu().numpy()
    median = float(np.median(r))
    mad = 1.4826 * float(np.median(np.abs(r - median)))
    gap = abs(float(r.min()) - median)
    if mad == 0:
        return (0.0 if gap == 0 else math.inf), median, mad
    return gap / mad, median, mad


def knn_labels(query: Tensor, bank: Tensor, bank_labels: Tensor, metric: str = "cosine") -> Tensor:
    """The label of each query's nearest neighbour in ``bank``.

    Args:
        query: ``(Q, D)`` embeddings.
        bank: ``(N, D)`` embeddings.
        bank_labels: ``(N,)`` labels of the bank.
        metric: ``cosine`` (largest cosine similarity) or ``euclidean`` (smallest distance).

    Returns:
        ``(Q,)`` labels.
    """
    if metric == "cosine":
        nearest = (F.normalize(query, dim=1) @ F.normalize(bank, dim=1).T).argmax(dim=1)
    else:
        nearest = torch.cdist(query, bank).argmin(dim=1)
    return bank_labels[nearest]


def trigger_size(mask: Tensor, pattern: Tensor, regularizer: str = "mask-pattern") -> Tensor:
    """The trigger-size term: ``mean(m·p)`` (the release's final version) or ``mean(m)`` (its first version).

    Args:
        mask: ``(1, H, W)`` in ``[0, 1]``.
        pattern: ``(C, H, W)`` in ``[0, 1]``.
        regularizer: ``mask-pattern`` or ``mask``.
    """
    return (mask * pattern).mean() if regularizer == "mask-pattern" else mask.mean()


def sigmoid_space(theta: Tensor) -> Tensor:
    """``tanh(θ)/2 + 0.5``: the release's map from unconstrained parameters to ``[0, 1]``."""
    return torch.tanh(theta) / 2 + 0.5


@dataclass
class _ClusterRun:
    """What the inversion for one cluster found."""

    mask: Tensor
    pattern: Tensor
    size: float  # best epoch-mean mean(m·p) among successful epochs; 1.0 if none
    hit_rate: float  # of the kept trigger
    found: bool
    steps: int
    epochs: int
    stopped: str
    lam: float


@dataclass
class _Schedule:
    """The release's per-epoch λ controller and its optional early stop.

    λ is 0 until ``patience`` epochs in a row reach the hit-rate threshold, then ``lam``; afterwards ``patience``
    successful epochs in a row multiply it by ``factor`` and ``patience`` failed ones divide it.
    """

    lam_init: float
    factor: float
    patience: int
    lam: float = 0.0
    set_count: int = 0
    up: int = 0
    down: int = 0
    raised: bool = False
    lowered: bool = False
    stale: int = 0
    stale_best: float = math.inf

    def update(self, success: bool) -> None:
        if self.lam == 0 and success:
            self.set_count += 1
            if self.set_count >= self.patience:
                self.lam, self.up, self.down, self.raised, self.lowered = self.lam_init, 0, 0, False, False
        else:
            self.set_count = 0
        if success:
            self.up, self.down = self.up + 1, 0
        else:
            self.up, self.down = 0, self.down + 1
        if self.lam != 0 and self.up >= self.patience:
            self.up, self.lam, self.raised = 0, self.lam * self.factor, True
        elif self.lam != 0 and self.down >= self.patience:
            self.down, self.lam, self.lowered = 0, self.lam / self.factor, True

    def should_stop(self, epoch: int, best: float, threshold: float, patience: int, warmup: int) -> str | None:
        """``early`` once λ has moved both ways and ``best`` stopped dropping below ``threshold``× its previous
        best for ``patience`` epochs; ``warmup`` at epoch ``warmup`` if λ is still 0 or no trigger succeeded."""
        if self.raised and self.lowered:
            if best < math.inf:
                self.stale = self.stale + 1 if best >= threshold * self.stale_best else 0
            self.stale_best = min(best, self.stale_best)
            return "early" if self.stale >= patience else None
        if epoch == warmup and (self.lam == 0 or best == math.inf):
            return "warmup"
        return None


@SCANNERS.register("ssl-cleanse")
class SSLCleanse(Scanner):
    """SSL-Cleanse's detector [0]: k-means clusters, a trigger inverted towards each, a MAD test on their sizes.

    - [0] SSL-Cleanse: Trojan Detection and Mitigation in Self-Supervised Learning, Zheng et al., ECCV 2024,
      https://arxiv.org/abs/2303.09079

    The scan images' embeddings are clustered with k-means (``n_init=kmeans_inits``, ``random_state=seed``). For
    each cluster ``t``, ``N − (largest cluster size)`` images from the other clusters are each paired with the
    embedding ``z`` of a random member of ``t``; a mask ``m`` ``(1, H, W)`` and pattern ``p`` ``(C, H, W)`` in
    tanh space minimise ``mean(2 − 2·cos(f(x'), z)) + λ·R`` with Adam (``R = mean(m·p)``, or ``mean(m)`` with
    ``regularizer="mask"``). Once per epoch ``knn_samples``
    stamped images (drawn with replacement) are classified by 1-NN among the clean embeddings labelled by
    cluster; the epoch succeeds if more than ``threshold`` of them land in ``t``. A cluster's size is the
    smallest epoch-mean ``R`` of a successful epoch (1.0 if none). The score is the anomaly index of the
    smallest size (:func:`anomaly_index`); **a large index means backdoored**.

    Args:
        clusters: K of k-means (the paper picks it with SWK, which is not released).
        samples: clean images used, drawn without replacement.
        lr / batch_size: Adam's learning rate (betas (0.5, 0.9)) and the images per step.
        epochs: the most epochs per cluster.
        threshold: the 1-NN hit rate an epoch must exceed to succeed.
        lam / lam_factor / patience: λ after the warm-up, its multiplier, and the epochs in a row that move it.
        knn_samples: stamped images classified per epoch.
        knn_metric: ``cosine`` or ``euclidean`` (the release's).
        early_stop / early_stop_threshold / early_stop_patience / warmup_epochs: the release's optional stop
            (see ``_Schedule.should_stop``).
        kmeans_inits: k-means restarts.
        regularizer: the trigger size ``R``: ``mask-pattern`` (``mean(m·p)``) or ``mask`` (``mean(m)``).
        max_seconds: optional wall-time budget for all clusters, checked at the end of each epoch.

    >>> from encoder_guard.encoders import Encoder, make_spec
    >>> enc = Encoder(make_spec("resnet10-tiny", input_size=16))
    >>> scanner = SSLCleanse(clusters=3, samples=24, epochs=2, knn_samples=16)
    >>> scanner.scan(enc, torch.rand(24, 1, 16, 16)).score >= 0
    True
    """

    name = "ssl-cleanse"
    higher_is_suspicious = True
    cutoff = 2.0
    cutoff_source = "Neural Cleanse's anomaly-index rule"

    def __init__(self, seed: int = 0, device: str = "cpu", clusters: int = 10, samples: int = 1000, lr: float = 0.1,
                 batch_size: int = 32, epochs: int = 1000, threshold: float = 0.99, lam: float = 0.1,
                 lam_factor: float = 1.5, patience: int = 5, knn_samples: int = 1000, knn_metric: str = "cosine",
                 early_stop: bool = True, early_stop_threshold: float = 0.99, early_stop_patience: int = 10,
                 warmup_epochs: int = 50, kmeans_inits: int = 30, regularizer: str = "mask-pattern",
                 max_seconds: float | None = None) -> None:
        super().__init__(seed=seed, device=device)
        check_positive(samples=samples, lr=lr, batch_size=batch_size, epochs=epochs, lam=lam, patience=patience,
                       knn_samples=knn_samples, early_stop_patience=early_stop_patience, kmeans_inits=kmeans_inits,
                       max_seconds=max_seconds)
        if clusters < 2:
            raise ValueError(f"clusters must be at least 2 (a trigger is inverted towards each), got {clusters}")
        if not 0 <= threshold < 1:
            raise ValueError(f"threshold is a hit rate in [0, 1), got {threshold}")
        if lam_factor <= 1:
            raise ValueError(f"lam_factor must exceed 1, got {lam_factor}")
        if knn_metric not in KNN_METRICS:
            raise ValueError(f"knn_metric must be one of {', '.join(KNN_METRICS)}, got {knn_metric!r}")
        if regularizer not in REGULARIZERS:
            raise ValueError(f"regularizer must be one of {', '.join(REGULARIZERS)}, got {regularizer!r}")
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be ≥ 0, got {warmup_epochs}")
        self.clusters, self.samples, self.lr, self.batch_size = int(clusters), int(samples), float(lr), int(batch_size)
        self.epochs, self.threshold, self.lam, self.lam_factor = int(epochs), float(threshold), float(lam), float(lam_factor)
        self.patience, self.knn_samples, self.knn_metric = int(patience), int(knn_samples), knn_metric
        self.early_stop, self.early_stop_threshold = bool(early_stop), float(early_stop_threshold)
        self.early_stop_patience, self.warmup_epochs = int(early_stop_patience), int(warmup_epochs)
        self.kmeans_inits, self.regularizer = int(kmeans_inits), regularizer
        self.max_seconds = None if max_seconds is None else float(max_seconds)

    def cluster(self, z: Tensor) -> Tensor:
        """k-means cluster ids ``(N,)`` of the embeddings ``z`` ``(N, D)``."""
        from sklearn.cluster import KMeans

        km = KMeans(n_clusters=self.clusters, random_state=self.seed % 2**32, n_init=self.kmeans_inits)
        return torch.as_tensor(km.fit_predict(z.detach().double().cpu().numpy()), dtype=torch.long)

    def run(self, encoder: nn.Module, images: Tensor) -> tuple[float, Inversion, dict[str, Any]]:
        g = torch.Generator().manual_seed(self.seed)
        x = images[sample_rows(len(images), self.samples, g).to(images.device)]
        if len(x) <= self.clusters:
            raise ValueError(f"{len(x)} images cannot form {self.clusters} clusters with images left over; "
                             "pass more images or fewer clusters")
        z = embed(encoder, x)
        labels = self.cluster(z)
        counts = torch.bincount(labels, minlength=self.clusters)
        if int((counts > 0).sum()) < self.clusters:
            raise ValueError(f"the embeddings form only {int((counts > 0).sum())} distinct clusters; "
                             f"lower clusters (now {self.clusters}) or pass more varied images")
        budget = len(x) - int(counts.max())
        t0, runs = time.perf_counter(), []
        bar = trange(self.clusters, desc="ssl-cleanse", unit="cluster", leave=False, mininterval=1.0)
        for t in bar:
            deadline = None
            if self.max_seconds is not None:
                left = self.max_seconds - (time.perf_counter() - t0)
                deadline = time.perf_counter() + max(left, 0.0) / (self.clusters - t)
            runs.append(self._invert(encoder, x, z, labels, t, budget, deadline))
            bar.set_postfix(size=f"{runs[-1].size:.4f}", refresh=False)
            get_logger().debug("ssl-cleanse cluster %d: size %.4f, hit rate %.3f, %d epochs (%s)", t, runs[-1].size,
                               runs[-1].hit_rate, runs[-1].epochs, runs[-1].stopped)
        sizes = torch.tensor([r.size for r in runs], dtype=torch.float64)
        index, median, mad = anomaly_index(sizes)
        suspect = int(sizes.argmin())
        best = runs[suspect]
        target = unit_mean(embed(encoder, stamp(x, best.mask, best.pattern)))
        trigger = Inversion(best.mask[0], best.pattern, best.size, best.hit_rate, target, best.steps)
        details = {"anomaly_index": index, "suspect_cluster": suspect, "median": median, "mad": mad,
                   "sizes": sizes.tolist(), "hit_rates": [r.hit_rate for r in runs], "found": [r.found for r in runs],
                   "cluster_sizes": counts.tolist(), "inputs_per_cluster": budget, "epochs": [r.epochs for r in runs],
                   "stopped": [r.stopped for r in runs], "lambda_final": [r.lam for r in runs], "images": len(x)}
        get_logger().info("ssl-cleanse: anomaly index %.3f (cluster %d, size %.4f)", index, suspect, best.size)
        return index, trigger, details

    def _invert(self, encoder: nn.Module, x: Tensor, z: Tensor, labels: Tensor, t: int, budget: int,
                deadline: float | None) -> _ClusterRun:
        """Invert the smallest trigger that sends the other clusters' images into cluster ``t``."""
        g = step_generator(self.seed, t)
        members, others = (labels == t).nonzero().squeeze(1), (labels != t).nonzero().squeeze(1)
        inputs = x[others[torch.randperm(len(others), generator=g)[:budget]].to(x.device)]
        targets = z[members[torch.randint(len(members), (len(inputs),), generator=g)].to(z.device)]
        c, h, w = x.shape[1:]
        theta_m = to_tanh_space(torch.rand(1, h, w, generator=g)).to(x.device).requires_grad_(True)
        theta_p = to_tanh_space(torch.rand(c, h, w, generator=g)).to(x.device).requires_grad_(True)
        opt = torch.optim.Adam([theta_p, theta_m], lr=self.lr, betas=(0.5, 0.9))
        sched = _Schedule(self.lam, self.lam_factor, self.patience)
        bank_labels = labels.to(z.device)
        best_size, best_trigger, best_hit = math.inf, None, 0.0
        step, hit, stopped, epoch = 0, 0.0, "epochs", 0
        for epoch in range(self.epochs):
            regs = []
            for idx in _batches(len(inputs), self.batch_size, g):
                idx = idx.to(x.device)
                mask, pattern = sigmoid_space(theta_m), sigmoid_space(theta_p)
                out = encoder(stamp(inputs[idx], mask, pattern))
                reg = trigger_size(mask, pattern, self.regularizer)
                loss = (2 - 2 * F.cosine_similarity(out, targets[idx], dim=1)).mean() + sched.lam * reg
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
                regs.append(float(reg.detach()))
            with torch.no_grad():
                mask, pattern = sigmoid_space(theta_m), sigmoid_space(theta_p)
                probe = x[torch.randint(len(x), (self.knn_samples,), generator=g).to(x.device)]
                hit = float((knn_labels(embed(encoder, stamp(probe, mask, pattern)), z, bank_labels, self.knn_metric)
                             == t).float().mean())
            epoch_size = sum(regs) / len(regs)
            if hit > self.threshold and epoch_size < best_size:
                best_size, best_trigger, best_hit = epoch_size, (mask.clone(), pattern.clone(), step), hit
            reason = sched.should_stop(epoch, best_size, self.early_stop_threshold, self.early_stop_patience,
                                       self.warmup_epochs) if self.early_stop else None
            if reason is not None:
                stopped = reason
                break
            sched.update(hit >= self.threshold)
            if deadline is not None and time.perf_counter() > deadline:
                stopped = "budget"
                break
        if best_trigger is None:
            return _ClusterRun(mask, pattern, 1.0, hit, False, step, epoch + 1, stopped, sched.lam)
        return _ClusterRun(best_trigger[0], best_trigger[1], best_size, best_hit, True, best_trigger[2], epoch + 1,
                           stopped, sched.lam)


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    """A seeded shuffle of ``range(n)`` in full batches (the release drops the last partial one); one batch of
    everything when ``n`` is smaller than ``batch_size``."""
    order = torch.randperm(n, generator=generator)
    if n <= batch_size:
        return [order]
    return list(order[: n - n % batch_size].split(batch_size))
