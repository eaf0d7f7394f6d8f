"""SimCLR/BYOL view augmentation on whole batches of tensors.

lightly's PIL transforms (``SimCLRTransform``) make about 490 two-view images/s per core here, which
starves a CPU-sized encoder (see benchmarks/throughput.py); this module applies the same family of
augmentations to a whole ``(B, C, H, W)`` batch at once with a handful of tensor ops, on any device,
drawing every random number from one ``torch.Generator`` so that a resumed run sees the same views.

What it does, per sample, in this order (the SimCLR recipe, [0] Appendix A):
random resized crop (one affine ``grid_sample``, horizontal flip folded in), colour jitter with
probability ``jitter_p`` (brightness, contrast, saturation; fixed order rather than torchvision's random
order), random grayscale (RGB only), Gaussian blur with probability ``blur_p``, solarisation with
probability ``solarize_p`` (BYOL's second view, [1]).

- [0] A Simple Framework for Contrastive Learning of Visual Representations (SimCLR), Ting Chen et al., ICML 2020,
  arXiv 2002.05709
- [1] Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning (BYOL), Jean-Bastien Grill et al.,
  NeurIPS 2020, arXiv 2006.07733
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class ViewConfig:
    """Augmentation strengths of one view (defaults: SimCLR's, without hue)."""

    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0

    def __post_init__(self) -> None:
        self.crop_scale = tuple(self.crop_scale)  # type: ignore[assignment]
        self.crop_ratio = tuple(self.crop_ratio)  # type: ignore[assignment]
        self.blur_sigma = tuple(self.blur_sigma)  # type: ignore[assignment]
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}")
        for name in ("hflip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} is a probability, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device: torch.device) -> Tensor:
    return torch.rand(n, generator=g, device=device) * (hi - lo) + lo


def _bernoulli(n: int, p: float, g: torch.Generator, device: torch.device) -> Tensor:
    return torch.rand(n, generator=g, device=device) < p


def random_resized_crop(x: Tensor, cfg: ViewConfig, g: torch.Generator) -> Tensor:
    """Crop a random area share and aspect ratio of each image and resize it back, flipping at random."""
    b, dev = x.shape[0], x.device
    area = _uniform(b, *cfg.crop_scale, g, dev)
    log_ratio = _uniform(b, math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]), g, dev)
    ratio = log_ratio.exp()
    w = (area * ratio).sqrt().clamp(max=1.0)
    h = (area / ratio).sqrt().clamp(max=1.0)
    cx = (_uniform(b, -1, 1, g, dev)) * (1 - w)
    cy = (_uniform(b, -1, 1, g, dev)) * (1 - h)
    flip = torch.where(_bernoulli(b, cfg.hflip_p, g, dev), -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=dev)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _gray(x: Tensor) -> Tensor:
    if x.shape[1] == 3:
        return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    return x.mean(dim=1, keepdim=True)


def color_jitter(x: Tensor, cfg: ViewConfig, g: torch.Generator) -> Tensor:
    b, dev = x.shape[0], x.device
    apply = _bernoulli(b, cfg.jitter_p, g, dev).view(b, 1, 1, 1)
    one = torch.ones(b, device=dev)
    bright = _uniform(b, 1 - cfg.brightness, 1 + cfg.brightness, g, dev) if cfg.brightness else one
    contrast = _uniform(b, 1 - cfg.contrast, 1 + cfg.contrast, g, dev) if cfg.contrast else one
    sat = _uniform(b, 1 - cfg.saturation, 1 + cfg.saturation, g, dev) if cfg.saturation else one
    y = (x * bright.view(b, 1, 1, 1)).clamp(0, 1)
    m = _gray(y).mean(dim=(1, 2, 3), keepdim=True)
    y = ((y - m) * contrast.view(b, 1, 1, 1) + m).clamp(0, 1)
    if x.shape[1] == 3:
        gy = _gray(y)
        y = ((y - gy) * sat.view(b, 1, 1, 1) + gy).clamp(0, 1)
    return torch.where(apply, y, x)


def random_grayscale(x: Tensor, cfg: ViewConfig, g: torch.Generator) -> Tensor:
    if x.shape[1] != 3:
        return x
    apply = _bernoulli(x.shape[0], cfg.grayscale_p, g, x.device).view(-1, 1, 1, 1)
    return torch.where(apply, _gray(x).expand_as(x), x)


def gaussian_blur(x: Tensor, cfg: ViewConfig, g: torch.Generator) -> Tensor:
    """Per-sample Gaussian blur, kernel about 10% of the image side (as in SimCLR), odd, at least 3."""
    b, c, hgt, wid = x.shape
    dev = x.device
    apply = _bernoulli(b, cfg.blur_p, g, dev)
    sigma = _uniform(b, *cfg.blur_sigma, g, dev)
    if not bool(apply.any()):
        return x
    k = max(3, int(0.1 * hgt) // 2 * 2 + 1)
    r = torch.arange(k, device=dev, dtype=x.dtype) - k // 2
    kern = torch.exp(-(r.view(1, -1) ** 2) / (2 * sigma.view(-1, 1) ** 2))
    kern = (kern / kern.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (B*C, k)
    y = x.reshape(1, b * c, hgt, wid)
    y = F.conv2d(F.pad(y, (k // 2, k // 2, 0, 0), mode="reflect"), kern.view(b * c, 1, 1, k), groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, k // 2, k // 2), mode="reflect"), kern.view(b * c, 1, k, 1), groups=b * c)
    return torch.where(apply.view(b, 1, 1, 1), y.view(b, c, hgt, wid), x)


def solarize(x: Tensor, cfg: ViewConfig, g: torch.Generator) -> Tensor:
    apply = _bernoulli(x.shape[0], cfg.solarize_p, g, x.device).view(-1, 1, 1, 1)
    return torch.where(apply & (x >= 0.5), 1 - x, x)


def augment(x: Tensor, cfg: ViewConfig, g: torch.Generator) -> Tensor:
    """One random view of every image of ``x`` (float ``(B, C, H, W)`` in ``[0, 1]``)."""
    x = random_resized_crop(x, cfg, g)
    if cfg.jitter_p > 0:
        x = color_jitter(x, cfg, g)
    if cfg.grayscale_p > 0:
        x = random_grayscale(x, cfg, g)
    if cfg.blur_p > 0:
        x = gaussian_blur(x, cfg, g)
    if cfg.solarize_p > 0:
        x = solarize(x, cfg, g)
    return x.clamp_(0, 1)
