"""Frozen features, extracted once and cached per (encoder digest, dataset, split, transform).

Every evaluation of an encoder on a dataset needs the same train/test features; defenses and reports
evaluate the same encoder many times, so features are stored under
``$ENCODER_GUARD_CACHE/features/<digest>/<key>.pt`` (default ``~/.cache/encoder_guard``) and reused.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor
from tqdm import tqdm

from encoder_guard.data import ImageDataset
from encoder_guard.encoders import Encoder
from encoder_guard.runs import get_logger

CACHE_ENV = "ENCODER_GUARD_CACHE"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "encoder_guard")).expanduser()


def dataset_fingerprint(ds: ImageDataset) -> str:
    """Cheap content key of a dataset: sizes plus a hash of a strided sample of pixels and all labels."""
    h = hashlib.sha256(f"{ds.name}|{ds.split}|{tuple(ds.images.shape)}".encode())
    stride = max(1, len(ds) // 512)
    h.update(ds.images[::stride].contiguous().numpy().tobytes())
    h.update(ds.labels.numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def extract_features(
    encoder: Encoder,
    ds: ImageDataset,
    transform: Callable[[Tensor], Tensor] | None = None,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    desc: str = "features",
) -> Tensor:
    """``(N, D)`` features of ``ds`` (images in ``[0, 1]``, ``transform`` applied first, e.g. a trigger)."""
    was_training = encoder.training
    encoder.eval().to(device)
    out = []
    for start in tqdm(range(0, len(ds), batch_size), desc=desc, unit="batch", leave=False, mininterval=1.0):
        x = ds.float_images(start, start + batch_size).to(device)
        if transform is not None:
            x = transform(x)
        out.append(encoder(x).float().cpu())
    encoder.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, encoder.feature_dim)


def cached_features(
    encoder: Encoder,
    ds: ImageDataset,
    transform_key: str = "identity",
    transform: Callable[[Tensor], Tensor] | None = None,
    cache: bool = True,
    device: torch.device | str = "cpu",
    digest: str | None = None,
) -> Tensor:
    """:func:`extract_features` through the on-disk cache (``transform_key`` names the transform)."""
    if not cache:
        return extract_features(encoder, ds, transform, device=device, desc=f"{ds.name}/{ds.split}")
    digest = digest or encoder.digest()
    key = f"{dataset_fingerprint(ds)}-{hashlib.sha256(transform_key.encode()).hexdigest()[:12]}"
    path = cache_root() / "features" / digest / f"{key}.pt"
    if path.is_file():
        try:
            feats = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(feats, Tensor) and feats.shape == (len(ds), encoder.feature_dim):
                return feats
        except Exception:  # a damaged cache entry is recomputed, never trusted
            get_logger().warning(f"ignoring unreadable feature cache {path}")
    feats = extract_features(encoder, ds, transform, device=device, desc=f"{ds.name}/{ds.split}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    torch.save(feats, tmp)
    os.replace(tmp, path)
    return feats
