"""Judge an encoder: linear probe and kNN on frozen features, clean accuracy and (with a trigger) ASR."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor

from downstream.features import cached_features
from downstream.knn import knn_predict
from downstream.linear import fit_linear_probe
from downstream.metrics import accuracy, attack_success_rate, robust_accuracy, worst_class_asr
from encoder_guard.data import ImageDataset
from encoder_guard.encoders import Encoder

if TYPE_CHECKING:
    from downstream.classifier import Classifier


@dataclass
class EvalConfig:
    """Protocol knobs; the defaults are the protocol every figure of this project uses (docs/design.md)."""

    knn_k: int = 200
    knn_temperature: float = 0.1
    probe_weight_decay: float = 1e-4
    probe_max_iter: int = 500
    seed: int = 0
    cache: bool = True
    device: str = "cpu"


def evaluate_encoder(
    encoder: Encoder,
    train: ImageDataset,
    test: ImageDataset,
    cfg: EvalConfig | None = None,
    trigger: Callable[[Tensor], Tensor] | None = None,
    trigger_key: str | None = None,
    target: int | None = None,
) -> dict[str, Any]:
    """CA of a linear probe and kNN trained on ``train`` features, measured on ``test``.

    With ``trigger`` (a function on ``[0, 1]`` image batches), the worst-class ASR of both classifiers on the
    triggered test set (``worst_asr_*``, ``worst_class_*``); with ``target`` too, their ASR and RA (non-target
    images only).
    """
    cfg = cfg or EvalConfig()
    if train.channels != encoder.spec.in_chans:
        from encoder_guard.errors import EncoderGuardError

        raise EncoderGuardError(
            f"the encoder takes {encoder.spec.in_chans}-channel images but {train.name} has {train.channels}; "
            "evaluate on a dataset with matching channels"
        )
    t0 = time.perf_counter()
    digest = encoder.digest() if cfg.cache else None
    f_train = cached_features(encoder, train, cache=cfg.cache, device=cfg.device, digest=digest)
    f_test = cached_features(encoder, test, cache=cfg.cache, device=cfg.device, digest=digest)
    n_cls = max(train.num_classes, int(train.labels.max()) + 1)
    probe = fit_linear_probe(f_train, train.labels, n_cls, cfg.probe_weight_decay, cfg.probe_max_iter, cfg.seed)
    pred_lin = probe.predict(f_test)
    pred_knn = knn_predict(f_train, train.labels, f_test, n_cls, cfg.knn_k, cfg.knn_temperature)
    out: dict[str, Any] = {
        "ca_linear": accuracy(pred_lin, test.labels),
        "ca_knn": accuracy(pred_knn, test.labels),
        "train_size": len(train),
        "test_size": len(test),
        "train_dataset": train.describe(),
        "test_dataset": test.describe(),
        "protocol": {"knn_k": cfg.knn_k, "knn_temperature": cfg.knn_temperature,
                     "probe": "linear, standardised features, L-BFGS", "probe_weight_decay": cfg.probe_weight_decay,
                     "seed": cfg.seed},
        "encoder_digest": digest or encoder.digest(),
    }
    if trigger is not None:
        f_trig = cached_features(encoder, test, trigger_key or repr(trigger), trigger, cache=cfg.cache,
                                 device=cfg.device, digest=digest)
        trig_lin = probe.predict(f_trig)
        trig_knn = knn_predict(f_train, train.labels, f_trig, n_cls, cfg.knn_k, cfg.knn_temperature)
        for name, pred in (("linear", trig_lin), ("knn", trig_knn)):
            out[f"worst_asr_{name}"], out[f"worst_class_{name}"] = worst_class_asr(pred, test.labels, n_cls)
    if trigger is not None and target is not None:
        out.update(
            target=int(target),
            asr_linear=attack_success_rate(trig_lin, test.labels, target),
            asr_knn=attack_success_rate(trig_knn, test.labels, target),
            ra_linear=robust_accuracy(trig_lin, test.labels, target),
            ra_knn=robust_accuracy(trig_knn, test.labels, target),
        )
    out["eval_seconds"] = time.perf_counter() - t0
    return out


def evaluate_classifier(
    clf: "Classifier",
    test: ImageDataset,
    trigger: Callable[[Tensor], Tensor] | None = None,
    trigger_key: str | None = None,
    target: int | None = None,
    cache: bool = True,
    device: str = "cpu",
) -> dict[str, Any]:
    """CA of a downstream classifier (encoder + head) on ``test``; with a trigger, its ASR and RA."""
    digest = clf.encoder.digest() if cache else None
    with torch.no_grad():
        pred = clf.head(cached_features(clf.encoder, test, cache=cache, device=device, digest=digest)).argmax(1)
        out: dict[str, Any] = {"ca": accuracy(pred, test.labels), "test_size": len(test)}
        if trigger is not None:
            if target is None:
                raise ValueError("a trigger needs a target class for ASR")
            f = cached_features(clf.encoder, test, trigger_key or repr(trigger), trigger, cache=cache, device=device,
                                digest=digest)
            pred_t = clf.head(f).argmax(1)
            out.update(target=int(target), asr=attack_success_rate(pred_t, test.labels, target),
                       ra=robust_accuracy(pred_t, test.labels, target))
    return out


EVAL_DEFAULTS: dict[str, Any] = {"dataset": "fashion-mnist", "data_root": None, "train_split": "train",
                                 "test_split": "test", "train_fraction": None, "train_count": None, "knn_k": 200,
                                 "knn_temperature": 0.1, "probe_weight_decay": 1e-4, "seed": 0, "cache": True,
                                 "device": "cpu"}


def run_evaluation(encoder: Encoder, cfg: dict[str, Any], out: str | Path, trigger: Any = None, target: int | None = None,
                   reference: Encoder | None = None) -> dict[str, Any]:
    """``encoder-guard evaluate``: :func:`evaluate_encoder` on a registered dataset, into a run directory.

    ``cfg`` holds the keys of :data:`EVAL_DEFAULTS`. The dataset is resized and channel-converted to the
    encoder's input when they differ (recorded under ``adapted``). With ``trigger`` and ``target`` the
    metrics include ASR and RA; with ``reference`` (a clean encoder) the same metrics on it, under
    ``reference``. Writes ``RUN/metrics.json`` (with ``config.yaml`` and ``log.txt``) and returns it.
    """
    from encoder_guard.adapt import adapt_dataset
    from encoder_guard.data import load_dataset, take_subset
    from encoder_guard.errors import EncoderGuardError
    from encoder_guard.runs import RunDir

    cfg = {**EVAL_DEFAULTS, **cfg}
    run = RunDir(out, cfg)
    train = load_dataset(cfg["dataset"], cfg["train_split"], cfg["data_root"])
    test = load_dataset(cfg["dataset"], cfg["test_split"], cfg["data_root"])
    if cfg["train_fraction"] is not None or cfg["train_count"] is not None:
        train = take_subset(train, cfg["train_fraction"], cfg["train_count"], True, int(cfg["seed"]))
    if trigger is not None:
        if target is None:
            raise EncoderGuardError("a trigger needs --target K (the attack's target class)")
        if not 0 <= target < test.num_classes:
            raise EncoderGuardError(f"--target {target} is not a class of {cfg['dataset']} (0..{test.num_classes - 1})")
    ecfg = EvalConfig(knn_k=int(cfg["knn_k"]), knn_temperature=float(cfg["knn_temperature"]),
                      probe_weight_decay=float(cfg["probe_weight_decay"]), seed=int(cfg["seed"]), cache=bool(cfg["cache"]),
                      device=str(cfg["device"]))
    kw: dict[str, Any] = dict(trigger=trigger, trigger_key=trigger.key() if trigger is not None else None, target=target)
    adapted_train, notes = adapt_dataset(train, encoder.spec)
    if notes:
        run.logger.info(f"adapted {cfg['dataset']} to the encoder: {', '.join(notes)}")
    metrics = evaluate_encoder(encoder, adapted_train, adapt_dataset(test, encoder.spec)[0], ecfg, **kw)
    metrics["adapted"] = notes
    if reference is not None:
        ref = evaluate_encoder(reference, adapt_dataset(train, reference.spec)[0], adapt_dataset(test, reference.spec)[0],
                               ecfg, **kw)
        metrics["reference"] = {k: v for k, v in ref.items() if k.startswith(("ca_", "asr_", "ra_"))}
    summary = f"CA linear {metrics['ca_linear']:.2%}  CA kNN {metrics['ca_knn']:.2%}"
    if trigger is not None:
        summary += f"  ASR linear {metrics['asr_linear']:.2%}  ASR kNN {metrics['asr_knn']:.2%}"
        if reference is not None:
            summary += (f"  (reference encoder: ASR linear {metrics['reference']['asr_linear']:.2%}, "
                        f"kNN {metrics['reference']['asr_knn']:.2%})")
    metrics.update({k: cfg[k] for k in ("encoder", "trigger") if k in cfg})
    run.write_json("metrics.json", metrics)
    run.logger.info(f"{summary}  → {run.file('metrics.json')}")
    return metrics
