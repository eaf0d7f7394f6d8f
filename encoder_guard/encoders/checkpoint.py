"""Reading and writing encoder checkpoints without executing pickled code.

Our own format is one ``.safetensors`` file: the backbone's weights, and the :class:`EncoderSpec` as
JSON in the header metadata (key ``encoder_guard.spec``). Files from other projects are read by
:func:`read_weights`, which only ever calls ``safetensors`` or ``torch.load(weights_only=True)``;
a file that needs more is refused with the reason.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from encoder_guard.encoders.encoder import Encoder
from encoder_guard.encoders.spec import EncoderSpec
from encoder_guard.errors import CheckpointError

SPEC_KEY = "encoder_guard.spec"
FORMAT_KEY = "format"
PLUGIN_PREFIX = "plugins."  # plug-in tensors (Purifier's masks, Purifier+'s alignment) beside the backbone's


def save_encoder(encoder: Encoder, path: str | os.PathLike, extra: dict[str, str] | None = None) -> Path:
    """Write ``encoder`` as one safetensors file with its spec in the metadata (atomically)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in encoder.backbone.state_dict().items()}
    tensors.update({f"{PLUGIN_PREFIX}{k}": v.detach().cpu().contiguous() for k, v in encoder.plugins.state_dict().items()})
    meta = {FORMAT_KEY: "encoder_guard/1", SPEC_KEY: encoder.spec.to_json(), **(extra or {})}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def read_weights(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, str]]:
    """Load a checkpoint's contents safely.

    Returns:
        ``(payload, metadata)``: for safetensors the tensors and header metadata; for torch files the
        unpickled object (restricted to tensors and plain containers) and ``{}``.

    Raises:
        CheckpointError: missing file, not a checkpoint, corrupt, or needing arbitrary unpickling.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path")
    if path.is_dir():
        for name in ("encoder.safetensors", "checkpoint.safetensors"):
            if (path / name).is_file():
                return read_weights(path / name)
        raise CheckpointError(f"{path} is a folder without encoder.safetensors; pass the checkpoint file itself")
    with open(path, "rb") as fh:
        head = fh.read(16)
    if not head:
        raise CheckpointError(f"{path} is empty; re-download or re-create it")
    if path.suffix == ".safetensors" or _looks_like_safetensors(head):
        from safetensors import SafetensorError
        from safetensors.torch import load_file, safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
            return load_file(str(path)), meta
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); it is corrupt or truncated") from exc
    # a torch zip starts with a local file header even when truncated (is_zipfile needs the end record)
    if not (zipfile.is_zipfile(path) or head[:4] == b"PK\x03\x04" or head[:2] == b"\x80\x02"):
        raise CheckpointError(f"{path} is not a checkpoint (neither safetensors nor a torch.save file)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True), {}
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        reason = next((ln for ln in first if "Unsupported global" in ln or "GLOBAL" in ln), first[0] if first else "")
        raise CheckpointError(
            f"{path} cannot be loaded safely: it needs arbitrary pickled objects ({reason.strip()}); "
            "we only load tensors (torch.load weights_only=True). If you trust its source, re-save its state_dict "
            "with torch.save(model.state_dict(), ...) or as safetensors"
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"{path} is corrupt or truncated ({str(exc).splitlines()[0]}); re-download it") from exc


def _looks_like_safetensors(head: bytes) -> bool:
    return len(head) >= 9 and head[8:9] == b"{"


def load_state_into(encoder: Encoder, state: dict[str, Tensor], source: str) -> Encoder:
    """Load a backbone state dict strictly, explaining any mismatch by key and shape."""
    own = encoder.backbone.state_dict()
    # BatchNorm step counters are bookkeeping, absent from some exporters' files: never a mismatch.
    state = {k: v for k, v in state.items() if not (k.endswith("num_batches_tracked") and k not in own)}
    for k in own:
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = torch.zeros((), dtype=torch.long)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append("shape mismatch " + ", ".join(f"{k}: file {a} vs model {b}" for k, a, b in wrong[:4]))
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        raise CheckpointError(
            f"{source} does not fit the encoder architecture ({'; '.join(parts)}); "
            "it was made for another architecture: pass the matching --format or backbone settings"
        )
    encoder.backbone.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
    return encoder


def load_own(tensors: dict[str, Tensor], meta: dict[str, str], source: str) -> Encoder:
    """Rebuild an encoder from our safetensors format."""
    if SPEC_KEY not in meta:
        raise CheckpointError(f"{source} has no encoder_guard spec in its metadata")
    spec = EncoderSpec.from_json(meta[SPEC_KEY])
    plugin_state = {k[len(PLUGIN_PREFIX):]: v for k, v in tensors.items() if k.startswith(PLUGIN_PREFIX)}
    encoder = load_state_into(Encoder(spec), {k: v for k, v in tensors.items() if not k.startswith(PLUGIN_PREFIX)}, source)
    try:
        encoder.plugins.load_state_dict(plugin_state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{source}: the plug-in tensors do not match the spec's plug-ins ({str(exc).splitlines()[0]}); "
                              "the file is damaged or was edited") from exc
    return encoder
