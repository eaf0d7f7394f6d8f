"""The attack zoo: BadEncoder attacks drawn from seeded trigger families, split into dev and test seeds.

A defense is used on an encoder whose trigger nobody knows, so its presets must hold on attacks they were not
chosen on. Every zoo attack is a pure function of ``(family, seed)`` (and the image shape and class count):
a target class and a trigger drawn from the family's ranges:

- ``patch``: a square of side 3–9 px (scaled from 28-px images), anywhere in the image including the centre,
  white, a seeded random binary pattern or a checkerboard;
- ``blend``: seeded uniform noise blended at α 0.1–0.3 (Blended, arXiv 1712.05526);
- ``ctrl``: CTRL's DCT trigger (ICCV 2023, arXiv 2210.07346), magnitude 60–150 at a mid and a high frequency;
- ``warp``: WaNet's smooth warp (ICLR 2021, arXiv 2102.10369), k 3–5 control points, strength 2–3 (on the dev
  draws, 0.66–1.57 planted 86–95% linear ASR, under the zoo's 95% bar at k 5; 2.0 at k 5 planted 95.4%).

**The split.** Seeds below :data:`TEST_START` are the **dev** split: presets and thresholds are chosen by
looking at them. Seeds from :data:`TEST_START` on are the **test** split: only ever reported. The split is a
property of the seed, so a result can always be traced to the split it came from.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FAMILIES = ("patch", "blend", "ctrl", "warp")
TEST_START = 1000  # seeds [0, 1000) are dev, [1000, ∞) test
PATTERNS = ("white", "random", "checkerboard")


def split_of(seed: int) -> str:
    """``dev`` or ``test``: the split a zoo seed belongs to."""
    if seed < 0:
        raise ValueError(f"zoo seeds are non-negative, got {seed}")
    return "dev" if seed < TEST_START else "test"


def split_seeds(split: str, count: int, start: int = 0) -> list[int]:
    """``count`` consecutive seeds of ``split``, from its ``start``-th."""
    if split not in ("dev", "test"):
        raise ValueError(f"split must be 'dev' or 'test', got {split!r}")
    first = (0 if split == "dev" else TEST_START) + start
    seeds = list(range(first, first + count))
    if split == "dev" and seeds and seeds[-1] >= TEST_START:
        raise ValueError(f"the dev split holds seeds 0..{TEST_START - 1}; {count} from {start} run into the test split")
    return seeds


@dataclass(frozen=True)
class ZooAttack:
    """One drawn attack: ``trigger`` holds the keys of an attack config's ``trigger`` section."""

    family: str
    seed: int
    target: int
    trigger: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.family}-{self.seed}"

    @property
    def split(self) -> str:
        return split_of(self.seed)


def draw(family: str, seed: int, image_size: int = 28, num_classes: int = 10) -> ZooAttack:
    """The attack of ``family`` drawn by ``seed`` for ``image_size``-px images with ``num_classes`` classes."""
    if family not in FAMILIES:
        raise ValueError(f"unknown zoo family {family!r}; choose one of: {', '.join(FAMILIES)}")
    split_of(seed)
    g = random.Random(f"encoder_guard.zoo:{family}:{seed}")  # string seeds hash the same on every platform
    target = g.randrange(num_classes)
    if family == "patch":
        side = max(1, round(g.randint(3, 9) * image_size / 28))
        trigger = {"kind": "patch", "size": side, "pattern": g.choice(PATTERNS), "seed": g.randrange(2**31),
                   "position": [g.randint(0, image_size - side), g.randint(0, image_size - side)]}
    elif family == "blend":
        trigger = {"kind": "blend", "alpha": round(g.uniform(0.1, 0.3), 3), "seed": g.randrange(2**31)}
    elif family == "ctrl":
        window = min(image_size, 32)
        mid, high = g.randint(window // 2 - 3, window // 2 + 1), g.randint(window - 4, window - 1)
        trigger = {"kind": "ctrl", "magnitude": round(g.uniform(60, 150), 1), "frequencies": [[mid, mid], [high, high]]}
    else:
        trigger = {"kind": "warp", "k": g.randint(3, 5), "strength": round(g.uniform(2.0, 3.0), 3),
                   "seed": g.randrange(2**31)}
    return ZooAttack(family, seed, target, trigger)


def zoo(split: str, per_family: int, families: tuple[str, ...] = FAMILIES, image_size: int = 28,
        num_classes: int = 10, start: int = 0) -> list[ZooAttack]:
    """``per_family`` attacks of each family from ``split``, family by family."""
    return [draw(f, s, image_size, num_classes) for f in families for s in split_seeds(split, per_family, start)]


def attack_config(attack: ZooAttack, base: dict[str, Any]) -> dict[str, Any]:
    """``base`` (an attack config, e.g. the ``badencoder-fmnist`` preset) with the zoo attack's target, trigger and
    seed: what ``encoder-guard attack badencoder --config`` runs."""
    return {**base, "name": attack.name, "seed": attack.seed, "target": attack.target,
            "trigger": {"file": None, **attack.trigger}}


def write_zoo(attacks: list[ZooAttack], base: dict[str, Any], out: Path, image_size: int = 28, channels: int = 1,
              pictures: bool = True) -> Path:
    """Write each attack's ``OUT/NAME/attack.yaml`` (the config ``encoder-guard attack badencoder`` runs), its
    ``trigger.safetensors`` and a ``trigger.png`` picture, and ``OUT/zoo.yaml``, the index; returns the index."""
    from encoder_guard.config import dump_config
    from encoder_guard.errors import EncoderGuardError
    from encoder_guard.triggers import build_trigger, save_trigger
    from encoder_guard.triggers.show import trigger_picture

    index = []
    for attack in attacks:
        cfg = attack_config(attack, base)
        try:
            trigger = build_trigger(cfg["trigger"], image_size, channels)
        except EncoderGuardError as exc:
            raise EncoderGuardError(f"zoo attack {attack.name} for {image_size}-px images: {exc}") from exc
        run = out / attack.name
        run.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run / "attack.yaml")
        save_trigger(trigger, run / "trigger.safetensors")
        if pictures:
            trigger_picture(trigger, run / "trigger.png")
        index.append({"name": attack.name, "family": attack.family, "seed": attack.seed, "split": attack.split,
                      "target": attack.target, "trigger": attack.trigger, "trigger_key": trigger.key(),
                      "config": str(run / "attack.yaml")})
    dump_config({"image_size": image_size, "channels": channels, "attacks": index}, out / "zoo.yaml")
    return out / "zoo.yaml"
