"""The package's layers: pretraining, attacks and defenses are siblings that import none of each other.

Shared pieces (augmentation, trigger stamping and poisoning, the training loop, the threat models) sit below
all three in ``encoder_guard/``; an import across siblings would pull one family's choices into another's.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SIBLINGS = {"pretrain": ROOT / "pretrain", "encoder_guard.attacks": ROOT / "encoder_guard" / "attacks",
            "encoder_guard.defenses": ROOT / "encoder_guard" / "defenses"}


def imported_modules(path: Path, package: str) -> set[str]:
    """Absolute names of every module ``path`` imports, relative imports resolved against ``package``."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names.add(base)
    return names


@pytest.mark.parametrize("family", sorted(SIBLINGS))
def test_a_family_imports_no_sibling_family(family):
    others = [name for name in SIBLINGS if name != family]
    for path in sorted(SIBLINGS[family].rglob("*.py")):
        package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
        crossing = {m for m in imported_modules(path, package) for o in others if m == o or m.startswith(o + ".")}
        assert not crossing, f"{path.relative_to(ROOT)} imports {sorted(crossing)}"


def test_relative_imports_resolve_to_their_package():
    src = ROOT / "encoder_guard" / "defenses" / "mimic.py"
    assert any(m.startswith("encoder_guard.") for m in imported_modules(src, "encoder_guard.defenses"))
