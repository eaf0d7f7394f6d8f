"""TAC's target test over seeds: detection rate on backdoored classifiers, false alarms on clean ones.

Usage:
  python benchmarks/tac_detection.py --clean runs/clean/encoder.safetensors \
      --bad runs/badencoder-random6/encoder.safetensors --bad-target 8 \
      --trigger runs/badencoder-random6/trigger.safetensors --seeds 10 --rates 0.05 [--alpha 0.05]
  python benchmarks/tac_detection.py --clean runs/clean/encoder.safetensors --victim finetune \
      --trigger runs/triggers/badnets3.safetensors runs/triggers/blend.safetensors --seeds 10 --rates 0.05

Per seed k (seed k also picks the BadNets target class k mod 10 and the clean reference subset):
- ``clean``: the clean encoder's classifier trained on the clean training set (a false alarm if flagged);
- ``<trigger>-R``: the clean encoder's classifier trained on a set BadNets-poisoned with the trigger at rate R
  to target k;
- ``badencoder`` (with ``--bad``, probe victim only): the BadEncoder encoder (its fixed target) under a clean probe.
The classifier is a linear probe on the frozen encoder (``--victim probe``) or the probe and encoder then
fine-tuned end to end (``--victim finetune``, the fine-tune threat). Writes
benchmarks/results/tac_detection.{json,md} (probe) or tac_detection_finetune.{json,md}.
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


def one(encoder, trigger: str, target: int, rate: float, seed: int, alpha: float, victim: str = "probe") -> dict:
    cfg = {"downstream": {"dataset": "fashion-mnist", "trigger": trigger, "target": target, "poison_rate": rate,
                          "clean_fraction": 0.05, "victim": victim}}
    ds = downstream_setup(cfg, encoder, seed)
    clf = deployed_classifier(cfg, encoder, ds, seed)
    found, _ = detect(clf, cached_features(clf.encoder, ds.data.clean), alpha=alpha)
    return {**found.as_dict(), "seed": seed, "true_target": target, "rate": rate, "asr": ds.evaluate(clf)["asr"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clean", required=True)
    ap.add_argument("--bad", default=None, help="a BadEncoder encoder under a clean probe (probe victim)")
    ap.add_argument("--bad-target", type=int, default=0)
    ap.add_argument("--trigger", nargs="+", required=True, help="trigger files the BadNets sets are poisoned with")
    ap.add_argument("--victim", choices=["probe", "finetune"], default="probe")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--rates", type=float, nargs="+", default=[0.01, 0.05])
    ap.add_argument("--alpha", type=float, default=0.05)
    args = ap.parse_args()
    if args.bad and args.victim != "probe":
        ap.error("--bad is a backdoored encoder under a clean probe: use it with --victim probe")
    clean = load_encoder(args.clean)
    bad = load_encoder(args.bad) if args.bad else None
    poisoned = {f"{Path(t).stem}-{r:g}": (t, r) for t in args.trigger for r in args.rates}
    rows: dict[str, list[dict]] = {"clean": [], **{name: [] for name in poisoned}}
    for s in range(args.seeds):
        rows["clean"].append(one(clean, args.trigger[0], s % 10, 0.0, s, args.alpha, args.victim))
        for name, (trigger, rate) in poisoned.items():
            rows[name].append(one(clean, trigger, s % 10, rate, s, args.alpha, args.victim))
        if bad is not None:
            rows.setdefault("badencoder", []).append(one(bad, args.trigger[0], args.bad_target, 0.0, s, args.alpha))
        print(s, {k: (v[-1]["candidate"], round(v[-1]["p_value"], 4)) for k, v in rows.items()}, flush=True)
    write(rows, vars(args))


def write(rows: dict[str, list[dict]], args: dict) -> None:
    """The summary table (and the rows) into benchmarks/results/."""
    classifier = "linear probe" if args["victim"] == "probe" else "probe then end-to-end fine-tune"
    lines = [f"TAC target test, alpha = {args['alpha']}, {args['seeds']} seeds (Fashion-MNIST, 5% clean references; "
             f"the classifier: {classifier}).", "",
             "| setting | backdoor in | flagged | flagged with the true target | smallest shift at the true target "
             "| mean ASR | median p |", "|---|---|---|---|---|---|---|"]
    summary = {}
    for name, rs in rows.items():
        flagged = sum(r["flagged"] for r in rs)
        named = sum(r["candidate"] == r["true_target"] for r in rs)
        right = sum(r["flagged"] and r["candidate"] == r["true_target"] for r in rs)
        where = {"clean": "nowhere", "badencoder": "encoder"}.get(name, "classifier")
        ps = sorted(r["p_value"] for r in rs)
        summary[name] = {"flagged": flagged, "correct": right, "named": named, "n": len(rs)}
        dash = name == "clean"
        lines.append(f"| {name} | {where} | {flagged}/{len(rs)} | {'—' if dash else right}/{len(rs)} | "
                     f"{'—' if dash else named}/{len(rs)} | {100 * sum(r['asr'] for r in rs) / len(rs):.1f}% | "
                     f"{ps[len(ps) // 2]:.3g} |")
    name = "tac_detection" if args["victim"] == "probe" else f"tac_detection_{args['victim']}"
    write_result(name, {"args": args, "summary": summary, "rows": rows}, lines)

if __name__ == "__main__":
    main()
