"""Backbone registry: named presets of :class:`EncoderSpec`, built on timm's ResNet.

timm gives the blocks, ``forward_intermediates`` and ``feature_info``; we only swap the stem for the
CIFAR-style one (3×3, stride 1, no max-pool) that small images need, since timm's ResNet keeps a 7×7
stride-2 stem. Parameter names match torchvision's ResNet (``conv1``, ``bn1``, ``layerN.M.conv1``,
``downsample.0``), so torchvision, BadEncoder, solo-learn and lightly weights map onto it by renaming.

- [0] Deep Residual Learning for Image Recognition, He et al., CVPR 2016, https://arxiv.org/abs/1512.03385
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any, Callable, cast

from torch import nn

from encoder_guard.encoders.spec import CIFAR_MEAN, CIFAR_STD, FMNIST_MEAN, FMNIST_STD, IMAGENET_MEAN, IMAGENET_STD, EncoderSpec
from encoder_guard.errors import EncoderGuardError
from encoder_guard.registry import Registry

BACKBONES: Registry[Callable[[], EncoderSpec]] = Registry("backbone")

_CIFAR_STEM: dict[str, Any] = dict(stem_kernel=3, stem_stride=1, stem_padding=1, stem_pool=False)
_IMAGENET_STEM: dict[str, Any] = dict(stem_kernel=7, stem_stride=2, stem_padding=3, stem_pool=True)


@BACKBONES.register("resnet10-tiny")
def resnet10_tiny() -> EncoderSpec:
    """ResNet-10 layout, widths 16–128 (0.31M parameters): the CPU preset for 28×28 grayscale."""
    return EncoderSpec(layers=(1, 1, 1, 1), widths=(16, 32, 64, 128), stem_width=16, in_chans=1, input_size=28,
                       mean=FMNIST_MEAN, std=FMNIST_STD, **_CIFAR_STEM)


@BACKBONES.register("resnet18-tiny")
def resnet18_tiny() -> EncoderSpec:
    """ResNet-18 layout, widths 16–128 (0.70M parameters)."""
    return replace(resnet10_tiny(), layers=(2, 2, 2, 2))


@BACKBONES.register("resnet18-cifar")
def resnet18_cifar() -> EncoderSpec:
    """ResNet-18 with the CIFAR stem (11.2M parameters), BadEncoder's and the papers' encoder."""
    return EncoderSpec(layers=(2, 2, 2, 2), widths=(64, 128, 256, 512), stem_width=64, in_chans=3, input_size=32,
                       mean=CIFAR_MEAN, std=CIFAR_STD, **_CIFAR_STEM)


@BACKBONES.register("resnet18")
def resnet18() -> EncoderSpec:
    """torchvision's ImageNet ResNet-18."""
    return EncoderSpec(layers=(2, 2, 2, 2), widths=(64, 128, 256, 512), stem_width=64, in_chans=3, input_size=224,
                       mean=IMAGENET_MEAN, std=IMAGENET_STD, **_IMAGENET_STEM)


@BACKBONES.register("resnet50")
def resnet50() -> EncoderSpec:
    """torchvision's ImageNet ResNet-50."""
    return replace(resnet18(), block="bottleneck", layers=(3, 4, 6, 3))


def make_spec(backbone: str, **overrides: Any) -> EncoderSpec:
    """A registered preset with ``overrides`` applied (``None`` values are dropped, as in timm's factory)."""
    spec = BACKBONES.get(backbone)()
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "in_chans" in overrides and "mean" not in overrides and overrides["in_chans"] != spec.in_chans:
        c = overrides["in_chans"]
        overrides["mean"] = (spec.mean * c)[:c] if len(spec.mean) == 1 else (sum(spec.mean) / len(spec.mean),) * c
        overrides["std"] = (spec.std * c)[:c] if len(spec.std) == 1 else (sum(spec.std) / len(spec.std),) * c
    unknown = set(overrides) - {f.name for f in fields(EncoderSpec)}
    if unknown:
        valid = ", ".join(f.name for f in fields(EncoderSpec))
        raise EncoderGuardError(f"unknown encoder setting(s) {', '.join(sorted(unknown))}; valid: {valid}")
    return replace(spec, **overrides, provenance=dict(spec.provenance, backbone=backbone))


def build_backbone(spec: EncoderSpec) -> Any:
    """A timm ResNet for ``spec`` without a classifier, with the spec's stem."""
    from timm.models.resnet import BasicBlock, Bottleneck, ResNet, make_blocks

    if spec.arch != "resnet":
        raise ValueError(f"unknown arch {spec.arch!r}; only 'resnet' is implemented")
    block = BasicBlock if spec.block == "basic" else Bottleneck
    net: Any = ResNet(
        block=cast(Any, block),
        layers=spec.layers,
        channels=spec.widths,
        in_chans=spec.in_chans,
        stem_width=spec.stem_width,
        num_classes=0,
        zero_init_last=False,
    )
    net.conv1 = nn.Conv2d(spec.in_chans, spec.stem_width, spec.stem_kernel, spec.stem_stride, spec.stem_padding, bias=False)
    net.bn1 = nn.BatchNorm2d(spec.stem_width)
    if not spec.stem_pool:
        net.maxpool = nn.Identity()
    if spec.stem_width != 64:  # timm's plain stem always feeds 64 channels into layer1: rebuild the stages
        stages, _ = make_blocks((block,) * len(spec.widths), spec.widths, spec.layers, inplanes=spec.stem_width)
        for name, stage in stages:
            setattr(net, name, stage)
    net.init_weights(zero_init_last=False)
    return net
