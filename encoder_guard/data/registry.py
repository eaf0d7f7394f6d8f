"""Dataset registry and the single entry point :func:`load_dataset`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Protocol

from encoder_guard.data.base import ImageDataset
from encoder_guard.registry import Registry


class DatasetLoader(Protocol):
    def __call__(
        self, root: Path | None, split: str, image_size: int | None, download: bool
    ) -> ImageDataset: ...


DATASETS: Registry[DatasetLoader] = Registry("dataset")

DATA_ENV = "ENCODER_GUARD_DATA"


def data_root(root: str | os.PathLike | None) -> Path | None:
    """The root given by the user, else ``$ENCODER_GUARD_DATA``, else ``None`` (loader defaults)."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser() if env else None


def load_dataset(
    name: str,
    split: str = "train",
    root: str | os.PathLike | None = None,
    image_size: int | None = None,
    download: bool = False,
) -> ImageDataset:
    """Load a registered dataset split into memory.

    Args:
        name: registry name (``fashion-mnist``, ``cifar10``, ``stl10``, ``svhn``, ``gtsrb``,
            ``imagefolder``, ``synthetic``).
        split: ``train`` or ``test`` (STL-10 also ``unlabeled`` and ``train+unlabeled``).
        root: where the files are; default ``$ENCODER_GUARD_DATA`` or the loader's own default.
        image_size: resize to this square size (file-based sets need one; array sets keep theirs if None).
        download: let torchvision download a missing set (never in tests; off by default).

    Raises:
        DatasetNotFoundError: with where it looked and how to get the data.
    """
    loader: Callable[..., ImageDataset] = DATASETS.get(name)
    ds = loader(data_root(root), split, image_size, download)
    if image_size is not None and ds.image_size != image_size:
        from encoder_guard.data.transforms import resize_uint8

        ds = ImageDataset(resize_uint8(ds.images, image_size), ds.labels, ds.classes, ds.name, ds.split, ds.meta)
    return ds
