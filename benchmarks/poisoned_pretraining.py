"""Poisoned pretraining (SSL-Backdoor patch, CTRL frequency trigger, CorruptEncoder placement): CA and ASR per cell.

Every cell is one ``pretrain`` run with ``poison.kind``/``poison.rate``/``poison.placement`` set, evaluated with the trigger the
run wrote (linear probe and kNN, non-target test images), beside the same trigger's ASR on a reference
clean encoder (chance level). A cell whose encoder exists is not retrained; one killed midway resumes.

Usage: python benchmarks/poisoned_pretraining.py [--methods simclr byol] [--kinds patch ctrl]
       [--rates 0.05 0.01] [--placements stamp corrupt] [--target 0] [--reference runs/clean/encoder.safetensors] [--root runs/poison]
       [--set optim.epochs=2 ...] [--report-only]
Writes RUN/eval.json per cell (read back, not recomputed, on a rerun) and benchmarks/results/poisoned_pretraining.{json,md};
``--report-only`` tabulates the cells already trained (others are listed as not run) without training any.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result

from downstream import EvalConfig, evaluate_encoder
from encoder_guard.config import load_config
from encoder_guard.data import load_dataset
from encoder_guard.encoders import load_encoder
from encoder_guard.triggers import load_trigger
from pretrain import pretrain
from pretrain.trainer import CHECKPOINT

PRESETS = {"simclr": "fmnist-tiny", "byol": "fmnist-tiny-byol"}


def run_cell(method: str, kind: str, rate: float, placement: str, target: int, root: Path, overrides: list[str],
             train: bool = True) -> tuple[Path, float | None]:
    """The cell's run directory and its pretraining seconds (``None``: not trained and ``train`` is off)."""
    out = root / (f"{method}-{kind}-{rate:g}" + ("" if placement == "stamp" else f"-{placement}"))
    sets = [f"poison.kind={kind}", f"poison.rate={rate}", f"poison.target={target}", f"poison.placement={placement}",
            *overrides]
    if (out / "encoder.safetensors").exists():  # trained by an earlier run: the training loop's own time
        return out, json.loads((out / "metrics.json").read_text()).get("train_seconds_since_resume", float("nan"))
    if not train:
        return out, None
    cfg = load_config(PRESETS[method], "pretrain", sets)
    t0 = time.perf_counter()
    pretrain(cfg, out, resume=(out / CHECKPOINT).exists())
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["simclr", "byol"], choices=sorted(PRESETS))
    ap.add_argument("--kinds", nargs="+", default=["patch", "ctrl"])
    ap.add_argument("--rates", nargs="+", type=float, default=[0.05, 0.01])
    ap.add_argument("--placements", nargs="+", default=["stamp"], choices=["stamp", "corrupt"],
                    help="stamp: the trigger on target images; corrupt: CorruptEncoder's object and trigger apart")
    ap.add_argument("--target", type=int, default=0)
    ap.add_argument("--reference", default="runs/clean/encoder.safetensors")
    ap.add_argument("--root", default="runs/poison")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--report-only", action="store_true", help="tabulate trained cells, train none")
    args = ap.parse_args()
    train, test = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    reference = load_encoder(args.reference) if args.reference else None
    ecfg = EvalConfig()
    rows: list[dict] = []
    on_reference: dict[str, dict] = {}
    for rate in args.rates:
        for method in args.methods:
            for kind, placement in ((k, p) for k in args.kinds for p in args.placements):
                out, seconds = run_cell(method, kind, rate, placement, args.target, Path(args.root), args.set,
                                        not args.report_only)
                if seconds is None:
                    rows.append({"method": method, "kind": kind, "placement": placement, "rate": rate,
                                 "target": args.target, "run": None})
                    continue
                done = out / "eval.json"  # a cell is evaluated once; a rerun reads it back
                if done.exists():
                    rows.append(json.loads(done.read_text()))
                    continue
                trigger = load_trigger(out / "trigger.safetensors")
                kw = dict(trigger=trigger, trigger_key=trigger.key(), target=args.target)
                m = evaluate_encoder(load_encoder(out / "encoder.safetensors"), train, test, ecfg, **kw)
                row = {"method": method, "kind": kind, "placement": placement, "rate": rate, "target": args.target,
                       "run": str(out),
                       "pretrain_seconds": seconds, **{k: m[k] for k in ("ca_linear", "ca_knn", "asr_linear", "asr_knn")}}
                if reference is not None:  # one evaluation per trigger: cells of the same kind share it
                    if trigger.key() not in on_reference:
                        on_reference[trigger.key()] = evaluate_encoder(reference, train, test, ecfg, **kw)
                    r = on_reference[trigger.key()]
                    row.update(ref_asr_linear=r["asr_linear"], ref_asr_knn=r["asr_knn"])
                done.write_text(json.dumps(row, indent=2))
                rows.append(row)
                print(json.dumps(row))
    lines = [f"## Poisoned pretraining, target class {args.target} {' '.join(args.set)}", "",
             "| method | trigger | placement | rate | CA linear | CA kNN | ASR linear | ASR kNN "
             "| same trigger on clean encoder (lin / kNN) | training since the last resume |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["run"] is None:
            lines.append(f"| {r['method']} | {r['kind']} | {r['placement']} | {r['rate']:.0%} | not run | | | | | |")
            continue
        ref = f"{r['ref_asr_linear']:.1%} / {r['ref_asr_knn']:.1%}" if "ref_asr_linear" in r else "—"
        lines.append(f"| {r['method']} | {r['kind']} | {r.get('placement', 'stamp')} | {r['rate']:.0%} "
                     f"| {r['ca_linear']:.2%} | {r['ca_knn']:.2%} | "
                     f"{r['asr_linear']:.2%} | {r['asr_knn']:.2%} | {ref} | {r['pretrain_seconds'] / 60:.1f} min |")
    write_result("poisoned_pretraining", {"overrides": args.set, "reference": args.reference, "rows": rows}, lines)


if __name__ == "__main__":
    main()
