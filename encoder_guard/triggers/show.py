"""A picture of a trigger: clean samples on the top row, triggered below, the difference at the bottom."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from encoder_guard.triggers.base import Trigger


def _trigger_shape(trigger: Trigger) -> tuple[int, int]:
    t = trigger.tensors()
    if "pattern" in t:
        return int(t["pattern"].shape[0]), int(t["pattern"].shape[-1])
    p = trigger.params()
    return int(p["channels"]), int(p["image_size"])


def sample_images(trigger: Trigger, dataset: str | None, root: str | None, count: int) -> Tensor:
    from encoder_guard.adapt import adapt_dataset
    from encoder_guard.data import load_dataset
    from encoder_guard.data.synthetic import make_synthetic
    from encoder_guard.encoders import make_spec

    channels, size = _trigger_shape(trigger)
    if dataset is None:
        dataset = "fashion-mnist" if channels == 1 else "cifar10"
    try:
        ds = load_dataset(dataset, "test", root)
    except Exception:  # no data at hand: show the trigger on synthetic images rather than fail
        ds = make_synthetic(size=count, num_classes=count, channels=channels, image_size=size, split="test")
    spec = make_spec("resnet10-tiny", in_chans=channels, input_size=size)
    ds, _ = adapt_dataset(ds, spec)
    idx = torch.linspace(0, len(ds) - 1, count).long()
    return ds.images[idx].float().div(255)


def trigger_picture(trigger: Trigger, out: Path, dataset: str | None = None, root: str | None = None, count: int = 6,
                    scale: int = 4) -> Path:
    from PIL import Image

    clean = sample_images(trigger, dataset, root, count)
    triggered = trigger.apply(clean)
    diff = (triggered - clean).abs()
    diff = diff / diff.amax().clamp_min(1e-8)
    rows = [torch.cat(list(r), dim=-1) for r in (clean, triggered, diff)]
    grid = torch.cat(rows, dim=-2)
    arr = (grid.clamp(0, 1) * 255).round().to(torch.uint8)
    arr = arr.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    img = Image.fromarray(arr[0].numpy(), "L") if arr.shape[0] == 1 else Image.fromarray(arr.permute(1, 2, 0).numpy(), "RGB")
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    return out
