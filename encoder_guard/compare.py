"""``encoder-guard compare MATRIX.yaml --out DIR``: attacks × defenses × seeds under one protocol.

Every cell is one (attack, defense, seed): the defense runs through the same runner as ``encoder-guard
defend`` in ``DIR/cells/<attack>/<defense>/seed<k>/defense``, and what it returns is judged on the test set:

- an **encoder** (the undefended ``none`` row and every encoder-level defense: MIMIC, Purifier+, ...) gets the
  protocol's linear probe and kNN classifier on the downstream training set (BadNets-poisoned under an
  attack with ``poison_rate``), and the cell reports CA, ASR and RA of both;
- a **classifier** (PAD-FT, D3, TAC, ...: encoder + linear head) is judged as it is; the cell reports its
  CA, ASR and RA in the linear columns, and the kNN columns stay empty;
- an encoder-level defense gets the matrix's ``data`` (a clean unlabelled share of the pretraining set); a
  classifier-level one the deployed classifier (a linear probe fitted on the training set with the cell's
  seed) and the matrix's ``downstream`` data (5% clean labelled images by default; PAD-FT and CLP use none);
- ``none`` (always run) is the undefended encoder, judged like an encoder-level defense's output; under the
  poisoned fine-tune threat (``downstream.victim: finetune``) it is the fine-tuned victim classifier itself.
  ΔCA and DER of every cell are against it.

A matrix file has ``attacks`` (each an ``encoder``, ``trigger`` and ``target``, or a ``run`` directory of
``encoder-guard attack``/``pretrain`` holding all three, plus ``poison_rate`` for a poisoned downstream set)
and ``defenses`` (each a registered method's name, or a label with ``method:``, and any hyperparameters
that differ from its preset). A defense entry may also set ``seeds`` (fewer than the matrix's), ``only``
(the attacks it runs under) and ``not_applicable: {attack: reason}`` (reported as n/a with the reason).
``pretrain_seconds`` adds each defense's wall time as a share of that pretraining time. An attack may set
``victim`` (``probe`` or ``finetune``) for its own cells, over ``downstream.victim``. A ``pass`` section
(``asr``, ``over_floor``, ``floors: {attack: floor attack}``, optionally ``ca_drop``) judges every cell of the
attacks it gives a floor: it passes at ASR ≤ max(``asr``, floor + ``over_floor``), the floor being the floor
attack's undefended ASR for the same seed (and, with ``ca_drop``, is also counted for ΔCA ≥ −``ca_drop``), and
the report ends with a per-defense summary.

A finished cell leaves ``metrics.json`` and is never recomputed, so an interrupted comparison is resumed by
running the same command again; a cell whose defense was interrupted resumes that defense. Each cell
records a digest of its settings (the defense's resolved hyperparameters and data, and the attack); when a
preset or the matrix changes what a cell would run, the old cell is moved aside to ``seed<k>.stale-<n>``
and recomputed. See ``configs/compare/`` for matrices.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from downstream.evaluate import EvalConfig, evaluate_encoder
from downstream.metrics import defense_effectiveness_rating
from downstream.report import write_report
from encoder_guard.config import load_yaml
from encoder_guard.defenses import DEFENSES
from encoder_guard.defenses.runner import build_defense, defend_config, run_defense
from encoder_guard.encoders import load_encoder
from encoder_guard.errors import EncoderGuardError
from encoder_guard.runs import RunDir, get_logger, log_kept
from encoder_guard.threats import deployed_classifier, downstream_setup, victim_of

NONE = "none"
ENTRY_KEYS = ("method", "seeds", "only", "not_applicable", "config")


def _merge(base: dict[str, Any], extra: dict[str, Any] | None) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in (extra or {}).items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def attack_from_run(name: str, attack: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """An attack entry from a run directory: its encoder and trigger, and the target its config names."""
    run = Path(attack["run"])
    cfg_file = run / "config.yaml"
    if not cfg_file.is_file():
        raise EncoderGuardError(f"{path}: attack {name!r}: {run} is not a run directory (no config.yaml)")
    cfg = load_yaml(cfg_file)
    target = cfg["target"] if "target" in cfg else (cfg.get("poison") or {}).get("target")
    out = {"encoder": str(run / "encoder.safetensors"), "trigger": str(run / "trigger.safetensors"), "target": target}
    return {**out, **{k: v for k, v in attack.items() if k != "run"}}


def load_matrix(path: str | Path) -> dict[str, Any]:
    """Read and check a matrix file (``attacks`` and ``defenses`` sections, ``seeds``)."""
    m = load_yaml(Path(path))
    for key in ("attacks", "defenses"):
        if not isinstance(m.get(key), dict) or not m[key]:
            raise EncoderGuardError(f"{path}: '{key}' must map names to settings (see configs/compare/)")
    for name, a in list(m["attacks"].items()):
        a = dict(a or {})
        if a.get("run"):
            a = attack_from_run(name, a, path)
        missing = [k for k in ("encoder", "trigger", "target") if a.get(k) is None]
        if missing:
            raise EncoderGuardError(f"{path}: attack {name!r} lacks {', '.join(missing)}")
        if not Path(a["encoder"]).is_file():
            raise EncoderGuardError(f"{path}: attack {name!r}: no encoder at {a['encoder']}")
        m["attacks"][name] = a
    for label, d in m["defenses"].items():
        d = d or {}
        method = d.get("method", label)
        if method != NONE:
            DEFENSES.get(method)  # names the registered defenses if unknown
        unknown = [a for a in (d.get("only") or []) + list(d.get("not_applicable") or {}) if a not in m["attacks"]]
        if unknown:
            raise EncoderGuardError(f"{path}: defense {label!r} names attacks the matrix lacks: {', '.join(unknown)}")
    if m.get("pass") is not None:
        bar = m["pass"]
        if not isinstance(bar, dict) or "asr" not in bar or not isinstance(bar.get("floors"), dict):
            raise EncoderGuardError(f"{path}: 'pass' needs 'asr' and 'floors: {{attack: floor attack}}' (optionally "
                                    f"'over_floor', 'ca_drop'), got {bar!r}")
        extra = set(bar) - {"asr", "over_floor", "ca_drop", "floors"}
        if extra:
            raise EncoderGuardError(f"{path}: 'pass' has unknown keys {', '.join(sorted(extra))} "
                                    "(it takes asr, over_floor, ca_drop, floors)")
        named = [a for pair in bar["floors"].items() for a in pair if a not in m["attacks"]]
        if named:
            raise EncoderGuardError(f"{path}: pass.floors names attacks the matrix lacks: {', '.join(named)}")
    m.setdefault("seeds", [0])
    m["seeds"] = m["seeds"] if isinstance(m["seeds"], list) else [m["seeds"]]
    return m


def _downstream(matrix: dict[str, Any], attack: dict[str, Any]) -> dict[str, Any]:
    keys = ("trigger", "target", "poison_rate", "victim")
    return _merge(matrix.get("downstream") or {}, {k: attack[k] for k in keys if k in attack})


def defense_config(matrix: dict[str, Any], attack: dict[str, Any], label: str, seed: int) -> tuple[str, dict[str, Any]]:
    """The registered method of defense ``label`` and its full run config for this cell."""
    entry = dict(matrix["defenses"][label] or {})
    method = entry.get("method", label)
    settings = {k: v for k, v in entry.items() if k not in ENTRY_KEYS}
    cfg = defend_config(method, entry.get("config")) if method != NONE else {"downstream": {}}
    cfg["seed"] = seed
    cfg["defense"] = _merge(cfg.get("defense") or {}, settings)
    cfg["downstream"] = _merge(cfg.get("downstream") or {}, _downstream(matrix, attack))
    if "data" in cfg:
        cfg["data"] = _merge(cfg["data"], matrix.get("data"))
    cfg["train"] = _merge(cfg.get("train") or {}, matrix.get("train"))
    return method, cfg


def settings_digest(method: str, cfg: dict[str, Any], attack: dict[str, Any]) -> str:
    """What a cell runs, as a short digest: the defense's resolved hyperparameters, its data and the attack
    (``train`` says how it runs, not what, and is left out)."""
    what = {k: v for k, v in cfg.items() if k != "train"}
    if method != NONE:
        what["defense"] = build_defense(method, cfg).hparams()
    blob = json.dumps({"method": method, "config": what, "attack": attack}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached_cell(cell: Path, digest: str) -> dict[str, Any] | None:
    """The finished cell's metrics if it ran under the settings with this digest, else ``None``."""
    done = cell / "metrics.json"
    if not done.is_file():
        return None
    cached = json.loads(done.read_text())
    return cached if cached.get("settings_digest") == digest else None


def _move_aside(cell: Path) -> Path:
    """Keep a cell computed under other settings next to its replacement (nothing is deleted)."""
    k = 1
    while (stale := cell.with_name(f"{cell.name}.stale-{k}")).exists():
        k += 1
    cell.rename(stale)
    get_logger().warning(f"{cell} was computed under other settings (preset or matrix changed): moved to {stale.name}, "
                         "recomputing")
    return stale


def _encoder_metrics(m: dict[str, Any]) -> dict[str, Any]:
    keys = ("ca_linear", "ca_knn", "asr_linear", "asr_knn", "ra_linear", "ra_knn")
    return {k: m.get(k) for k in keys}


def run_cell(matrix: dict[str, Any], attack_name: str, label: str, seed: int, cell: Path, progress: str = "") -> dict[str, Any]:
    """One cell's metrics (from ``cell/metrics.json`` when it is already done); logs ``progress`` and its state."""
    log = get_logger()
    attack = matrix["attacks"][attack_name]
    head = {"attack": attack_name, "defense": label, "seed": seed}
    reason = ((matrix["defenses"][label] or {}).get("not_applicable") or {}).get(attack_name)
    if reason:
        log.info(f"{progress}{attack_name} × {label} × seed {seed} (not applicable)")
        return {**head, "note": f"not applicable: {reason}"}
    method, cfg = defense_config(matrix, attack, label, seed)
    digest = settings_digest(method, cfg, attack)
    cached = cached_cell(cell, digest)
    log.info(f"{progress}{attack_name} × {label} × seed {seed} ({'running' if cached is None else 'cached'})")
    if cached is not None:
        return cached
    if (cell / "metrics.json").is_file():
        _move_aside(cell)
    encoder = load_encoder(attack["encoder"])
    level = "encoder" if method == NONE else DEFENSES.get(method).level
    out: dict[str, Any] = {**head, "method": method, "level": level, "settings_digest": digest}
    t0 = time.perf_counter()
    report: dict[str, Any] = {"data": {"images": 0}, "wall_seconds_since_resume": 0.0}
    if method != NONE:
        run_dir = cell / "defense"
        report_file = run_dir / "report.json"
        if report_file.is_file():
            report = json.loads(report_file.read_text())
        else:
            report = run_defense(method, cfg, encoder, run_dir, resume=(run_dir / "checkpoints").is_dir())
    if method == NONE and victim_of(cfg) == "finetune":  # the undefended row is the fine-tuned victim itself
        ds = downstream_setup(cfg, encoder, seed, clean=False)
        report = {**report, "after": ds.evaluate(deployed_classifier(cfg, encoder, ds, seed))}
        level = out["level"] = "classifier"
    if level == "classifier":
        after = report["after"]
        metrics = {"ca_linear": after["ca"], "asr_linear": after.get("asr"), "ra_linear": after.get("ra"),
                   "ca_knn": None, "asr_knn": None, "ra_knn": None}
    else:
        judged = encoder if method == NONE else load_encoder(cell / "defense" / "encoder.safetensors")
        ds = downstream_setup(cfg, judged, seed, clean=False)
        key = ds.trigger.key() if ds.trigger is not None else None
        metrics = _encoder_metrics(evaluate_encoder(judged, ds.data.train, ds.test, EvalConfig(seed=seed),
                                                    trigger=ds.trigger, trigger_key=key, target=ds.target))
    out.update(metrics, clean_images=int((report.get("data") or {}).get("images", 0)),
               wall_seconds=float(report.get("wall_seconds_since_resume", 0.0)), cell_seconds=time.perf_counter() - t0)
    cell.mkdir(parents=True, exist_ok=True)
    tmp = cell / "metrics.json.tmp"
    tmp.write_text(json.dumps(out, indent=2))
    tmp.replace(cell / "metrics.json")
    return out


def passes(cell: dict[str, Any], floor: dict[str, Any], bar: dict[str, Any]) -> bool:
    """Whether ``cell``'s ASR (linear, and kNN where judged) is at most max(``bar.asr``, the ``floor`` cell's
    ASR + ``bar.over_floor``); a floor judged without kNN (a classifier) gives its linear ASR for both."""
    for key in ("asr_linear", "asr_knn"):
        if cell.get(key) is None:
            continue
        base = floor.get(key) if floor.get(key) is not None else floor.get("asr_linear")
        limit = max(float(bar["asr"]), float(base or 0.0) + float(bar.get("over_floor", 0.0)))
        if cell[key] > limit:
            return False
    return True


def run_matrix(matrix: dict[str, Any], out: Path) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """Run (or resume) every cell, then write the report; returns the cells and the report's paths."""
    run = RunDir(out, matrix)
    labels = [NONE] + [d for d in matrix["defenses"] if d != NONE]
    matrix = _merge(matrix, {"defenses": {NONE: matrix["defenses"].get(NONE) or {}}})
    entries = {d: matrix["defenses"][d] or {} for d in labels}
    seeds = {d: entries[d].get("seeds", matrix["seeds"]) for d in labels}
    seeds[NONE] = sorted(set(matrix["seeds"]).union(*seeds.values()))
    todo = [(a, d, s) for a in matrix["attacks"] for s in seeds[NONE] for d in labels
            if s in seeds[d] and a in entries[d].get("only", [a])]
    cells = []
    for i, (a, d, s) in enumerate(todo, 1):
        with log_kept():
            cells.append(run_cell(matrix, a, d, s, out / "cells" / a / d / f"seed{s}", progress=f"[{i}/{len(todo)}] "))
    base = {(c["attack"], c["seed"]): c for c in cells if c["defense"] == NONE}
    pretrain_seconds = matrix.get("pretrain_seconds")
    bar: dict[str, Any] = matrix.get("pass") or {}
    for c in cells:
        b = base[(c["attack"], c["seed"])]
        if c.get("ca_linear") is None:
            continue
        c["delta_ca"] = c["ca_linear"] - b["ca_linear"]
        if c.get("asr_linear") is not None and b.get("asr_linear") is not None:
            c["der"] = defense_effectiveness_rating(b["ca_linear"], b["asr_linear"], c["ca_linear"], c["asr_linear"])
        if pretrain_seconds:
            c["share_of_pretraining"] = c["wall_seconds"] / float(pretrain_seconds)
        floor = (bar.get("floors") or {}).get(c["attack"])
        if floor is not None and (floor, c["seed"]) in base and c.get("asr_linear") is not None:
            c["passed"] = passes(c, base[(floor, c["seed"])], bar)
            if bar.get("ca_drop") is not None:
                c["passed_with_ca"] = c["passed"] and c["delta_ca"] >= -float(bar["ca_drop"])
    run.write_json("cells.json", {"cells": cells})
    paths = write_report(cells, out, matrix.get("title", "comparison"), bar or None)
    run.logger.info(f"report → {paths['markdown']}")
    return cells, paths
