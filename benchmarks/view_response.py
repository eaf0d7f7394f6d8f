"""How often augmented clean views already set off an encoder's backdoor: what a distilling teacher shows.

Usage:
  python benchmarks/view_response.py --encoder bad=runs/badencoder/encoder.safetensors:0 \
      --encoder clean=runs/clean/encoder.safetensors:0 --view preset --view 'weak={crop_scale: [0.8, 1.0], jitter_p: 0.0}'

For each encoder (``LABEL=PATH:TARGET``) a linear probe is fitted on the full Fashion-MNIST training set;
then 3,000 clean training images outside the target class are augmented with each view setting (MIMIC's
preset augmentation, its ``augment`` hyperparameter, overridden key by key) and the share of views the
probe puts in the target class is reported (mean of 4 draws). A backdoored encoder that sends more
views to its target than the clean encoder does is being triggered by the augmentation itself, and a
student distilled on those views learns that response.
Writes benchmarks/results/view_response.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result

from downstream.classifier import fit_classifier
from encoder_guard.augment import ViewConfig, augment
from encoder_guard.data import load_dataset
from encoder_guard.defenses import DEFENSES
from encoder_guard.encoders import load_encoder


def parse_view(text: str) -> tuple[str, dict]:
    """``preset``, or ``LABEL={KEY: VALUE, ...}`` (a YAML mapping over the preset's keys)."""
    label, _, mapping = text.partition("=")
    over = yaml.safe_load(mapping) if mapping else {}
    if not isinstance(over, dict):
        raise SystemExit(f"--view {text!r}: expected LABEL={{KEY: VALUE, ...}}")
    return label, over


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", action="append", required=True, help="LABEL=PATH:TARGET")
    ap.add_argument("--view", action="append", default=[], help="preset, or LABEL={KEY: VALUE, ...} over the preset")
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--draws", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    base = DEFENSES.get("mimic")().hparams()["augment"]
    views = dict(parse_view(v) for v in (args.view or ["preset"]))
    train = load_dataset("fashion-mnist", "train")
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[: args.images]
    x, y = train.images[pick].float().div(255), train.labels[pick]
    rows = []
    for spec in args.encoder:
        label, _, rest = spec.partition("=")
        path, _, target = rest.rpartition(":")
        target = int(target)
        clf = fit_classifier(load_encoder(path).eval(), train).eval()
        others = x[y != target]
        with torch.no_grad():
            plain = (clf(others).argmax(1) == target).float().mean().item()
            for name, over in views.items():
                cfg = ViewConfig(**{**base, **over})
                g = torch.Generator().manual_seed(args.seed + 1)
                shares = [(clf(augment(others, cfg, g)).argmax(1) == target).float().mean().item() for _ in range(args.draws)]
                rows.append({"encoder": label, "path": path, "target": target, "view": name, "overrides": over,
                             "unaugmented": plain, "augmented": sum(shares) / len(shares)})
                print(rows[-1], flush=True)
    lines = [f"Share of augmented clean views (not of the target class; {args.images:,} training images, "
             f"{args.draws} draws) a linear probe puts in the target class", "",
             "| encoder | target | view | overrides of MIMIC's augment | unaugmented | augmented |", "|---|---|---|---|---|---|"]
    for r in rows:
        over = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "-"
        lines.append(f"| {r['encoder']} | {r['target']} | {r['view']} | {over} | {r['unaugmented']:.1%} | {r['augmented']:.1%} |")
    write_result("view_response", {"args": vars(args), "rows": rows}, lines)


if __name__ == "__main__":
    main()
