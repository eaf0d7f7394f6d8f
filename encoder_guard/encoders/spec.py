"""The JSON-serialisable description of an encoder, stored inside every checkpoint.

A spec is everything needed to rebuild the network and to feed it correctly: the architecture, the stem
(kernel, stride, padding, pooling: BadEncoder and solo-learn CIFAR stems differ only in padding), the
input size and channels, and the normalisation. It also keeps how the weights were made (SSL method,
provenance), so ``encoder-guard info`` can tell a user what a file is.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from encoder_guard.errors import CheckpointError

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FMNIST_MEAN = (0.2860,)
FMNIST_STD = (0.3530,)


@dataclass
class EncoderSpec:
    """How to build and feed an encoder.

    Attributes:
        arch: backbone family (``resnet``).
        block: ``basic`` (ResNet-10/18/34) or ``bottleneck`` (ResNet-50...).
        layers: blocks per stage.
        widths: channels of each stage before block expansion.
        stem_width: channels of the first convolution.
        stem_kernel / stem_stride / stem_padding: the first convolution.
        stem_pool: whether a 3×3 stride-2 max-pool follows the stem (ImageNet style).
        in_chans: image channels (1 for Fashion-MNIST).
        input_size: square input side the encoder was trained on.
        mean / std: per-channel normalisation applied inside the encoder to ``[0, 1]`` inputs.
        ssl_method: how the weights were trained (``simclr``, ``byol``, ``badencoder``...), if known.
        provenance: free-form record (source format, file, run, attack...).
        plugins: plug-in modules on stage outputs, by tap name (see ``encoders.plugins``; Purifier, Purifier+).
    """

    arch: str = "resnet"
    block: str = "basic"
    layers: tuple[int, ...] = (1, 1, 1, 1)
    widths: tuple[int, ...] = (16, 32, 64, 128)
    stem_width: int = 16
    stem_kernel: int = 3
    stem_stride: int = 1
    stem_padding: int = 1
    stem_pool: bool = False
    in_chans: int = 1
    input_size: int = 28
    mean: tuple[float, ...] = FMNIST_MEAN
    std: tuple[float, ...] = FMNIST_STD
    ssl_method: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    plugins: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layers = tuple(int(v) for v in self.layers)
        self.widths = tuple(int(v) for v in self.widths)
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        if self.block not in ("basic", "bottleneck"):
            raise CheckpointError(f"block must be 'basic' or 'bottleneck', got {self.block!r}")
        if len(self.layers) != len(self.widths):
            raise CheckpointError(f"spec has {len(self.layers)} stages in layers but {len(self.widths)} widths")
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise CheckpointError(
                f"mean/std have {len(self.mean)}/{len(self.std)} values for {self.in_chans} input channels; "
                "set normalisation to match the channels"
            )

    @property
    def feature_dim(self) -> int:
        return self.widths[-1] * (4 if self.block == "bottleneck" else 1)

    def to_json(self) -> str:
        d = asdict(self)
        d["feature_dim"] = self.feature_dim
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EncoderSpec":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_json(cls, text: str) -> "EncoderSpec":
        try:
            return cls.from_dict(json.loads(text))
        except (json.JSONDecodeError, TypeError) as exc:
            raise CheckpointError(f"the checkpoint's encoder spec is not valid JSON ({exc}); the file is damaged") from exc
