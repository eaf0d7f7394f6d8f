"""Run a registered defense in a run directory: its data, the defense, the defended checkpoint, a report.

Writes ``RUN/encoder.safetensors`` (loads like any other checkpoint), ``RUN/report.json`` (what the defense
did, the data it used, wall time) and the usual ``RUN/config.yaml`` and ``RUN/log.txt``. A classifier-level
defense (``level = "classifier"``) also writes ``RUN/head.safetensors``, and its report holds the
classifier's CA and ASR before and after (``downstream`` config section, see ``defenses.downstream``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from encoder_guard.checkpointing import check_run_dir
from encoder_guard.data import load_dataset
from encoder_guard.data.subsets import take_subset
from encoder_guard.defenses.base import DEFENSES, DefenseData, defense_level
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
    level = defense_level(name)
    # a classifier-level run is finished once its report is written (it saves the classifier just before)
    done = out / ("report.json" if level == "classifier" else "encoder.safetensors")
    if done.exists() and not resume:
        raise EncoderGuardError(f"{out} already holds a defended model; choose another --out")
    seed = int(cfg.get("seed", 0))
    train = cfg.get("train") or {}
    try:
        defense = DEFENSES.get(name)(**(cfg.get("defense") or {}), seed=seed, device=train.get("device", "cpu"))
    except ValueError as exc:  # a setting out of range: one line naming it, before any run directory is made
        raise EncoderGuardError(f"defend {name}: {exc}; change that value in the config or its --set") from exc
    check_run_dir(out, out / "checkpoints", resume)
    run = RunDir(out, cfg)
    if train.get("threads"):
        torch.set_num_threads(int(train["threads"]))
    if level == "classifier":
        return _run_classifier_defense(name, defense, cfg, encoder, out, run, resume)
    data = defense_data(cfg, encoder, seed) if getattr(defense, "uses_clean", True) else DefenseData(None, 0)
    if data.clean is None:
        run.logger.info(f"defend {name} → {out}: data-free")
    else:
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


def _run_classifier_defense(name: str, defense: Any, cfg: dict[str, Any], encoder: Encoder, out: Path, run: RunDir,
                            resume: bool) -> dict[str, Any]:
    from downstream.classifier import save_classifier
    from encoder_guard.defenses.downstream import compare_metrics, deployed_classifier, downstream_setup

    seed = int(cfg.get("seed", 0))
    ds = downstream_setup(cfg, encoder, seed, clean=getattr(defense, "uses_clean", True))
    clf = deployed_classifier(cfg, encoder, ds, seed)
    before = ds.evaluate(clf)
    run.logger.info(f"defend {name} → {out}: classifier before: {_summary(before)}; data {ds.data.usage()}")
    t0 = time.perf_counter()
    result = defense.run(clf, ds.data, out, resume)
    wall = time.perf_counter() - t0
    after = ds.evaluate(result.encoder)
    save_classifier(result.encoder, out)
    report = {"defense": name, **result.report, "before": before, "after": after, **compare_metrics(before, after),
              "wall_seconds": wall}
    run.write_json("report.json", report)
    run.logger.info(f"after: {_summary(after)} ({wall:.0f} s) → {out / 'head.safetensors'}")
    return report


def _summary(m: dict[str, Any]) -> str:
    return f"CA {m['ca']:.2%}" + (f", ASR {m['asr']:.2%}" if "asr" in m else "")
