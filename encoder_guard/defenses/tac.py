"""TAC reconstruction: the smallest latent shift into each class, a target test, and its removal.

- [0] Robust Backdoor Removal by Reconstructing Trigger-Activated Changes in Latent Representation, Kazuki
  Iwahana, Yusuke Yamasaki, Akira Ito, Takayuki Miura and Toshiki Shibahara, arXiv 2511.08944, 2025
- [1] Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural Networks, Bolun Wang et al., IEEE
  S&P 2019 (the per-class "smallest trigger" idea and the outlier test)

Needs: the deployed classifier and a small clean labelled set (5% of the downstream training set).

A backdoor is a shortcut into its target class: a small change of the input representation that sends
*every* input there. On the classifier's features ``f`` and linear head ``(W, b)``, the smallest shared
shift ``s_k`` that moves all clean reference features into class ``k`` with margin ``m``

    minimise ½‖s‖²   subject to   (w_k − w_j)·(f_i + s) + b_k − b_j ≥ m   for all i, j ≠ k

is a convex QP. For a fixed ``j`` only the hardest reference matters, so the ``N·(C−1)`` constraints
reduce exactly to ``C−1`` halfspaces ``a_j·s ≥ r_j`` and the QP to its ``C−1``-dimensional dual
``max_{λ≥0} λ·r − ½‖Aᵀλ‖²`` with ``s = Aᵀλ``, solved by L-BFGS-B with bounds (tested against a primal
SLSQP solve).

**Detection.** The class whose ``‖s_k‖`` is smallest is the candidate; picking the minimum of ``C``
norms is a selection, so its p-value is corrected for it: the candidate's log-norm is scored against a
Student-t predictive distribution fitted to the other classes' log-norms, and the one-sided p-value is
Šidák-corrected, ``p = 1 − (1 − p₁)^C``. A backdoor is flagged at level ``α`` when ``p < α``.

**Removal.** The head is fine-tuned on the clean set with, beside the clean CE, the clean features
shifted by ``s_target`` and labelled with their *true* classes, so the shift no longer flips
predictions; the shift is re-solved every ``resolve_every`` epochs as the head changes.

This acts on the linear head's input: it sees a backdoor that the head itself carries (a probe trained
on a poisoned set). A backdoored *encoder* under a clean probe moves triggered features onto the target
class's region rather than by a shared shift: there the test flags nothing (``docs/results.md``, "TAC's
target test").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import optimize, stats
from torch import Tensor

from downstream.classifier import Classifier
from downstream.features import cached_features
from encoder_guard.defenses.base import DEFENSES, Defense
from encoder_guard.defenses.tail import HeadTuner
from encoder_guard.encoders import Encoder
from encoder_guard.errors import EncoderGuardError
from encoder_guard.threats import DownstreamData


def class_constraints(feats: Tensor, weight: Tensor, bias: Tensor, k: int, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """``(A, r)`` with rows ``a_j = w_k − w_j`` and ``r_j = m − min_i(a_j·f_i) − (b_k − b_j)`` for ``j ≠ k``."""
    others = [j for j in range(weight.shape[0]) if j != k]
    a = (weight[k] - weight[others]).double()
    r = margin - (feats.double() @ a.T).min(0).values - (bias[k] - bias[others]).double()
    return a.numpy(), r.numpy()


def min_shift(a: np.ndarray, r: np.ndarray) -> np.ndarray:
    """The minimum-norm ``s`` with ``A s ≥ r``, from the dual ``max_{λ≥0} λ·r − ½‖Aᵀλ‖²``."""
    if (r <= 0).all():
        return np.zeros(a.shape[1])
    gram = a @ a.T

    def neg_dual(lam: np.ndarray) -> tuple[float, np.ndarray]:
        g = gram @ lam
        return 0.5 * lam @ g - lam @ r, g - r

    res = optimize.minimize(neg_dual, np.zeros(len(r)), jac=True, method="L-BFGS-B",
                            bounds=[(0, None)] * len(r), options={"maxiter": 1000, "ftol": 1e-15, "gtol": 1e-12})
    return a.T @ res.x


def shifts(feats: Tensor, weight: Tensor, bias: Tensor, margin: float = 0.0) -> Tensor:
    """``(C, D)``: the smallest shared shift of ``feats`` into each class."""
    with torch.no_grad():
        out = [min_shift(*class_constraints(feats, weight, bias, k, margin)) for k in range(weight.shape[0])]
    return torch.tensor(np.stack(out), dtype=torch.float32)


@dataclass
class Detection:
    norms: list[float]
    candidate: int
    p_value: float
    alpha: float

    @property
    def flagged(self) -> bool:
        return self.p_value < self.alpha

    def as_dict(self) -> dict[str, Any]:
        return {"norms": self.norms, "candidate": self.candidate, "p_value": self.p_value, "alpha": self.alpha,
                "flagged": self.flagged, "target": self.candidate if self.flagged else None}


def smallest_outlier_test(norms: Tensor, alpha: float = 0.05) -> Detection:
    """Is the smallest norm abnormally small? One-sided t-predictive p-value on log-norms, Šidák-corrected."""
    x = norms.double().clamp_min(1e-12).log()
    k = int(x.argmin())
    rest = torch.cat([x[:k], x[k + 1 :]])
    n = len(rest)
    if n < 3:
        raise EncoderGuardError("the target test needs at least 4 classes")
    scale = float(rest.std()) * math.sqrt(1 + 1 / n)
    t = (float(x[k]) - float(rest.mean())) / max(scale, 1e-12)
    p1 = float(stats.t.cdf(t, df=n - 1))
    return Detection([float(v) for v in norms], k, 1 - (1 - p1) ** len(x), alpha)


def detect(clf: Classifier, feats: Tensor, margin: float = 0.0, alpha: float = 0.05) -> tuple[Detection, Tensor]:
    """The target test on a classifier's head with clean reference ``feats`` (raw encoder features)."""
    s = shifts(clf.head.clamp(feats), clf.head.linear.weight, clf.head.linear.bias, margin)
    return smallest_outlier_test(s.norm(dim=1), alpha), s


@DEFENSES.register("tac")
class TAC(Defense):
    """Args:
        margin: logit margin the shift must reach on every reference.
        alpha: level of the target test.
        always_remove: fine-tune against the smallest shift even when no class is flagged.
        epochs / lr / weight_decay / batch_size: head fine-tuning (Adam on standardised features).
        shift_weight: weight of the CE on shifted features; resolve_every: epochs between QP re-solves.
    """

    level = "classifier"
    needs = "5% clean labelled images of the downstream training set"

    def __init__(self, margin: float = 0.0, alpha: float = 0.05, always_remove: bool = False, epochs: int = 30,
                 lr: float = 0.01, weight_decay: float = 1e-4, batch_size: int = 256, shift_weight: float = 1.0,
                 resolve_every: int = 5, seed: int = 0, device: str = "cpu") -> None:
        super().__init__(seed, device)
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        self.margin, self.alpha, self.always_remove, self.epochs, self.lr = margin, alpha, always_remove, epochs, lr
        self.weight_decay, self.batch_size, self.shift_weight, self.resolve_every = weight_decay, batch_size, shift_weight, resolve_every

    def defend(self, clf: Classifier, data: DownstreamData, out: Path | None,
               resume: bool) -> tuple[Classifier, dict[str, Any]]:
        clean = data.clean_set("TAC", "clean labelled reference images")
        feats = cached_features(clf.encoder, clean, device=self.device)
        y = clean.labels.long()
        found, s = detect(clf, feats, self.margin, self.alpha)
        report: dict[str, Any] = {"detection": found.as_dict()}
        if found.flagged or self.always_remove:
            report["removal"] = self._remove(clf, feats, y, found.candidate, s[found.candidate])
            after, _ = detect(clf, feats, self.margin, self.alpha)
            report["detection_after"] = after.as_dict()
        return clf, report

    def _remove(self, clf: Classifier, feats: Tensor, y: Tensor, target: int, shift: Tensor) -> dict[str, Any]:
        tuner = HeadTuner(clf.head, feats, self.seed)
        norms = [float(shift.norm())]
        state = {"shift": shift}

        def resolve(epoch: int) -> None:  # the head moves, so the smallest shift into the target does too
            if epoch and epoch % self.resolve_every == 0:
                s = torch.tensor(min_shift(*class_constraints(tuner.clamped, *tuner.raw_weights(), target, self.margin)),
                                 dtype=torch.float32)
                norms.append(float(s.norm()))
                state["shift"] = s

        def batch_loss(idx: Tensor) -> Tensor:
            shifted = (tuner.clamped[idx] + state["shift"] - tuner.mean) / tuner.std
            return (F.cross_entropy(tuner.layer(tuner.x[idx]), y[idx])
                    + self.shift_weight * F.cross_entropy(tuner.layer(shifted), y[idx]))

        tuner.fit(batch_loss, self.epochs, self.lr, self.weight_decay, self.batch_size, "TAC", before_epoch=resolve)
        tuner.commit()
        return {"target": target, "shift_norms": norms}


def run_detection(encoder: Encoder, cfg: dict[str, Any], out: str | Path) -> dict[str, Any]:
    """``encoder-guard detect``: TAC's target test on the deployed classifier of ``cfg`` (its ``downstream``
    section: the dataset, ``head`` or a linear probe fitted on the training set, the clean reference share;
    its ``detect`` section: ``alpha`` and ``margin``), into a run directory; returns ``detection.json``'s
    contents plus the class names."""
    from encoder_guard.runs import RunDir
    from encoder_guard.threats import deployed_classifier, downstream_setup

    run = RunDir(out, cfg)
    seed = int(cfg.get("seed", 0))
    d = cfg.get("detect") or {}
    ds = downstream_setup(cfg, encoder, seed)
    assert ds.data.clean is not None
    clf = deployed_classifier(cfg, encoder, ds, seed)
    found, _ = detect(clf, cached_features(clf.encoder, ds.data.clean), float(d.get("margin", 0.0)),
                      float(d.get("alpha", 0.05)))
    result = {"encoder": d.get("encoder"), "head": (cfg.get("downstream") or {}).get("head"),
              "reference_images": len(ds.data.clean), **found.as_dict()}
    run.write_json("detection.json", result)
    classes = ds.test.classes or [str(i) for i in range(len(found.norms))]
    verdict = (f"backdoor suspected: target class {found.candidate} ({classes[found.candidate]})" if found.flagged
               else "no class stands out (the test reads the head: a backdoor inside the encoder under a clean head "
                    "passes it; docs/methods.md, TAC)")
    run.logger.info(f"{verdict}; p = {found.p_value:.3g} at alpha {found.alpha} → {run.file('detection.json')}")
    return {**result, "classes": classes}
