"""The scanner contract: ``scanner.scan(encoder, images) -> ScanResult``.

A scanner decides whether a pre-trained encoder carries a backdoor from the encoder alone and a few clean,
unlabelled images, by *trigger inversion*: it optimises a mask and a pattern so that stamped images reach
the state a backdoor would put them in, and measures how small that trigger can be. A backdoored encoder
has a shortcut (a small patch that sends every input to one embedding); a clean encoder has none, so its
smallest working trigger is large.

Every scanner returns the same :class:`ScanResult`: the method's own statistic (``score``), the trigger that
decides it (an :class:`Inversion`), JSON-ready details and the wall time. Scores keep each paper's direction;
the class attribute :attr:`Scanner.higher_is_suspicious` says which way it points (DECREE's PL1: small means
backdoored; SSL-Cleanse's anomaly index: large means backdoored), so a calibrator can turn any score into one
"suspicion" direction.

:meth:`Scanner.scan` does the chores once: it converts ``uint8`` images to ``[0, 1]`` floats, moves the encoder to
``device``, puts it in eval mode and freezes it for the scan (its weights never receive a gradient), seeds the
global generator inside a forked random state, and times the run. A subclass implements :meth:`Scanner.run`
with the algorithm alone.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from encoder_guard.errors import EncoderGuardError
from encoder_guard.registry import Registry
from encoder_guard.triggers import PatchTrigger


def as_float_images(images: Tensor) -> Tensor:
    """``(N, C, H, W)`` images as float32 in ``[0, 1]`` (``uint8`` is divided by 255).

    Raises:
        ValueError: if ``images`` is not 4-D or a float tensor lies outside ``[0, 1]``.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    x = images.float()
    if x.numel() and (float(x.min()) < -1e-6 or float(x.max()) > 1 + 1e-6):
        raise ValueError(f"float images must lie in [0, 1], got [{float(x.min()):.3g}, {float(x.max()):.3g}]; "
                         "pass uint8 images or divide by 255")
    return x.clamp(0, 1)


def stamp(x: Tensor, mask: Tensor, pattern: Tensor) -> Tensor:
    """``(1 − m)·x + m·p`` clamped to ``[0, 1]``.

    Args:
        x: ``(B, C, H, W)`` images in ``[0, 1]``.
        mask: ``(H, W)`` or ``(1, H, W)``, broadcast over channels.
        pattern: ``(C, H, W)``.
    """
    return ((1 - mask) * x + mask * pattern).clamp(0, 1)


def mean_pairwise_cosine(z: Tensor) -> Tensor:
    """Mean cosine similarity over the ``B(B−1)`` off-diagonal pairs of the rows of ``z`` ``(B, D)``."""
    b = z.shape[0]
    if b < 2:
        raise ValueError("the mean pairwise cosine needs at least 2 embeddings")
    u = F.normalize(z, dim=1)
    sim = u @ u.T
    return (sim.sum() - sim.diagonal().sum()) / (b * (b - 1))


@torch.no_grad()
def embed(encoder: nn.Module, x: Tensor, batch_size: int = 256) -> Tensor:
    """The encoder's features of ``x`` ``(N, C, H, W)`` as ``(N, D)``, computed in batches without gradients."""
    return torch.cat([encoder(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def unit_mean(z: Tensor) -> Tensor:
    """The L2-normalised mean of the L2-normalised rows of ``z`` ``(N, D)``: the direction they share."""
    return F.normalize(F.normalize(z, dim=1).mean(dim=0), dim=0)


def sample_rows(n: int, count: int, generator: torch.Generator) -> Tensor:
    """``min(count, n)`` distinct indices of ``range(n)`` drawn by ``generator``, in increasing order (all of them
    when ``count ≥ n``, so a scan of every image sees them in the caller's order)."""
    return torch.randperm(n, generator=generator)[: min(count, n)].sort().values


def to_tanh_space(v: Tensor, scale: float = 2.0) -> Tensor:
    """``arctanh((v − 0.5)·scale)``: the unconstrained parameter that ``tanh(θ)/scale + 0.5`` maps back to ``v``.

    The argument is kept inside ``(−1, 1)`` so that a draw of exactly 0 does not start at an infinite parameter.
    """
    return torch.atanh(((v - 0.5) * scale).clamp(-1 + 1e-6, 1 - 1e-6))


def mask_centroid(mask: Tensor) -> list[float]:
    """The (row, column) centre of mass of an ``(H, W)`` mask (the image centre for an all-zero mask)."""
    h, w = mask.shape
    total = float(mask.sum())
    if total <= 0:
        return [(h - 1) / 2, (w - 1) / 2]
    rows = torch.arange(h, dtype=mask.dtype)
    cols = torch.arange(w, dtype=mask.dtype)
    return [float((mask.sum(1) * rows).sum()) / total, float((mask.sum(0) * cols).sum()) / total]


@dataclass
class Inversion:
    """An inverted trigger: stamped images are ``(1 − mask)·x + mask·pattern``.

    Attributes:
        mask: ``(H, W)`` in ``[0, 1]``, shared by every channel.
        pattern: ``(C, H, W)`` in ``[0, 1]``.
        size: the method's trigger-size statistic (DECREE: mean of the mask; SSL-Cleanse: mean of mask × pattern,
            or of the mask); 1.0 when no trigger met the method's attack criterion.
        success: the attack criterion this trigger reached (DECREE: mean pairwise cosine of the stamped batch;
            SSL-Cleanse: 1-NN hit rate on the target cluster).
        target: ``(D,)`` L2-normalised mean embedding of the stamped scan images.
        steps: optimisation steps taken when this trigger was recorded.
    """

    mask: Tensor
    pattern: Tensor
    size: float
    success: float
    target: Tensor
    steps: int

    def apply(self, x: Tensor) -> Tensor:
        """Stamp ``x`` (``(B, C, H, W)``, ``uint8`` or float in ``[0, 1]``): float images in ``[0, 1]``, same shape."""
        x = as_float_images(x)
        return stamp(x, self.mask.to(x.device, x.dtype), self.pattern.to(x.device, x.dtype))

    def as_trigger(self) -> PatchTrigger:
        """The trigger as a file-backed patch trigger, which ``evaluate --trigger`` and the defenses read."""
        return PatchTrigger(self.mask[None].detach().cpu(), self.pattern.detach().cpu())

    def summary(self) -> dict[str, Any]:
        """JSON-ready numbers that describe the trigger (its tensors are summarised, not dumped)."""
        m = self.mask.detach().float().cpu()
        return {
            "size": float(self.size),
            "success": float(self.success),
            "steps": int(self.steps),
            "mask_shape": list(m.shape),
            "mask_mean": float(m.mean()),
            "mask_max": float(m.max()),
            "mask_centroid": mask_centroid(m),
            "pattern_shape": list(self.pattern.shape),
            "pattern_mean": float(self.pattern.float().mean()),
            "target_dim": int(self.target.numel()),
        }


@dataclass
class ScanResult:
    """What a scan found.

    Attributes:
        method: the scanner's registry name.
        score: the method's own statistic (DECREE: PL1; SSL-Cleanse: anomaly index); its direction is
            ``details["higher_is_suspicious"]``.
        trigger: the trigger that decides the score.
        details: JSON-ready per-method record (settings, schedules, per-cluster numbers...).
        seconds: wall time of the scan.
    """

    method: str
    score: float
    trigger: Inversion
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable record (the trigger's tensors summarised). A non-finite score stays a float."""
        return {"method": self.method, "score": float(self.score), "seconds": float(self.seconds),
                "trigger": self.trigger.summary(), "details": _jsonable(self.details)}


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Tensor):
        return obj.tolist() if obj.numel() <= 64 else {"shape": list(obj.shape), "mean": float(obj.float().mean())}
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, float):
        return obj
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    return str(obj)


@contextmanager
def frozen(encoder: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """``encoder`` on ``device``, in eval mode, with no parameter requiring a gradient; afterwards every submodule's
    mode, every ``requires_grad`` flag and the device are as before."""
    params = list(encoder.parameters())
    flags = [p.requires_grad for p in params]
    modes = [(m, m.training) for m in encoder.modules()]
    tensors = params + list(encoder.buffers())
    home = tensors[0].device if tensors else device
    encoder.to(device).eval()
    for p in params:
        p.requires_grad_(False)
    try:
        yield encoder
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        for m, training in modes:
            m.training = training
        encoder.to(home)


class Scanner:
    """Base class of every registered scanner.

    Class attributes:
        name: the registry name.
        higher_is_suspicious: whether a larger ``score`` means "more likely backdoored".
        cutoff: the score at which the method flags an encoder when no clean reference population calibrates
            it; ``cutoff_source`` says where it comes from.

    Args:
        seed: seeds every random draw of the scan (same seed and device → same result on CPU).
        device: where the encoder and the trigger live during the scan.

    A subclass takes its settings as typed keyword arguments with the paper's defaults, validates them in its
    ``__init__`` and implements :meth:`run`.
    """

    name: ClassVar[str] = ""
    higher_is_suspicious: ClassVar[bool] = False
    cutoff: ClassVar[float] = math.nan
    cutoff_source: ClassVar[str] = ""

    def __init__(self, seed: int = 0, device: str = "cpu", **settings: Any) -> None:
        if settings:
            raise TypeError(f"{type(self).__name__} got unknown setting(s) {', '.join(sorted(settings))}; "
                            f"valid: {', '.join(self.setting_names())}")
        self.seed, self.device = int(seed), device

    def scan(self, encoder: nn.Module, images: Tensor) -> ScanResult:
        """Scan ``encoder`` (an :class:`~encoder_guard.encoders.Encoder` or any module mapping ``[0, 1]`` images
        ``(B, C, H, W)`` to features ``(B, D)``) with clean unlabelled ``images`` ``(N, C, H, W)``."""
        x = as_float_images(images)
        if len(x) < 2:
            raise ValueError(f"a scan needs at least 2 images, got {len(x)}")
        spec = getattr(encoder, "spec", None)
        if spec is not None and getattr(spec, "in_chans", x.shape[1]) != x.shape[1]:
            raise ValueError(f"the encoder takes {spec.in_chans}-channel images, got {x.shape[1]} channels")
        t0 = time.perf_counter()
        device = torch.device(self.device)
        with frozen(encoder, device), torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            score, trigger, details = self.run(encoder, x.to(device))
        seconds = time.perf_counter() - t0
        trigger = Inversion(trigger.mask.detach().cpu(), trigger.pattern.detach().cpu(), float(trigger.size),
                            float(trigger.success), trigger.target.detach().cpu(), int(trigger.steps))
        details = {"higher_is_suspicious": self.higher_is_suspicious, "settings": self.settings(), "seed": self.seed,
                   **details}
        return ScanResult(self.name, float(score), trigger, details, seconds)

    def run(self, encoder: nn.Module, images: Tensor) -> tuple[float, Inversion, dict[str, Any]]:
        """The algorithm on a frozen, eval-mode ``encoder`` and float ``images`` on the scan device:
        ``(score, deciding trigger, details)``."""
        raise NotImplementedError

    @classmethod
    def setting_names(cls) -> list[str]:
        """The settings the subclass's ``__init__`` takes (besides ``seed`` and ``device``)."""
        params = inspect.signature(cls.__init__).parameters.values()
        return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                and p.name not in ("self", "seed", "device")]

    def settings(self) -> dict[str, Any]:
        """The settings as ``__init__`` takes them, so ``type(s)(seed=s.seed, **s.settings())`` rebuilds ``s``."""
        return {name: getattr(self, name) for name in self.setting_names()}

    def __repr__(self) -> str:
        shown = {**self.settings(), "seed": self.seed, "device": self.device}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in shown.items())})"


SCANNERS: Registry[type[Scanner]] = Registry("scanner")


def build_scanner(name: str, seed: int = 0, device: str = "cpu", **settings: Any) -> Scanner:
    """The registered scanner ``name`` with ``settings`` (``None`` values are dropped, so a caller's unset option
    never overrides the paper's default)."""
    cls = SCANNERS.get(name)
    unknown = set(settings) - set(cls.setting_names())
    if unknown:
        raise EncoderGuardError(f"unknown {name} setting(s) {', '.join(sorted(unknown))}; "
                                f"valid: {', '.join(cls.setting_names())}")
    return cls(seed=seed, device=device, **{k: v for k, v in settings.items() if v is not None})


def check_positive(**values: float | int | None) -> None:
    """Raise ``ValueError`` naming the first setting that is not a positive finite number (``None`` is allowed)."""
    for key, v in values.items():
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ValueError(f"{key} must be a positive number, got {v!r}")
