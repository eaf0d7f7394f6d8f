"""Which of Purifier+'s gates catches a trigger, scored by the map's mean excess or by its peak.

Usage: python benchmarks/gate_scores.py --encoder runs/badencoder-random9/encoder.safetensors \
           --trigger runs/badencoder-random9/trigger.safetensors --target 3 \
           --purified runs/purifier-plus-no-rating-badencoder-random9/encoder.safetensors

(``--purified``: ``encoder-guard defend purifier-plus-no-rating --encoder runs/badencoder-random9/encoder.safetensors
--out runs/purifier-plus-no-rating-badencoder-random9``.) For every detecting gate of the purified encoder (its fitted
``hi`` and ``scale``), the stage maps of the encoder *without* plug-ins are scored both ways on clean test
images and on the same images with the trigger (those not of the target class): ``peak``, the gate's own
score (``ActivationAlignment.excess``: the channels' mean excess at each position, taken where it is
largest), and ``mean``, the excess averaged over the whole map. Each score's threshold is the 0.99
quantile over the first half of the clean images (as the gate is calibrated on clean data); the table
gives the share of triggered images above it, the share of the other clean half above it, and the AUROC.
"any tap" flags an image when one of the taps does. Writes benchmarks/results/gate_scores.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result

from encoder_guard.data import load_dataset
from encoder_guard.encoders import load_encoder
from encoder_guard.encoders.plugins import cube_norms
from encoder_guard.triggers import load_trigger

SCORES = ("mean", "peak")


def score(plugin, x: torch.Tensor, kind: str) -> torch.Tensor:
    """Per sample: the gate's peak score, or the units' excess over ``hi`` (in clean ``scale``) averaged over the map."""
    if kind == "peak":
        return plugin.excess(x)
    values = cube_norms(x) if plugin.granularity == "cube" else x
    return ((values - plugin.hi).relu() / plugin.scale).flatten(1).mean(1)


@torch.no_grad()
def stage_maps(encoder, images: torch.Tensor, taps: list[str], batch: int = 500) -> list[torch.Tensor]:
    parts = [encoder.forward_intermediates(b, taps)[1] for b in images.split(batch)]
    return [torch.cat([p[i] for p in parts]) for i in range(len(taps))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", required=True, help="the encoder the purified one was fitted on (no plug-ins)")
    ap.add_argument("--trigger", required=True)
    ap.add_argument("--target", type=int, default=0, help="the attack's target class (its images are left out)")
    ap.add_argument("--purified", required=True, help="a purifier-plus or purifier-plus-no-rating encoder with gated plug-ins")
    ap.add_argument("--images", type=int, default=4000, help="first N test images")
    ap.add_argument("--quantile", type=float, default=0.99)
    args = ap.parse_args()

    original = load_encoder(args.encoder).eval()
    if original.plugins:
        sys.exit(f"{args.encoder} carries plug-ins; pass the encoder they were fitted on")
    purified = load_encoder(args.purified).eval()
    gates = {t: p for t, p in purified.plugins.items() if getattr(p, "gated", False) and p.detect}
    if not gates:
        sys.exit(f"{args.purified} has no detecting gate (fit Purifier+ with a gate)")
    test = load_dataset("fashion-mnist", "test")
    x = test.images[: args.images].float().div(255)
    y = test.labels[: args.images]
    trigger = load_trigger(args.trigger)
    taps = list(gates)
    clean_maps = stage_maps(original, x, taps)
    trig_maps = stage_maps(original, trigger.apply(x[y != args.target]), taps)
    half = len(x) // 2
    rows, flags = [], {s: ([], []) for s in SCORES}
    with torch.no_grad():
        for tap, mc, mt in zip(taps, clean_maps, trig_maps):
            plugin = gates[tap]
            for kind in SCORES:
                sc, st = score(plugin, mc, kind), score(plugin, mt, kind)
                thr = torch.quantile(sc[:half], args.quantile)
                held = sc[half:]
                auc = roc_auc_score([0] * len(held) + [1] * len(st), torch.cat([held, st]).numpy())
                flags[kind][0].append(held > thr)
                flags[kind][1].append(st > thr)
                rows.append({"tap": tap, "score": kind, "auroc": auc, "triggered_caught": float((st > thr).float().mean()),
                             "clean_caught": float((held > thr).float().mean())})
    for kind, (clean, trig) in flags.items():
        rows.append({"tap": "any tap", "score": kind, "auroc": None,
                     "triggered_caught": float(torch.stack(trig).any(0).float().mean()),
                     "clean_caught": float(torch.stack(clean).any(0).float().mean())})
    lines = [f"## Gate scores: {args.encoder} with {trigger!r}, gates of {args.purified}", "",
             f"Threshold: the clean {args.quantile} quantile over test images 0–{half - 1}; caught shares over the "
             f"other {len(x) - half} clean images and the {len(trig_maps[0])} triggered non-target ones.", "",
             "| tap | score | triggered caught | clean caught | AUROC |", "|---|---|---|---|---|"]
    lines += [f"| {r['tap']} | {r['score']} | {100 * r['triggered_caught']:.1f}% | {100 * r['clean_caught']:.1f}% | "
              + ("" if r["auroc"] is None else f"{r['auroc']:.4f}") + " |" for r in rows]
    write_result("gate_scores", {"args": vars(args), "rows": rows}, lines)


if __name__ == "__main__":
    main()
