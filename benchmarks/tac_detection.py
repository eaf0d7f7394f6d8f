"""TAC's target test over seeds: detection rate on backdoored classifiers, false alarms on clean ones.

Usage:
  python benchmarks/tac_detection.py --clean runs/clean/encoder.safetensors \
      --bad runs/badencoder-random6/encoder.safetensors --bad-target 8 \
      --trigger runs/badencoder-random6/trigger.safetensors --seeds 10 --rates 0.05 [--alpha 0.05]

Per seed k (seed k also picks the BadNets target class k mod 10 and the clean reference subset):
- ``clean``: the clean encoder under a probe trained on the clean training set (a false alarm if flagged);
- ``badnets-R``: the clean encoder under a probe trained on a set BadNets-poisoned at rate R to target k;
- ``badencoder``: the BadEncoder encoder (its fixed target) under a clean probe (seed: probe and references).
Writes benchmarks/results/tac_detection.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result

from downstream.features import cached_features
from encoder_guard.defenses.tac import detect
from encoder_guard.encoders import load_encoder
from encoder_guard.threats import deployed_classifier, downstream_setup


def one(encoder, trigger: str, target: int, rate: float, seed: int, alpha: float) -> dict:
    cfg = {"downstream": {"dataset": "fashion-mnist", "trigger": trigger, "target": target, "poison_rate": rate,
                          "clean_fraction": 0.05}}
    ds = downstream_setup(cfg, encoder, seed)
    clf = deployed_classifier(cfg, encoder, ds, seed)
    found, _ = detect(clf, cached_features(encoder, ds.data.clean), alpha=alpha)
    return {"seed": seed, "target": target, "rate": rate, "asr": ds.evaluate(clf)["asr"], **found.as_dict()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clean", required=True)
    ap.add_argument("--bad", required=True)
    ap.add_argument("--bad-target", type=int, default=0)
    ap.add_argument("--trigger", required=True)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--rates", type=float, nargs="+", default=[0.01, 0.05])
    ap.add_argument("--alpha", type=float, default=0.05)
    args = ap.parse_args()
    clean, bad = load_encoder(args.clean), load_encoder(args.bad)
    rows = {"clean": [], "badencoder": [], **{f"badnets-{r:g}": [] for r in args.rates}}
    for s in range(args.seeds):
        rows["clean"].append(one(clean, args.trigger, s % 10, 0.0, s, args.alpha))
        for r in args.rates:
            rows[f"badnets-{r:g}"].append(one(clean, args.trigger, s % 10, r, s, args.alpha))
        rows["badencoder"].append(one(bad, args.trigger, args.bad_target, 0.0, s, args.alpha))
        print(s, {k: (v[-1]["candidate"], round(v[-1]["p_value"], 4)) for k, v in rows.items()}, flush=True)
    lines = [f"TAC target test, alpha = {args.alpha}, {args.seeds} seeds (Fashion-MNIST, 5% clean references).", "",
             "| setting | backdoor in | flagged | flagged with the true target | mean ASR | median p |",
             "|---|---|---|---|---|---|"]
    summary = {}
    for name, rs in rows.items():
        flagged = sum(r["flagged"] for r in rs)
        right = sum(r["flagged"] and r["candidate"] == r["target"] for r in rs)
        where = {"clean": "nowhere", "badencoder": "encoder"}.get(name, "probe")
        ps = sorted(r["p_value"] for r in rs)
        summary[name] = {"flagged": flagged, "correct": right, "n": len(rs)}
        lines.append(f"| {name} | {where} | {flagged}/{len(rs)} | {right if name != 'clean' else '—'}/{len(rs)} | "
                     f"{100 * sum(r['asr'] for r in rs) / len(rs):.1f}% | {ps[len(ps) // 2]:.3g} |")
    write_result("tac_detection", {"args": vars(args), "summary": summary, "rows": rows}, lines)


if __name__ == "__main__":
    main()
