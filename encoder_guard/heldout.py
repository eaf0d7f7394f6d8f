"""``encoder-guard heldout CONFIG --out DIR``: encoder-level defenses on held-out zoo attacks and another domain.

A defense is used on an encoder whose trigger nobody knows, and the encoder is reused on data unlike its
pretraining set. This benchmark measures both. It draws BadEncoder attacks from the zoo (``encoder_guard.zoo``,
normally its **test** split, never looked at when presets were chosen), plants each on the clean encoder, and
runs every defense of the config (and the undefended ``none`` row) on every backdoored encoder and on the
clean encoder itself. Each defended encoder is judged twice:

- on the **pretraining domain**, under the comparison protocol (``encoder_guard.compare``): CA and ASR of the
  linear probe and the kNN classifier. The **floor** of an attack is the clean encoder's ASR for the same
  trigger and target (a trigger can push an image toward a class by itself); a defense **passes** an encoder
  when its ASR is at most ``max(pass_asr, floor + margin)``, linear and kNN;
- on **another domain** (``other_domain``: any dataset, typically an image folder), where the attacker's target
  class may not exist: CA, and the worst-class ASR (the share of triggered images sent to the single class
  that draws most of them) beside the clean encoder's value for the same trigger.

A drawn attack that does not plant a backdoor (ASR under ``planted_asr`` linear or kNN, or CA more than
``planted_ca_drop`` below the clean encoder's) is reported as failed and left out of the defense statistics.

**Cells and shards.** The work is a list of independent units: the clean encoder, one per zoo attack, one per
extra encoder (``encoders``: e.g. poisoned pretraining runs). A unit's attack, defenses and evaluations are
cells that leave their results on disk and are never recomputed, so an interrupted run resumes. ``--shard K/N``
runs every N-th unit from the K-th, so N processes on N machines (a SLURM or Kubernetes job array) share the
work through one output directory; ``--merge`` writes the report from the finished cells.
"""

from __future__ import annotations

import copy
import functools
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from downstream.evaluate import EvalConfig, evaluate_encoder
from encoder_guard.adapt import adapt_dataset
from encoder_guard.compare import NONE, attack_from_run, run_cell
from encoder_guard.config import dump_config, load_config, load_yaml
from encoder_guard.data import ImageDataset, load_dataset
from encoder_guard.encoders import Encoder, load_encoder
from encoder_guard.errors import EncoderGuardError
from encoder_guard.runs import RunDir, get_logger, log_kept
from encoder_guard.triggers import Trigger, load_trigger
from encoder_guard.zoo import FAMILIES, ZooAttack, attack_config, zoo

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "attack": {"preset": "badencoder-fmnist", "set": []},
    "zoo": {"split": "test", "per_family": 3, "families": list(FAMILIES), "start": 0},
    "encoders": {},
    "pass_asr": 0.05,
    "margin": 0.02,
    "planted_asr": 0.95,
    "planted_ca_drop": 0.02,
    "pretrain_seconds": None,
}
CLEAN = "clean"


@dataclass(frozen=True)
class Unit:
    """One encoder of the benchmark: the clean one, a zoo attack planted on it, or an extra backdoored run."""

    name: str
    family: str
    attack: ZooAttack | None = None
    run: str | None = None


def load_heldout_config(path: str | Path) -> dict[str, Any]:
    """Read and check a benchmark config (``configs/heldout/``) over :data:`DEFAULTS`."""
    cfg = copy.deepcopy(DEFAULTS)
    for key, value in load_yaml(Path(path)).items():
        cfg[key] = {**cfg[key], **value} if isinstance(cfg.get(key), dict) and isinstance(value, dict) else value
    for key in ("clean", "defenses", "data", "downstream", "other_domain"):
        if not cfg.get(key):
            raise EncoderGuardError(f"{path}: '{key}' is missing (see configs/heldout/)")
    if not (Path(cfg["clean"]) / "encoder.safetensors").is_file():
        raise EncoderGuardError(f"{path}: clean: {cfg['clean']} holds no encoder.safetensors; pretrain it first "
                                "(encoder-guard pretrain --config fmnist-tiny --out ...)")
    unknown = [f for f in cfg["zoo"]["families"] if f not in FAMILIES]
    if unknown:
        raise EncoderGuardError(f"{path}: unknown zoo families {unknown}; choose from {', '.join(FAMILIES)}")
    for name, entry in cfg["encoders"].items():
        if not (Path(entry["run"]) / "encoder.safetensors").is_file():
            raise EncoderGuardError(f"{path}: encoders.{name}: no encoder.safetensors in {entry['run']}")
    if NONE in cfg["defenses"]:
        raise EncoderGuardError(f"{path}: '{NONE}' (the undefended row) is always run; leave it out of defenses")
    return cfg


def plan(cfg: dict[str, Any]) -> list[Unit]:
    """Every unit of the benchmark, in a fixed order (what ``--shard`` splits); zoo attacks are drawn for the
    clean encoder's image size and the downstream set's classes."""
    z, d = cfg["zoo"], cfg["downstream"]
    size = load_encoder(Path(cfg["clean"]) / "encoder.safetensors").spec.input_size
    classes = load_dataset(d.get("dataset", "fashion-mnist"), "test", d.get("root")).num_classes
    drawn = zoo(z["split"], int(z["per_family"]), tuple(z["families"]), size, classes, int(z.get("start", 0)))
    return ([Unit(CLEAN, CLEAN, run=cfg["clean"])] + [Unit(a.name, a.family, attack=a) for a in drawn]
            + [Unit(n, e.get("family", "other"), run=e["run"]) for n, e in cfg["encoders"].items()])


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` → ``(K, N)`` with ``1 <= K <= N``."""
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise EncoderGuardError(f"--shard takes K/N (e.g. 2/4), not {text!r}") from None
    if not 1 <= k <= n:
        raise EncoderGuardError(f"--shard {text}: K must lie in 1..N")
    return k, n


def _json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def _planted(cfg: dict[str, Any], unit: Unit, out: Path) -> dict[str, Any]:
    """The unit's encoder, trigger and target; a zoo attack is run (or resumed) into ``out/encoders/NAME``."""
    if unit.attack is None:
        run = Path(unit.run or "")
        if unit.name == CLEAN:
            return {"encoder": str(run / "encoder.safetensors"), "trigger": None, "target": None}
        return attack_from_run(unit.name, {"run": str(run)}, "encoders")
    run = out / "encoders" / unit.name
    acfg = attack_config(unit.attack, load_config(cfg["attack"]["preset"], "attack", cfg["attack"].get("set") or []))
    if (run / "config.yaml").is_file():
        done = load_yaml(run / "config.yaml")
        if done.get("trigger") != acfg["trigger"] or done.get("target") != acfg["target"]:
            raise EncoderGuardError(f"{run} holds another attack than zoo draw {unit.name}; use another --out")
    if not (run / "metrics.json").is_file():
        from encoder_guard.attacks.runner import run_attack

        get_logger().info(f"planting {unit.name}: target {unit.attack.target}, {unit.attack.trigger}")
        run_attack("badencoder", acfg, load_encoder(Path(cfg["clean"]) / "encoder.safetensors"), run,
                   resume=(run / "checkpoints").is_dir())
    return {"encoder": str(run / "encoder.safetensors"), "trigger": str(run / "trigger.safetensors"),
            "target": unit.attack.target}


@functools.lru_cache(maxsize=4)
def _domain_split(name: str, root: str | None, split: str) -> ImageDataset:
    """One split of the other domain, decoded once per process (every cell of every unit reads it)."""
    return load_dataset(name, split, root)


def _other_domain(cfg: dict[str, Any], encoder: Encoder, trigger: Trigger | None) -> dict[str, Any]:
    """CA and (with a trigger) worst-class ASR of ``encoder`` on the other domain, linear and kNN."""
    od = cfg["other_domain"]
    train, _ = adapt_dataset(_domain_split(od["dataset"], od.get("root"), "train"), encoder.spec)
    test, _ = adapt_dataset(_domain_split(od["dataset"], od.get("root"), "test"), encoder.spec)
    m = evaluate_encoder(encoder, train, test, EvalConfig(seed=int(cfg["seed"])), trigger=trigger,
                         trigger_key=trigger.key() if trigger is not None else None)
    keys = ("ca_linear", "ca_knn", "worst_asr_linear", "worst_asr_knn", "worst_class_linear", "worst_class_knn")
    return {k: m[k] for k in keys if k in m}


def _cached(path: Path, compute: Any) -> dict[str, Any]:
    if path.is_file():
        return json.loads(path.read_text())
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    _json(path, result)
    return result


def _finished(cfg: dict[str, Any], done: Path) -> bool:
    """Whether ``done`` (a ``unit.json``) holds a row for every defense of ``cfg``: a defense added to the
    config runs on every unit; the rest of its cells are reused."""
    if not done.is_file():
        return False
    return [r["defense"] for r in json.loads(done.read_text())["rows"]] == [NONE, *cfg["defenses"]]


def run_unit(cfg: dict[str, Any], unit: Unit, out: Path, progress: str = "") -> dict[str, Any]:
    """Every cell of one unit (each reused when finished); writes and returns ``out/cells/NAME/unit.json``."""
    log = get_logger()
    done = out / "cells" / unit.name / "unit.json"
    if _finished(cfg, done):
        log.info(f"{progress}{unit.name}: finished")
        return json.loads(done.read_text())
    log.info(f"{progress}{unit.name} ({unit.family})")
    planted = _planted(cfg, unit, out)
    trigger = load_trigger(planted["trigger"]) if planted["trigger"] else None
    seed = int(cfg["seed"])
    matrix = {"attacks": {unit.name: planted}, "downstream": cfg["downstream"], "data": cfg["data"],
              "train": cfg.get("train"), "defenses": {NONE: {}, **cfg["defenses"]}}
    rows = []
    for label in matrix["defenses"]:
        cell = out / "cells" / unit.name / label
        with log_kept():
            row = run_cell(matrix, unit.name, label, seed, cell, progress=f"{progress}  ")
        judged = cell / "defense" / "encoder.safetensors" if label != NONE else Path(planted["encoder"])
        row["other_domain"] = _cached(cell / "other_domain.json",
                                      lambda: _other_domain(cfg, load_encoder(judged), trigger))
        rows.append(row)
    floor = None
    if trigger is not None:
        clean_cell = out / "cells" / unit.name / "floor"
        clean_matrix = {**matrix, "attacks": {unit.name: {**planted, "encoder": str(Path(cfg["clean"]) / "encoder.safetensors")}}}
        with log_kept():
            floor = run_cell(clean_matrix, unit.name, NONE, seed, clean_cell, progress=f"{progress}  floor: ")
        floor["other_domain"] = _cached(clean_cell / "other_domain.json", lambda: _other_domain(
            cfg, load_encoder(Path(cfg["clean"]) / "encoder.safetensors"), trigger))
    attack = {"target": planted["target"], "trigger": unit.attack.trigger if unit.attack else planted["trigger"]}
    result = {"name": unit.name, "family": unit.family, **attack, "rows": rows, "floor": floor}
    _json(done, result)
    return result


def run_heldout(cfg: dict[str, Any], out: Path, shard: tuple[int, int] = (1, 1)) -> list[dict[str, Any]]:
    """Run (or resume) the units of ``shard`` (K of N); returns their results."""
    k, n = shard
    units = plan(cfg)
    mine = units[k - 1::n]
    run = RunDir(out / "shards" / f"{k}-of-{n}", cfg)
    run.logger.info(f"shard {k}/{n}: {len(mine)} of {len(units)} units → {out}")
    t0 = time.perf_counter()
    results = [run_unit(cfg, u, out, progress=f"[{i}/{len(mine)}] ") for i, u in enumerate(mine, 1)]
    run.logger.info(f"shard {k}/{n} finished in {time.perf_counter() - t0:.0f} s")
    return results


# -- the report ---------------------------------------------------------------------------------------------


def _planted_ok(cfg: dict[str, Any], none: dict[str, Any], clean: dict[str, Any]) -> str | None:
    """Why a drawn attack did not plant a backdoor, or ``None`` when it did."""
    reasons = [f"ASR {k} {100 * none[f'asr_{k}']:.1f}%" for k in ("linear", "knn")
               if none[f"asr_{k}"] < cfg["planted_asr"]]
    reasons += [f"CA {k} {100 * (none[f'ca_{k}'] - clean[f'ca_{k}']):+.1f}" for k in ("linear", "knn")
                if none[f"ca_{k}"] < clean[f"ca_{k}"] - cfg["planted_ca_drop"]]
    return ", ".join(reasons) or None


def _limit(cfg: dict[str, Any], floor: float) -> float:
    return max(float(cfg["pass_asr"]), floor + float(cfg["margin"]))


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _worst(values: list[float], high: bool = True) -> float | None:
    return (max(values) if high else min(values)) if values else None


def summarise(cfg: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-encoder rows and per-defense aggregates from finished units."""
    by_name = {r["name"]: r for r in results}
    clean = by_name.get(CLEAN)
    labels = [NONE] + list(cfg["defenses"])
    clean_rows = {row["defense"]: row for row in clean["rows"]} if clean else {}
    rows: list[dict[str, Any]] = []
    failed: dict[str, str] = {}
    for r in results:
        if r["name"] == CLEAN:
            continue
        none = next(row for row in r["rows"] if row["defense"] == NONE)
        why = _planted_ok(cfg, none, clean_rows[NONE]) if clean else None
        if why:
            failed[r["name"]] = why
        floor = r["floor"] or {}
        for row in r["rows"]:
            od, fod = row["other_domain"], floor.get("other_domain") or {}
            entry = {"encoder": r["name"], "family": r["family"], "target": r["target"], "defense": row["defense"],
                     "planted": why is None, "wall_seconds": row.get("wall_seconds", 0.0)}
            for k in ("linear", "knn"):
                entry[f"ca_{k}"], entry[f"asr_{k}"] = row.get(f"ca_{k}"), row.get(f"asr_{k}")
                entry[f"floor_{k}"] = floor.get(f"asr_{k}")
                entry[f"delta_ca_{k}"] = (row[f"ca_{k}"] - none[f"ca_{k}"]) if row.get(f"ca_{k}") is not None else None
                entry[f"other_ca_{k}"] = od.get(f"ca_{k}")
                entry[f"other_delta_ca_{k}"] = od[f"ca_{k}"] - none["other_domain"][f"ca_{k}"]
                entry[f"other_worst_asr_{k}"] = od.get(f"worst_asr_{k}")
                entry[f"other_floor_{k}"] = fod.get(f"worst_asr_{k}")
            checked = [k for k in ("linear", "knn") if entry[f"asr_{k}"] is not None and entry[f"floor_{k}"] is not None]
            entry["passed"] = bool(checked) and all(entry[f"asr_{k}"] <= _limit(cfg, entry[f"floor_{k}"]) for k in checked)
            rows.append(entry)
    aggregates = []
    for label in labels:
        mine = [e for e in rows if e["defense"] == label and e["planted"]]
        agg: dict[str, Any] = {"defense": label, "encoders": len(mine), "passed": sum(e["passed"] for e in mine)}
        for k in ("linear", "knn"):
            asr = [e[f"asr_{k}"] for e in mine if e[f"asr_{k}"] is not None]
            excess = [e[f"asr_{k}"] - e[f"floor_{k}"] for e in mine if e[f"asr_{k}"] is not None]
            dca = [e[f"delta_ca_{k}"] for e in mine if e[f"delta_ca_{k}"] is not None]
            odca = [e[f"other_delta_ca_{k}"] for e in mine]
            oexcess = [e[f"other_worst_asr_{k}"] - e[f"other_floor_{k}"] for e in mine
                       if e[f"other_worst_asr_{k}"] is not None and e[f"other_floor_{k}"] is not None]
            agg.update({f"median_asr_{k}": _median(asr), f"worst_asr_{k}": _worst(asr),
                        f"median_excess_{k}": _median(excess), f"worst_excess_{k}": _worst(excess),
                        f"median_delta_ca_{k}": _median(dca), f"worst_delta_ca_{k}": _worst(dca, high=False),
                        f"other_worst_delta_ca_{k}": _worst(odca, high=False),
                        f"other_worst_excess_{k}": _worst(oexcess)})
            if clean_rows.get(label) and clean_rows[label].get(f"ca_{k}") is not None:
                base = clean_rows[NONE]
                agg[f"clean_delta_ca_{k}"] = clean_rows[label][f"ca_{k}"] - base[f"ca_{k}"]
                agg[f"clean_other_delta_ca_{k}"] = (clean_rows[label]["other_domain"][f"ca_{k}"]
                                                    - base["other_domain"][f"ca_{k}"])
        walls = [e["wall_seconds"] for e in mine]
        agg["median_wall_seconds"] = _median(walls)
        if cfg.get("pretrain_seconds") and walls:
            agg["worst_share_of_pretraining"] = max(walls) / float(cfg["pretrain_seconds"])
        aggregates.append(agg)
    return {"rows": rows, "aggregates": aggregates, "failed_attacks": failed,
            "clean": {row["defense"]: {k: row.get(k) for k in ("ca_linear", "ca_knn")}
                      | {f"other_{k}": row["other_domain"].get(k) for k in ("ca_linear", "ca_knn")}
                      for row in clean["rows"]} if clean else {}}


def _pct(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "—"
    return f"{100 * v:+.1f}" if signed else f"{100 * v:.1f}"


def _pair(a: float | None, b: float | None, signed: bool = False) -> str:
    return f"{_pct(a, signed)} / {_pct(b, signed)}"


def markdown(cfg: dict[str, Any], summary: dict[str, Any], missing: list[str], title: str) -> str:
    """The report: per-defense aggregates, failed attacks, the clean encoder, then one row per encoder × defense."""
    z = cfg["zoo"]
    lines = [f"# {title}", "",
             f"Zoo split **{z['split']}**, {z['per_family']} per family ({', '.join(z['families'])}); "
             f"pass: ASR ≤ max({100 * cfg['pass_asr']:.0f}%, floor + {100 * cfg['margin']:.0f} points), linear and "
             "kNN; floor: the clean encoder's ASR for the same trigger and target. Linear / kNN in every pair; "
             f"other domain: {cfg['other_domain'].get('dataset')} ({cfg['other_domain'].get('root') or 'registered'}).", ""]
    if missing:
        lines += [f"**Unfinished units ({len(missing)}):** {', '.join(missing)}.", ""]
    failed = summary["failed_attacks"]
    planted = {e["encoder"] for e in summary["rows"] if e["planted"]}
    lines += [f"Backdoored encoders in the statistics: {len(planted)}; attacks that did not plant a backdoor "
              f"(excluded): {len(failed)}" + (": " + "; ".join(f"{n} ({w})" for n, w in failed.items()) if failed else "")
              + ".", "",
              "| defense | passed | median ASR | worst ASR | median ASR − floor | median ΔCA | worst ΔCA "
              "| other domain: worst ΔCA | other domain: worst-class ASR − clean, worst | clean encoder ΔCA "
              "| clean encoder ΔCA, other domain | median wall s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for a in summary["aggregates"]:
        share = a.get("worst_share_of_pretraining")
        wall = f"{a['median_wall_seconds']:.0f}" if a["median_wall_seconds"] is not None else "—"
        if share is not None and a["defense"] != NONE:
            wall += f" (worst {100 * share:.0f}% of pretraining)"
        lines.append(
            f"| {a['defense']} | {a['passed']}/{a['encoders']} | {_pair(a['median_asr_linear'], a['median_asr_knn'])} "
            f"| {_pair(a['worst_asr_linear'], a['worst_asr_knn'])} "
            f"| {_pair(a['median_excess_linear'], a['median_excess_knn'], True)} "
            f"| {_pair(a['median_delta_ca_linear'], a['median_delta_ca_knn'], True)} "
            f"| {_pair(a['worst_delta_ca_linear'], a['worst_delta_ca_knn'], True)} "
            f"| {_pair(a['other_worst_delta_ca_linear'], a['other_worst_delta_ca_knn'], True)} "
            f"| {_pair(a['other_worst_excess_linear'], a['other_worst_excess_knn'], True)} "
            f"| {_pair(a.get('clean_delta_ca_linear'), a.get('clean_delta_ca_knn'), True)} "
            f"| {_pair(a.get('clean_other_delta_ca_linear'), a.get('clean_other_delta_ca_knn'), True)} | {wall} |")
    if summary["clean"]:
        c = summary["clean"][NONE]
        lines += ["", f"Clean encoder: CA {_pair(c['ca_linear'], c['ca_knn'])}, other domain "
                      f"{_pair(c['other_ca_linear'], c['other_ca_knn'])}."]
    lines += ["", "| encoder | family | target | defense | CA | ASR | floor | passed | ΔCA | other domain CA "
                  "| worst-class ASR (clean) | wall s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in summary["rows"]:
        worst = (f"{_pair(e['other_worst_asr_linear'], e['other_worst_asr_knn'])} "
                 f"({_pair(e['other_floor_linear'], e['other_floor_knn'])})")
        status = ("yes" if e["passed"] else "**no**") if e["planted"] else "not planted"
        lines.append(f"| {e['encoder']} | {e['family']} | {e['target']} | {e['defense']} "
                     f"| {_pair(e['ca_linear'], e['ca_knn'])} | {_pair(e['asr_linear'], e['asr_knn'])} "
                     f"| {_pair(e['floor_linear'], e['floor_knn'])} | {status} "
                     f"| {_pair(e['delta_ca_linear'], e['delta_ca_knn'], True)} "
                     f"| {_pair(e['other_ca_linear'], e['other_ca_knn'])} | {worst} | {e['wall_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(cfg: dict[str, Any], summary: dict[str, Any], path: Path) -> Path | None:
    """ASR of every planted encoder under every row, by family, against the pass line; ``None`` without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [e for e in summary["rows"] if e["planted"]]
    labels = list(dict.fromkeys(e["defense"] for e in rows))
    families = list(dict.fromkeys(e["family"] for e in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    colours = plt.get_cmap("tab10")
    for ax, k in zip(axes, ("linear", "knn")):
        named: set[str] = set()
        for e in rows:
            if e[f"asr_{k}"] is None:
                continue
            i, f = labels.index(e["defense"]), families.index(e["family"])
            x = i + (f - (len(families) - 1) / 2) * 0.12
            ax.scatter(x, 100 * e[f"asr_{k}"], s=22, color=colours(f % 10), alpha=0.85,
                       label=None if e["family"] in named else e["family"])
            named.add(e["family"])
        ax.axhline(100 * float(cfg["pass_asr"]), ls="--", lw=1, color="grey")
        ax.set_yscale("symlog", linthresh=10)
        ax.set_xticks(range(len(labels)), labels, rotation=25, ha="right", fontsize=8)
        ax.set_title(f"ASR, {'linear probe' if k == 'linear' else 'kNN'} (dashed: {100 * cfg['pass_asr']:.0f}%)")
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("attack success rate (%)")
    if rows:
        axes[0].legend(fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def merge(cfg: dict[str, Any], out: Path, title: str | None = None) -> tuple[dict[str, Any], dict[str, Path]]:
    """Write ``out/report.{md,json}`` (and ``asr_by_defense.png`` with matplotlib) from the finished units
    (unfinished ones are listed, not waited for)."""
    results, missing = [], []
    for unit in plan(cfg):
        done = out / "cells" / unit.name / "unit.json"
        (results.append(json.loads(done.read_text())) if _finished(cfg, done) else missing.append(unit.name))
    summary = summarise(cfg, results)
    text = markdown(cfg, summary, missing, title or cfg.get("title", "Held-out attacks"))
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    (out / "report.md").write_text(text)
    _json(out / "report.json", {**summary, "missing": missing, "units": results})
    paths = {"markdown": out / "report.md", "json": out / "report.json"}
    png = plot(cfg, summary, out / "asr_by_defense.png")
    if png is not None:
        paths["plot"] = png
    return summary, paths
