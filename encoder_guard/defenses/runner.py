"""Run a registered defense in a run directory: clean data, the defense, the defended checkpoint, a report.

Writes ``RUN/encoder.safetensors`` (loads like any other checkpoint), ``RUN/report.json`` (what the defense
did, the clean data it used, wall time) and the usual ``RUN/config.yaml`` and ``RUN/log.txt``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from encoder_guard.checkpointing import check_run_dir
from encoder_guard.data import load_dataset
from encoder_guard.data.subsets import take_subset
from encoder_guard.defenses.base import DEFENSES, DefenseData
from encoder_guard.encoders import Encoder, save_encoder
from encoder_guard.errors import EncoderGuardError
from encoder_guard.runs import RunDir

MAX_SHARE = 0.05  # the clean-data budget of the threat model (DESIGN.md, "Defense bar")


def defense_data(cfg: dict[str, Any], encoder: Encoder, seed: int) -> DefenseData:
    """The defender's clean images: a seeded share of the pretraining set, at most 5% unless allowed."""
    d = cfg["data"]
    full = load_dataset(d["dataset"], d.get("split", "train"), d.get("root"), encoder.spec.input_size)
    if full.channels != encoder.spec.in_chans:
        raise EncoderGuardError(f"{full.name} has {full.channels}-channel images but the encoder takes "
                                f"{encoder.spec.in_chans}; use the encoder's pretraining data")
    clean = take_subset(full, d.get("fraction"), d.get("count"), bool(d.get("balanced", False)), seed)
    if len(clean) > MAX_SHARE * len(full) + 1 and not d.get("allow_more", False):
        raise EncoderGuardError(
            f"{len(clean):,} clean images are {len(clean) / len(full):.1%} of {full.name}/{full.split}; the threat model "
            f"grants at most {MAX_SHARE:.0%}. Lower data.fraction/data.count, or pass --set data.allow_more=true"
        )
    return DefenseData(clean, len(full))


def run_defense(name: str, cfg: dict[str, Any], encoder: Encoder, out: Path, resume: bool = False) -> dict[str, Any]:
    out = Path(out)
    if (out / "encoder.safetensors").exists() and not resume:
        raise EncoderGuardError(f"{out} already holds a defended encoder; choose another --out")
    check_run_dir(out, out / "checkpoints", resume)
    run = RunDir(out, cfg)
    seed = int(cfg.get("seed", 0))
    train = cfg.get("train") or {}
    if train.get("threads"):
        torch.set_num_threads(int(train["threads"]))
    data = defense_data(cfg, encoder, seed)
    defense = DEFENSES.get(name)(**(cfg.get("defense") or {}), seed=seed, device=train.get("device", "cpu"))
    run.logger.info(f"defend {name} → {out}: {len(data.clean):,} clean images "
                    f"({data.usage()['share_of_pretraining_set']:.1%} of {data.clean.name}/{data.clean.split})")
    t0 = time.perf_counter()
    result = defense.run(encoder, data, out, resume)
    wall = time.perf_counter() - t0
    result.encoder.spec.provenance = dict(result.encoder.spec.provenance, defense=name)
    save_encoder(result.encoder, out / "encoder.safetensors", {"defense": name})
    report = {"defense": name, **result.report, "wall_seconds": wall}
    run.write_json("report.json", report)
    run.logger.info(f"defended encoder → {out / 'encoder.safetensors'} ({wall:.0f} s)")
    return report
