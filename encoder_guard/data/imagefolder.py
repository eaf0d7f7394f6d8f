"""Any folder of images, one sub-folder per class (torchvision's ``ImageFolder`` layout).

``root`` is the dataset folder; a ``train``/``test`` (or ``val``) sub-folder is used for the split when it
exists, else ``root`` itself. Images are decoded once and kept as they are: grayscale when every image is,
else RGB, and at their own size when they share one square size. Asked for ``image_size``, or given images
of several sizes (or not square), they are resized to ``image_size`` (default 32, as GTSRB).
"""

from __future__ import annotations

from pathlib import Path

import torch

from encoder_guard.data.base import ImageDataset
from encoder_guard.data.registry import DATASETS
from encoder_guard.data.transforms import pil_to_uint8
from encoder_guard.errors import DatasetNotFoundError

DEFAULT_SIZE = 32


@DATASETS.register("imagefolder")
def load_imagefolder(root: Path | None, split: str, image_size: int | None, download: bool) -> ImageDataset:
    from torchvision.datasets import ImageFolder

    if root is None:
        raise DatasetNotFoundError("imagefolder needs --data-root pointing at a folder with one sub-folder per class")
    folder = root
    for name in ((split,) if split != "test" else ("test", "val")):
        if (root / name).is_dir():
            folder = root / name
            break
    if not folder.is_dir():
        raise DatasetNotFoundError(f"image folder {folder} does not exist; pass --data-root to a folder of class sub-folders")
    try:
        ds = ImageFolder(str(folder))
    except (FileNotFoundError, RuntimeError) as exc:
        raise DatasetNotFoundError(f"{folder} holds no class sub-folders with images ({exc}); lay it out as root/<class>/<image>") from exc
    from PIL import Image

    opened = [Image.open(p) for p, _ in ds.samples]
    channels = 1 if all(im.mode in ("1", "L", "I", "I;16", "F") for im in opened) else 3
    sizes = {im.size for im in opened}
    own = next(iter(sizes)) if len(sizes) == 1 else None
    size = image_size or (own[0] if own is not None and own[0] == own[1] else DEFAULT_SIZE)
    images = torch.stack([pil_to_uint8(im, size, channels) for im in opened])
    meta = {"path": str(folder), "own_sizes": sorted(sizes)[:4], "resized": own != (size, size)}
    return ImageDataset(images, torch.tensor(ds.targets), list(ds.classes), "imagefolder", split, meta)
