"""``encoder-guard compare MATRIX.yaml --out DIR``: attacks × defenses × seeds under one protocol.

Every cell is one (attack, defense, seed): the defense runs through the same runner as ``encoder-guard
defend`` in ``DIR/cells/<attack>/<defense>/seed<k>/``, and the resulting downstream classifier is
judged on the test set. The protocol is fixed for every cell:

- the downstream classifier is a linear probe on the downstream training set (BadNets-poisoned under
  an attack with ``poison_rate``), fitted with the cell's seed;
- an encoder-level defense (MIMIC, Purifier, ...) gets the matrix's ``data`` (a clean unlabelled share of
  the pretraining set); the probe is then fitted on its defended encoder;
- a classifier-level defense (PAD-FT, D3, TAC) gets the deployed classifier and the matrix's
  ``downstream`` data (5% clean labelled images by default; PAD-FT uses only the training set);
- ``none`` (always run) is the undefended classifier; ΔCA and DER of every cell are against it;
- a defense may run on fewer seeds than the matrix (``seeds: [0]``, e.g. for a slow one);
- a defense that cannot act under an attack says so with ``not_applicable: {attack: reason}``: its cell
  is reported as "n/a" with the reason instead of a number.

A finished cell leaves ``metrics.json`` and is never recomputed, so an interrupted comparison is resumed
by running the same command again; a cell whose defense was interrupted resumes that defense. Each cell
records a digest of its settings (the defense's resolved config and the attack); when a preset or the
matrix changes what a cell would run, the old cell is moved aside to ``seed<k>.stale-<n>`` and recomputed
instead of being reported under settings it did not use. A cell from before digests cannot be checked:
it is kept, and the log says so (delete it to recompute).
See ``configs/compare/`` for matrices.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from encoder_guard.config import load_config, load_yaml
from encoder_guard.errors import EncoderGuardError
from encoder_guard.runs import RunDir, get_logger, setup_logging

NONE = "none"


def _merge(base: dict[str, Any], extra: dict[str, Any] | None) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in (extra or {}).items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_matrix(path: str | Path) -> dict[str, Any]:
    """Read and check a matrix file (``attacks`` and ``defenses`` sections, ``seeds``)."""
    from encoder_guard.defenses import DEFENSES

    m = load_yaml(Path(path))
    for key in ("attacks", "defenses"):
        if not isinstance(m.get(key), dict) or not m[key]:
            raise EncoderGuardError(f"{path}: '{key}' must map names to settings (see configs/compare/)")
    for name, a in m["attacks"].items():
        missing = [k for k in ("encoder", "trigger", "target") if (a or {}).get(k) is None]
        if missing:
            raise EncoderGuardError(f"{path}: attack {name!r} lacks {', '.join(missing)}")
        if not Path(a["encoder"]).is_file():
            raise EncoderGuardError(f"{path}: attack {name!r}: no encoder at {a['encoder']}")
    for label, d in m["defenses"].items():
        method = (d or {}).get("method", label)
        if method != NONE:
            DEFENSES.get(method)  # names the registered defenses if unknown
    m.setdefault("seeds", [0])
    m["seeds"] = m["seeds"] if isinstance(m["seeds"], list) else [m["seeds"]]
    return m


def _downstream(matrix: dict[str, Any], attack: dict[str, Any]) -> dict[str, Any]:
    keys = ("trigger", "target", "poison_rate")
    return _merge(matrix.get("downstream") or {}, {k: attack[k] for k in keys if k in attack})


def defense_config(matrix: dict[str, Any], attack: dict[str, Any], label: str, seed: int) -> tuple[str, dict[str, Any]]:
    """The registered method of defense ``label`` and its full run config for this cell."""
    settings = dict(matrix["defenses"][label] or {})
    settings.pop("not_applicable", None)
    settings.pop("seeds", None)
    method = settings.pop("method", label)
    preset = settings.pop("config", method)
    cfg = load_config(preset, "defend") if method != NONE else {}
    cfg["seed"] = seed
    cfg["defense"] = _merge(cfg.get("defense") or {}, settings)
    cfg["downstream"] = _merge(cfg.get("downstream") or {}, _downstream(matrix, attack))
    if "data" in cfg:
        cfg["data"] = _merge(cfg["data"], matrix.get("data"))
    cfg["train"] = _merge(cfg.get("train") or {}, matrix.get("train"))
    return method, cfg


def settings_digest(method: str, cfg: dict[str, Any], attack: dict[str, Any]) -> str:
    """What a cell runs, as a short digest: the defense, its resolved config (less ``train``: device and
    threads say how it runs, not what) and the attack it faces."""
    what = {k: v for k, v in cfg.items() if k != "train"}
    blob = json.dumps({"method": method, "config": what, "attack": attack}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached_cell(cell: Path, digest: str) -> dict[str, Any] | None:
    """The finished cell's metrics if it ran under the settings with this digest, else ``None``."""
    done = cell / "metrics.json"
    if not done.is_file():
        return None
    cached = json.loads(done.read_text())
    return cached if cached.get("settings_digest", digest) == digest else None  # cells from before digests are kept


def _move_aside(cell: Path) -> Path:
    """Keep a cell computed under other settings next to its replacement (nothing is deleted)."""
    k = 1
    while (stale := cell.with_name(f"{cell.name}.stale-{k}")).exists():
        k += 1
    cell.rename(stale)
    get_logger().warning(f"{cell} was computed under other settings (preset or matrix changed): moved to {stale.name}, "
                         "recomputing")
    return stale


def run_cell(matrix: dict[str, Any], attack_name: str, label: str, seed: int, cell: Path, progress: str = "") -> dict[str, Any]:
    """One cell's metrics (from ``cell/metrics.json`` when it is already done); logs ``progress`` and its state."""
    from downstream.classifier import fit_classifier
    from encoder_guard.defenses import defense_level
    from encoder_guard.defenses.downstream import deployed_classifier, downstream_setup
    from encoder_guard.defenses.runner import run_defense
    from encoder_guard.encoders import load_encoder

    log = get_logger()
    attack = matrix["attacks"][attack_name]
    reason = ((matrix["defenses"][label] or {}).get("not_applicable") or {}).get(attack_name)
    if reason:
        log.info(f"{progress}{attack_name} × {label} × seed {seed} (not applicable)")
        return {"attack": attack_name, "defense": label, "seed": seed, "ca": None, "asr": None,
                "note": f"not applicable: {reason}"}
    method, cfg = defense_config(matrix, attack, label, seed)
    digest = settings_digest(method, cfg, attack)
    cached = cached_cell(cell, digest)
    log.info(f"{progress}{attack_name} × {label} × seed {seed} ({'running' if cached is None else 'cached'})")
    if cached is not None:
        if "settings_digest" not in cached:
            log.warning(f"{cell} predates settings digests, so nothing can tell whether the current preset and matrix "
                        "would run it the same way; kept as it is (delete it to recompute)")
        return cached
    done = cell / "metrics.json"
    if done.is_file():
        _move_aside(cell)
    encoder = load_encoder(attack["encoder"])
    out: dict[str, Any] = {"attack": attack_name, "defense": label, "method": method, "seed": seed,
                           "settings_digest": digest}
    t0 = time.perf_counter()
    if method == NONE:
        ds = downstream_setup(cfg, encoder, seed, clean=False)
        metrics, report = ds.evaluate(deployed_classifier(cfg, encoder, ds, seed)), {"data": {"images": 0}}
    else:
        run_dir = cell / "defense"
        report_file = run_dir / "report.json"
        if report_file.is_file():
            report = json.loads(report_file.read_text())
        else:
            report = run_defense(method, cfg, encoder, run_dir, resume=(run_dir / "checkpoints").is_dir())
        if defense_level(method) == "classifier":
            metrics = report["after"]
        else:
            defended = load_encoder(run_dir / "encoder.safetensors")
            ds = downstream_setup(cfg, defended, seed, clean=False)
            metrics = ds.evaluate(fit_classifier(defended, ds.data.train, seed=seed))
    out.update(ca=metrics["ca"], asr=metrics.get("asr"), ra=metrics.get("ra"),
               clean_images=int((report.get("data") or {}).get("images", 0)),
               wall_seconds=float(report.get("wall_seconds", 0.0)), cell_seconds=time.perf_counter() - t0)
    cell.mkdir(parents=True, exist_ok=True)
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=2))
    tmp.replace(done)
    return out


def run_matrix(matrix: dict[str, Any], out: Path) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """Run (or resume) every cell, then write the report; returns the cells and the report's paths."""
    from downstream.metrics import defense_effectiveness_rating
    from downstream.report import write_report

    run = RunDir(out, matrix)
    labels = [NONE] + [d for d in matrix["defenses"] if d != NONE]
    matrix = _merge(matrix, {"defenses": {NONE: matrix["defenses"].get(NONE) or {}}})
    seeds = {d: (matrix["defenses"][d] or {}).get("seeds", matrix["seeds"]) for d in labels}
    seeds[NONE] = sorted(set(matrix["seeds"]).union(*seeds.values()))
    todo = [(a, d, s) for a in matrix["attacks"] for s in seeds[NONE] for d in labels if s in seeds[d]]
    cells = []
    for i, (a, d, s) in enumerate(todo, 1):
        setup_logging(run.file("log.txt"))  # a cell's defense run points the log at its own directory
        cells.append(run_cell(matrix, a, d, s, out / "cells" / a / d / f"seed{s}", progress=f"[{i}/{len(todo)}] "))
    setup_logging(run.file("log.txt"))
    base = {(c["attack"], c["seed"]): c for c in cells if c["defense"] == NONE}
    for c in cells:
        b = base[(c["attack"], c["seed"])]
        if c.get("ca") is None:
            continue
        c["delta_ca"] = c["ca"] - b["ca"]
        if c.get("asr") is not None and b.get("asr") is not None:
            c["der"] = defense_effectiveness_rating(b["ca"], b["asr"], c["ca"], c["asr"])
    run.write_json("cells.json", {"cells": cells})
    paths = write_report(cells, out, matrix.get("title", "comparison"))
    run.logger.info(f"report → {paths['markdown']}")
    return cells, paths
