"""Where two encoders' stage attention maps differ: the maps MIMIC's attention loss copies.

For each tap, on clean training images and on the same images with a trigger: the mean squared distance
between the two encoders' attention maps (``encoder_guard.defenses.distill.attention_map``), and the
share of each encoder's mean map (squared) that falls in the trigger's box (scaled to the map). A
backdoored teacher whose clean-image maps already lean toward the trigger's corner teaches that lean to
a student that never sees the trigger.

Usage:
  python benchmarks/attention_maps.py --encoder runs/bad/encoder.safetensors \
      --reference runs/clean/encoder.safetensors --trigger runs/bad/trigger.safetensors --tag bad
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

from encoder_guard.data import load_dataset  # noqa: E402
from encoder_guard.defenses.distill import attention_map  # noqa: E402
from encoder_guard.encoders import load_encoder  # noqa: E402
from encoder_guard.triggers import load_trigger  # noqa: E402
from encoder_guard.utils import seeded_choice  # noqa: E402

TAPS = ("layer1", "layer2", "layer3", "layer4")


def box_share(maps: torch.Tensor, box: tuple[int, int, int, int], image_side: int) -> float:
    """Share of the mean map's squared mass in the cells that overlap ``box`` (top, left, bottom, right;
    image pixels, inclusive)."""
    side = int(maps.shape[1] ** 0.5)
    mean = maps.mean(0).view(side, side).pow(2)
    t, left = (v * side // image_side for v in box[:2])
    b, r = (-(-(v + 1) * side // image_side) for v in box[2:])
    return float(mean[t:b, left:r].sum() / mean.sum())


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", required=True)
    ap.add_argument("--reference", required=True, help="a clean encoder of the same architecture")
    ap.add_argument("--trigger", required=True, help="a patch trigger file (its box is the region measured)")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", required=True)
    args = ap.parse_args()
    train = load_dataset("fashion-mnist", "train")
    idx = seeded_choice(torch.arange(len(train)), args.images, args.seed)
    x = train.images[idx].float().div(255)
    trigger = load_trigger(args.trigger)
    box = trigger.params().get("box")
    if box is None:
        raise SystemExit(f"{args.trigger} is not a patch trigger with a box; this measure needs one")
    enc, ref = load_encoder(args.encoder).eval(), load_encoder(args.reference).eval()
    maps = {(who, kind): [attention_map(m) for m in e.forward_intermediates(inp, list(TAPS))[1]]
            for who, e in (("encoder", enc), ("reference", ref)) for kind, inp in (("clean", x), ("triggered", trigger(x)))}
    rows, lines = [], [f"## Stage attention maps: {args.encoder} against {args.reference} ({args.images} training images, "
                       f"trigger box {box})", "",
                       "| tap | map side | distance on clean images | box share, clean images: encoder / reference | "
                       "box share, triggered images: encoder / reference |", "|---|---|---|---|---|"]
    for i, tap in enumerate(TAPS):
        e, r = maps["encoder", "clean"][i], maps["reference", "clean"][i]
        row = {"tap": tap, "side": int(e.shape[1] ** 0.5), "distance": float((e - r).pow(2).sum(1).mean()),
               **{f"share_{who}_{kind}": box_share(maps[who, kind][i], box, x.shape[-1])
                  for who in ("encoder", "reference") for kind in ("clean", "triggered")}}
        rows.append(row)
        lines.append(f"| {tap} | {row['side']} | {row['distance']:.4f} | {row['share_encoder_clean']:.3f} / "
                     f"{row['share_reference_clean']:.3f} | {row['share_encoder_triggered']:.3f} / {row['share_reference_triggered']:.3f} |")
    write_result(f"attention_maps_{args.tag}", {"encoder": args.encoder, "reference": args.reference,
                                                "trigger": args.trigger, "images": args.images, "rows": rows}, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
