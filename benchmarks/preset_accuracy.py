"""Pretrain a preset and evaluate it on Fashion-MNIST: CA (linear, kNN) and wall times.

Usage: python benchmarks/preset_accuracy.py fmnist-tiny [--set optim.epochs=2 ...] [--out runs/bench-fmnist-tiny]
Writes benchmarks/results/preset_accuracy.{json,md}: one row per preset and overrides, this run's replacing the
row it measured again and keeping the others.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, write_result

from downstream import EvalConfig, evaluate_encoder
from encoder_guard.config import load_config
from encoder_guard.data import load_dataset
from encoder_guard.encoders import load_encoder
from pretrain import pretrain


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("preset")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out or f"runs/bench-{args.preset}")
    cfg = load_config(args.preset, "pretrain", args.set)
    t0 = time.perf_counter()
    summary = pretrain(cfg, out)
    t_pre = time.perf_counter() - t0
    enc = load_encoder(out / "encoder.safetensors")
    m = evaluate_encoder(enc, load_dataset(cfg["eval"]["dataset"], "train"), load_dataset(cfg["eval"]["dataset"], "test"),
                         EvalConfig(cache=False))
    total = time.perf_counter() - t0
    row = {"preset": args.preset, "overrides": args.set, "run": str(out), "ca_linear": m["ca_linear"],
           "ca_knn": m["ca_knn"], "epochs": summary["epochs"], "pretrain_seconds": t_pre, "total_seconds": total,
           "images_per_second": summary["images_per_second"]}
    previous = RESULTS / "preset_accuracy.json"
    rows = json.loads(previous.read_text())["rows"] if previous.exists() else []
    rows = [r for r in rows if (r["preset"], r["overrides"]) != (args.preset, args.set)] + [row]
    lines = ["## Pretraining presets on Fashion-MNIST (linear probe / kNN)", "",
             "| preset | overrides | epochs | CA linear | CA kNN | pretraining | total |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['preset']} | {' '.join(r['overrides']) or '-'} | {r['epochs']} | {r['ca_linear']:.2%} | {r['ca_knn']:.2%} "
              f"| {r['pretrain_seconds'] / 60:.1f} min | {r['total_seconds'] / 60:.1f} min |" for r in rows]
    write_result("preset_accuracy", {"rows": rows}, lines)


if __name__ == "__main__":
    main()
