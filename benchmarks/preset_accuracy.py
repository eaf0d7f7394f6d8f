"""Pretrain a preset and evaluate it on Fashion-MNIST: CA (linear, kNN) and wall times.

Usage: python benchmarks/preset_accuracy.py fmnist-tiny [--set optim.epochs=2 ...] [--out runs/NAME]
Writes benchmarks/results/preset_<preset>[_<tag>].json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

from downstream import EvalConfig, evaluate_encoder  # noqa: E402
from encoder_guard.config import load_config  # noqa: E402
from encoder_guard.data import load_dataset  # noqa: E402
from encoder_guard.encoders import load_encoder  # noqa: E402
from pretrain import pretrain  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("preset")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--out", default=None)
    ap.add_argument("--tag", default=None)
    args = ap.parse_args()
    out = Path(args.out or f"runs/bench-{args.preset}{'-' + args.tag if args.tag else ''}")
    cfg = load_config(args.preset, "pretrain", args.set)
    t0 = time.perf_counter()
    summary = pretrain(cfg, out)
    t_pre = time.perf_counter() - t0
    enc = load_encoder(out / "encoder.safetensors")
    m = evaluate_encoder(enc, load_dataset(cfg["eval"]["dataset"], "train"), load_dataset(cfg["eval"]["dataset"], "test"),
                         EvalConfig(cache=False))
    total = time.perf_counter() - t0
    data = {"preset": args.preset, "overrides": args.set, "run": str(out), "ca_linear": m["ca_linear"], "ca_knn": m["ca_knn"],
            "epochs": summary["epochs"], "pretrain_seconds": t_pre, "total_seconds": total,
            "images_per_second": summary["images_per_second"]}
    name = f"preset_{args.preset}" + (f"_{args.tag}" if args.tag else "")
    write_result(name, data, [f"## {args.preset} {' '.join(args.set)}",
                              f"CA linear {m['ca_linear']:.2%}, CA kNN {m['ca_knn']:.2%}; pretraining {t_pre / 60:.1f} min, "
                              f"total {total / 60:.1f} min"])


if __name__ == "__main__":
    main()
