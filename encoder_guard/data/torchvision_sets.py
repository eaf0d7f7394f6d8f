"""CIFAR-10, STL-10, SVHN and GTSRB in torchvision's on-disk formats, from a local root.

Nothing is downloaded unless the user asks (``download=True`` / ``--download``); a missing set raises
:class:`DatasetNotFoundError` naming the folder torchvision expects and how to fetch it.

- [0] CIFAR-10: Learning Multiple Layers of Features from Tiny Images, Alex Krizhevsky, technical report, 2009
- [1] STL-10: An Analysis of Single-Layer Networks in Unsupervised Feature Learning, Adam Coates, Honglak Lee and
  Andrew Y. Ng, AISTATS 2011
- [2] SVHN: Reading Digits in Natural Images with Unsupervised Feature Learning, Yuval Netzer et al., NIPS Workshop
  on Deep Learning and Unsupervised Feature Learning 2011
- [3] GTSRB: The German Traffic Sign Recognition Benchmark: A multi-class classification competition, Johannes
  Stallkamp et al., IJCNN 2011, DOI 10.1109/IJCNN.2011.6033395
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from encoder_guard.data.base import ImageDataset
from encoder_guard.data.registry import DATASETS
from encoder_guard.data.transforms import pil_to_uint8
from encoder_guard.errors import DatasetNotFoundError

DEFAULT_ROOT = Path.home() / ".cache" / "encoder_guard" / "data"

GTSRB_CLASSES = [f"sign{i:02d}" for i in range(43)]
# STL-10's class_names.txt; torchvision sets ``.classes`` only when that file exists (its md5 check skips it)
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


def _open(name: str, expected: str, build: Callable[[], Any], root: Path) -> Any:
    try:
        return build()
    except (RuntimeError, FileNotFoundError, OSError, ValueError) as exc:
        raise DatasetNotFoundError(
            f"{name} not found under {root} (torchvision expects {expected}): {str(exc).splitlines()[0]}; "
            f"pass --data-root to the folder that holds it, or add --download to fetch it once"
        ) from exc


def _check_split(name: str, split: str, allowed: tuple[str, ...]) -> None:
    if split not in allowed:
        raise DatasetNotFoundError(f"{name} has splits {', '.join(allowed)}, not {split!r}")


@DATASETS.register("cifar10")
def load_cifar10(root: Path | None, split: str, image_size: int | None, download: bool) -> ImageDataset:
    from torchvision.datasets import CIFAR10

    _check_split("cifar10", split, ("train", "test"))
    root = root or DEFAULT_ROOT
    ds = _open("CIFAR-10", f"{root}/cifar-10-batches-py", lambda: CIFAR10(str(root), train=split == "train", download=download), root)
    images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
    return ImageDataset(images, torch.tensor(ds.targets), list(ds.classes), "cifar10", split)


@DATASETS.register("stl10")
def load_stl10(root: Path | None, split: str, image_size: int | None, download: bool) -> ImageDataset:
    from torchvision.datasets import STL10

    _check_split("stl10", split, ("train", "test", "unlabeled", "train+unlabeled"))
    root = root or DEFAULT_ROOT
    ds = _open("STL-10", f"{root}/stl10_binary", lambda: STL10(str(root), split=split, download=download), root)
    images = torch.from_numpy(np.ascontiguousarray(ds.data))  # already NCHW
    return ImageDataset(images, torch.from_numpy(ds.labels.astype(np.int64)), list(getattr(ds, "classes", STL10_CLASSES)), "stl10", split)


@DATASETS.register("svhn")
def load_svhn(root: Path | None, split: str, image_size: int | None, download: bool) -> ImageDataset:
    from torchvision.datasets import SVHN

    _check_split("svhn", split, ("train", "test", "extra"))
    root = root or DEFAULT_ROOT
    ds = _open("SVHN", f"{root}/{split}_32x32.mat", lambda: SVHN(str(root), split=split, download=download), root)
    images = torch.from_numpy(np.ascontiguousarray(ds.data))  # NCHW
    return ImageDataset(images, torch.from_numpy(ds.labels.astype(np.int64)), [str(i) for i in range(10)], "svhn", split)


@DATASETS.register("gtsrb")
def load_gtsrb(root: Path | None, split: str, image_size: int | None, download: bool) -> ImageDataset:
    """GTSRB images vary in size: they are resized to ``image_size`` (default 32, as in BadEncoder)."""
    from torchvision.datasets import GTSRB

    _check_split("gtsrb", split, ("train", "test"))
    root = root or DEFAULT_ROOT
    ds = _open("GTSRB", f"{root}/gtsrb/GTSRB", lambda: GTSRB(str(root), split=split, download=download), root)
    size = image_size or 32
    samples = ds._samples  # list of (path, label); torchvision builds it from the folder or the test CSV
    if not samples:
        raise DatasetNotFoundError(f"GTSRB {split} under {root} holds no images; re-extract the archive")
    from PIL import Image

    images = torch.stack([pil_to_uint8(Image.open(p), size, 3) for p, _ in samples])
    labels = torch.tensor([int(t) for _, t in samples])
    return ImageDataset(images, labels, list(GTSRB_CLASSES), "gtsrb", split)
