"""Datasets: one registry, one in-memory convention (uint8 NCHW), seeded subsets."""

from encoder_guard.data import fashion_mnist, imagefolder, synthetic, torchvision_sets  # noqa: F401  (register)
from encoder_guard.data.base import ImageDataset
from encoder_guard.data.registry import DATASETS, load_dataset
from encoder_guard.data.subsets import subset_indices, take_subset
from encoder_guard.data.synthetic import make_synthetic

__all__ = ["DATASETS", "ImageDataset", "load_dataset", "make_synthetic", "subset_indices", "take_subset"]
