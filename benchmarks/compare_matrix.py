"""Run a comparison matrix and keep its report as this project's current figures.

Usage: python benchmarks/compare_matrix.py configs/compare/fmnist.yaml [--runs runs/compare-fmnist]

Runs (or resumes) ``encoder-guard compare`` on the matrix in ``--runs`` (default ``runs/compare-<name>``) and
writes its report to ``benchmarks/results/compare_<name>.{md,csv,json}`` (and ``.png`` with matplotlib):
the table, the per-seed cells and the machine that measured them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine

from encoder_guard.compare import load_matrix, run_matrix


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("matrix", help="a matrix YAML (configs/compare/)")
    ap.add_argument("--runs", default=None, help="where the cells run (default: runs/compare-<name>)")
    args = ap.parse_args()
    name = Path(args.matrix).stem
    out = Path(args.runs or f"runs/compare-{name}")
    cells, paths = run_matrix(load_matrix(args.matrix), out)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"compare_{name}"
    shutil.copyfile(paths["markdown"], stem.with_suffix(".md"))
    shutil.copyfile(paths["csv"], stem.with_suffix(".csv"))
    if "plot" in paths:
        shutil.copyfile(paths["plot"], stem.with_suffix(".png"))
    stem.with_suffix(".json").write_text(json.dumps({"machine": machine(), "matrix": args.matrix, "cells": cells},
                                                    indent=2, default=str))
    print(paths["markdown"].read_text())
    print(f"→ {stem}.md")


if __name__ == "__main__":
    main()
