"""YAML configs with ``--set key.sub=value`` overrides, validated against the preset.

Presets are plain YAML files (``configs/<family>/<name>.yaml``); a run's resolved config is written to
``RUN/config.yaml`` so that every figure can be traced to the settings that produced it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable

import yaml

from encoder_guard.errors import EncoderGuardError

# the presets: installed inside the package (encoder_guard/presets), or configs/ beside it in a source checkout
_INSTALLED = Path(__file__).resolve().parent / "presets"
CONFIG_DIR = _INSTALLED if _INSTALLED.is_dir() else Path(__file__).resolve().parents[1] / "configs"

# Sections whose keys are open: the class they configure validates them (an SSL method, EncoderSpec, the
# view augmentation, an attack, a defense), so a preset states only what differs from the class's defaults.
OPEN_SECTIONS = ("method", "model", "augment", "attack", "defense", "settings")


def resolve_config_path(name_or_path: str | Path, family: str) -> Path:
    """A path as given, or a preset name looked up in ``configs/<family>/``."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    preset = CONFIG_DIR / family / f"{name_or_path}.yaml"
    if preset.is_file():
        return preset
    choices = sorted(f.stem for f in (CONFIG_DIR / family).glob("*.yaml")) if (CONFIG_DIR / family).is_dir() else []
    raise EncoderGuardError(f"config {name_or_path} not found; give a YAML path or a preset: {', '.join(choices) or 'none installed'}")


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise EncoderGuardError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise EncoderGuardError(f"{path} must hold a mapping at the top level")
    return data


def parse_value(raw: str) -> Any:
    """A ``--set`` value as YAML, with ``1e-3`` read as a number (YAML 1.1 wants ``1.0e-3``)."""
    if raw == "":
        return None
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise EncoderGuardError(f"--set value {raw!r} is not valid YAML ({getattr(exc, 'problem', None) or exc}); write a list as "
                                f"[a,b] and quote the whole --set argument in the shell, e.g. --set \"key=[a,b]\"") from exc
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_overrides(cfg: dict[str, Any], sets: Iterable[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings (values parsed as YAML) to a copy of ``cfg``.

    Unknown keys are refused (with the valid ones listed) except inside :data:`OPEN_SECTIONS`, so a typo
    never silently trains with the default.
    """
    out = copy.deepcopy(cfg)
    for item in sets:
        if "=" not in item:
            raise EncoderGuardError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        value = parse_value(raw)
        parts = key.strip().split(".")
        node = out
        for depth, part in enumerate(parts[:-1]):
            if not isinstance(node.get(part), dict):
                if part in node or parts[0] not in OPEN_SECTIONS:
                    sections = ", ".join(k for k, v in node.items() if isinstance(v, dict))
                    raise EncoderGuardError(f"unknown config key {key!r}: {part!r} is not a section; sections: {sections}")
                node[part] = {}
            node = node[part]
        leaf = parts[-1]
        if leaf not in node and parts[0] not in OPEN_SECTIONS:
            raise EncoderGuardError(f"unknown config key {key!r}; valid keys here: {', '.join(sorted(node))}")
        node[leaf] = value
    return out


def load_config(name_or_path: str | Path, family: str, sets: Iterable[str] = ()) -> dict[str, Any]:
    """Read a preset or YAML file and apply overrides."""
    return apply_overrides(load_yaml(resolve_config_path(name_or_path, family)), sets)


def dump_config(cfg: dict[str, Any], path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
