"""How often the pretraining preset's random crops show a CorruptEncoder poison's trigger without its object.

CorruptEncoder's positive pair is one view of the object alone and one of the trigger alone; this counts, over
crops drawn like the preset's views (``augment.crop_scale``, aspect 3/4–4/3), the share that hold at least 90% of a
trigger copy and under 10% of the object, for the placements ``poison.object_scale`` / ``poison.tile`` set.

Usage: python benchmarks/corrupt_crops.py [--preset fmnist-tiny] [--draws 20000]
Writes benchmarks/results/corrupt_crops.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torchvision.transforms import RandomResizedCrop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result

from encoder_guard.config import load_config
from encoder_guard.triggers import build_trigger
from encoder_guard.triggers.poison import tiled_copies

PLACEMENTS = [(0.5, False), (0.35, False), (0.25, False), (0.35, True), (0.25, True)]


def _share(box: tuple[int, int, int, int], area: tuple[int, int, int, int]) -> float:
    """The share of ``area`` (top, bottom, left, right; exclusive ends) inside the crop ``box`` (i, j, h, w)."""
    i, j, h, w = box
    top, bottom, left, right = area
    rows, cols = max(0, min(i + h, bottom) - max(i, top)), max(0, min(j + w, right) - max(j, left))
    return rows * cols / ((bottom - top) * (right - left))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="fmnist-tiny")
    ap.add_argument("--draws", type=int, default=20000)
    args = ap.parse_args()
    cfg = load_config(args.preset, "pretrain", [])
    side = 28  # Fashion-MNIST
    scale = tuple(cfg["augment"]["crop_scale"])
    torch.manual_seed(0)
    crop = RandomResizedCrop(side, scale=scale)
    boxes = [crop.get_params(torch.zeros(1, side, side), crop.scale, crop.ratio) for _ in range(args.draws)]
    trigger = build_trigger({"kind": "patch"}, side, 1)  # the poisoning presets' 9-px white square, bottom right
    rows = []
    for object_scale, tile in PLACEMENTS:
        obj = round(object_scale * side)  # the object sits in the top-left corner, away from the square
        copies = tiled_copies(trigger, (0, 0, obj, obj)) if tile else [trigger]
        boxes_of_copies = [c.params()["box"] for c in copies]  # (top, left, bottom, right), inclusive
        areas = [(t, b + 1, left, r + 1) for t, left, b, r in boxes_of_copies]
        alone = sum(_share(b, (0, obj, 0, obj)) < 0.1 and any(_share(b, a) > 0.9 for a in areas) for b in boxes)
        rows.append({"object_scale": object_scale, "object_px": obj, "tile": tile, "copies": len(copies),
                     "trigger_only": alone / len(boxes)})
    lines = [f"## Crops of a CorruptEncoder poison that show the trigger alone ({args.preset}: crop scale {scale}, "
             f"{args.draws:,} draws)", "", "| object side | trigger copies | trigger-only crops |", "|---|---|---|"]
    lines += [f"| {r['object_px']} px | {r['copies']} | {r['trigger_only']:.1%} |" for r in rows]
    write_result("corrupt_crops", {"preset": args.preset, "crop_scale": list(scale), "draws": args.draws, "rows": rows},
                 lines)


if __name__ == "__main__":
    main()
