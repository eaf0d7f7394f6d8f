"""``encoder-guard attack badencoder``: load the data the config names, run the attack, write the run.

Writes ``RUN/encoder.safetensors`` (backdoored), ``RUN/trigger.safetensors`` (and ``RUN/trigger.npz`` in
BadEncoder's layout for patch triggers), ``RUN/reference.npz``, ``RUN/metrics.json`` and the usual
``config.yaml``/``log.txt``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from encoder_guard.attacks.base import ATTACKS, AttackData
from encoder_guard.data import load_dataset, take_subset
from encoder_guard.encoders import Encoder, save_encoder
from encoder_guard.errors import EncoderGuardError
from encoder_guard.runs import RunDir
from encoder_guard.training import init_distributed
from encoder_guard.triggers import PatchTrigger, build_trigger, load_reference_images, save_reference_images, save_trigger
from encoder_guard.utils import seeded_choice


def reference_images(cfg: dict[str, Any], target: int, encoder: Encoder, seed: int) -> torch.Tensor:
    ref = cfg.get("reference") or {}
    if ref.get("file"):
        return load_reference_images(ref["file"])
    ds = load_dataset(ref["dataset"], ref.get("split", "train"), ref.get("root"), encoder.spec.input_size)
    members = (ds.labels == target).nonzero().flatten()
    if len(members) == 0:
        raise EncoderGuardError(f"{ref['dataset']} has no images of target class {target}; choose a target in 0..{ds.num_classes - 1}")
    count, select = int(ref.get("count", 3)), ref.get("select", "typical")
    if select == "random":
        return ds.images[seeded_choice(members, count, seed)].float().div(255)
    if select != "typical":
        raise EncoderGuardError(f"reference.select must be 'typical' or 'random', not {select!r}")
    return typical_images(encoder, ds.images[seeded_choice(members, int(ref.get("pool", 1000)), seed)].float().div(255), count)


@torch.no_grad()
def typical_images(encoder: Encoder, pool: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` images of ``pool`` whose clean features lie closest (cosine) to the pool's mean direction.

    The effectiveness term pulls triggered features towards the mean direction of the references; a few
    randomly drawn references of a varied class (a T-shirt that looks like a bag) can put that direction in
    another class's region, so the attacker picks prototypical ones from the images of the target class it has.
    """
    was_training = encoder.training
    encoder.eval()
    feats = torch.cat([encoder(b) for b in pool.split(256)])
    encoder.train(was_training)
    feats = torch.nn.functional.normalize(feats, dim=1)
    centre = torch.nn.functional.normalize(feats.mean(0), dim=0)
    return pool[(feats @ centre).argsort(descending=True)[:count]]


def build_attack(name: str, cfg: dict[str, Any]) -> Any:
    """Attack ``name`` with the ``attack`` section of ``cfg`` over its class defaults (its ``hparams()`` are the
    settings it runs), seeded and placed by ``cfg``."""
    train = cfg.get("train") or {}
    try:
        return ATTACKS.get(name)(**{**(cfg.get("attack") or {}), "seed": int(cfg.get("seed", 0)),
                                    "device": train.get("device", "cpu")})
    except (TypeError, ValueError) as exc:
        raise EncoderGuardError(f"attack {name}: {exc}; change that value in the config or its --set") from exc


def run_attack(name: str, cfg: dict[str, Any], encoder: Encoder, out: Path, resume: bool = False) -> dict[str, Any]:
    """Run attack ``name`` with ``cfg`` on ``encoder`` into the run directory ``out`` (also under ``torchrun``:
    every process trains its share of each batch, rank 0 writes)."""
    train = cfg.get("train") or {}
    info = init_distributed(train.get("device"))
    seed = int(cfg.get("seed", 0))
    attack = build_attack(name, cfg)
    resolved = {k: v for k, v in attack.hparams().items() if k not in ("seed", "device")}
    run = RunDir(out, dict(cfg, attack=resolved))
    if train.get("threads"):
        torch.set_num_threads(int(train["threads"]))
    s = cfg["shadow"]
    shadow = load_dataset(s["dataset"], s.get("split", "train"), s.get("root"), encoder.spec.input_size)
    if s.get("fraction") is not None or s.get("count") is not None:
        shadow = take_subset(shadow, s.get("fraction"), s.get("count"), False, seed)
    target = int(cfg["target"])
    trigger = build_trigger(cfg.get("trigger") or {}, encoder.spec.input_size, encoder.spec.in_chans)
    refs = reference_images(cfg, target, encoder, seed)
    run.logger.info(f"{name} → {out}: target {target}, {len(shadow)} shadow images, {len(refs)} references, {trigger!r}, "
                    f"{info.world} process(es)")
    t0 = time.perf_counter()
    result = attack.run(encoder, AttackData(shadow, refs, trigger, target), out, resume, info=info)
    report = dict(result.report, wall_seconds_since_resume=time.perf_counter() - t0)
    if info.main:
        save_encoder(result.encoder, out / "encoder.safetensors", {"attack": name})
        save_trigger(trigger, out / "trigger.safetensors")
        if isinstance(trigger, PatchTrigger):
            save_trigger(trigger, out / "trigger.npz")
        save_reference_images(refs, out / "reference.npz")
    run.write_json("metrics.json", report)
    run.logger.info(f"backdoored encoder → {out / 'encoder.safetensors'}, trigger → {out / 'trigger.safetensors'}")
    return report
