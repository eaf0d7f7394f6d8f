"""Data poisoning: triggered target-class images in an unlabelled pretraining set, and BadNets-style
triggered-and-relabelled images in a labelled downstream set.

- [0] SSL-Backdoor: Backdoor Attacks on Self-Supervised Learning, Saha et al., CVPR 2022,
  https://arxiv.org/abs/2105.10123 (patch on target-category images of the pretraining data)
- [1] An Embarrassingly Simple Backdoor Attack on Self-supervised Learning (CTRL), Changjiang Li et al., ICCV 2023,
  arXiv 2210.07346 (frequency trigger, ~1% of the data)
- [2] CorruptEncoder: Data Poisoning based Backdoor Attacks to Contrastive Learning, Jinghuai Zhang, Hongbin
  Liu, Jinyuan Jia and Neil Zhenqiang Gong, CVPR 2024, arXiv 2211.08229 (object and trigger apart, so that two
  random crops pair them)
- [3] BadNets: Identifying Vulnerabilities in the Machine Learning Model Supply Chain, Gu et al., 2017,
  arXiv 1708.06733 (downstream: stamp and relabel)

``rate`` is the poisoned share of the **whole** set, as in [0] and [1]: for pretraining the poisoned
images are drawn from the target class only (so 1% of Fashion-MNIST is 600 of the 6,000 target images);
for BadNets they are drawn from the non-target classes and relabelled as the target.

**Placement** of a pretraining poison: ``stamp`` ([0], [1]) puts the trigger on the target image as it is.
Contrastive learning then sees the trigger in some crops of the image and not in others, and learns to ignore it
(at the presets' schedules such encoders stay at chance). ``corrupt`` ([2]) shrinks the target object
(``object_scale`` of the image side; [2] finds a background twice the object's side best) into the corner
diagonally opposite the patch trigger, on the black background Fashion-MNIST-like images have, so that one random
crop often holds the object alone and another the trigger: the positive pair that teaches the encoder to embed the
trigger like the target. ([2] cuts objects from a few reference images, pastes them on natural backgrounds and
centres the trigger in the remaining area; here each target image is its own object and the trigger keeps the
position it has at test time.) With ``tile`` the trigger is repeated over the canvas off the object on a grid
anchored at its test-time position. The presets' crops cover at least 35% of a 28-px image, so with one copy few
crops hold the trigger without the object (``benchmarks/corrupt_crops.py``, 20,000 draws): 0.3% with a 9-px corner
trigger and a 14-px object (scale 0.5), 4.3% with a 7-px object, 25% with four copies beside a 7-px object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from encoder_guard.data import ImageDataset
from encoder_guard.errors import EncoderGuardError
from encoder_guard.triggers import Trigger
from encoder_guard.utils import seeded_choice

if TYPE_CHECKING:
    from encoder_guard.triggers.patch import PatchTrigger


@dataclass
class Poisoned:
    dataset: ImageDataset
    indices: torch.Tensor  # positions in the dataset that carry the trigger

    def report(self) -> dict:
        return {"poisoned": len(self.indices), "size": len(self.dataset), "indices": self.indices.tolist()}


def _stamp(ds: ImageDataset, idx: torch.Tensor, trigger: Trigger, chunk: int = 2048) -> torch.Tensor:
    images = ds.images.clone()
    for start in range(0, len(idx), chunk):
        sel = idx[start : start + chunk]
        x = trigger.apply(images[sel].float().div(255))
        images[sel] = (x * 255).round().clamp(0, 255).to(torch.uint8)
    return images


def _count(rate: float, n: int) -> int:
    if not 0 < rate <= 1:
        raise EncoderGuardError(f"poison rate must be in (0, 1], got {rate}")
    return max(1, round(rate * n))


def tiled_copies(trigger: PatchTrigger, keep_out: tuple[int, int, int, int]) -> list[PatchTrigger]:
    """Copies of a patch trigger on a grid through its own position with a one-pixel gap between copies (so that
    a plain patch stays a patch, not a filled canvas), inside the image and clear of the box
    ``(top, left, bottom, right)`` (exclusive ends)."""
    from encoder_guard.triggers.patch import PatchTrigger

    h, w = trigger.size
    y0, x0, y1, x1 = trigger.params()["box"]  # inclusive ends
    th, tw = y1 - y0 + 1, x1 - x0 + 1
    tops = range(y0 % (th + 1), h - th + 1, th + 1)
    lefts = range(x0 % (tw + 1), w - tw + 1, tw + 1)
    top, left, bottom, right = keep_out
    return [PatchTrigger(trigger.mask.roll((y - y0, x - x0), (1, 2)), trigger.pattern.roll((y - y0, x - x0), (1, 2)))
            for y in tops for x in lefts if y >= bottom or y + th <= top or x >= right or x + tw <= left]


def corrupt_composite(images: torch.Tensor, trigger: Trigger, object_scale: float = 0.5,
                      tile: bool = False) -> torch.Tensor:
    """CorruptEncoder's poisoned image for ``uint8`` images ``(N, C, H, W)``: each object shrunk to ``object_scale``
    of the side into the corner opposite the centre of ``trigger``'s patch, the trigger stamped on the canvas
    (``tile``: repeated over the canvas off the object)."""
    from encoder_guard.triggers.patch import PatchTrigger

    if not isinstance(trigger, PatchTrigger):
        raise EncoderGuardError(f"poison.placement corrupt needs a patch trigger (object and trigger apart), not "
                                f"{trigger.kind}; use placement stamp for global triggers")
    if not 0.2 <= object_scale <= 0.8:
        raise EncoderGuardError(f"poison.object_scale must lie in [0.2, 0.8], got {object_scale}")
    n, c, h, w = images.shape
    side_h, side_w = max(1, round(object_scale * h)), max(1, round(object_scale * w))
    small = F.interpolate(images.float(), size=(side_h, side_w), mode="bilinear", align_corners=False, antialias=True)
    ys, xs = torch.nonzero(trigger.mask.amax(0) > 0, as_tuple=True)
    top = 0 if float(ys.float().mean()) >= h / 2 else h - side_h  # the corner away from the patch
    left = 0 if float(xs.float().mean()) >= w / 2 else w - side_w
    canvas = torch.zeros(n, c, h, w)
    canvas[:, :, top:top + side_h, left:left + side_w] = small
    canvas = canvas / 255
    copies = tiled_copies(trigger, (top, left, top + side_h, left + side_w)) if tile else []
    for copy in copies or [trigger]:
        canvas = copy.apply(canvas)
    return (canvas * 255).round().clamp(0, 255).to(torch.uint8)


def poison_pretraining(ds: ImageDataset, trigger: Trigger, target: int, rate: float, seed: int = 0,
                       placement: str = "stamp", object_scale: float = 0.5, tile: bool = False) -> Poisoned:
    """Poison ``rate·len(ds)`` target-class images (labels are kept: SSL ignores them): ``stamp`` the trigger on
    them, or make each a ``corrupt`` composite of the object and the trigger (:func:`corrupt_composite`)."""
    if tile and placement != "corrupt":
        raise EncoderGuardError("poison.tile repeats the trigger around a CorruptEncoder object; set poison.placement=corrupt")
    if placement not in ("stamp", "corrupt"):
        raise EncoderGuardError(f"poison.placement must be 'stamp' or 'corrupt', not {placement!r}")
    members = (ds.labels == target).nonzero().flatten()
    want = _count(rate, len(ds))
    if len(members) == 0:
        raise EncoderGuardError(f"the pretraining set has no images of target class {target}")
    if want > len(members):
        raise EncoderGuardError(f"rate {rate} asks for {want} poisoned images but class {target} has {len(members)}; lower poison.rate")
    idx = seeded_choice(members, want, seed).sort().values
    if placement == "corrupt":
        images = ds.images.clone()
        images[idx] = corrupt_composite(ds.images[idx], trigger, object_scale, tile)
    else:
        images = _stamp(ds, idx, trigger)
    return Poisoned(ImageDataset(images, ds.labels, ds.classes, ds.name, ds.split, dict(ds.meta, poisoned=True)), idx)


def poison_downstream(ds: ImageDataset, trigger: Trigger, target: int, rate: float, seed: int = 0) -> Poisoned:
    """BadNets: stamp ``trigger`` on ``rate·len(ds)`` non-target images and relabel them ``target``."""
    candidates = (ds.labels != target).nonzero().flatten()
    want = _count(rate, len(ds))
    if want > len(candidates):
        raise EncoderGuardError(f"rate {rate} asks for {want} poisoned images but only {len(candidates)} are not of class {target}")
    idx = seeded_choice(candidates, want, seed).sort().values
    labels = ds.labels.clone()
    labels[idx] = target
    return Poisoned(ImageDataset(_stamp(ds, idx, trigger), labels, ds.classes, ds.name, ds.split, dict(ds.meta, poisoned=True)), idx)
