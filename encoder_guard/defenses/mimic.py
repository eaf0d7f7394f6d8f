"""MIMIC: distil a backdoored encoder's clean behaviour into a fresh student, guided by per-stage MI.

- [0] Mutual Information Guided Backdoor Mitigation for Pre-trained Encoders, Tingxu Han, Weisong Sun, Ziqi
  Ding, Chunrong Fang, Hanwei Qian, Jiaxun Li, Zhenyu Chen and Xiangyu Zhang, IEEE Transactions on Information
  Forensics and Security (TIFS) 2025, arXiv 2406.03508

Needs: the encoder and clean unlabelled images (at most 5% of its pretraining set); no labels, nothing about
the trigger.

A backdoor is a shortcut the student does not need. A student of the same architecture, from random
initialisation, that learns the teacher's clean behaviour from a little clean data (a clone loss on the final
features, an attention loss on the stage maps, NT-Xent for its own structure) inherits the utility but not the
trigger response, which clean data never exercises. The mutual information between each teacher stage and
the teacher's final features (MINE) says how much that stage carries the representation; stages are
distilled in proportion to it (weights with mean 1).

The preset adds to the paper's method, each addition measured on the ``fmnist-tiny`` encoders
(``docs/methods.md`` lists the figures):

- the clone loss at weight 0.5 on features z-scored by the teacher's per-dimension statistics; at weight 1
  the clone loss carries part of the trigger response back, without it the student misses the clean kNN
  accuracy;
- attention weight 1.5;
- weak teacher views (``teacher_augment``: crops of at least 90%, no jitter): strong crops of clean images
  already set a backdoored teacher off, and a student taught on them learns the response;
- perturbations of the student's taught views while the teacher sees them clean (``student_noise``): a
  noise blend (weight up to 0.3) on a quarter, a random square (a tenth to a third of the side; noise, flat
  or checkerboard) on a quarter, a smooth random warp (WaNet's construction, strength up to 3) on half, so a
  blended, frequency, patch or warping trigger is not copied through the clone loss;
- NT-Xent at temperature 0.8, Adam 2e-3, batch 128, 80 epochs, and the exponential moving average of the
  student's weights (decay 0.998) returned in its place.

The stage weighting of MIMIC's public code (``1000 + 10000 · I_l / Σ I`` on attention terms averaged over
positions, the MI measured on the freshly initialised student) is ``stage_weights="reference",
mi_model="student", attention=1``.
"""

from __future__ import annotations

from typing import Any, Sequence

from encoder_guard.defenses.base import DEFENSES
from encoder_guard.defenses.distill import TAPS, Distillation, merged


@DEFENSES.register("mimic")
class MIMIC(Distillation):
    """Args: those of :class:`~encoder_guard.defenses.distill.Distillation`, with MIMIC's preset as defaults."""

    def __init__(
        self,
        clone: float = 0.5,
        attention: float = 1.5,
        stage_weights: str = "mi",
        taps: Sequence[str] = TAPS,
        clone_space: str = "standardised",
        student_noise: dict[str, Any] | None = None,
        schedule: dict[str, Any] | None = None,
        teacher_augment: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            clone=clone, attention=attention, stage_weights=stage_weights, taps=taps, clone_space=clone_space,
            student_noise=merged({"alpha": 0.3, "p": 0.25, "patch": 0.25, "warp": 0.5}, student_noise),
            schedule=merged({"epochs": 80, "batch_size": 128, "lr": 2e-3, "temperature": 0.8, "ema": 0.998}, schedule),
            teacher_augment=merged({"crop_scale": [0.9, 1.0], "jitter_p": 0.0}, teacher_augment),
            **kwargs,
        )
