"""Weighted kNN classification on frozen features, with faiss.

The protocol of InstDisc/SimCLR-style monitors (and of lightly and CTRL): cosine similarity on
L2-normalised features, the ``k`` nearest training features vote for their class with weight
``exp(sim / T)``.

- [0] Unsupervised Feature Learning via Non-Parametric Instance Discrimination, Wu et al., CVPR 2018,
  https://arxiv.org/abs/1805.01978
"""

from __future__ import annotations

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def knn_search(bank: Tensor, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact inner-product search: ``(similarities (Q, k), indices (Q, k))``, best first."""
    k = min(k, len(bank))
    index = faiss.IndexFlatIP(bank.shape[1])
    index.add(np.ascontiguousarray(bank.numpy(), dtype=np.float32))
    sims, idx = index.search(np.ascontiguousarray(queries.numpy(), dtype=np.float32), k)
    return torch.from_numpy(sims), torch.from_numpy(idx).long()


def knn_predict(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
) -> Tensor:
    """Predicted classes of ``test_features``.

    Args:
        train_features: ``(N, D)`` bank features (normalised here).
        train_labels: ``(N,)`` labels in ``[0, num_classes)``.
        test_features: ``(Q, D)`` query features.
        k: neighbours that vote (clipped to ``N``).
        temperature: vote weight ``exp(sim / temperature)``.

    Returns:
        ``(Q,)`` int64 predictions.
    """
    if k < 1 or temperature <= 0:
        raise ValueError(f"k must be >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    bank = F.normalize(train_features.float(), dim=1)
    queries = F.normalize(test_features.float(), dim=1)
    sims, idx = knn_search(bank, queries, k)
    weights = (sims / temperature).exp()
    votes = torch.zeros(len(queries), num_classes)
    votes.scatter_add_(1, train_labels[idx], weights)
    return votes.argmax(dim=1)
