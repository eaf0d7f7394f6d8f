"""Time one encoder scan per scanner: the fmnist-tiny encoder and a ResNet-18 at 32×32.

Usage: python benchmarks/scan_timing.py [--encoder runs/clean/encoder.safetensors] [--methods decree collapse]

Scans ``--encoder`` on the Fashion-MNIST test split, and a ResNet-18 (the CIFAR stem, 3×32×32, random weights:
the time does not depend on what the weights learned) on 10,000 random 32×32 images, with each scanner's preset.
Writes ``benchmarks/results/scan_timing.{md,json}``. Run it alone on the machine: the figures are wall times.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result

from encoder_guard.data import load_dataset
from encoder_guard.encoders import Encoder, load_encoder, make_spec
from encoder_guard.scan import build_scanner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", default="runs/clean/encoder.safetensors")
    ap.add_argument("--methods", nargs="+", default=["decree", "collapse"])
    args = ap.parse_args()
    torch.manual_seed(0)
    cases = {
        "fmnist-tiny (ResNet-10-tiny, 1×28×28)": (load_encoder(args.encoder), load_dataset("fashion-mnist", "test").images),
        "ResNet-18 (CIFAR stem, 3×32×32)": (Encoder(make_spec("resnet18-cifar", in_chans=3, input_size=32)).eval(),
                                            torch.randint(0, 256, (10_000, 3, 32, 32), dtype=torch.uint8)),
    }
    rows = []
    for case, (encoder, images) in cases.items():
        params = sum(p.numel() for p in encoder.parameters()) / 1e6
        for method in args.methods:
            result = build_scanner(method).scan(encoder, images)
            rows.append({"encoder": case, "parameters_m": round(params, 2), "method": method,
                         "seconds": round(result.seconds, 1), "score": result.score})
            print(f"{case} × {method}: {result.seconds:.1f} s", flush=True)
    lines = ["| encoder | parameters | scanner | seconds per scan |", "|---|---|---|---|"]
    lines += [f"| {r['encoder']} | {r['parameters_m']}M | {r['method']} | {r['seconds']:.0f} |" for r in rows]
    write_result("scan_timing", {"rows": rows, "threads": torch.get_num_threads()}, lines)


if __name__ == "__main__":
    main()
