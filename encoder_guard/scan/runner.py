"""``encoder-guard scan``: is this encoder backdoored, and toward what?

A scan reads the encoder and clean unlabelled images of the user's choice (another distribution than the
encoder's pretraining set is allowed), runs one scanner (:mod:`encoder_guard.scan`) and writes a run
directory: ``report.json`` (score, threshold, verdict, suspected target), ``trigger.safetensors`` (the
inverted trigger as a patch trigger every other command reads: ``evaluate --trigger``, a defense's trigger),
``trigger.png`` and ``target_embedding.safetensors``.

**The verdict.** A small encoder admits small universal adversarial patches even when clean, so a score means
little on its own. Given a reference population (``reference``: a JSON file with the same method's scores on
clean encoders, e.g. the population benchmark's ``reference_<method>.json``), the score is turned into a
z-score against it, in the direction the method calls suspicious (DECREE's PL1 on a log scale, being a size
fraction), and the encoder is flagged at ``z ≥ z_threshold`` (the reference's own threshold, fixed on the
population's dev split, unless one is given; 3 where it has none). Without one, the method's own cut-off
(:attr:`~encoder_guard.scan.base.Scanner.cutoff`) is applied and the report says the verdict is uncalibrated.

**The suspected target.** Where the images carry labels, the class whose mean embedding (L2-normalised) is
nearest in cosine to the inverted trigger's target embedding.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from encoder_guard.errors import EncoderGuardError
from encoder_guard.scan.base import SCANNERS, ScanResult, build_scanner, embed

SCAN_DEFAULTS: dict[str, Any] = {
    "method": "collapse",
    "seed": 0,
    "device": "cpu",
    "data": {"dataset": "fashion-mnist", "root": None, "split": "test", "count": None},
    "settings": {},
    "reference": None,
    "z_threshold": None,  # None: the reference's own (fixed on a dev population), else 3
}



def suspicion(score: float, higher_is_suspicious: bool) -> float:
    """A score on one scale where larger is more suspicious (a size fraction is compared on a log scale)."""
    return score if higher_is_suspicious else -math.log(max(score, 1e-6))


def z_score(score: float, higher_is_suspicious: bool, reference: list[float]) -> tuple[float, float, float]:
    """``(z, mean, std)``: ``score``'s suspicion against the reference scores' (mean and sample std)."""
    ref = [suspicion(s, higher_is_suspicious) for s in reference]
    mean, std = statistics.fmean(ref), max(statistics.stdev(ref), 1e-6)
    return (suspicion(score, higher_is_suspicious) - mean) / std, mean, std


def load_reference(path: str | Path, method: str) -> dict[str, Any]:
    """A reference population: ``{"method": NAME, "scores": [...], "encoders": [...]}`` of clean encoders."""
    p = Path(path)
    if not p.is_file():
        raise EncoderGuardError(f"reference population {p} not found; the population benchmark writes one "
                                "(benchmarks/scan_population.py), or leave --reference out for the method's own rule")
    try:
        ref = json.loads(p.read_text())
        scores = [float(s) for s in ref["scores"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise EncoderGuardError(f"{p} is not a reference population (a JSON object with 'method' and a list of "
                                f"'scores'): {exc}") from None
    if ref.get("method") != method:
        raise EncoderGuardError(f"{p} holds {ref.get('method')!r} scores, not {method!r}: scan with that method or "
                                "give the reference of this one")
    if len(scores) < 3:
        raise EncoderGuardError(f"{p} holds {len(scores)} clean scores; a z-score needs at least 3")
    return {**ref, "scores": scores}


def verdict(score: float, method: str, reference: dict[str, Any] | None, z_threshold: float) -> dict[str, Any]:
    """Flag or clear ``score``: a z-score against ``reference`` when given, else the method's own cut-off."""
    cls = SCANNERS.get(method)
    higher = cls.higher_is_suspicious
    if reference is None:
        cut = cls.cutoff
        flagged = score > cut if higher else score < cut
        return {"flagged": flagged, "threshold": cut, "z": None, "calibrated": False,
                "rule": f"{'score >' if higher else 'score <'} {cut:g} ({cls.cutoff_source}, uncalibrated)"}
    z, mean, std = z_score(score, higher, reference["scores"])
    edge = mean + z_threshold * std  # the threshold back on the score's own scale
    cut = edge if higher else math.exp(-edge)
    return {"flagged": z >= z_threshold, "threshold": cut, "z": z, "calibrated": True,
            "rule": f"z ≥ {z_threshold:g} against {len(reference['scores'])} clean encoders "
                    f"({'score >' if higher else 'score <'} {cut:.4g})"}


def suspected_class(target: Tensor, features: Tensor, labels: Tensor, classes: list[str]) -> dict[str, Any]:
    """The class whose normalised mean embedding is nearest in cosine to ``target``, with the runner-up."""
    known = labels >= 0
    ids = labels[known].unique()
    means = torch.stack([F.normalize(features[known][labels[known] == k].mean(0), dim=0) for k in ids])
    cos = means @ F.normalize(target.to(means), dim=0)
    order = cos.argsort(descending=True)
    best, second = int(ids[order[0]]), int(ids[order[1]]) if len(order) > 1 else None
    name = classes[best] if best < len(classes) else str(best)
    return {"class": best, "name": name, "cosine": float(cos[order[0]]),
            "runner_up": second, "runner_up_cosine": float(cos[order[1]]) if second is not None else None}


def scan_images(cfg: dict[str, Any], spec: Any) -> tuple[Tensor, Tensor, list[str]]:
    """The scan's images (adapted to the encoder's input), their labels (``-1``: none) and class names."""
    from encoder_guard.adapt import adapt_dataset
    from encoder_guard.data import load_dataset

    d = cfg["data"]
    ds, _ = adapt_dataset(load_dataset(d["dataset"], d.get("split", "test"), d.get("root")), spec)
    images, labels = ds.images, ds.labels
    count = d.get("count")
    if count is not None and count < len(images):
        keep = torch.randperm(len(images), generator=torch.Generator().manual_seed(int(cfg["seed"])))[:count]
        images, labels = images[keep], labels[keep]
    return images, labels, list(ds.classes or [])


def run_scan(encoder: Any, cfg: dict[str, Any], out: str | Path) -> dict[str, Any]:
    """Scan ``encoder`` under ``cfg`` (:data:`SCAN_DEFAULTS` keys) into the run directory ``out``; returns the
    report written to ``out/report.json``."""
    from safetensors.torch import save_file

    from encoder_guard.runs import RunDir
    from encoder_guard.triggers import save_trigger
    from encoder_guard.triggers.show import trigger_picture

    method = cfg["method"]
    SCANNERS.get(method)  # an unknown name is answered with the choices before any work
    reference = load_reference(cfg["reference"], method) if cfg.get("reference") else None
    run = RunDir(out, cfg)
    images, labels, classes = scan_images(cfg, encoder.spec)
    scanner = build_scanner(method, seed=int(cfg["seed"]), device=cfg.get("device", "cpu"), **(cfg.get("settings") or {}))
    run.logger.info(f"scan {method}: {len(images)} images of {cfg['data']['dataset']} ({scanner!r})")
    result: ScanResult = scanner.scan(encoder, images)
    z_threshold = cfg.get("z_threshold")
    if z_threshold is None:
        z_threshold = (reference or {}).get("z_threshold", 3.0)
    decision = verdict(result.score, method, reference, float(z_threshold))
    inv = result.trigger
    trigger = inv.as_trigger()
    save_trigger(trigger, run.file("trigger.safetensors"))
    save_file({"target": inv.target.detach().cpu().contiguous()}, str(run.file("target_embedding.safetensors")))
    picture = trigger_picture(trigger, run.file("trigger.png"), cfg["data"]["dataset"], cfg["data"].get("root"))
    target = None
    if bool((labels >= 0).any()):
        features = embed(encoder.eval(), images.float().div(255))
        target = suspected_class(inv.target, features, labels, classes)
    report = {"method": method, "score": result.score, **decision, "suspected_target": target,
              "trigger": inv.summary(), "images": len(images), "dataset": cfg["data"]["dataset"],
              "reference": cfg.get("reference"), "seconds": result.seconds, "details": result.details,
              "files": {"trigger": "trigger.safetensors", "picture": picture.name,
                        "target_embedding": "target_embedding.safetensors"}}
    run.write_json("report.json", report)
    said = "BACKDOOR SUSPECTED" if decision["flagged"] else "no backdoor found"
    toward = f", toward class {target['class']} ({target['name']})" if decision["flagged"] and target else ""
    run.logger.info(f"{said}{toward}: {method} score {result.score:.4g}, {decision['rule']}; "
                    f"{result.seconds:.0f} s → {run.file('report.json')}")
    return report
