"""Distillation on clean unlabelled data: the losses and the loop behind MIMIC and its baselines.

One loop serves four defenses, which differ in where the student starts, who teaches it and which losses
are on (:class:`Distillation` holds the switches; ``mimic.py`` and ``ssl_baselines.py`` register the four):

- **MIMIC**: a student from random initialisation, taught by the given (possibly backdoored) encoder with
  NT-Xent + clone loss + attention loss whose per-stage weights grow with the teacher's per-stage mutual
  information with its final features;
- **SSL fine-tuning**: the given encoder itself, NT-Xent only;
- **plain distillation**: a random student, clone loss only;
- **NAD**, SSL version: the teacher is the given encoder after SSL fine-tuning; the student is the given
  encoder, trained with NT-Xent + attention loss (uniform stage weights).

Losses on two augmented views ``v`` of each clean image (student ``s``, teacher ``t``, frozen; with
``teacher_views`` the second view is drawn from them and the clone and attention terms use it alone):

- NT-Xent ([3]) on a fresh SimCLR projection head of the student (lightly's ``NTXentLoss``);
- clone ``1 − cos(s(v), t(v))``, averaged over views; with ``clone_space="standardised"`` both features are
  first z-scored per dimension by the teacher's mean and standard deviation over the clean images
  (unaugmented, computed once): on raw features the cosine is dominated by the teacher's few
  high-variance dimensions, and a student that matched them (cos 0.945) came out with a lower effective
  rank than its teacher (37.5 against 55.8), which kNN feels more than a linear probe does;
- attention ``Σ_l w_l · ‖a(s_l(v)) − a(t_l(v))‖²`` with ``a(F) = normalise(Σ_c F_c²)`` over positions, the
  activation-based attention map of [2] (squared, per-sample L2-normalised), averaged over the batch.

``student_noise`` (:class:`StudentNoise`) perturbs a share of the student's taught views (a noise blend, a
random square, a smooth random warp) while the teacher's stay clean, so the clone and attention losses teach
the student to answer a perturbed image as the teacher answers the clean one.

The student trains in train mode (its BatchNorm statistics are learned from the clean data); the teacher
stays in eval mode. Views use :mod:`encoder_guard.augment`, the pretraining recipe's batched augmentation.
:class:`encoder_guard.training.TrainLoop` runs the steps: cosine learning rate to 0, checkpoints, NaN guard,
bf16 autocast where the hardware runs it natively (``Schedule.precision``; every loss in fp32), the
exponential moving average of the student returned in its place (``Schedule.ema``), and DDP under
``torchrun``. ``Schedule.channels_last`` runs student and teacher in NHWC layout (on a 2-core CPU in fp32,
the fmnist-tiny student's forward and backward on 256 images take 0.36 s instead of 0.44 s); the returned
student is back in the default layout, which is what checkpoints store.

- [0] Mutual Information Guided Backdoor Mitigation for Pre-trained Encoders, Tingxu Han, Weisong Sun, Ziqi
  Ding, Chunrong Fang, Hanwei Qian, Jiaxun Li, Zhenyu Chen and Xiangyu Zhang, IEEE Transactions on Information
  Forensics and Security (TIFS) 2025, arXiv 2406.03508
- [1] Neural Attention Distillation: Erasing Backdoor Triggers from Deep Neural Networks, Yige Li et al.,
  ICLR 2021, arXiv 2101.05930
- [2] Paying More Attention to Attention, Sergey Zagoruyko and Nikos Komodakis, ICLR 2017, arXiv 1612.03928
- [3] A Simple Framework for Contrastive Learning of Visual Representations, Ting Chen et al., ICML 2020,
  arXiv 2002.05709
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol, Sequence

import torch
import torch.nn.functional as F
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from torch import Tensor, nn

from encoder_guard.augment import ViewConfig, augment
from encoder_guard.defenses.base import Defense
from encoder_guard.encoders import Encoder, load_encoder, save_encoder
from encoder_guard.mi import build_estimator
from encoder_guard.mi.layers import layer_mutual_information, mi_weights
from encoder_guard.runs import get_logger
from encoder_guard.threats import DefenseData
from encoder_guard.training import Step, TrainLoop, cosine_lr, init_distributed
from encoder_guard.triggers.warp import wanet_grid
from encoder_guard.utils import PRECISIONS, autocast, resolve_precision, seeded_choice, step_generator

TAPS = ("layer1", "layer2", "layer3", "layer4")
CLONE_SPACES = ("raw", "standardised")


def attention_map(feature: Tensor) -> Tensor:
    """``(B, C, H, W)`` → ``(B, H·W)``: channel-summed squared activation, L2-normalised per sample."""
    return F.normalize(feature.pow(2).sum(dim=1).flatten(1), dim=1)


def attention_loss(student: Sequence[Tensor], teacher: Sequence[Tensor], weights: Sequence[float],
                   per_position: bool = False) -> Tensor:
    """``Σ_l w_l · mean_b ‖a(s_l) − a(t_l)‖²`` over paired stage maps; ``per_position`` divides each stage's
    term by its ``H·W`` positions (the mean squared error of MIMIC's public code)."""
    terms = [w * (attention_map(s) - attention_map(t)).pow(2).sum(dim=1).mean() / (s.shape[-2] * s.shape[-1] if per_position else 1)
             for s, t, w in zip(student, teacher, weights)]
    return torch.stack(terms).sum()


def clone_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """``mean_b (1 − cos(s_b, t_b))`` over ``(B, D)`` features."""
    return (1 - F.cosine_similarity(student, teacher, dim=1)).mean()


@dataclass
class LossWeights:
    """Weights of the three terms and of each tapped stage inside the attention term."""

    ssl: float = 1.0
    clone: float = 1.0
    attention: float = 1.0
    taps: list[str] = field(default_factory=lambda: list(TAPS))
    stages: list[float] = field(default_factory=lambda: [1.0] * len(TAPS))
    per_position: bool = False  # attention terms averaged over positions (with ``reference`` stage weights)

    def __post_init__(self) -> None:
        if min(self.ssl, self.clone, self.attention) < 0:
            raise ValueError("loss weights must be non-negative")
        if self.ssl == self.clone == self.attention == 0:
            raise ValueError("at least one of the ssl, clone and attention weights must be positive")
        if len(self.taps) != len(self.stages):
            raise ValueError(f"{len(self.taps)} taps but {len(self.stages)} stage weights")


@dataclass
class Schedule:
    """The optimisation: Adam with a cosine rate to 0 over ``epochs``, batches of ``batch_size`` clean images."""

    epochs: int = 40
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-6
    temperature: float = 0.5
    checkpoint_every: int = 5
    ema: float = 0.0
    channels_last: bool = True
    precision: str = "auto"

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2 or self.lr <= 0 or self.temperature <= 0:
            raise ValueError("epochs >= 1, batch_size >= 2, lr > 0 and temperature > 0 are required")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {self.precision!r}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema is a decay in [0, 1) (0: off), not {self.ema}")


class ViewPerturbation(Protocol):
    """What perturbs the student's taught views: ``(views, generator) → views``, off where ``active`` is false."""

    @property
    def active(self) -> bool: ...

    def __call__(self, v: Tensor, g: torch.Generator) -> Tensor: ...


@dataclass
class StudentNoise:
    """Perturbations of the student's copy of the taught view, while the teacher sees ``v`` itself.

    - noise blend: with probability ``p`` a sample is blended with a fresh uniform-noise image,
      ``(1 − α)·v + α·u`` with ``α ~ U(0, alpha)``;
    - patch: with probability ``patch`` a square of side ``U(patch_side)`` × image side, at a uniform
      position, is replaced by uniform noise, a flat grey level or a two-level checkerboard;
    - warp: with probability ``warp`` the sample is resampled along a smooth random field (WaNet's
      construction: ``k×k`` control points, ``k ∈ {3..6}``, displacement ``U(0, warp_strength)`` in WaNet's
      units).

    The clone and attention losses then ask the student to answer a perturbed image as the teacher answers
    the clean one, so the student learns to ignore these perturbations, and a trigger of the same kind is one
    (after the augmentation defenses of Borgnia et al., "Strong Data Augmentation Sanitizes Poisoning and
    Backdoor Attacks Without an Accuracy Tradeoff", ICASSP 2021, arXiv 2011.09527).
    """

    alpha: float = 0.0
    p: float = 0.25
    patch: float = 0.0
    patch_side: tuple[float, float] = (0.1, 0.35)
    warp: float = 0.0
    warp_strength: float = 3.0

    def __post_init__(self) -> None:
        for name in ("alpha", "p", "patch", "warp"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"student noise {name} must be in [0, 1], got {getattr(self, name)}")
        lo, hi = self.patch_side
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"student noise patch_side must be 0 < low <= high <= 1, got {self.patch_side}")
        if self.warp_strength <= 0:
            raise ValueError(f"student noise warp_strength must be positive, got {self.warp_strength}")

    @property
    def active(self) -> bool:
        return self.alpha * self.p > 0 or self.patch > 0 or self.warp > 0

    def __call__(self, v: Tensor, g: torch.Generator) -> Tensor:
        b = v.shape[0]
        if self.alpha * self.p > 0:
            alpha = torch.rand(b, 1, 1, 1, generator=g, device=v.device) * self.alpha
            alpha = alpha * (torch.rand(b, 1, 1, 1, generator=g, device=v.device) < self.p)
            noise = torch.rand(v.shape, generator=g, device=v.device)
            v = (1 - alpha) * v + alpha * noise
        if self.patch > 0:
            v = self._patch(v, torch.rand(b, generator=g, device=v.device) < self.patch, g)
        if self.warp > 0:
            v = self._warp(v, torch.rand(b, generator=g, device=v.device) < self.warp, g)
        return v

    def _patch(self, v: Tensor, rows: Tensor, g: torch.Generator) -> Tensor:
        n, (c, h, w), dev = int(rows.sum()), v.shape[1:], v.device
        if n == 0:
            return v
        lo, hi = self.patch_side
        side = (lo + (hi - lo) * torch.rand(n, generator=g, device=dev)).mul(min(h, w)).round().clamp_min(1)
        y0 = (torch.rand(n, generator=g, device=dev) * (h - side + 1)).floor()
        x0 = (torch.rand(n, generator=g, device=dev) * (w - side + 1)).floor()
        ys, xs = torch.arange(h, device=dev).view(1, h, 1), torch.arange(w, device=dev).view(1, 1, w)
        inside = ((ys >= y0.view(-1, 1, 1)) & (ys < (y0 + side).view(-1, 1, 1))
                  & (xs >= x0.view(-1, 1, 1)) & (xs < (x0 + side).view(-1, 1, 1))).unsqueeze(1)
        kind = torch.randint(0, 3, (n, 1, 1, 1), generator=g, device=dev)
        levels = torch.rand(n, c, 1, 2, generator=g, device=dev)
        checker = ((ys + xs) % 2).unsqueeze(1).to(v.dtype)
        low, high = levels[..., :1], levels[..., 1:]
        patterns = torch.where(kind == 0, torch.rand(n, c, h, w, generator=g, device=dev),
                               torch.where(kind == 1, low.expand(n, c, h, w), low + (high - low) * checker))
        out = v.clone()
        out[rows] = torch.where(inside, patterns.to(v.dtype), v[rows])
        return out

    def _warp(self, v: Tensor, rows: Tensor, g: torch.Generator) -> Tensor:
        n, h, dev = int(rows.sum()), v.shape[-1], v.device
        if n == 0:
            return v
        k = int(torch.randint(3, 7, (1,), generator=g, device=dev))
        control = torch.rand(n, 2, k, k, generator=g, device=dev) * 2 - 1
        grid = wanet_grid(control, h, torch.rand(n, 1, 1, 1, generator=g, device=dev) * self.warp_strength)
        out = v.clone()
        out[rows] = F.grid_sample(v[rows], grid.to(v.dtype), mode="bilinear", padding_mode="border",
                                  align_corners=True).clamp(0, 1)
        return out


class Student(nn.Module):
    """The encoder being trained, the stage maps its attention loss reads, and the projection head NT-Xent
    needs (dropped afterwards). One ``forward`` computes all three, so DDP sees every trained parameter."""

    def __init__(self, encoder: Encoder, taps: Sequence[str], head: bool) -> None:
        super().__init__()
        self.encoder, self.taps = encoder, list(taps)
        self.head = SimCLRProjectionHead(encoder.feature_dim, 512, 128) if head else None

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor], Tensor | None]:
        feats, maps = self.encoder.forward_intermediates(x, self.taps) if self.taps else (self.encoder(x), [])
        z = self.head(feats).float() if self.head is not None else None
        return feats, maps, z


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
    student_noise: ViewPerturbation | None = None,
    seed: int = 0,
    device: str = "cpu",
) -> list[dict[str, float]]:
    """Train ``student`` in place on ``images`` (uint8 N×C×H×W); returns per-epoch mean losses.

    ``clone_space`` is ``raw`` or ``standardised`` (the clone loss on features z-scored by the teacher's
    statistics over ``images``). ``teacher`` may be ``None`` only when the clone and attention weights are 0.
    With ``teacher_views`` the second view of each image is drawn from it, and the teacher's losses see only
    that view. Under ``torchrun`` every process trains on its share of each batch.
    """
    if teacher is None and (weights.clone > 0 or weights.attention > 0):
        raise ValueError("the clone and attention losses need a teacher")
    if clone_space not in CLONE_SPACES:
        raise ValueError(f"clone_space must be one of {CLONE_SPACES}, not {clone_space!r}")
    dev = torch.device(device)
    info = init_distributed(device)
    precision = resolve_precision(schedule.precision, dev)
    layout = torch.channels_last if schedule.channels_last else torch.contiguous_format
    use_maps = weights.attention > 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the projection head's initialisation
        model = Student(student, weights.taps if use_maps else [], head=weights.ssl > 0)
    model = model.to(dev, memory_format=layout).train()  # type: ignore[call-overload]
    for p in model.parameters():
        p.requires_grad_(True)
    if teacher is not None:
        teacher = teacher.to(dev, memory_format=layout).eval()  # type: ignore[call-overload]
        for p in teacher.parameters():
            p.requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=schedule.lr, weight_decay=schedule.weight_decay)
    n = len(images)
    bs = min(schedule.batch_size, n)
    total = schedule.epochs * max(1, n // bs)
    ntxent = NTXentLoss(temperature=schedule.temperature, gather_distributed=True)
    shift: Tensor | float = 0.0
    scale: Tensor | float = 1.0
    if teacher is not None and weights.clone > 0 and clone_space == "standardised":
        with torch.no_grad(), autocast(dev, precision):
            chunks = (images[i : i + 512].to(dev).float().div(255) for i in range(0, len(images), 512))
            t_all = torch.cat([teacher(x.contiguous(memory_format=layout)).float() for x in chunks])
        shift, scale = t_all.mean(0), t_all.std(0).clamp_min(1e-6)  # the teacher's, on the clean images
    second_views = teacher_views or views
    noise = student_noise if student_noise is not None and student_noise.active and teacher is not None else None
    taps = weights.taps if use_maps else []
    loop = TrainLoop(model, opt, epochs=schedule.epochs, batch_size=bs, seed=seed, checkpoint=checkpoint,
                     checkpoint_every=schedule.checkpoint_every, lr=lambda s: cosine_lr(s, total, schedule.lr),
                     precision=precision, device=dev, ema=schedule.ema, ema_of=model.encoder, desc=desc,
                     advice=f"lower the learning rate (defense.schedule.lr, now {schedule.lr})", info=info)

    def step(rows: Tensor, at: Step) -> tuple[Tensor, dict[str, float]]:
        x = images[rows].to(dev).float().div_(255)
        # on CPU the views draw from the epoch's generator, after the data order; elsewhere from one per step
        g = at.generator if dev.type == "cpu" else step_generator(seed, 1 + at.epoch, at.step, device=dev)
        v = torch.cat([augment(x, views, g), augment(x, second_views, g)]).contiguous(memory_format=layout)
        taught = slice(len(x), None) if teacher_views is not None else slice(None)  # the views the teacher sees
        v_s = v  # the student's input: the taught views noised where asked, the teacher's kept clean
        if noise is not None:
            v_s = v.clone()
            v_s[taught] = noise(v[taught], g)
        with loop.autocast():  # the networks in bf16 where native; every loss in fp32
            feats, maps, z = loop.module(v_s)
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
                parts["attention"] = attention_loss([m[taught] for m in maps], t_maps, weights.stages, weights.per_position)
        loss = sum(getattr(weights, k) * term for k, term in parts.items())
        assert isinstance(loss, Tensor)
        return loss, {k: val.item() for k, val in parts.items()}

    get_logger().info(f"{desc}: {schedule.epochs} epochs × {max(1, n // bs)} steps of {bs} on {dev}, {precision}, "
                      f"{info.world} process(es)")
    try:
        history = loop.run(step, n, resume=resume)
    finally:
        if teacher is not None:
            teacher.to(memory_format=torch.contiguous_format)
    student.cpu().to(memory_format=torch.contiguous_format).eval()
    return history


def fresh_copy(encoder: Encoder, seed: int) -> Encoder:
    """The same architecture, randomly initialised (seeded)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = Encoder(copy.deepcopy(encoder.spec))
    student.spec.provenance = {}
    return student


class Distillation(Defense):
    """A student distilled on clean unlabelled data: the settings MIMIC and its baselines share.

    Args:
        student_init: ``random`` (a fresh copy of the architecture) or ``copy`` (the given encoder).
        teacher: ``given`` (the encoder as it is) or ``finetuned`` (after ``teacher_epochs`` of SSL
            fine-tuning on the same clean data, as NAD does).
        teacher_epochs: SSL fine-tuning epochs of a ``finetuned`` teacher.
        ssl / clone / attention: loss weights.
        stage_weights: ``mi`` (proportional to per-stage MI, mean 1), ``uniform``, or ``reference`` (MIMIC's
            public code: ``1000 + 10000 · I_l / Σ I`` on attention terms averaged over positions).
        mi_model: whose stage MI sets the weights: ``teacher`` (the encoder being purified, as the paper
            describes) or ``student`` (the freshly initialised student, as MIMIC's public code computes it).
        taps: stages whose attention is distilled.
        mi: estimator settings: ``estimator`` (mine | infonce | gaussian), ``samples`` (clean images used),
            ``pool`` (cells per side each map is pooled to) and the estimator's own arguments.
        schedule: :class:`Schedule` fields (epochs, batch_size, lr, weight_decay, temperature,
            checkpoint_every, ema, channels_last, precision).
        augment: view augmentation (:class:`encoder_guard.augment.ViewConfig` fields).
        teacher_augment: overrides of ``augment`` for the second view, which is then the only view the
            teacher's losses see (``None``: both views drawn from ``augment``, both taught).
        clone_space: ``raw`` or ``standardised`` (see the module docstring).
        student_noise: :class:`StudentNoise` fields (``alpha: 0``, ``patch: 0``, ``warp: 0``: off).

    Nested settings (``mi``, ``schedule``, ``augment``, ``teacher_augment``, ``student_noise``) are merged
    over the class's own, so ``schedule: {epochs: 10}`` changes the epochs alone.
    """

    needs = "5% clean unlabelled images"
    checkpoints = True
    mi_defaults: ClassVar[dict[str, Any]] = {"estimator": "mine", "samples": 2000, "pool": 2, "steps": 500}
    augment_defaults: ClassVar[dict[str, Any]] = {"crop_scale": [0.2, 1.0], "hflip_p": 0.5, "jitter_p": 0.8,
                                                  "brightness": 0.4, "contrast": 0.4, "saturation": 0.0,
                                                  "grayscale_p": 0.0}

    def __init__(
        self,
        student_init: str = "random",
        teacher: str = "given",
        teacher_epochs: int = 0,
        ssl: float = 1.0,
        clone: float = 1.0,
        attention: float = 1.0,
        stage_weights: str = "mi",
        mi_model: str = "teacher",
        taps: Sequence[str] = TAPS,
        mi: dict[str, Any] | None = None,
        schedule: dict[str, Any] | None = None,
        augment: dict[str, Any] | None = None,
        teacher_augment: dict[str, Any] | None = None,
        clone_space: str = "raw",
        student_noise: dict[str, Any] | None = None,
        seed: int = 0,
        device: str = "cpu",
    ) -> None:
        super().__init__(seed, device)
        if student_init not in ("random", "copy"):
            raise ValueError(f"student_init must be 'random' or 'copy', not {student_init!r}")
        if teacher not in ("given", "finetuned"):
            raise ValueError(f"teacher must be 'given' or 'finetuned', not {teacher!r}")
        if teacher == "finetuned" and teacher_epochs < 1:
            raise ValueError("a finetuned teacher needs teacher_epochs >= 1")
        if clone_space not in CLONE_SPACES:
            raise ValueError(f"clone_space must be one of {CLONE_SPACES}, not {clone_space!r}")
        if stage_weights not in ("mi", "uniform", "reference"):
            raise ValueError(f"stage_weights must be 'mi', 'uniform' or 'reference', not {stage_weights!r}")
        if mi_model not in ("teacher", "student"):
            raise ValueError(f"mi_model must be 'teacher' or 'student', not {mi_model!r}")
        self.mi_model = mi_model
        self.student_init, self.teacher, self.teacher_epochs = student_init, teacher, teacher_epochs
        self.ssl, self.clone, self.attention, self.stage_weights = ssl, clone, attention, stage_weights
        self.taps, self.clone_space = list(taps), clone_space
        self.mi = {**self.mi_defaults, **(mi or {})}
        self.schedule = asdict(_build(Schedule, schedule, "schedule"))
        self.augment = {**self.augment_defaults, **(augment or {})}
        self.teacher_augment = None if teacher_augment is None else dict(teacher_augment)
        self.student_noise = asdict(_build(StudentNoise, student_noise, "student_noise"))
        self._weights = LossWeights(ssl, clone, attention, self.taps, [1.0] * len(self.taps),
                                    per_position=stage_weights == "reference")
        self._schedule = Schedule(**self.schedule)
        self._views = _build(ViewConfig, self.augment, "augment")
        self._teacher_views = (None if teacher_augment is None
                               else _build(ViewConfig, {**self.augment, **teacher_augment}, "teacher_augment"))

    def stage_mi(self, model: Encoder, data: DefenseData) -> list[dict[str, Any]]:
        """Per-stage MI of ``model`` (teacher or fresh student) on clean images (no augmentation)."""
        assert data.clean is not None
        opts = dict(self.mi)
        name, samples, pool = opts.pop("estimator"), int(opts.pop("samples")), int(opts.pop("pool"))
        idx = seeded_choice(torch.arange(len(data.clean)), samples, self.seed)
        images = data.clean.images[idx].float().div(255)
        estimator = build_estimator(name, seed=self.seed, **opts)
        return [r.to_dict() for r in layer_mutual_information(model, images, estimator, self.taps, pool)]

    def defend(self, encoder: Encoder, data: DefenseData, out: Path | None,
               resume: bool) -> tuple[nn.Module, dict[str, Any]]:
        if data.clean is None:
            raise ValueError("distillation needs clean images")
        assert out is not None  # Defense.__call__ gives a checkpointing defense a directory
        log = get_logger()
        report: dict[str, Any] = {}
        teacher = encoder
        if self.teacher == "finetuned":
            teacher = self._finetuned_teacher(encoder, data, out, resume)
        stages = [1.0] * len(self.taps)
        student = fresh_copy(encoder, self.seed) if self.student_init == "random" else copy.deepcopy(encoder)
        if self.attention > 0 and self.stage_weights != "uniform":
            t_mi = time.perf_counter()
            per_stage = self.stage_mi(student if self.mi_model == "student" else teacher, data)
            stages = mi_weights([s["mi"] for s in per_stage], self.stage_weights)
            report["stage_mi"] = per_stage
            report["mi_seconds"] = time.perf_counter() - t_mi
            log.info("stage MI (nats): " + ", ".join(f"{s['tap']} {s['mi']:.3f}" for s in per_stage))
        weights = replace(self._weights, stages=stages)
        report["stage_weights"] = dict(zip(self.taps, stages))
        needs_teacher = self.clone > 0 or self.attention > 0
        report["history"] = distill(student, teacher if needs_teacher else None, data.clean.images, weights,
                                    self._schedule, self._views, out / "checkpoints" / "student.pt", resume,
                                    desc="defend", teacher_views=self._teacher_views, clone_space=self.clone_space,
                                    student_noise=self.perturbation(), seed=self.seed, device=self.device)
        student.spec.provenance = dict(encoder.spec.provenance)
        report["precision"] = resolve_precision(self._schedule.precision, torch.device(self.device))
        return student, report

    def perturbation(self) -> ViewPerturbation:
        """What perturbs the student's taught views (``student_noise``; a subclass may put its own in)."""
        return StudentNoise(**self.student_noise)

    def _finetuned_teacher(self, encoder: Encoder, data: DefenseData, out: Path, resume: bool) -> Encoder:
        assert data.clean is not None
        path = out / "teacher.safetensors"
        if resume and path.exists():
            return load_encoder(path).eval()
        teacher = copy.deepcopy(encoder)
        sched = replace(self._schedule, epochs=self.teacher_epochs)
        distill(teacher, None, data.clean.images, LossWeights(1.0, 0.0, 0.0, [], []), sched, self._views,
                out / "checkpoints" / "teacher.pt", resume, desc="teacher", seed=self.seed, device=self.device)
        if init_distributed(self.device).main:
            save_encoder(teacher, path)
        return teacher.eval()


def _build(cls: Any, settings: dict[str, Any] | None, name: str) -> Any:
    """``cls(**settings)``, with an unknown key named together with the valid ones."""
    try:
        return cls(**(settings or {}))
    except TypeError as exc:
        valid = ", ".join(f.name for f in cls.__dataclass_fields__.values())
        raise ValueError(f"{name}: {exc}; its keys: {valid}") from exc


def merged(defaults: dict[str, Any], given: dict[str, Any] | None) -> dict[str, Any]:
    """``defaults`` with ``given``'s keys over them (a subclass's nested preset under the caller's settings)."""
    return {**defaults, **(given or {})}
