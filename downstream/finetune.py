"""End-to-end fine-tuning of a downstream classifier (encoder + linear head) on a labelled set.

The standard transfer recipe: start from the linear probe on the frozen encoder, then train every weight with
SGD (momentum 0.9, weight decay 5e-4, cosine learning rate, gradient norm clipped at 5) for a few epochs, with light augmentation (a random
crop of the image padded by ``pad`` pixels, a horizontal flip with probability ``hflip_p``). The head trains on
features centred and scaled by their statistics at the start (one scale for all dimensions), where one learning
rate suits any encoder; BatchNorm
keeps the encoder's running statistics (its affine weights train), so the first step starts from exactly the
probe that was deployed. On a
BadNets-poisoned set this is the **fine-tune threat**: the backdoor is learnt by the whole network, as in the
papers of the downstream defenses (PAD-FT, D3, TAC), not by one linear layer over a clean encoder. On a small
clean set it is the defender's simplest yardstick (``finetune-all``).

The fine-tuned classifier of a threat is cached under ``$ENCODER_GUARD_CACHE/victims/<key>``, the key a digest
of the encoder, the training set, the recipe and the seed: every defense of a comparison meets the same victim.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from downstream.classifier import Classifier, Head, fit_classifier, load_classifier, save_classifier
from downstream.features import cache_root, dataset_fingerprint
from encoder_guard.data import ImageDataset
from encoder_guard.encoders import Encoder
from encoder_guard.errors import EncoderGuardError
from encoder_guard.runs import get_logger


@dataclass
class FinetuneConfig:
    """The recipe; ``lr`` is the encoder's learning rate, the head's is ``head_lr_ratio`` times it."""

    epochs: int = 3
    lr: float = 0.01
    head_lr_ratio: float = 10.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    pad: int = 2
    hflip_p: float = 0.0
    max_grad_norm: float = 5.0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.lr <= 0 or self.batch_size < 1 or self.pad < 0 or not 0 <= self.hflip_p <= 1:
            raise EncoderGuardError(f"fine-tuning needs epochs >= 1, lr > 0, batch_size >= 1, pad >= 0 and a "
                                    f"probability hflip_p; got {asdict(self)}")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "FinetuneConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d or {}) - known)
        if unknown:
            raise EncoderGuardError(f"unknown fine-tuning keys {unknown}; known: {sorted(known)}")
        return cls(**(d or {}))


def light_augment(x: Tensor, pad: int, hflip_p: float, g: torch.Generator) -> Tensor:
    """A random ``pad``-pixel shift (crop of the zero-padded image) and a random horizontal flip, per image."""
    b, _, h, w = x.shape
    if pad:
        padded = F.pad(x, (pad, pad, pad, pad))
        rows = torch.randint(0, 2 * pad + 1, (b, 1), generator=g) + torch.arange(h)  # (b, h)
        cols = torch.randint(0, 2 * pad + 1, (b, 1), generator=g) + torch.arange(w)  # (b, w)
        x = padded[torch.arange(b)[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if hflip_p > 0:
        flip = torch.rand(b, generator=g) < hflip_p
        x = torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)
    return x


def finetune_classifier(clf: Classifier, train: ImageDataset, cfg: FinetuneConfig, seed: int = 0,
                        desc: str = "fine-tune") -> Classifier:
    """A copy of ``clf`` with every weight trained on ``train`` by the recipe ``cfg`` (``clf`` is left as it is)."""
    model = copy.deepcopy(clf)
    model.eval()
    with torch.no_grad():  # the head trains on standardised features, where one learning rate suits any encoder
        sample = torch.cat([model.encoder(train.float_images(i, i + 512)) for i in range(0, min(len(train), 4096), 512)])
    mean, std = Head.feature_stats(sample.float())
    std = std.mean().expand_as(std).clone()  # one scale for all: a dimension dead at the start may wake up
    layer = model.head.standardised(mean, std)
    for p in model.encoder.parameters():
        p.requires_grad_(True)
    params = list(model.encoder.parameters()) + list(layer.parameters())
    groups = [{"params": list(model.encoder.parameters()), "lr": cfg.lr},
              {"params": list(layer.parameters()), "lr": cfg.lr * cfg.head_lr_ratio}]
    opt = torch.optim.SGD(groups, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps_per_epoch = -(-len(train) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(seed)
    labels = train.labels.long()
    model.eval()  # BatchNorm keeps the encoder's statistics: step 0 is exactly the probe the victim started from
    bar = tqdm(total=cfg.epochs * steps_per_epoch, desc=desc, unit="step", leave=False, mininterval=1.0)
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(train), generator=g)
        total = 0.0
        for start in range(0, len(train), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            x = light_augment(train.images[idx].float().div(255), cfg.pad, cfg.hflip_p, g)
            loss = F.cross_entropy(layer((model.head.clamp(model.encoder(x)) - mean) / std), labels[idx])
            if not torch.isfinite(loss):
                raise EncoderGuardError(f"fine-tuning diverged (loss {float(loss.detach())}) at epoch {epoch + 1}; "
                                        "lower downstream.finetune.lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            bar.update()
        bar.set_postfix(epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{total / len(train):.3f}")
    bar.close()
    model.head.load_standardised(layer, mean, std)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def finetuned_victim(encoder: Encoder, train: ImageDataset, cfg: FinetuneConfig, seed: int = 0,
                     cache: bool = True) -> Classifier:
    """The fine-tune threat's deployed classifier: the linear probe on ``train``, then fine-tuned end to end on
    it; read from the cache when this encoder, set, recipe and seed were fine-tuned before."""
    blob = json.dumps({"encoder": encoder.digest(), "train": dataset_fingerprint(train), "recipe": asdict(cfg),
                       "seed": seed}, sort_keys=True)
    where = cache_root() / "victims" / hashlib.sha256(blob.encode()).hexdigest()[:16]
    if cache and (where / "head.safetensors").is_file():
        return load_classifier(where)
    get_logger().info(f"fine-tuning the victim classifier on {len(train):,} images of {train.name} "
                      f"({cfg.epochs} epochs, lr {cfg.lr})")
    clf = finetune_classifier(fit_classifier(encoder, train, seed=seed, cache=cache), train, cfg, seed,
                              desc="victim fine-tune")
    if cache:
        save_classifier(clf, where)
    return clf
