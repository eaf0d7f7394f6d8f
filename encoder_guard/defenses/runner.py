"""Run a registered defense in a run directory: its data, the defense, the defended model, a report.

Writes ``RUN/encoder.safetensors`` (loads like any other checkpoint), ``RUN/report.json`` (what the defense
did, the data it used, wall time) and the usual ``RUN/config.yaml`` (with the defense's resolved
hyperparameters) and ``RUN/log.txt``. A classifier-level defense also writes ``RUN/head.safetensors``, and
its report holds the classifier's CA and ASR before and after (``downstream`` config section, see
:mod:`encoder_guard.threats`). Under ``torchrun`` a defense that trains (MIMIC and its baselines) splits
every batch over the processes, and only rank 0 writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, cast

import torch

from downstream.classifier import Classifier, save_classifier
from downstream.metrics import compare_metrics
from encoder_guard.checkpointing import check_run_dir
from encoder_guard.config import load_config
from encoder_guard.defenses.base import DEFENSES, Defense
from encoder_guard.encoders import Encoder, save_encoder
from encoder_guard.errors import EncoderGuardError
from encoder_guard.runs import RunDir, is_main_process
from encoder_guard.threats import DefenseData, defense_data, deployed_classifier, downstream_setup


def defend_config(name: str, config: str | Path | None = None, sets: Iterable[str] = ()) -> dict[str, Any]:
    """The run config of defense ``name``: ``config`` (a YAML path) or its level's run settings
    (``configs/defend/encoder.yaml`` or ``classifier.yaml``), with ``--set`` overrides."""
    level = DEFENSES.get(name).level
    return load_config(config or level, "defend", sets)


def build_defense(name: str, cfg: dict[str, Any]) -> Defense:
    """The registered defense ``name`` with the ``defense`` section of ``cfg`` over its preset."""
    cls = DEFENSES.get(name)
    train = cfg.get("train") or {}
    settings = dict(cfg.get("defense") or {})
    unknown = sorted(set(settings) - set(cls.hparam_names()))
    if unknown:
        raise EncoderGuardError(f"defend {name}: no setting {', '.join(unknown)}; its settings: "
                                f"{', '.join(cls.hparam_names())}")
    try:
        return cls(**settings, seed=int(cfg.get("seed", 0)), device=train.get("device", "cpu"))
    except (TypeError, ValueError) as exc:  # a setting out of range: one line naming it, before any run directory
        raise EncoderGuardError(f"defend {name}: {exc}; change that value in the config or its --set") from exc


def run_defense(name: str, cfg: dict[str, Any], encoder: Encoder, out: Path, resume: bool = False) -> dict[str, Any]:
    """Defend ``encoder`` with defense ``name`` and run config ``cfg`` into the run directory ``out``."""
    out = Path(out)
    defense = build_defense(name, cfg)
    # a classifier-level run is finished once its report is written (it saves the classifier just before)
    done = out / ("report.json" if defense.level == "classifier" else "encoder.safetensors")
    if done.exists() and not resume:
        raise EncoderGuardError(f"{out} already holds a defended model; choose another --out")
    check_run_dir(out, out / "checkpoints", resume)
    cfg = dict(cfg, defense={k: v for k, v in defense.hparams().items() if k != "seed"})
    run = RunDir(out, cfg)
    seed = defense.seed
    train = cfg.get("train") or {}
    if train.get("threads"):
        torch.set_num_threads(int(train["threads"]))
    if defense.level == "classifier":
        return _run_classifier_defense(name, defense, cfg, encoder, out, run, resume)
    data = defense_data(cfg, encoder, seed) if defense.uses_clean else DefenseData(None, 0)
    if data.clean is None:
        run.logger.info(f"defend {name} → {out}: data-free")
    else:
        run.logger.info(f"defend {name} → {out}: {len(data.clean):,} clean images "
                        f"({data.usage()['share_of_pretraining_set']:.1%} of {data.clean.name}/{data.clean.split})")
    result = defense(encoder, data, out, resume)
    defended = cast(Encoder, result.model)
    defended.spec.provenance = dict(defended.spec.provenance, defense=name)
    if is_main_process():
        save_encoder(defended, out / "encoder.safetensors", {"defense": name})
    report = {"defense": name, **result.report}
    run.write_json("report.json", report)
    run.logger.info(f"defended encoder → {out / 'encoder.safetensors'} ({report['wall_seconds_since_resume']:.0f} s)")
    return report


def _run_classifier_defense(name: str, defense: Defense, cfg: dict[str, Any], encoder: Encoder, out: Path, run: RunDir,
                            resume: bool) -> dict[str, Any]:
    ds = downstream_setup(cfg, encoder, defense.seed, clean=defense.uses_clean)
    clf = deployed_classifier(cfg, encoder, ds, defense.seed)
    before = ds.evaluate(clf)
    run.logger.info(f"defend {name} → {out}: classifier before: {_summary(before)}; data {ds.data.usage()}")
    result = defense(clf, ds.data, out, resume)
    defended = cast(Classifier, result.model)
    after = ds.evaluate(defended)
    if is_main_process():
        save_classifier(defended, out)
    report = {"defense": name, **result.report, "before": before, "after": after, **compare_metrics(before, after)}
    run.write_json("report.json", report)
    run.logger.info(f"after: {_summary(after)} ({report['wall_seconds_since_resume']:.0f} s) → {out / 'head.safetensors'}")
    return report


def _summary(m: dict[str, Any]) -> str:
    return f"CA {m['ca']:.2%}" + (f", ASR {m['asr']:.2%}" if "asr" in m else "")

