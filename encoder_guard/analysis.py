"""``encoder-guard analyze mi``: per-stage MI of an encoder as a table, a JSON file and a bar plot."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import torch

from encoder_guard.config import parse_value
from encoder_guard.data import load_dataset
from encoder_guard.encoders import TAP_NAMES, Encoder
from encoder_guard.errors import EncoderGuardError
from encoder_guard.mi import build_estimator
from encoder_guard.mi.layers import layer_mutual_information, mi_weights
from encoder_guard.runs import RunDir
from encoder_guard.utils import seeded_choice


def mi_report(encoder: Encoder, dataset: str, root: str | None, samples: int, estimator: str, pool: int, seed: int,
              out: Path, sets: Sequence[str] = ()) -> list[dict[str, Any]]:
    opts: dict[str, Any] = {}
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep:
            raise EncoderGuardError(f"--set wants KEY=VALUE, got {item!r}")
        opts[key.strip()] = parse_value(raw)
    est = build_estimator(estimator, **{"seed": seed, **opts})
    run = RunDir(out, {"encoder_digest": encoder.digest(), "dataset": dataset, "samples": samples,
                       "estimator": repr(est), "pool": pool, "seed": seed})
    ds = load_dataset(dataset, "train", root, encoder.spec.input_size)
    if ds.channels != encoder.spec.in_chans:
        raise EncoderGuardError(f"{dataset} has {ds.channels}-channel images; the encoder takes {encoder.spec.in_chans}")
    images = ds.images[seeded_choice(torch.arange(len(ds)), samples, seed)].float().div(255)
    t0 = time.perf_counter()
    rows = [r.to_dict() for r in layer_mutual_information(encoder, images, est, TAP_NAMES, pool)]
    for r, w in zip(rows, mi_weights([r["mi"] for r in rows])):
        r["weight"] = w
    run.write_json("mi.json", {"rows": rows, "estimator": repr(est), "pool": pool, "samples": len(images),
                               "seconds": time.perf_counter() - t0})
    if not _bar_plot(rows, out / "mi.png", repr(est)):
        run.logger.warning("matplotlib is not installed: no mi.png (pip install 'encoder-guard[plot]')")
    run.logger.info("MI (nats): " + ", ".join(f"{r['tap']} {r['mi']:.3f}" for r in rows))
    return rows


def _bar_plot(rows: list[dict[str, Any]], path: Path, title: str) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar([r["tap"] for r in rows], [r["mi"] for r in rows], color="#4c72b0")
    ax.set_ylabel("I(stage; final features) [nats]")
    ax.set_title(title if len(title) < 60 else title[:57] + "...", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
