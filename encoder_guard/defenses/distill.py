"""Distillation on clean unlabelled data: the loop behind MIMIC and its baselines.

One loop, four families of defense, chosen by where the student starts, who teaches it and which losses
are on (``encoder_guard.defenses.mimic`` and ``.baselines`` register them):

- **MIMIC** ([0]): a student from random initialisation, taught by the given (possibly backdoored)
  encoder with NT-Xent + clone loss + attention loss whose per-stage weights grow with the teacher's
  per-stage mutual information with its final features.
- **SSL fine-tuning**: the given encoder itself, NT-Xent only.
- **Plain distillation**: a random student, clone loss only.
- **NAD** ([1]), SSL version: the teacher is the given encoder after SSL fine-tuning; the student is the
  given encoder, trained with NT-Xent + attention loss (uniform stage weights).

Losses on two augmented views ``v`` of each clean image (student ``s``, teacher ``t``, frozen; with
``teacher_views`` the second view is drawn from them and the clone and attention terms use it alone):

- NT-Xent on a fresh SimCLR projection head of the student (lightly's ``NTXentLoss``);
- clone ``1 − cos(s(v), t(v))``, averaged over views; with ``clone_space="standardised"`` both features
  are first z-scored per dimension by the teacher's mean and standard deviation over the clean images
  (unaugmented, computed once). On raw features the cosine is dominated by the teacher's few
  high-variance dimensions and the mean they share; the student matched them (cos 0.945) but came out
  with a lower effective rank than its teacher (37.5 against 55.8), which kNN feels more than a linear
  probe does. Standardising makes every teacher dimension count (benchmarks/RESULTS.md, "MIMIC since session 22");
- attention ``Σ_l w_l · ‖a(s_l(v)) − a(t_l(v))‖²`` with ``a(F) = normalise(Σ_c F_c²)`` over positions,
  the activation-based attention map of [2] (squared, per-sample L2-normalised), averaged over the batch.

``student_noise`` (:class:`StudentNoise`) blends a share of the student's taught views with uniform noise while
the teacher's stay clean, so the clone and attention losses teach the student to answer a noisy image as the
teacher answers the clean one.

The student trains in train mode (its BatchNorm statistics are learned from the clean data); the teacher
stays in eval mode. Views use ``pretrain.augment`` so they match the pretraining recipe.

``Schedule.channels_last`` runs student and teacher in NHWC layout, as pretraining does (on a 2-core CPU in
fp32, the fmnist-tiny student's forward and backward on 256 images took 0.36 s instead of 0.44 s, the
teacher's forward on 128 0.033 s instead of 0.05 s). The returned student is back in the default layout,
which is what checkpoints store. ``Schedule.precision`` (``auto``, ``fp32``, ``bf16``) runs student, head and
teacher under bf16 autocast and every loss in fp32, as pretraining does; ``auto`` picks bf16 only where the
hardware runs it natively, so a defense's share of the pretraining time compares like with like (benchmarks/RESULTS.md).

``Schedule.ema`` > 0 returns, instead of the last weights, their exponential moving average (weights and
BatchNorm statistics, torch's ``AveragedModel``): on MIMIC a slower average trades clean accuracy for a
lower trigger response: the more early weights the average holds, the lower the ASR (benchmarks/RESULTS.md).

- [0] Mutual Information Guided Backdoor Mitigation for Pre-Trained Encoders, Han et al., IEEE TIFS 2025
- [1] Neural Attention Distillation, Li et al., ICLR 2021, https://arxiv.org/abs/2101.05930
- [2] Paying More Attention to Attention, Zagoruyko and Komodakis, ICLR 2017, https://arxiv.org/abs/1612.03928
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from encoder_guard.checkpointing import SaveOnInterrupt, load_state, save_state
from encoder_guard.encoders import Encoder
from encoder_guard.errors import CheckpointError, TrainingDivergedError
from encoder_guard.runs import get_logger
from encoder_guard.utils import PRECISIONS, autocast, resolve_precision, step_generator
from pretrain.augment import ViewConfig, augment


def attention_map(feature: Tensor) -> Tensor:
    """``(B, C, H, W)`` → ``(B, H·W)``: channel-summed squared activation, L2-normalised per sample."""
    return F.normalize(feature.pow(2).sum(dim=1).flatten(1), dim=1)


def attention_loss(student: Sequence[Tensor], teacher: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    terms = [w * (attention_map(s) - attention_map(t)).pow(2).sum(dim=1).mean() for s, t, w in zip(student, teacher, weights)]
    return torch.stack(terms).sum()


CLONE_SPACES = ("raw", "standardised")


def clone_loss(student: Tensor, teacher: Tensor) -> Tensor:
    return (1 - F.cosine_similarity(student, teacher, dim=1)).mean()


@dataclass
class LossWeights:
    """Weights of the three terms and of each tapped stage inside the attention term."""

    ssl: float = 1.0
    clone: float = 1.0
    attention: float = 1.0
    taps: list[str] = field(default_factory=lambda: ["layer1", "layer2", "layer3", "layer4"])
    stages: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0])

    def __post_init__(self) -> None:
        if min(self.ssl, self.clone, self.attention) < 0:
            raise ValueError("loss weights must be non-negative")
        if self.ssl == self.clone == self.attention == 0:
            raise ValueError("at least one of the ssl, clone and attention weights must be positive")
        if len(self.taps) != len(self.stages):
            raise ValueError(f"{len(self.taps)} taps but {len(self.stages)} stage weights")


@dataclass
class Schedule:
    epochs: int = 40
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-6
    temperature: float = 0.5
    seed: int = 0
    checkpoint_every: int = 5
    ema: float = 0.0
    channels_last: bool = True
    precision: str = "auto"
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2 or self.lr <= 0 or self.temperature <= 0:
            raise ValueError("epochs >= 1, batch_size >= 2, lr > 0 and temperature > 0 are required")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {self.precision!r}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema is a decay in [0, 1) (0: off), not {self.ema}")


@dataclass
class StudentNoise:
    """Noise on the student's copy of the taught view: with probability ``p`` a sample is blended with a fresh
    uniform-noise image, ``(1 − α)·v + α·u`` with ``α ~ U(0, alpha)``, while the teacher sees ``v``.

    The clone and attention losses then ask the student to answer a noisy image as the teacher answers the
    clean one, so the student learns to ignore low-amplitude noise patterns, and a blended-noise trigger is
    one (an addition to MIMIC, after the augmentation defenses of Borgnia et al., ICASSP 2021,
    https://arxiv.org/abs/2011.09527; benchmarks/RESULTS.md, "MIMIC since session 25"). A quarter of the views closes a
    blended-noise and a CTRL trigger's leak; half of them costs clean kNN accuracy (benchmarks/RESULTS.md, "MIMIC since
    session 26").
    """

    alpha: float = 0.0
    p: float = 0.25

    def __post_init__(self) -> None:
        if not 0 <= self.alpha <= 1 or not 0 <= self.p <= 1:
            raise ValueError(f"student noise alpha and p must be in [0, 1], got {self.alpha} and {self.p}")

    def __call__(self, v: Tensor, g: torch.Generator) -> Tensor:
        b = v.shape[0]
        alpha = torch.rand(b, 1, 1, 1, generator=g, device=v.device) * self.alpha
        alpha = alpha * (torch.rand(b, 1, 1, 1, generator=g, device=v.device) < self.p)
        noise = torch.rand(v.shape, generator=g, device=v.device)
        return (1 - alpha) * v + alpha * noise


class Student(nn.Module):
    """The encoder being trained plus the projection head NT-Xent needs (dropped afterwards)."""

    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = SimCLRProjectionHead(encoder.feature_dim, 512, 128)


def distill(
    student: Encoder,
    teacher: Encoder | None,
    images: Tensor,
    weights: LossWeights,
    schedule: Schedule,
    views: ViewConfig,
    checkpoint: Path,
    resume: bool = False,
    desc: str = "distill",
    teacher_views: ViewConfig | None = None,
    clone_space: str = "raw",
    student_noise: StudentNoise | None = None,
) -> list[dict[str, float]]:
    """Train ``student`` in place on ``images`` (uint8 N×C×H×W); returns per-epoch mean losses.

    ``clone_space`` is ``raw`` or ``standardised`` (the clone loss on features z-scored by the teacher's
    statistics over ``images``).

    ``teacher`` may be ``None`` only when the clone and attention weights are 0. With ``teacher_views``
    the second view of each image is drawn from it, and the teacher's losses see only that view.
    """
    log = get_logger()
    if teacher is None and (weights.clone > 0 or weights.attention > 0):
        raise ValueError("the clone and attention losses need a teacher")
    if clone_space not in CLONE_SPACES:
        raise ValueError(f"clone_space must be one of {CLONE_SPACES}, not {clone_space!r}")
    device = torch.device(schedule.device)
    precision = resolve_precision(schedule.precision, device)
    layout = torch.channels_last if schedule.channels_last else torch.contiguous_format
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(schedule.seed)  # the projection head's initialisation
        model = Student(student).to(device, memory_format=layout).train()
    if teacher is not None:
        teacher = teacher.to(device, memory_format=layout).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=schedule.lr, weight_decay=schedule.weight_decay)
    n = len(images)
    bs = min(schedule.batch_size, n)
    steps = max(1, n // bs)
    total = schedule.epochs * steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))  # cosine to 0
    ntxent = NTXentLoss(temperature=schedule.temperature)
    ema = None  # an exponential moving average of the student's weights and BatchNorm statistics, returned in its place
    if schedule.ema > 0:
        ema = AveragedModel(model.encoder, multi_avg_fn=get_ema_multi_avg_fn(schedule.ema), use_buffers=True)
    taps = list(weights.taps)
    use_maps = weights.attention > 0
    start, history = 0, []
    if resume and checkpoint.exists():
        state = load_state(checkpoint)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, history = state["epoch"], list(state["history"])
        if ema is not None:
            if "ema" not in state:
                raise CheckpointError(f"{checkpoint} was saved without an EMA student; resume with the ema it was started with "
                                      "(schedule.ema=0) or start a new run")
            ema.load_state_dict(state["ema"])
        log.info(f"{desc}: resuming at epoch {start + 1}/{schedule.epochs}")
    second_views = teacher_views or views
    shift, scale = 0.0, 1.0
    if weights.clone > 0 and clone_space == "standardised":  # a teacher pass only when the clone loss is on
        with torch.no_grad(), autocast(device, precision):
            chunks = (images[i : i + 512].to(device).float().div(255) for i in range(0, len(images), 512))
            t_all = torch.cat([teacher(x.contiguous(memory_format=layout)).float() for x in chunks])
        shift, scale = t_all.mean(0), t_all.std(0).clamp_min(1e-6)  # the teacher's, on the clean images
    taught = slice(bs, None) if teacher_views is not None else slice(None)  # the views the teacher's losses see
    log.info(f"{desc}: {schedule.epochs} epochs × {steps} steps of {bs} on {device}, {precision}")
    bar = tqdm(total=total, initial=start * steps, desc=desc, unit="step", mininterval=1.0)
    epoch = start
    try:
        with SaveOnInterrupt():
            for epoch in range(start, schedule.epochs):
                g = step_generator(schedule.seed, epoch)
                perm = torch.randperm(n, generator=g)
                # CUDA draws need a CUDA generator; on CPU order and views share one stream, as they always have
                g_views = g if device.type == "cpu" else step_generator(schedule.seed, 1 + epoch, device=device)
                sums: dict[str, float] = {}
                for i in range(steps):
                    x = images[perm[i * bs : (i + 1) * bs]].to(device).float().div_(255)
                    v = torch.cat([augment(x, views, g_views), augment(x, second_views, g_views)])
                    v = v.contiguous(memory_format=layout)
                    v_s = v  # the student's input: the taught views noised where asked, the teacher's kept clean
                    if student_noise is not None and student_noise.alpha * student_noise.p > 0 and teacher is not None:
                        v_s = v.clone()
                        v_s[taught] = student_noise(v[taught], g_views)
                    with autocast(device, precision):  # the networks in bf16 where native; every loss in fp32
                        feats, maps = model.encoder.forward_intermediates(v_s, taps) if use_maps else (model.encoder(v_s), [])
                        z = model.head(feats).float() if weights.ssl > 0 else None
                        if teacher is not None:
                            with torch.no_grad():
                                seen = v[taught]
                                t_feats, t_maps = teacher.forward_intermediates(seen, taps) if use_maps else (teacher(seen), [])
                    feats, maps = feats.float(), [m.float() for m in maps]
                    parts: dict[str, Tensor] = {}
                    if z is not None:
                        parts["ssl"] = ntxent(z[: len(x)], z[len(x) :])
                    if teacher is not None:
                        t_feats, t_maps = t_feats.float(), [m.float() for m in t_maps]
                        if weights.clone > 0:
                            parts["clone"] = clone_loss((feats[taught] - shift) / scale, (t_feats - shift) / scale)
                        if use_maps:
                            parts["attention"] = attention_loss([m[taught] for m in maps], t_maps, weights.stages)
                    loss = sum(getattr(weights, k) * term for k, term in parts.items())
                    if not torch.isfinite(loss):
                        raise TrainingDivergedError(f"{desc}: loss became {loss.item()} at epoch {epoch + 1}; lower lr (now {schedule.lr})")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    if ema is not None:
                        ema.update_parameters(model.encoder)
                    for k, val in parts.items():
                        sums[k] = sums.get(k, 0.0) + val.item() / steps
                    bar.update(1)
                    bar.set_postfix(epoch=f"{epoch + 1}/{schedule.epochs}", loss=f"{loss.item():.3f}", refresh=False)
                history.append({"epoch": epoch + 1, **sums})
                if (epoch + 1) % schedule.checkpoint_every == 0 or epoch + 1 == schedule.epochs:
                    state = {"model": model.state_dict(), "optimizer": opt.state_dict(),
                             "scheduler": sched.state_dict(), "epoch": epoch + 1, "history": history}
                    if ema is not None:
                        state["ema"] = ema.state_dict()
                    save_state(checkpoint, state)
                    log.info(f"{desc}: epoch {epoch + 1}/{schedule.epochs} " + " ".join(f"{k} {v:.4f}" for k, v in sums.items()))
    except KeyboardInterrupt:
        log.info(f"{desc}: interrupted; {checkpoint} holds the last saved epoch; continue with --resume")
        raise
    finally:
        bar.close()
        if teacher is not None:
            teacher.to(memory_format=torch.contiguous_format)
    if ema is not None:
        model.encoder.load_state_dict(ema.module.state_dict())
    model.encoder.cpu().to(memory_format=torch.contiguous_format).eval()
    return history


def fresh_copy(encoder: Encoder, seed: int) -> Encoder:
    """The same architecture, randomly initialised (seeded)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = Encoder(copy.deepcopy(encoder.spec))
    student.spec.provenance = {}
    return student
