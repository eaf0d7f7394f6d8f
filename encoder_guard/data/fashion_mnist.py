"""Fashion-MNIST from IDX files (gzipped or not), wherever they are.

- [0] Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning Algorithms, Han Xiao, Kashif Rasul
  and Roland Vollgraf, 2017, arXiv 1708.07747

Looked for, in order: the ``root`` the user gave (the folder with the IDX files, or a torchvision root
holding ``FashionMNIST/raw``), ``$ENCODER_GUARD_FMNIST``, and Debian's ``dataset-fashion-mnist`` package
(``/usr/share/datasets/fashion-mnist``). numpy reads the gzipped files directly in well under a second.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from encoder_guard.data.base import ImageDataset
from encoder_guard.data.registry import DATASETS
from encoder_guard.errors import DatasetNotFoundError

DEBIAN_PATH = Path("/usr/share/datasets/fashion-mnist")
ENV = "ENCODER_GUARD_FMNIST"
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"), "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array, checking its header."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:
        raise DatasetNotFoundError(f"cannot read IDX file {path}: {exc}; re-download or reinstall it") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DatasetNotFoundError(f"{path} is not an unsigned-byte IDX file; re-download it")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(data) - offset != expected:
        raise DatasetNotFoundError(f"{path} is truncated ({len(data) - offset} of {expected} bytes); re-download it")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def _find(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def candidate_dirs(root: Path | None) -> list[Path]:
    dirs: list[Path] = []
    if root is not None:
        dirs += [root, root / "FashionMNIST" / "raw", root / "fashion-mnist"]
    if os.environ.get(ENV):
        dirs.append(Path(os.environ[ENV]).expanduser())
    if root is None:
        dirs.append(DEBIAN_PATH)
    return dirs


@DATASETS.register("fashion-mnist")
def load_fashion_mnist(root: Path | None, split: str, image_size: int | None, download: bool) -> ImageDataset:
    if split not in _FILES:
        raise DatasetNotFoundError(f"fashion-mnist has splits train and test, not {split!r}")
    img_stem, lbl_stem = _FILES[split]
    searched = candidate_dirs(root)
    for folder in searched:
        img, lbl = _find(folder, img_stem), _find(folder, lbl_stem)
        if img and lbl:
            images = torch.from_numpy(read_idx(img).copy()).unsqueeze(1)
            labels = torch.from_numpy(read_idx(lbl).astype(np.int64))
            return ImageDataset(images, labels, list(CLASSES), "fashion-mnist", split, {"path": str(folder)})
    if download:
        from torchvision.datasets import FashionMNIST

        target = root or Path.home() / ".cache" / "encoder_guard" / "data"
        FashionMNIST(str(target), train=split == "train", download=True)
        return load_fashion_mnist(target, split, image_size, False)
    raise DatasetNotFoundError(
        f"Fashion-MNIST {split} not found in {', '.join(str(d) for d in searched)}; "
        "install it with `apt-get install dataset-fashion-mnist`, or point --data-root / $ENCODER_GUARD_FMNIST "
        "at a folder with the IDX files"
    )
