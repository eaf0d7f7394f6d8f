"""MIMIC and its baselines as registered defenses on the distillation loop.

- [0] Mutual Information Guided Backdoor Mitigation for Pre-Trained Encoders, Han et al., IEEE TIFS 2025

MIMIC's premise: a backdoor is a shortcut the student does not need. A fresh student that learns the
teacher's clean behaviour from a little clean data (clone loss on final features, attention loss on
stage maps, NT-Xent for its own structure) inherits the utility but not the trigger response, which
clean data never exercises. MI between each teacher stage and the teacher's final features says how
much that stage carries the representation; stages are distilled in proportion to it.

Clean data can exercise it through augmentation, though: on the BadEncoder ``fmnist-tiny`` encoder a
clean probe puts 6.7% of strongly augmented clean views (crops down to 20% of the image) in the target
class, against 4.6% on the clean encoder, and 2.9% against 2.5% for crops of at least 80% without
jitter. The preset therefore draws the second view weakly (``teacher_augment``: crops of at least 90% since
session 29) and lets the teacher teach on it alone, while NT-Xent still pairs it with a strong first view
(benchmarks/RESULTS.md, "MIMIC's teacher views" and "MIMIC since session 29").

One class, ``Distillation``, covers MIMIC and the three baselines (see ``distill.py``); the registry
maps each name to its defaults, and configs/defend/<name>.yaml exposes them all.
"""

from __future__ import annotations

import copy
import functools
import time
from pathlib import Path
from typing import Any

import torch

from encoder_guard.defenses.base import DEFENSES, DefenseData, DefenseResult
from encoder_guard.defenses.distill import CLONE_SPACES, LossWeights, Schedule, StudentNoise, distill, fresh_copy
from encoder_guard.encoders import Encoder, save_encoder, load_encoder
from encoder_guard.mi import build_estimator
from encoder_guard.mi.layers import layer_mutual_information, mi_weights
from encoder_guard.runs import get_logger
from encoder_guard.utils import resolve_precision, seeded_choice
from pretrain.augment import ViewConfig


class Distillation:
    """Args:
        student_init: ``random`` (a fresh copy of the architecture) or ``copy`` (the given encoder).
        teacher: ``given`` (the encoder as it is) or ``finetuned`` (after ``teacher_epochs`` of SSL
            fine-tuning on the same clean data, as NAD does).
        teacher_epochs: SSL fine-tuning epochs of a ``finetuned`` teacher.
        ssl / clone / attention: loss weights.
        clone_space: ``raw`` (cosine on the features as they are) or ``standardised`` (on features z-scored
            per dimension by the teacher's statistics on the clean data; see ``distill.py``).
        student_noise: ``alpha`` and ``p`` of ``distill.StudentNoise``: a share ``p`` of the student's taught
            views blended with uniform noise at a weight drawn from ``U(0, alpha)``, the teacher's kept clean
            (``alpha: 0``: off).
        stage_weights: ``mi`` (proportional to the teacher's per-stage MI, mean 1) or ``uniform``.
        taps: stages whose attention is distilled.
        mi: estimator settings: ``estimator`` (mine | infonce | gaussian), ``samples`` (clean images used),
            ``pool`` (cells per side each map is pooled to) and the estimator's own arguments.
        schedule: epochs, batch_size, lr, weight_decay, temperature, checkpoint_every, ema, channels_last and
            precision (``auto``: bf16 where the hardware runs it natively, as pretraining; the report names
            the one used).
        augment: view augmentation (``pretrain.augment.ViewConfig`` fields).
        teacher_augment: overrides of ``augment`` for the second view, which is then the only view the
            teacher's losses see (``None``: both views drawn from ``augment``, both taught). Strong views
            (small crops) already set a backdoored teacher off on clean images, and a student taught on them
            learns the response; weak ones do not (``benchmarks/view_response.py``).
        seed / device: the run's seed (student init, data order, views, MI) and device.
    """

    def __init__(
        self,
        student_init: str = "random",
        teacher: str = "given",
        teacher_epochs: int = 0,
        ssl: float = 1.0,
        clone: float = 1.0,
        attention: float = 1.0,
        stage_weights: str = "mi",
        taps: list[str] | None = None,
        mi: dict[str, Any] | None = None,
        schedule: dict[str, Any] | None = None,
        augment: dict[str, Any] | None = None,
        teacher_augment: dict[str, Any] | None = None,
        clone_space: str = "raw",
        student_noise: dict[str, Any] | None = None,
        seed: int = 0,
        device: str = "cpu",
    ) -> None:
        if student_init not in ("random", "copy"):
            raise ValueError(f"student_init must be 'random' or 'copy', not {student_init!r}")
        if teacher not in ("given", "finetuned"):
            raise ValueError(f"teacher must be 'given' or 'finetuned', not {teacher!r}")
        if teacher == "finetuned" and teacher_epochs < 1:
            raise ValueError("a finetuned teacher needs teacher_epochs >= 1")
        if clone_space not in CLONE_SPACES:  # checked here too, so a bad config fails before the MI estimates
            raise ValueError(f"clone_space must be one of {CLONE_SPACES}, not {clone_space!r}")
        if stage_weights not in ("mi", "uniform"):
            raise ValueError(f"stage_weights must be 'mi' or 'uniform', not {stage_weights!r}")
        self.student_init, self.teacher, self.teacher_epochs = student_init, teacher, teacher_epochs
        self.stage_weights = stage_weights
        self.taps = list(taps or ["layer1", "layer2", "layer3", "layer4"])
        self.weights = LossWeights(ssl, clone, attention, self.taps, [1.0] * len(self.taps))
        self.mi = {"estimator": "mine", "samples": 2000, "pool": 2, **(mi or {})}
        self.schedule = Schedule(**{**(schedule or {}), "seed": seed, "device": device})
        self.views = ViewConfig(**(augment or {}))
        self.clone_space = clone_space
        self.student_noise = StudentNoise(**(student_noise or {}))
        self.teacher_views = None if teacher_augment is None else ViewConfig(**{**self.views.to_dict(), **teacher_augment})

    def hparams(self) -> dict[str, Any]:
        return {"student_init": self.student_init, "teacher": self.teacher, "teacher_epochs": self.teacher_epochs,
                "ssl": self.weights.ssl, "clone": self.weights.clone, "attention": self.weights.attention,
                "stage_weights": self.stage_weights, "taps": self.taps, "mi": self.mi,
                "schedule": vars(self.schedule), "augment": self.views.to_dict(),
                "teacher_augment": None if self.teacher_views is None else self.teacher_views.to_dict(),
                "clone_space": self.clone_space, "student_noise": vars(self.student_noise)}

    def stage_mi(self, teacher: Encoder, data: DefenseData) -> list[dict[str, Any]]:
        """Per-stage MI of the teacher on clean images (no augmentation)."""
        opts = dict(self.mi)
        name, samples, pool = opts.pop("estimator"), int(opts.pop("samples")), int(opts.pop("pool"))
        idx = seeded_choice(torch.arange(len(data.clean)), samples, self.schedule.seed)
        images = data.clean.images[idx].float().div(255)
        estimator = build_estimator(name, seed=self.schedule.seed, **opts)
        return [r.to_dict() for r in layer_mutual_information(teacher, images, estimator, self.taps, pool)]

    def run(self, encoder: Encoder, data: DefenseData, out: Path, resume: bool = False) -> DefenseResult:
        log = get_logger()
        out = Path(out)
        t0 = time.perf_counter()
        report: dict[str, Any] = {"hparams": self.hparams(), "data": data.usage()}
        teacher = copy.deepcopy(encoder).eval()
        if self.teacher == "finetuned":
            teacher = self._finetuned_teacher(encoder, data, out, resume)
        stages = [1.0] * len(self.taps)
        if self.weights.attention > 0 and self.stage_weights == "mi":
            t_mi = time.perf_counter()
            per_stage = self.stage_mi(teacher, data)
            stages = mi_weights([s["mi"] for s in per_stage], "mi")
            report["stage_mi"] = per_stage
            report["mi_seconds"] = time.perf_counter() - t_mi
            log.info("stage MI (nats): " + ", ".join(f"{s['tap']} {s['mi']:.3f}" for s in per_stage))
        self.weights.stages = stages
        report["stage_weights"] = dict(zip(self.taps, stages))
        student = fresh_copy(encoder, self.schedule.seed) if self.student_init == "random" else copy.deepcopy(encoder)
        needs_teacher = self.weights.clone > 0 or self.weights.attention > 0
        history = distill(student, teacher if needs_teacher else None, data.clean.images, self.weights, self.schedule,
                          self.views, out / "checkpoints" / "student.pt", resume, desc="defend",
                          teacher_views=self.teacher_views, clone_space=self.clone_space,
                          student_noise=self.student_noise)
        student.spec.provenance = dict(encoder.spec.provenance)
        report["history"] = history
        report["precision"] = resolve_precision(self.schedule.precision, torch.device(self.schedule.device))
        report["wall_seconds_this_session"] = time.perf_counter() - t0
        return DefenseResult(student, report)

    def _finetuned_teacher(self, encoder: Encoder, data: DefenseData, out: Path, resume: bool) -> Encoder:
        path = out / "teacher.safetensors"
        if resume and path.exists():
            return load_encoder(path).eval()
        teacher = copy.deepcopy(encoder)
        sched = Schedule(**{**vars(self.schedule), "epochs": self.teacher_epochs})
        distill(teacher, None, data.clean.images, LossWeights(1.0, 0.0, 0.0, [], []), sched, self.views,
                out / "checkpoints" / "teacher.pt", resume, desc="teacher")
        save_encoder(teacher, path)
        return teacher.eval()


def _register(name: str, **defaults: Any) -> None:
    DEFENSES.register(name)(functools.partial(Distillation, **defaults))


# MIMIC with a half-weight clone loss on standardised features, longer, averaged, and taught on weak views only:
# measured in benchmarks/RESULTS.md (small crops set the teacher's backdoor off; without the clone loss the student misses
# the kNN CA of the 25-epoch preset's encoder; at full weight the clone loss carries the trigger back; on raw
# features it copies the teacher's dominant dimensions and misses the clean encoder's kNN no-harm line; without
# noise on a quarter of the student's taught views it copies the teacher's response to a blended noise trigger and
# to CTRL's frequency trigger; noising half costs the clean encoder's kNN CA, an eighth left 6.0% linear ASR; a
# softer NT-Xent (temperature 0.8) keeps the clean teacher's kNN CA on five seeds but, on the teacher's crops of
# 80% and more, left 6.0% linear ASR; on crops of 90% and more the ASR is back under the line)
_register("mimic", student_init="random", teacher="given", stage_weights="mi", clone=0.5, clone_space="standardised",
          attention=1.5, student_noise={"alpha": 0.3, "p": 0.25},
          schedule={"epochs": 80, "batch_size": 128, "lr": 2e-3, "ema": 0.998, "temperature": 0.8},
          teacher_augment={"crop_scale": (0.9, 1.0), "jitter_p": 0.0})
_register("finetune", student_init="copy", teacher="given", clone=0.0, attention=0.0)
_register("distill", student_init="random", teacher="given", ssl=0.0, attention=0.0)
_register("nad", student_init="copy", teacher="finetuned", teacher_epochs=10, clone=0.0, stage_weights="uniform")
