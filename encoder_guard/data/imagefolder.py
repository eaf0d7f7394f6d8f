"""Any folder of images, one sub-folder per class (torchvision's ``ImageFolder`` layout).

``root`` is the dataset folder; a ``train``/``test`` (or ``val``) sub-folder is used for the split when it
exists, else ``root`` itself. Images are decoded once, converted to RGB and resized to ``image_size``
(default 32) so that they sit in memory like every other set.
"""

from __future__ import annotations

from pathlib import Path

import torch

from encoder_guard.data.base import ImageDataset
from encoder_guard.data.registry import DATASETS
from encoder_guard.data.transforms import pil_to_uint8
from encoder_guard.errors import DatasetNotFoundError


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
    size = image_size or 32
    from PIL import Image

    images = torch.stack([pil_to_uint8(Image.open(p), size, 3) for p, _ in ds.samples])
    return ImageDataset(images, torch.tensor(ds.targets), list(ds.classes), "imagefolder", split, {"path": str(folder)})
