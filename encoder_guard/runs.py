"""Run directories: ``config.yaml``, ``log.txt``, ``metrics.json`` and checkpoints, written the same way by
every command. Only the process of rank 0 writes under distributed training.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from encoder_guard.config import dump_config

LOGGER_NAME = "encoder_guard"


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


class RunDir:
    """A run's folder. Creating one sets up ``log.txt`` (appending, so a resumed run keeps its history)."""

    def __init__(self, path: str | os.PathLike, config: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.writes = is_main_process()
        if self.writes:
            self.path.mkdir(parents=True, exist_ok=True)
            if config is not None:
                dump_config(config, self.path / "config.yaml")
        self.logger = setup_logging(self.path / "log.txt" if self.writes else None)

    def file(self, name: str) -> Path:
        return self.path / name

    def write_json(self, name: str, data: dict[str, Any]) -> Path:
        p = self.path / name
        if self.writes:
            tmp = p.with_name(p.name + ".tmp")
            tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=_jsonable))
            os.replace(tmp, p)
        return p


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def setup_logging(log_file: Path | None) -> logging.Logger:
    """The package logger: INFO to stderr and to ``log_file`` (one handler each, replaced per run)."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.INFO)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(message)s"))
    if not is_main_process():  # under torchrun the other ranks say only what goes wrong
        console.setLevel(logging.WARNING)
    logger.addHandler(console)
    if log_file is not None:
        fh = logging.FileHandler(log_file, mode="a")
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    logger.propagate = False
    return logger


@contextmanager
def log_kept() -> Iterator[None]:
    """Run a nested stage (whose own run directory takes the package log over) and point the log back at the
    file it wrote to before, however the stage ends."""
    files = [Path(h.baseFilename) for h in get_logger().handlers if isinstance(h, logging.FileHandler)]
    try:
        yield
    finally:
        setup_logging(files[0] if files else None)


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)
