"""Run the encoder-scan population benchmark and keep its report as this project's current figures.

Usage: python benchmarks/scan_population.py configs/scan/fmnist-population.yaml [--runs DIR]

Runs (or resumes) ``encoder-guard scan-population`` in ``--runs`` (default ``runs/scan-<name>``) and copies its
report to ``benchmarks/results/scan_<name>.{md,json,png}`` with the machine that measured it, and each method's
dev reference population to ``benchmarks/results/scan_<name>_reference_<method>.json`` (``scan --reference``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, keep_report

from encoder_guard.scan.population import load_population_config, report, run_population


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", help="a population YAML (configs/scan/)")
    ap.add_argument("--runs", default=None, help="where the cells run (default: runs/scan-<name>)")
    args = ap.parse_args()
    name = Path(args.config).stem
    cfg = load_population_config(args.config)
    out = Path(args.runs or f"runs/scan-{name}")
    paths = report(cfg, run_population(cfg, out), out)
    keep_report(f"scan_{name}", paths, args.config)
    for key, path in paths.items():
        if key.startswith("reference_"):
            shutil.copyfile(path, RESULTS / f"scan_{name}_{key}.json")

if __name__ == "__main__":
    main()
