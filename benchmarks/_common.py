"""Helpers shared by the benchmark scripts: where results go and what machine made them."""

from __future__ import annotations

import json
import os
import platform
import shutil
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "processor": platform.processor() or platform.machine()}


def write_result(name: str, data: dict[str, Any], summary_lines: list[str]) -> Path:
    """Write ``RESULTS/NAME.json`` (with the machine) and its Markdown summary, and print the summary."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **data}, indent=2))
    (RESULTS / f"{name}.md").write_text("\n".join(summary_lines) + "\n")
    print("\n".join(summary_lines))
    print(f"→ {path}")
    return path


def keep_report(stem: str, paths: dict[str, Path], config: str) -> Path:
    """Copy a run's report into ``RESULTS/STEM.{md,png,json}`` (the JSON with the machine and the config that
    made it), and print it."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / stem
    out.with_suffix(".md").write_text(paths["markdown"].read_text())
    if "plot" in paths:
        shutil.copyfile(paths["plot"], out.with_suffix(".png"))
    out.with_suffix(".json").write_text(json.dumps({"machine": machine(), "config": config,
                                                    **json.loads(paths["json"].read_text())}, indent=2, default=str))
    print(paths["markdown"].read_text())
    print(f"→ {out}.md")
    return out
