"""``encoder-guard scan-population CONFIG --out DIR``: a scanner measured on clean and backdoored encoders.

A detector is only as good as its separation of the two populations it will meet, so it is measured on both:
clean encoders (several SSL methods, seeds and schedule lengths, since a scan's score moves with all three) and
backdoored ones (BadEncoder over patch, blend, CTRL and warping triggers, poisoned pretraining). Every encoder
belongs to a **dev** or a **test** split. The dev split fixes everything that is chosen: the reference
population (the dev clean encoders' scores, written to ``reference_<method>.json`` for ``scan --reference``) and
the z threshold (the one that flags the most dev backdoored encoders at a dev false-positive rate within
``fpr``). The test split is only reported: AUROC, TPR and FPR at the dev threshold, the suspected target's
accuracy, the wall time per scan.

Config keys: ``title``; ``methods`` (scanner name → its settings); ``data`` (the scan images: ``dataset``,
``root``, ``split``, ``count``); ``seed``; ``fpr`` (the dev false-positive budget, 0.1); ``encoders``, name →
one of

- ``{run: DIR}``: a run directory (``encoder.safetensors``; a ``target`` in its ``config.yaml`` marks a
  backdoored encoder and names the target);
- ``{encoder: FILE, backdoored: BOOL, target: K}``: a checkpoint;
- ``{pretrain: {config: PRESET, set: [KEY=VALUE, ...]}}``: a clean encoder this benchmark pretrains into
  ``DIR/encoders/NAME`` (resumed after a kill);

each with ``split`` (``dev`` or ``test``) and optionally ``family`` (shown in the report). Every scan is a cell
(``DIR/cells/NAME/METHOD``, a ``scan`` run directory) reused when its settings are unchanged, so a killed run
resumes; the report is written from the finished cells.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from encoder_guard.config import dump_config, load_config, load_yaml
from encoder_guard.errors import EncoderGuardError
from encoder_guard.runs import get_logger, log_kept
from encoder_guard.scan.base import SCANNERS
from encoder_guard.scan.runner import SCAN_DEFAULTS, run_scan, z_score

DEFAULTS: dict[str, Any] = {"seed": 0, "fpr": 0.1, "data": dict(SCAN_DEFAULTS["data"]), "methods": {"decree": {}}}
SPLITS = ("dev", "test")


def load_population_config(path: str | Path) -> dict[str, Any]:
    """Read and check a population config (see the module docstring)."""
    raw = load_yaml(Path(path))
    cfg = {**DEFAULTS, **raw, "data": {**DEFAULTS["data"], **(raw.get("data") or {})}}
    for method in cfg["methods"]:
        SCANNERS.get(method)
    encoders = cfg.get("encoders")
    if not isinstance(encoders, dict) or not encoders:
        raise EncoderGuardError(f"{path}: 'encoders' must map names to {{run: DIR}}, {{encoder: FILE, backdoored: "
                                "BOOL}} or {pretrain: {config: PRESET}}, each with split: dev|test")
    for name, e in encoders.items():
        if (e or {}).get("split") not in SPLITS:
            raise EncoderGuardError(f"{path}: encoder {name!r} needs split: dev or test")
        if sum(k in e for k in ("run", "encoder", "pretrain")) != 1:
            raise EncoderGuardError(f"{path}: encoder {name!r} needs exactly one of run, encoder, pretrain")
    return cfg


def resolve(cfg: dict[str, Any], name: str, out: Path) -> dict[str, Any]:
    """Encoder ``name``'s checkpoint, whether it is backdoored and its target; a ``pretrain`` entry is built."""
    e = cfg["encoders"][name]
    base = {"name": name, "split": e["split"], "family": e.get("family")}
    if "encoder" in e:
        return {**base, "encoder": str(e["encoder"]), "backdoored": bool(e.get("backdoored")), "target": e.get("target")}
    if "run" in e:
        run = Path(e["run"])
        saved = load_yaml(run / "config.yaml") if (run / "config.yaml").is_file() else {}
        poison = saved.get("poison") or {}
        target = saved.get("target", poison.get("target") if poison.get("kind", "none") != "none" else None)
        backdoored = bool(e.get("backdoored", target is not None))
        return {**base, "encoder": str(run / "encoder.safetensors"), "backdoored": backdoored,
                "target": target if backdoored else None, "family": e.get("family") or ("clean" if not backdoored else None)}
    from pretrain import pretrain

    run = out / "encoders" / name
    if not (run / "encoder.safetensors").is_file():
        p = e["pretrain"]
        get_logger().info(f"pretraining clean encoder {name}: {p['config']} {' '.join(p.get('set') or [])}")
        pretrain(load_config(p["config"], "pretrain", p.get("set") or []), run, resume=(run / "checkpoints").is_dir())
    return {**base, "encoder": str(run / "encoder.safetensors"), "backdoored": False, "target": None,
            "family": e.get("family") or "clean"}


def scan_cell(cfg: dict[str, Any], entry: dict[str, Any], method: str, out: Path) -> dict[str, Any]:
    """One encoder × scanner (reused when ``cell/report.json`` was written under the same settings)."""
    from encoder_guard.encoders import load_encoder

    cell = out / "cells" / entry["name"] / method
    scan_cfg = {**SCAN_DEFAULTS, "method": method, "seed": int(cfg["seed"]), "data": cfg["data"],
                "settings": dict(cfg["methods"][method] or {}), "encoder": entry["encoder"]}
    done = cell / "report.json"
    if done.is_file() and (cell / "config.yaml").is_file() and load_yaml(cell / "config.yaml") == _plain(scan_cfg):
        return json.loads(done.read_text())
    with log_kept():
        return run_scan(load_encoder(entry["encoder"]), scan_cfg, cell)


def _plain(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` as its YAML dump reads back (tuples become lists)."""
    return json.loads(json.dumps(cfg))


def run_population(cfg: dict[str, Any], out: Path) -> list[dict[str, Any]]:
    """Scan every encoder with every method (resuming finished cells); returns one row per encoder × method."""
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    rows = []
    names = list(cfg["encoders"])
    for i, name in enumerate(names, 1):
        entry = resolve(cfg, name, out)
        for method in cfg["methods"]:
            get_logger().info(f"[{i}/{len(names)}] {name} ({entry['split']}, "
                              f"{'backdoored' if entry['backdoored'] else 'clean'}) × {method}")
            report = scan_cell(cfg, entry, method, out)
            rows.append({**entry, "method": method, "score": report["score"], "seconds": report["seconds"],
                         "suspected": (report.get("suspected_target") or {}).get("class")})
    return rows


def _best_threshold(clean: list[float], bad: list[float], fpr: float) -> float:
    """The z threshold (flag at z ≥ t) with the highest TPR on ``bad`` whose FPR on ``clean`` is at most ``fpr``."""
    candidates = sorted(set(clean + bad))
    cuts = [candidates[0] - 1.0] + [(a + b) / 2 for a, b in zip(candidates, candidates[1:])] + [candidates[-1] + 1.0]
    best, best_tpr = cuts[-1], -1.0
    for t in cuts:
        fp = sum(z >= t for z in clean) / max(len(clean), 1)
        tp = sum(z >= t for z in bad) / max(len(bad), 1)
        if fp <= fpr and (tp > best_tpr or (tp == best_tpr and t > best)):
            best, best_tpr = t, tp
    return best


def summarise(cfg: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per method: the dev reference and threshold, and the test split's AUROC, TPR, FPR and target accuracy."""
    from sklearn.metrics import roc_auc_score

    out: dict[str, Any] = {}
    for method in cfg["methods"]:
        higher = SCANNERS.get(method).higher_is_suspicious
        mine = [r for r in rows if r["method"] == method]
        dev_clean = [r for r in mine if r["split"] == "dev" and not r["backdoored"]]
        if len(dev_clean) < 3:
            raise EncoderGuardError(f"{method}: the dev split holds {len(dev_clean)} clean encoders; the reference "
                                    "population needs at least 3")
        reference = [r["score"] for r in dev_clean]
        for r in mine:
            r["z"] = z_score(r["score"], higher, reference)[0]
        dev = [r for r in mine if r["split"] == "dev"]
        threshold = _best_threshold([r["z"] for r in dev if not r["backdoored"]],
                                    [r["z"] for r in dev if r["backdoored"]], float(cfg["fpr"]))
        for r in mine:
            r["flagged"] = r["z"] >= threshold
        split_stats = {}
        for split in SPLITS:
            part = [r for r in mine if r["split"] == split]
            bad, clean = [r for r in part if r["backdoored"]], [r for r in part if not r["backdoored"]]
            caught = [r for r in bad if r["flagged"] and r["target"] is not None]
            split_stats[split] = {
                "clean": len(clean), "backdoored": len(bad),
                "auroc": roc_auc_score([r["backdoored"] for r in part], [r["z"] for r in part]) if bad and clean else None,
                "tpr": sum(r["flagged"] for r in bad) / len(bad) if bad else None,
                "fpr": sum(r["flagged"] for r in clean) / len(clean) if clean else None,
                "target_accuracy": sum(r["suspected"] == r["target"] for r in caught) / len(caught) if caught else None,
                "median_seconds": statistics.median(r["seconds"] for r in part) if part else None,
                "max_seconds": max(r["seconds"] for r in part) if part else None,
            }
        out[method] = {"reference": {"method": method, "scores": [r["score"] for r in dev_clean],
                                     "encoders": [r["name"] for r in dev_clean], "z_threshold": threshold,
                                     "settings": cfg["methods"][method] or {}, "data": cfg["data"]},
                       "z_threshold": threshold, **split_stats}
    return out


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.0f}%"


def markdown(cfg: dict[str, Any], summary: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [f"# {cfg.get('title', 'Encoder scan on a population of encoders')}", "",
             "z: the score against the dev split's clean encoders, in the direction the method calls suspicious; "
             "the threshold is fixed on the dev split; the test split is only reported.", "",
             "| method | split | clean | backdoored | AUROC | TPR | FPR | target right (flagged, with a target) "
             "| z threshold (dev) | median / max s per scan |", "|---|---|---|---|---|---|---|---|---|---|"]
    for method, s in summary.items():
        for split in SPLITS:
            t = s[split]
            auroc = "—" if t["auroc"] is None else f"{t['auroc']:.3f}"
            secs = "—" if t["median_seconds"] is None else f"{t['median_seconds']:.0f} / {t['max_seconds']:.0f}"
            lines.append(f"| {method} | {split} | {t['clean']} | {t['backdoored']} | {auroc} | {_pct(t['tpr'])} | "
                         f"{_pct(t['fpr'])} | {_pct(t['target_accuracy'])} | {s['z_threshold']:.2f} | {secs} |")
    lines += ["", "| encoder | split | family | backdoored (target) | method | score | z | flagged | suspected class | s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        bad = f"yes ({r['target']})" if r["backdoored"] else "no"
        lines.append(f"| {r['name']} | {r['split']} | {r.get('family') or '—'} | {bad} | {r['method']} | "
                     f"{r['score']:.4g} | {r['z']:+.2f} | {'yes' if r['flagged'] else 'no'} | "
                     f"{'—' if r['suspected'] is None else r['suspected']} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], rows: list[dict[str, Any]], path: Path) -> Path | None:
    """ROC curves of the test split per method (dev dashed); ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from sklearn.metrics import roc_curve
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    for i, method in enumerate(summary):
        for split, style in (("test", "-"), ("dev", "--")):
            part = [r for r in rows if r["method"] == method and r["split"] == split]
            if len({r["backdoored"] for r in part}) < 2:
                continue
            fpr, tpr, _ = roc_curve([r["backdoored"] for r in part], [r["z"] for r in part])
            auroc = summary[method][split]["auroc"]
            ax.plot(fpr, tpr, style, color=plt.get_cmap("tab10")(i), label=f"{method}, {split} (AUROC {auroc:.2f})")
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1)
    ax.set_xlabel("false-positive rate (clean encoders flagged)")
    ax.set_ylabel("true-positive rate (backdoored flagged)")
    ax.legend(fontsize=8, frameon=False, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(cfg: dict[str, Any], rows: list[dict[str, Any]], out: Path) -> dict[str, Path]:
    """Write ``report.{md,json}``, ``roc.png`` and one ``reference_<method>.json`` per method into ``out``."""
    summary = summarise(cfg, rows)
    paths = {"markdown": out / "report.md", "json": out / "report.json"}
    paths["markdown"].write_text(markdown(cfg, summary, rows))
    paths["json"].write_text(json.dumps({"summary": summary, "rows": rows}, indent=2, default=str))
    for method, s in summary.items():
        paths[f"reference_{method}"] = out / f"reference_{method}.json"
        paths[f"reference_{method}"].write_text(json.dumps(s["reference"], indent=2, default=str))
    png = plot(summary, rows, out / "roc.png")
    if png is not None:
        paths["plot"] = png
    return paths
