"""Run the held-out attack benchmark and keep its report as this project's current figures.

Usage: python benchmarks/heldout.py configs/heldout/fmnist-test.yaml [--runs DIR] [--merge]

Runs (or resumes) ``encoder-guard heldout`` in ``--runs`` (default ``runs/heldout-<name>``; with ``--merge``
only the report is written from the finished cells, e.g. after a job array ran the shards) and copies the
report to ``benchmarks/results/heldout_<name>.{md,json,png}`` with the machine that measured it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import keep_report

from encoder_guard.heldout import load_heldout_config, merge, run_heldout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", help="a benchmark YAML (configs/heldout/)")
    ap.add_argument("--runs", default=None, help="where the cells run (default: runs/heldout-<name>)")
    ap.add_argument("--merge", action="store_true", help="only write the report from the finished cells")
    args = ap.parse_args()
    name = Path(args.config).stem
    cfg = load_heldout_config(args.config)
    out = Path(args.runs or f"runs/heldout-{name}")
    if not args.merge:
        run_heldout(cfg, out)
    _, paths = merge(cfg, out)
    keep_report(f"heldout_{name}", paths, args.config)

if __name__ == "__main__":
    main()
