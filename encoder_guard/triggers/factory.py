"""Build a trigger from a config section (``trigger: {kind: patch, ...}``) or load it from a file."""

from __future__ import annotations

from typing import Any

from encoder_guard.errors import EncoderGuardError
from encoder_guard.triggers.base import Trigger
from encoder_guard.triggers.blend import BlendTrigger
from encoder_guard.triggers.ctrl import CTRLTrigger
from encoder_guard.triggers.io import load_trigger
from encoder_guard.triggers.patch import PatchTrigger
from encoder_guard.triggers.warp import WarpTrigger

# Every key build_trigger reads, with its default (None: the kind's own default)
TRIGGER_KEYS: dict[str, Any] = {"kind": "patch", "size": None, "position": "bottom-right", "pattern": "white", "seed": 0,
                                "alpha": None, "magnitude": None, "window": None, "frequencies": None, "k": None,
                                "strength": None}


def build_trigger(cfg: dict[str, Any], image_size: int, channels: int) -> Trigger:
    """A trigger for ``channels``×``image_size``² images.

    ``cfg`` keys: ``file`` (load it, ignoring the rest), or ``kind`` = ``patch`` (``size``, ``position``
    as a corner name or ``[row, col]``, ``pattern`` white|random|checkerboard, ``seed``), ``blend`` (``alpha``,
    ``seed``: a noise pattern), ``ctrl`` (``magnitude``, ``window``, ``frequencies``) or ``warp`` (WaNet's
    ``k`` control points and ``strength``, ``seed``).
    """
    cfg = {k: v for k, v in (cfg or {}).items() if v is not None}
    if cfg.get("file"):
        return load_trigger(cfg["file"])
    kind = cfg.pop("kind", "patch")
    try:
        if kind == "patch":
            pos = cfg.get("position", "bottom-right")
            return PatchTrigger.square(image_size, channels, size=cfg.get("size"),
                                       position=tuple(pos) if isinstance(pos, list) else pos,
                                       pattern=cfg.get("pattern", "white"), seed=int(cfg.get("seed", 0)))
        if kind == "blend":
            return BlendTrigger.noise(image_size, channels, float(cfg.get("alpha", 0.2)), int(cfg.get("seed", 0)))
        if kind == "ctrl":
            return CTRLTrigger(image_size, channels, float(cfg.get("magnitude", 100.0)), cfg.get("window"), cfg.get("frequencies"))
        if kind == "warp":
            return WarpTrigger.wanet(image_size, channels, int(cfg.get("k", 4)), float(cfg.get("strength", 0.5)),
                                     int(cfg.get("seed", 0)))
    except ValueError as exc:
        raise EncoderGuardError(f"trigger {kind}: {exc}") from exc
    raise EncoderGuardError(f"unknown trigger kind {kind!r}; choose one of: blend, ctrl, patch, warp")
