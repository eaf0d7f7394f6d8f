"""Write scikit-learn's bundled handwritten digits as an image folder: a downstream domain unlike Fashion-MNIST.

Usage: python benchmarks/digits_folder.py runs/data/digits

The 1,797 8×8 digits (UCI optical recognition of handwritten digits, 16 grey levels) ship inside scikit-learn,
so nothing is downloaded. They are written as 28×28 grayscale PNGs (bilinear upsampling) to
``OUT/{train,test}/<digit>/<index>.png``, 70% / 30% per class with a fixed seed: what ``--dataset imagefolder
--data-root OUT`` reads.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="folder to write (train/ and test/ with one sub-folder per digit)")
    ap.add_argument("--size", type=int, default=28, help="side of the written images")
    args = ap.parse_args()
    digits = load_digits()
    images = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(args.size, args.size), mode="bilinear", align_corners=False)
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).squeeze(1).numpy()
    index = np.arange(len(pixels))
    train, test = train_test_split(index, test_size=0.3, stratify=digits.target, random_state=0)
    for split, members in (("train", train), ("test", test)):
        for i in members:
            folder = Path(args.out) / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels[i], mode="L").save(folder / f"{i:04d}.png")
    print(f"{len(train)} train and {len(test)} test images → {args.out}")


if __name__ == "__main__":
    main()
