"""Poisoned pretraining (SSL-Backdoor patch, CTRL frequency trigger, CorruptEncoder placement): CA and ASR per cell.

Every cell is one ``pretrain`` run with ``poison.kind``/``poison.rate``/``poison.placement`` set, evaluated with the trigger the
run wrote (linear probe and kNN, non-target test images), beside the same trigger's ASR on a reference
clean encoder (chance level). A cell whose encoder exists is not retrained; one killed midway resumes.

Usage: python benchmarks/poisoned_pretraining.py [--methods simclr byol] [--kinds patch ctrl]
       [--rates 0.05 0.01] [--placements stamp corrupt] [--epochs 25 50] [--object-scales 0.5]
       [--target 0] [--reference runs/clean/encoder.safetensors] [--root runs/poison] [--set key=value ...]
       [--report-only]
Writes RUN/eval.json per cell (read back, not recomputed, on a rerun) and benchmarks/results/poisoned_pretraining.{json,md}.
The table lists every evaluated cell under ``--root``, so that runs with different grids add up to one curve (ASR
against rate, schedule and placement); ``--report-only`` trains nothing.
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
from encoder_guard.config import load_config, load_yaml
from encoder_guard.data import load_dataset
from encoder_guard.encoders import load_encoder
from encoder_guard.triggers import load_trigger
from pretrain import pretrain
from pretrain.trainer import CHECKPOINT

PRESETS = {"simclr": "fmnist-tiny", "byol": "fmnist-tiny-byol"}


def cell_name(method: str, kind: str, rate: float, placement: str, epochs: int | None = None,
              object_scale: float | None = None, tile: bool = False) -> str:
    """``simclr-patch-0.05[-corrupt][-o0.35][-tiled][-e50]``: the preset's schedule and object scale are left out."""
    name = f"{method}-{kind}-{rate:g}" + ("" if placement == "stamp" else f"-{placement}")
    if object_scale is not None:
        name += f"-o{object_scale:g}"
    if tile:
        name += "-tiled"
    return name + ("" if epochs is None else f"-e{epochs}")


def run_cell(method: str, kind: str, rate: float, placement: str, target: int, root: Path, overrides: list[str],
             train: bool = True, epochs: int | None = None, object_scale: float | None = None,
             tile: bool = False) -> tuple[Path, float | None]:
    """The cell's run directory and its pretraining seconds (``None``: not trained and ``train`` is off)."""
    out = root / cell_name(method, kind, rate, placement, epochs, object_scale, tile)
    sets = [f"poison.kind={kind}", f"poison.rate={rate}", f"poison.target={target}", f"poison.placement={placement}",
            *([] if epochs is None else [f"optim.epochs={epochs}"]),
            *([] if object_scale is None else [f"poison.object_scale={object_scale}"]),
            *(["poison.tile=true"] if tile else []), *overrides]
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
    ap.add_argument("--epochs", nargs="+", type=int, default=[None],
                    help="pretraining epochs (default: the preset's: 25 SimCLR, 15 BYOL)")
    ap.add_argument("--object-scales", nargs="+", type=float, default=[None],
                    help="corrupt placement: the object's side as a share of the image's (default: the preset's 0.5)")
    ap.add_argument("--tile", action="store_true", help="corrupt placement: repeat the trigger off the object")
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
    grid = [(r, m, k, p, e, o) for r in args.rates for m in args.methods for k in args.kinds for p in args.placements
            for e in args.epochs for o in (args.object_scales if p == "corrupt" else [None])]
    for rate, method, kind, placement, epochs, scale in grid:
        out, seconds = run_cell(method, kind, rate, placement, args.target, Path(args.root), args.set,
                                not args.report_only, epochs, scale, args.tile and placement == "corrupt")
        done = out / "eval.json"  # a cell is evaluated once; a rerun reads it back
        if seconds is None or done.exists():
            continue
        trigger = load_trigger(out / "trigger.safetensors")
        kw = dict(trigger=trigger, trigger_key=trigger.key(), target=args.target)
        m = evaluate_encoder(load_encoder(out / "encoder.safetensors"), train, test, ecfg, **kw)
        cfg = load_yaml(out / "config.yaml")
        row = {"method": method, "kind": kind, "placement": placement, "rate": rate, "target": args.target,
               "epochs": cfg["optim"]["epochs"], "object_scale": cfg["poison"].get("object_scale"),
               "tile": bool(cfg["poison"].get("tile")),
               "run": str(out), "overrides": args.set,
               "pretrain_seconds": seconds, **{k: m[k] for k in ("ca_linear", "ca_knn", "asr_linear", "asr_knn")}}
        if reference is not None:  # one evaluation per trigger: cells of the same kind share it
            if trigger.key() not in on_reference:
                on_reference[trigger.key()] = evaluate_encoder(reference, train, test, ecfg, **kw)
            r = on_reference[trigger.key()]
            row.update(ref_asr_linear=r["asr_linear"], ref_asr_knn=r["asr_knn"])
        done.write_text(json.dumps(row, indent=2))
        print(json.dumps(row))
    rows = sorted((json.loads(p.read_text()) for p in Path(args.root).glob("*/eval.json")),
                  key=lambda r: (r["method"], r["kind"], r.get("placement", "stamp"), r["rate"], r.get("epochs", 0),
                                 r.get("object_scale") or 0, r.get("tile", False)))
    lines = ["## Poisoned pretraining: every evaluated cell", "",
             "| method | trigger | target | placement | object scale | rate | epochs | CA linear | CA kNN | ASR linear "
             "| ASR kNN | same trigger on clean encoder (lin / kNN) | training since the last resume |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = f"{r['ref_asr_linear']:.1%} / {r['ref_asr_knn']:.1%}" if "ref_asr_linear" in r else "—"
        placement = r.get("placement", "stamp")
        scale = f"{r['object_scale']:g}" if placement == "corrupt" and r.get("object_scale") else "—"
        placement += ", tiled" if r.get("tile") else ""
        lines.append(f"| {r['method']} | {r['kind']} | {r['target']} | {placement} | {scale} | {r['rate']:.0%} "
                     f"| {r.get('epochs', '—')} "
                     f"| {r['ca_linear']:.2%} | {r['ca_knn']:.2%} | "
                     f"{r['asr_linear']:.2%} | {r['asr_knn']:.2%} | {ref} | {r['pretrain_seconds'] / 60:.1f} min |")
    write_result("poisoned_pretraining", {"overrides": args.set, "reference": args.reference, "rows": rows}, lines)


if __name__ == "__main__":
    main()
