"""Defenses side by side on one backdoored encoder: CA, ASR, RA (linear, kNN) and wall time per cell.

Usage:
  python benchmarks/defense_table.py --attack runs/badencoder --clean runs/clean/encoder.safetensors \
      --cell mimic --cell finetune --cell "mimic-uniform=mimic:defense.stage_weights=uniform" ... --tag mimic

A cell is ``LABEL=DEFENSE[:KEY=VALUE,KEY=VALUE...]`` (or just ``DEFENSE``). Each runs with
``encoder_guard.defenses.runner.run_defense`` into ``runs/defense-<tag>/<label>`` and is evaluated under
the protocol (Fashion-MNIST train/test, linear probe + kNN, ASR on non-target test images; RA, the robust
accuracy, is the share of those triggered images still given their true class: a defense can cut ASR by
leaving them unrecognisable). Finished cells
(their ``eval.json`` exists) are read back, not recomputed. ``--pretrain-seconds`` turns wall times into
shares of the clean pretraining time. Writes benchmarks/results/defense_<tag>.json and .md; rows of earlier
runs with the same tag and attack that this run does not name are kept, so running one more cell adds a row.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, write_result  # noqa: E402

from downstream import EvalConfig, evaluate_encoder  # noqa: E402
from encoder_guard.config import load_config  # noqa: E402
from encoder_guard.data import load_dataset  # noqa: E402
from encoder_guard.defenses.runner import run_defense  # noqa: E402
from encoder_guard.encoders import load_encoder  # noqa: E402
from encoder_guard.triggers import load_trigger  # noqa: E402

KEYS = ("ca_linear", "ca_knn", "asr_linear", "asr_knn")
RA_KEYS = ("ra_linear", "ra_knn")  # since session 28; cells evaluated before have none


def merge_rows(earlier: list[dict], rows: list[dict]) -> tuple[list[dict], list[str]]:
    """Earlier rows in their order, each replaced by this run's row of the same cell, this run's new cells
    last; and the cells kept from earlier that this run did not name."""
    fresh = {r["cell"]: r for r in rows}
    kept = [r["cell"] for r in earlier if r["cell"] not in fresh]
    merged = [fresh.pop(r["cell"], r) for r in earlier]
    return merged + [r for r in rows if r["cell"] in fresh], kept


def parse_cell(text: str) -> tuple[str, str, list[str]]:
    label, _, rest = text.partition("=") if "=" in text.split(":")[0] else (text.split(":")[0], "", text)
    name, _, sets = rest.partition(":")
    return label, name, [s for s in sets.split(",") if s]


def evaluate(path: Path, trigger, target: int, train, test, device: str = "cpu") -> dict:
    m = evaluate_encoder(load_encoder(path), train, test, EvalConfig(cache=False, device=device), trigger=trigger,
                         trigger_key=trigger.key(), target=target)
    return {k: m[k] for k in KEYS + RA_KEYS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attack", required=True, help="attack or poisoned-pretraining run directory (encoder.safetensors, "
                    "trigger.safetensors, config.yaml)")
    ap.add_argument("--clean", default=None, help="the clean encoder the attack started from (a reference row)")
    ap.add_argument("--cell", action="append", default=[], help="LABEL=DEFENSE[:KEY=VALUE,...]")
    ap.add_argument("--set", action="append", default=[], help="override applied to every cell")
    ap.add_argument("--tag", required=True)
    ap.add_argument("--pretrain-seconds", type=float, default=None)
    ap.add_argument("--eval-device", default="cpu", help="where evaluation extracts features (cpu, cuda); "
                    "a cell's own training device is its train.device key (e.g. --set train.device=cuda)")
    args = ap.parse_args()
    attack = Path(args.attack)
    from encoder_guard.config import load_yaml

    cfg = load_yaml(attack / "config.yaml")  # an attack run, or a poisoned pretraining run (poison.target)
    target = int(cfg["target"] if "target" in cfg else cfg["poison"]["target"])
    trigger = load_trigger(attack / "trigger.safetensors")
    train, test = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    root = Path("runs") / f"defense-{args.tag}"
    rows = []
    refs = [("backdoored (no defense)", attack / "encoder.safetensors")] + ([("clean encoder", Path(args.clean))] if args.clean else [])
    for label, path in refs:
        cache = root / f"_ref-{label.split()[0]}.json"
        if not cache.exists():
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(evaluate(path, trigger, target, train, test, args.eval_device)))
        rows.append({"cell": label, "defense": "-", "overrides": [], **json.loads(cache.read_text()), "wall_seconds": None})
        print(rows[-1], flush=True)
    backdoored = load_encoder(attack / "encoder.safetensors")
    for text in args.cell:
        label, name, sets = parse_cell(text)
        out = root / label
        done = out / "eval.json"
        if not done.exists():
            if (out / "encoder.safetensors").exists():
                report = json.loads((out / "report.json").read_text())
            else:
                resume = (out / "checkpoints").exists()
                t0 = time.perf_counter()
                report = run_defense(name, load_config(name, "defend", args.set + sets), backdoored, out, resume=resume)
                report.setdefault("wall_seconds", time.perf_counter() - t0)
            metrics = evaluate(out / "encoder.safetensors", trigger, target, train, test, args.eval_device)
            done.write_text(json.dumps({**metrics, "wall_seconds": report["wall_seconds"],
                                        "clean_images": report["data"]["images"]}))
        rows.append({"cell": label, "defense": name, "overrides": args.set + sets, **json.loads(done.read_text())})
        print(rows[-1], flush=True)
    previous = RESULTS / f"defense_{args.tag}.json"
    if previous.exists():
        earlier = json.loads(previous.read_text())
        if earlier.get("attack") == str(attack):
            rows, kept = merge_rows(earlier["rows"], rows)
            if kept:
                print(f"kept {len(kept)} earlier row(s) of {previous.name} not named here: {', '.join(kept)}")
        else:
            print(f"{previous.name} was written for {earlier.get('attack')}, not {attack}: replacing it")
    lines = [f"## Defenses on {attack} (target {target}, {trigger!r})", "",
             "| cell | defense | overrides | CA linear | CA kNN | ASR linear | ASR kNN | RA linear | RA kNN | wall time "
             "| share of pretraining |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        wall = f"{r['wall_seconds']:.0f} s" if r.get("wall_seconds") else "-"
        share = f"{r['wall_seconds'] / args.pretrain_seconds:.1%}" if r.get("wall_seconds") and args.pretrain_seconds else "-"
        lines.append(f"| {r['cell']} | {r['defense']} | {' '.join(r['overrides']) or '-'} | "
                     + " | ".join(f"{r[k]:.1%}" if k in r else "-" for k in KEYS + RA_KEYS) + f" | {wall} | {share} |")
    write_result(f"defense_{args.tag}", {"attack": str(attack), "target": target, "trigger": repr(trigger),
                                         "pretrain_seconds": args.pretrain_seconds, "rows": rows}, lines)


if __name__ == "__main__":
    main()
