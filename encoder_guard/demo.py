"""``make demo``: the whole loop on Fashion-MNIST in minutes on a laptop CPU.

Pretrains SimCLR with the ``fmnist-tiny`` preset on a shorter schedule than the preset's (the demo says
so), evaluates it with the linear probe and kNN, puts the raw-pixel baselines beside it, and prints a
table. Each stage is skipped when its results are already in the run directory, and an interrupted
pretraining resumes, so running the demo again continues where it stopped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from encoder_guard.runs import RunDir

DEMO_EPOCHS = 3


def _table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    cells = [[title for _, title in columns]] + [[str(r.get(k, "")) for k, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def run_demo(out: Path, epochs: int | None = None, resume: bool = False) -> int:
    from downstream import EvalConfig, evaluate_encoder
    from downstream.baselines import raw_pixel_metrics
    from encoder_guard.config import load_config
    from encoder_guard.data import load_dataset
    from encoder_guard.encoders import load_encoder
    from pretrain import pretrain

    epochs = epochs or DEMO_EPOCHS
    run = RunDir(out, {"demo": {"preset": "fmnist-tiny", "epochs": epochs}})
    log = run.logger
    preset = load_config("fmnist-tiny", "pretrain")
    log.info(
        f"encoder-guard demo → {out}\n"
        f"  1/3 pretrain SimCLR on Fashion-MNIST (preset fmnist-tiny, shortened to {epochs} of its "
        f"{preset['optim']['epochs']} epochs for the demo)\n  2/3 linear probe + kNN on frozen features\n"
        "  3/3 raw-pixel baselines under the same protocol"
    )
    t0 = time.perf_counter()
    cfg = load_config("fmnist-tiny", "pretrain", [f"optim.epochs={epochs}"])
    pre_dir = out / "pretrain"
    if (pre_dir / "encoder.safetensors").is_file() and (pre_dir / "metrics.json").is_file():
        log.info(f"[1/3] pretraining already done in {pre_dir}, reusing it")
    else:
        pretrain(cfg, pre_dir, resume=(pre_dir / "checkpoints" / "last.pt").is_file())
    t_pre = time.perf_counter() - t0

    log.info("[2/3] evaluating the encoder (linear probe, kNN k=200 T=0.1)")
    train, test = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    enc = load_encoder(pre_dir / "encoder.safetensors")
    m = evaluate_encoder(enc, train, test, EvalConfig())
    log.info("[3/3] raw-pixel baselines")
    raw_path = out / "raw_pixels.json"
    raw = json.loads(raw_path.read_text()) if raw_path.is_file() else raw_pixel_metrics(train, test)
    run.write_json("raw_pixels.json", raw)
    total = time.perf_counter() - t0
    metrics = {"simclr": {k: m[k] for k in ("ca_linear", "ca_knn")}, "raw_pixels": raw, "epochs": epochs,
               "pretrain_seconds": t_pre, "total_seconds": total}
    run.write_json("metrics.json", metrics)
    rows = [
        {"enc": f"SimCLR fmnist-tiny ({epochs} ep)", "lin": _pct(m["ca_linear"]), "knn": _pct(m["ca_knn"])},
        {"enc": "raw pixels (784-d)", "lin": _pct(raw["ca_linear"]), "knn": _pct(raw["ca_knn"])},
    ]
    print()
    print(_table(rows, [("enc", "encoder"), ("lin", "CA linear"), ("knn", "CA kNN")]))
    print(f"\nFashion-MNIST test set (10,000 images); demo wall time {total / 60:.1f} min; run directory {out}")
    print(f"The full preset ({preset['optim']['epochs']} epochs): encoder-guard pretrain --config fmnist-tiny --out runs/fmnist-tiny")
    return 0
