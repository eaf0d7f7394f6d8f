"""Seeded subsets: a fraction or a count of a dataset, class-balanced on request.

Defenses are judged by how little clean data they need (MIMIC: ≤5% of the pretraining set), so the
subset is part of a run's record: :func:`subset_indices` is deterministic in ``seed`` and the indices
are written to the run directory by the callers.
"""

from __future__ import annotations

import torch

from encoder_guard.data.base import ImageDataset
from encoder_guard.errors import EncoderGuardError


def subset_indices(
    labels: torch.Tensor,
    fraction: float | None = None,
    count: int | None = None,
    balanced: bool = False,
    seed: int = 0,
) -> torch.Tensor:
    """Indices of a seeded subset.

    Args:
        labels: ``(N,)`` labels (used only when ``balanced``).
        fraction: share of the dataset in ``(0, 1]``; exclusive with ``count``.
        count: number of samples; exclusive with ``fraction``.
        balanced: take the same number from every class (rounding down; the remainder is spread over
            the first classes in a seeded order).
        seed: the subset is a function of ``seed`` alone.

    Returns:
        Sorted ``int64`` indices.
    """
    n = len(labels)
    if (fraction is None) == (count is None):
        raise EncoderGuardError("give exactly one of fraction or count for a subset")
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise EncoderGuardError(f"subset fraction must be in (0, 1], got {fraction}")
        count = max(1, round(fraction * n))
    assert count is not None
    if not 0 < count <= n:
        raise EncoderGuardError(f"subset count must be in 1..{n}, got {count}")
    g = torch.Generator().manual_seed(seed)
    if not balanced:
        return torch.randperm(n, generator=g)[:count].sort().values
    classes = labels.unique()
    per_class, extra = divmod(count, len(classes))
    order = classes[torch.randperm(len(classes), generator=g)]
    chosen = []
    for rank, cls in enumerate(order):
        members = (labels == cls).nonzero().flatten()
        want = per_class + (1 if rank < extra else 0)
        if want > len(members):
            raise EncoderGuardError(f"class {int(cls)} has {len(members)} samples, a balanced subset needs {want}")
        chosen.append(members[torch.randperm(len(members), generator=g)[:want]])
    return torch.cat(chosen).sort().values


def take_subset(
    ds: ImageDataset, fraction: float | None = None, count: int | None = None, balanced: bool = False, seed: int = 0
) -> ImageDataset:
    """:func:`subset_indices` applied to a dataset; the parent indices are kept in ``meta``."""
    return ds.subset(subset_indices(ds.labels, fraction, count, balanced, seed))
