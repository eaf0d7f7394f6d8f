"""What pooling the stage maps costs and changes in per-stage MI (MIMIC's stage weights).

Usage: python benchmarks/layer_mi.py --encoder runs/badencoder/encoder.safetensors [--samples 2000] [--pools 1 2 4 0]

For each pooling size (0 = no pooling: the whole map flattened, as MIMIC's reference code does) and each
stage: the MINE estimate, the input width and the seconds it took; then the stage weights each choice
gives. Writes benchmarks/results/layer_mi.json and .md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result

from encoder_guard.data import load_dataset
from encoder_guard.encoders import load_encoder
from encoder_guard.mi import MINE, layer_mutual_information
from encoder_guard.mi.layers import mi_weights
from encoder_guard.utils import seeded_choice


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", required=True)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--pools", type=int, nargs="+", default=[1, 2, 4, 0])
    ap.add_argument("--steps", type=int, default=500)
    args = ap.parse_args()
    enc = load_encoder(args.encoder).eval()
    ds = load_dataset("fashion-mnist", "train")
    images = ds.images[seeded_choice(torch.arange(len(ds)), args.samples, 0)].float().div(255)
    results, lines = [], [f"## Per-stage MINE on {args.encoder} ({args.samples} clean images, {args.steps} steps)", "",
                          "| pooling | stage | inputs | MI (nats) | weight | seconds |", "|---|---|---|---|---|---|"]
    for pool in args.pools:
        rows = layer_mutual_information(enc, images, MINE(steps=args.steps), pool=pool or 10_000)
        weights = mi_weights([r.mi for r in rows])
        label = "none (flattened)" if pool == 0 else f"{pool}×{pool}"
        for r, w in zip(rows, weights):
            results.append({"pool": pool, **r.to_dict(), "weight": w})
            lines.append(f"| {label} | {r.tap} | {r.inputs} | {r.mi:.3f} | {w:.2f} | {r.seconds:.1f} |")
    write_result("layer_mi", {"encoder": args.encoder, "samples": args.samples, "steps": args.steps, "rows": results}, lines)


if __name__ == "__main__":
    main()
