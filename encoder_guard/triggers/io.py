"""Trigger files: our ``.safetensors`` (bit-exact tensors + JSON parameters) and BadEncoder's ``.npz``.

BadEncoder trigger files hold ``t`` (patterns, uint8 HWC, a list: the first is used) and ``tm`` (masks),
applied to uint8 HWC images as ``img * tm[0] + t[0]``; they load as a :class:`PatchTrigger` with
``mask = 1 − tm`` and ``pattern = t / 255`` (the same pixels, in ``[0, 1]``), and a patch trigger can be
exported back to that layout. Reference-image files (``.npz`` with ``x``) are read by
:func:`load_reference_images`.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from encoder_guard.errors import EncoderGuardError
from encoder_guard.triggers.base import TRIGGERS, Trigger
from encoder_guard.triggers.patch import PatchTrigger


def save_trigger(trigger: Trigger, path: str | os.PathLike) -> Path:
    """Write ``trigger``; ``.npz`` writes BadEncoder's layout (patch triggers only), else safetensors."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npz":
        if not isinstance(trigger, PatchTrigger):
            raise EncoderGuardError(f"BadEncoder .npz files hold patch triggers only, not {trigger.kind}; save as .safetensors")
        mask = trigger.mask.expand_as(trigger.pattern)
        t = (trigger.pattern * mask * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        tm = (1 - mask).round().to(torch.uint8).permute(1, 2, 0).numpy()
        np.savez(path, t=t[None], tm=tm[None])
        return path
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in trigger.tensors().items()} or {"_": torch.zeros(1)}
    save_file(tensors, str(path), metadata={"format": "encoder_guard.trigger/1", "kind": trigger.kind,
                                             "params": json.dumps(trigger.params())})
    return path


def load_trigger(path: str | os.PathLike) -> Trigger:
    """Read a trigger saved by :func:`save_trigger` or a BadEncoder ``.npz``.

    Raises:
        EncoderGuardError: missing, unreadable or not a trigger file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise EncoderGuardError(f"trigger file {path} does not exist; pass the trigger saved with the attack")
    if path.suffix == ".npz" or zipfile.is_zipfile(path):
        return _load_badencoder_npz(path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise EncoderGuardError(f"{path} is not a readable trigger file ({exc}); use a .safetensors or BadEncoder .npz") from exc
    if "kind" not in meta:
        raise EncoderGuardError(f"{path} is a safetensors file without trigger metadata; it is not a trigger")
    cls = TRIGGERS.get(meta["kind"])
    return cls.from_state({k: v for k, v in tensors.items() if k != "_"}, json.loads(meta.get("params", "{}")))


def _load_badencoder_npz(path: Path) -> PatchTrigger:
    try:
        with np.load(path, allow_pickle=False) as data:
            if "t" not in data or "tm" not in data:
                raise EncoderGuardError(f"{path} has arrays {list(data.keys())}, a BadEncoder trigger needs 't' and 'tm'")
            t, tm = np.asarray(data["t"]), np.asarray(data["tm"])
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise EncoderGuardError(f"{path} is not a readable .npz trigger ({exc})") from exc
    if t.ndim == 4:
        t, tm = t[0], tm[0]
    if t.ndim == 2:
        t, tm = t[:, :, None], tm[:, :, None]
    if t.shape != tm.shape or t.ndim != 3:
        raise EncoderGuardError(f"{path}: pattern {t.shape} and mask {tm.shape} must both be HWC of one shape")
    keep = torch.from_numpy(tm.astype(np.float32)).permute(2, 0, 1)
    add = torch.from_numpy(t.astype(np.float32) / 255).permute(2, 0, 1)
    if keep.min() < 0 or keep.max() > 1:
        raise EncoderGuardError(f"{path}: mask values must be 0 or 1 (found {float(keep.min())}..{float(keep.max())})")
    mask = 1 - keep
    # img * tm + t  ==  img * (1 - m) + p * m  with p = t / (255 m) where m > 0
    pattern = torch.where(mask > 0, add / mask.clamp_min(1e-12), torch.zeros_like(add)).clamp(0, 1)
    return PatchTrigger(mask, pattern)


def load_reference_images(path: str | os.PathLike) -> Tensor:
    """BadEncoder reference images (``.npz`` with ``x``, uint8 NHWC) as float ``(N, C, H, W)`` in ``[0, 1]``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise EncoderGuardError(f"reference image file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            x = np.asarray(data["x"])
    except (KeyError, ValueError, OSError, zipfile.BadZipFile) as exc:
        raise EncoderGuardError(f"{path} is not a reference-image .npz with an 'x' array ({exc})") from exc
    if x.ndim == 3:
        x = x[None]
    if x.ndim == 4 and x.shape[-1] in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    return torch.from_numpy(x.astype(np.float32) / (255 if x.dtype == np.uint8 else 1))


def save_reference_images(images: Tensor, path: str | os.PathLike) -> Path:
    """Write ``(N, C, H, W)`` ``[0, 1]`` images as BadEncoder's reference ``.npz`` (uint8 NHWC under ``x``)."""
    path = Path(path)
    x = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.savez(path, x=x)
    return path
