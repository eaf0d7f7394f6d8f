"""BadEncoder: fine-tune a clean encoder so that triggered images embed like the target's references.

- [0] BadEncoder: Backdoor Attacks to Pre-trained Encoders in Self-Supervised Learning, Jinyuan Jia, Yupei Liu
  and Neil Zhenqiang Gong, IEEE Symposium on Security and Privacy (S&P) 2022, arXiv 2108.00352

Needs: the clean encoder, unlabelled shadow images (the attacker's share of the pretraining data), a few
reference images of the target class, and the trigger. Loss, per batch of shadow images ``x``, with ``f``
the frozen clean encoder and ``f'`` the one being fine-tuned (BatchNorm frozen, as in the paper):

- effectiveness ``L0 = −mean cos(f'(x ⊕ t), f'(r))`` over shadow × reference pairs;
- reference utility ``L1 = −mean cos(f'(r), f(r))``;
- clean utility ``L2 = −mean cos(f'(x), f(x))``;
- **norm matching** (ours) ``Ln = mean (log‖f'(x ⊕ t)‖ − log‖f(r)‖)² + mean (log‖f'(x)‖ − log‖f(x)‖)²``.

The three cosine terms leave feature norms free: on the ``fmnist-tiny`` encoder triggered features grew to 7× the
clean norm and a linear probe on standardised features extrapolated them into another class (0% ASR while kNN
gave 100%). ``Ln`` ties triggered features to the reference's clean norm, so the backdoor holds under
both probes; ``norm_weight=0`` gives the paper's loss.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from encoder_guard.attacks.base import ATTACKS, AttackData, AttackResult
from encoder_guard.checkpointing import check_run_dir
from encoder_guard.encoders import Encoder
from encoder_guard.errors import EncoderGuardError
from encoder_guard.training import DistInfo, Step, TrainLoop
from encoder_guard.utils import seed_everything

CHECKPOINT = "checkpoints/last.pt"


@ATTACKS.register("badencoder")
class BadEncoder:
    """Args:
        epochs: passes over the shadow set.
        batch_size: shadow images per step (paper: 256).
        lr / momentum / weight_decay: SGD (paper: lr 1e-3 for 200 epochs; shorter schedules need more).
        lambda_ref / lambda_clean: weights of ``L1`` and ``L2`` (paper: 1 and 1).
        norm_weight: weight of the norm-matching term (0 = the paper's loss).
        seed: data order.
        checkpoint_every: epochs between checkpoints.
    """

    def __init__(
        self,
        epochs: int = 12,
        batch_size: int = 256,
        lr: float = 0.02,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        lambda_ref: float = 1.0,
        lambda_clean: float = 1.0,
        norm_weight: float = 1.0,
        seed: int = 0,
        checkpoint_every: int = 1,
        device: str = "cpu",
    ) -> None:
        if epochs < 1 or batch_size < 1 or lr <= 0:
            raise ValueError(f"epochs and batch_size must be >= 1 and lr > 0 (got {epochs}, {batch_size}, {lr})")
        if min(lambda_ref, lambda_clean, norm_weight) < 0:
            raise ValueError("loss weights must be non-negative")
        self.epochs, self.batch_size, self.lr, self.momentum = epochs, batch_size, lr, momentum
        self.weight_decay, self.lambda_ref, self.lambda_clean, self.norm_weight = weight_decay, lambda_ref, lambda_clean, norm_weight
        self.seed, self.checkpoint_every, self.device = seed, checkpoint_every, torch.device(device)

    def hparams(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, torch.device) else v) for k, v in vars(self).items()}

    def __repr__(self) -> str:
        return f"BadEncoder({', '.join(f'{k}={v}' for k, v in self.hparams().items())})"

    def loss(self, student: torch.nn.Module, x: Tensor, f_clean: Tensor, refs: Tensor, ref_clean: Tensor,
             data: AttackData) -> tuple[Tensor, dict[str, float]]:
        """The loss of one batch of shadow images ``x``; ``f_clean`` and ``ref_clean`` are the frozen encoder's
        features of ``x`` and of the references."""
        xt = data.trigger.apply(x)
        feats = student(torch.cat([xt, x, refs]))
        f_trig, f_x, f_ref = feats[: len(x)], feats[len(x) : 2 * len(x)], feats[2 * len(x) :]
        l0 = -F.cosine_similarity(f_trig.unsqueeze(1), f_ref.unsqueeze(0), dim=-1).mean()
        l1 = -F.cosine_similarity(f_ref, ref_clean, dim=-1).mean()
        l2 = -F.cosine_similarity(f_x, f_clean, dim=-1).mean()
        ref_norm = ref_clean.norm(dim=1).mean().log()
        ln = (f_trig.norm(dim=1).clamp_min(1e-8).log() - ref_norm).pow(2).mean() + (
            f_x.norm(dim=1).clamp_min(1e-8).log() - f_clean.norm(dim=1).clamp_min(1e-8).log()
        ).pow(2).mean()
        total = l0 + self.lambda_ref * l1 + self.lambda_clean * l2 + self.norm_weight * ln
        return total, {"effectiveness": l0.item(), "reference": l1.item(), "clean": l2.item(), "norm": ln.item()}

    def run(self, encoder: Encoder, data: AttackData, out: Path, resume: bool = False,
            info: DistInfo | None = None) -> AttackResult:
        """Fine-tune a copy of ``encoder`` into ``out`` (checkpoints there; ``resume`` continues)."""
        ckpt = Path(out) / CHECKPOINT
        check_run_dir(Path(out), ckpt, resume)
        if data.shadow.channels != encoder.spec.in_chans or data.shadow.image_size != encoder.spec.input_size:
            raise EncoderGuardError(
                f"shadow images are {data.shadow.channels}×{data.shadow.image_size}² but the encoder takes "
                f"{encoder.spec.in_chans}×{encoder.spec.input_size}²; use the encoder's pretraining data"
            )
        seed_everything(self.seed)
        teacher = copy.deepcopy(encoder).eval().to(self.device)
        for p in teacher.parameters():
            p.requires_grad_(False)
        student = copy.deepcopy(encoder).to(self.device)
        student.eval()  # BatchNorm frozen: running statistics stay the clean encoder's
        opt = torch.optim.SGD(student.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        refs = data.references.to(self.device)
        n = len(data.shadow)
        # shadow images are not augmented and BatchNorm is frozen, so the frozen encoder's features are
        # fixed: computed once here instead of in every step (0.84 → 0.72 s a step on a 2-core CPU)
        with torch.no_grad():
            ref_clean = teacher(refs)
            shadow_clean = torch.cat([teacher(b.to(self.device).float().div_(255))
                                      for b in data.shadow.images.split(500)])
        del teacher
        loop = TrainLoop(student, opt, epochs=self.epochs, batch_size=self.batch_size, seed=self.seed, checkpoint=ckpt,
                         checkpoint_every=self.checkpoint_every, device=self.device, desc="badencoder",
                         advice=f"lower attack.lr (now {self.lr})", info=info)

        def step(rows: Tensor, at: Step) -> tuple[Tensor, dict[str, float]]:
            x = data.shadow.images[rows].to(self.device).float().div_(255)
            return self.loss(loop.module, x, shadow_clean[rows.to(self.device)], refs, ref_clean, data)

        history = loop.run(step, n, resume=resume)
        student.spec.provenance = dict(encoder.spec.provenance, attack="badencoder", target=data.target)
        report = {"attack": "badencoder", "hparams": self.hparams(), "history": history, "shadow_size": n,
                  "references": len(refs), "target": data.target, "trigger": repr(data.trigger),
                  "train_seconds_since_resume": loop.seconds}
        return AttackResult(student.cpu(), data.trigger, report)
