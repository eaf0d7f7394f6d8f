"""PAD-FT's self-purification: what the selection keeps, and what keeping only those samples costs.

Usage:
  python benchmarks/padft_selection.py --encoder runs/clean/encoder.safetensors \
      --trigger runs/bad/trigger.safetensors --target 0 --rate 0.05 --seeds 0 1 2

For each seed, PAD-FT (the preset, and variants) on two downstream training sets built from the same
encoder: BadNets-poisoned at ``--rate`` and the clean one. On the clean set every removed sample is a
clean one, so the CA lost there is the cost of the selection itself, apart from any poison.
Writes benchmarks/results/padft_selection.json and .md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

from encoder_guard.defenses.downstream import deployed_classifier, downstream_setup  # noqa: E402
from encoder_guard.defenses.padft import PADFT  # noqa: E402
from encoder_guard.encoders import load_encoder  # noqa: E402

VARIANTS = {
    "preset": {},
    "drop in every class": {"drop": "all"},
    "the preset until session 16 (every class, consistency 1)": {"drop": "all", "consistency": 1.0},
    "preset, consistency 1": {"consistency": 1.0},
    "first selection only": {"second_pass": False},
    "preset, no clip / weight decay": {"clip_quantile": None, "weight_decay": 0.0},
    "keep all, preset fine-tuning": {"keep": 1.0, "second_pass": False},
    "keep all, no clip / weight decay": {"keep": 1.0, "second_pass": False, "clip_quantile": None, "weight_decay": 0.0},
}


def flags(rs: list[dict]) -> str:
    """The classes the one-sided-confusion test flagged, seed by seed ("-" where it did not run)."""
    if all(r["flagged"] is None for r in rs):
        return "-"
    return "; ".join(",".join(map(str, r["flagged"])) or "none" for r in rs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", required=True)
    ap.add_argument("--trigger", required=True)
    ap.add_argument("--target", type=int, default=0)
    ap.add_argument("--rate", type=float, default=0.05)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = ap.parse_args()
    encoder = load_encoder(args.encoder)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for rate in (args.rate, 0.0):
                cfg = {"downstream": {"dataset": "fashion-mnist", "trigger": args.trigger, "target": args.target,
                                      "poison_rate": rate}}
                ds = downstream_setup(cfg, encoder, seed, clean=False)
                clf = deployed_classifier(cfg, encoder, ds, seed)
                before = ds.evaluate(clf)
                for name, overrides in VARIANTS.items():
                    result = PADFT(seed=seed, **overrides).run(clf, ds.data, Path(tmp))
                    after, sel = ds.evaluate(result.encoder), result.report["selection"]
                    rows.append({"seed": seed, "poison_rate": rate, "variant": name, "overrides": overrides,
                                 "ca_before": before["ca"], "asr_before": before["asr"], "ca": after["ca"],
                                 "asr": after["asr"], "kept": sel["kept"], "of": sel["of"],
                                 "poisoned_kept": sel.get("poisoned_kept"),
                                 "flagged": (result.report["relabelled"] or {}).get("flagged_classes")})
                    print(rows[-1], flush=True)
    lines = [f"PAD-FT selection on {args.encoder}, trigger {args.trigger} (target {args.target}), seeds {args.seeds}; "
             "linear classifier CA / ASR on the Fashion-MNIST test set, means over seeds.", "",
             "| training set | variant | kept | poisoned kept | CA before | CA after | ASR before | ASR after | classes flagged (per seed) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for rate in (args.rate, 0.0):
        for name in VARIANTS:
            rs = [r for r in rows if r["poison_rate"] == rate and r["variant"] == name]
            mean = lambda k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
            pk = "-" if rs[0]["poisoned_kept"] is None else f"{mean('poisoned_kept'):.0f}"
            lines.append(f"| {'BadNets ' + format(rate, '.0%') if rate else 'clean'} | {name} | {mean('kept'):,.0f} of "
                         f"{rs[0]['of']:,} | {pk} | {mean('ca_before'):.1%} | {mean('ca'):.1%} | {mean('asr_before'):.1%} | "
                         f"{mean('asr'):.1%} | {flags(rs)} |")
    write_result("padft_selection", {"args": vars(args), "rows": rows}, lines)


if __name__ == "__main__":
    main()
