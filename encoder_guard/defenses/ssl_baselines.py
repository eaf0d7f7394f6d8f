"""MIMIC's baselines on the same distillation loop, clean data and evaluation.

- ``finetune``: SSL fine-tuning; the backdoored encoder itself trained further with NT-Xent on the clean data.
- ``distill``: plain knowledge distillation; a random student, clone loss only.
- ``nad``: Neural Attention Distillation in its SSL form; the teacher is the encoder after 10 epochs of SSL
  fine-tuning, the student is the encoder, trained with NT-Xent and the attention loss (uniform stage
  weights).

- [0] Neural Attention Distillation: Erasing Backdoor Triggers from Deep Neural Networks, Yige Li, Xixiang Lyu,
  Nodens Koren, Lingjuan Lyu, Bo Li and Xingjun Ma, ICLR 2021, arXiv 2101.05930
- [1] Distilling the Knowledge in a Neural Network, Geoffrey Hinton, Oriol Vinyals and Jeff Dean, NIPS Deep
  Learning Workshop 2014, arXiv 1503.02531

Needs: the encoder and clean unlabelled images (at most 5% of its pretraining set).
"""

from __future__ import annotations

from typing import Any

from encoder_guard.defenses.base import DEFENSES
from encoder_guard.defenses.distill import Distillation


@DEFENSES.register("finetune")
class SSLFinetune(Distillation):
    """SSL fine-tuning of the given encoder (NT-Xent only)."""

    def __init__(self, student_init: str = "copy", clone: float = 0.0, attention: float = 0.0, **kwargs: Any) -> None:
        super().__init__(student_init=student_init, clone=clone, attention=attention, **kwargs)


@DEFENSES.register("distill")
class PlainDistillation(Distillation):
    """A random student taught by the given encoder with the clone loss alone [1]."""

    def __init__(self, ssl: float = 0.0, clone: float = 1.0, attention: float = 0.0, **kwargs: Any) -> None:
        super().__init__(ssl=ssl, clone=clone, attention=attention, **kwargs)


@DEFENSES.register("nad")
class NAD(Distillation):
    """NAD [0]: the encoder taught by its own SSL-fine-tuned copy with NT-Xent and the attention loss."""

    def __init__(self, student_init: str = "copy", teacher: str = "finetuned", teacher_epochs: int = 10,
                 clone: float = 0.0, stage_weights: str = "uniform", **kwargs: Any) -> None:
        super().__init__(student_init=student_init, teacher=teacher, teacher_epochs=teacher_epochs, clone=clone,
                         stage_weights=stage_weights, **kwargs)
