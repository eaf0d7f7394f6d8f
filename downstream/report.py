"""The comparison report: one row per (attack, defense), mean ± std over seeds, as Markdown, CSV and a plot.

Cells are the per-seed ``metrics.json`` files written by ``encoder_guard.compare``; this module only
aggregates and writes, so a report can be rebuilt from finished cells without running anything. The kNN
columns are empty for a defense that returns a classifier (encoder + linear head) rather than an encoder.
"""

from __future__ import annotations

import csv
import statistics
from pathlib import Path
from typing import Any, Iterable

# (key, title, shown as a percentage, in the Markdown table)
COLUMNS = [("ca_linear", "CA linear", True, True), ("ca_knn", "CA kNN", True, True),
           ("asr_linear", "ASR linear", True, True), ("asr_knn", "ASR kNN", True, True),
           ("ra_linear", "RA linear", True, False), ("ra_knn", "RA kNN", True, False),
           ("delta_ca", "ΔCA linear", True, True), ("der", "DER", False, False),
           ("clean_images", "clean data", False, True), ("wall_seconds", "wall time", False, True),
           ("share_of_pretraining", "share of pretraining", True, False)]


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(cells: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows ``{attack, defense, seeds, note, <metric>: (mean, std)}`` in first-seen order."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for c in cells:
        groups.setdefault((c["attack"], c["defense"]), []).append(c)
    rows = []
    for (attack, defense), cs in groups.items():
        row: dict[str, Any] = {"attack": attack, "defense": defense, "seeds": len(cs),
                               "note": next((c["note"] for c in cs if c.get("note")), "")}
        for key, _, _, _ in COLUMNS:
            vals = [float(c[key]) for c in cs if c.get(key) is not None]
            row[key] = _stats(vals) if vals else None
        rows.append(row)
    return rows


def _fmt(key: str, v: tuple[float, float] | None, percent: bool) -> str:
    if v is None:
        return "—"
    mean, std = v
    if key == "clean_images":
        return f"{mean:,.0f}"
    if key == "wall_seconds":
        return f"{mean:.0f} s" + (f" ± {std:.0f}" if std else "")
    if percent:
        sign = "+" if key == "delta_ca" and mean > 0 else ""
        return f"{sign}{100 * mean:.1f}%" + (f" ± {100 * std:.1f}" if std else "")
    return f"{mean:.3f}" + (f" ± {std:.3f}" if std else "")


def markdown(rows: list[dict[str, Any]]) -> str:
    """The report's table; the share-of-pretraining column only when some row has it, notes only when any."""
    shown = [c for c in COLUMNS if c[3] or (c[0] == "share_of_pretraining" and any(r[c[0]] for r in rows))]
    notes = any(r["note"] for r in rows)
    head = ["attack", "defense", "seeds"] + [title for _, title, _, _ in shown] + (["note"] if notes else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["attack"], r["defense"], str(r["seeds"])] + [_fmt(k, r[k], p) for k, _, p, _ in shown]
        lines.append("| " + " | ".join(cells + ([r["note"]] if notes else [])) + " |")
    return "\n".join(lines)


def _pair(values: list[tuple[float | None, float | None]], pick: Any) -> str:
    """``linear / kNN`` of ``pick`` over the cells' (linear, kNN) values, in percent (kNN: — when absent)."""
    parts = []
    for i in (0, 1):
        vals = [v[i] for v in values if v[i] is not None]
        parts.append(f"{100 * pick(vals):.1f}" if vals else "—")
    return " / ".join(parts)


def pass_summary(cells: Iterable[dict[str, Any]], bar: dict[str, Any]) -> str:
    """Per defense, over the cells judged against the matrix's bar (those with ``passed``): how many pass, the
    median and worst ASR, the worst ΔCA and the median wall time, as a Markdown table."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for c in cells:
        if c.get("passed") is not None:
            groups.setdefault(c["defense"], []).append(c)
    ca = bar.get("ca_drop")
    both = [f"ASR and ΔCA ≥ −{100 * ca:g}"] if ca is not None else []
    head = ["defense", "ASR bar met", *both, "median ASR", "worst ASR", "worst ΔCA", "median wall time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for defense, cs in groups.items():
        asr = [(c.get("asr_linear"), c.get("asr_knn")) for c in cs]
        dca = [c["delta_ca"] for c in cs if c.get("delta_ca") is not None]
        wall = statistics.median(float(c.get("wall_seconds") or 0.0) for c in cs)
        worst_dca = f"{100 * min(dca):+.1f}" if dca else "—"
        met = [f"{sum(bool(c['passed']) for c in cs)}/{len(cs)}"]
        met += [f"{sum(bool(c.get('passed_with_ca')) for c in cs)}/{len(cs)}"] if ca is not None else []
        row = [defense, *met, _pair(asr, statistics.median), _pair(asr, max), worst_dca, f"{wall:.0f} s"]
        lines.append("| " + " | ".join(row) + " |")
    over = 100 * bar.get("over_floor", 0.0)
    rule = (f"A cell meets the ASR bar at ASR ≤ max({100 * bar['asr']:g}%, floor + {over:g} point{'' if over == 1 else 's'}) "
            "(linear and, where judged, kNN), the floor being the undefended ASR of the same trigger and target "
            "without poisoning; ASR and ΔCA in percent, linear / kNN.")
    return rule + "\n\n" + "\n".join(lines)


def write_report(cells: list[dict[str, Any]], out: Path, title: str = "comparison",
                 bar: dict[str, Any] | None = None) -> dict[str, Path]:
    """``out/report.md``, ``out/report.csv`` and (with matplotlib) ``out/asr_vs_ca.png``; with a pass ``bar``
    the Markdown ends with :func:`pass_summary`."""
    out.mkdir(parents=True, exist_ok=True)
    rows = aggregate(cells)
    paths = {"markdown": out / "report.md", "csv": out / "report.csv"}
    judged = bar is not None and any(c.get("passed") is not None for c in cells)
    summary = f"\n## Per defense\n\n{pass_summary(cells, bar or {})}\n" if judged else ""
    paths["markdown"].write_text(
        f"# {title}\n\nMean ± std over seeds. CA and ASR on the test set (ASR over non-target images) of the "
        "linear probe and the kNN classifier (k=200, T=0.1) on the defended encoder's features, or of the "
        "defended classifier itself (kNN: —); ΔCA against the undefended linear probe of the same attack and "
        "seed; clean data = clean images the defense used.\n\n" + markdown(rows) + "\n" + summary)
    with paths["csv"].open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["attack", "defense", "seeds"] + [f"{k}_{s}" for k, _, _, _ in COLUMNS for s in ("mean", "std")]
                   + ["note"])
        for r in rows:
            w.writerow([r["attack"], r["defense"], r["seeds"]]
                       + [x for k, _, _, _ in COLUMNS for x in (r[k] if r[k] is not None else ("", ""))] + [r["note"]])
    png = scatter(rows, out / "asr_vs_ca.png")
    if png is not None:
        paths["plot"] = png
    return paths


def scatter(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """ASR against CA, one marker per (attack, defense); ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(8.5, 5))
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    defenses = list(dict.fromkeys(r["defense"] for r in rows))
    colours = plt.get_cmap("tab20")
    markers = "osD^vP*X"
    for r in rows:
        if r["ca_linear"] is None or r["asr_linear"] is None:
            continue
        ca, asr = r["ca_linear"], r["asr_linear"]
        yerr = [[100 * min(asr[1], asr[0])], [100 * min(asr[1], 1 - asr[0])]]  # the bar stays within [0, 100]
        ax.errorbar(100 * ca[0], 100 * asr[0], xerr=100 * ca[1], yerr=yerr, capsize=2,
                    fmt=markers[attacks.index(r["attack"]) % len(markers)], ms=7, alpha=0.85,
                    color=colours(defenses.index(r["defense"]) % 20))
    handles = [Line2D([], [], ls="", marker="s", color=colours(i % 20), label=d) for i, d in enumerate(defenses)]
    handles += [Line2D([], [], ls="", marker=markers[i % len(markers)], color="grey", label=f"attack: {a}")
                for i, a in enumerate(attacks)]
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    ax.set_xlabel("clean accuracy, linear probe (%)")
    ax.set_ylabel("attack success rate, linear probe (%)")
    ax.set_title("defenses: ASR vs CA (lower right is better)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
