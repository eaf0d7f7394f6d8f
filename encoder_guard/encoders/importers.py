"""Encoders from other projects' checkpoints: one registry of formats, one entry point.

Each format knows how to recognise its files and how to rename their keys to torchvision's ResNet names
(which timm shares), and what stem and normalisation its project used. The architecture (block type,
stages, widths, channels, stem kernel) is always read from the weights; what the weights cannot tell
(stem padding, max-pool, normalisation) comes from the format's convention or the config beside the file,
and the user can override any of it.

Layouts (docs/design.md, "Checkpoint formats"): BadEncoder/MIMIC/DECREE ``{'state_dict': {'f.f.<i>...', 'g...'}}``; solo-learn
Lightning ``.ckpt`` with ``backbone.`` (older ``encoder.``) keys and ``args.json`` beside it, CIFAR stem
3×3/stride 1/**padding 2**; lightly ``backbone.`` keys, named or the tutorials' ``nn.Sequential`` indices;
plain torchvision/timm state dicts.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from torch import Tensor

from encoder_guard.encoders.checkpoint import SPEC_KEY, load_own, load_state_into, read_weights
from encoder_guard.encoders.encoder import Encoder
from encoder_guard.encoders.spec import CIFAR_MEAN, CIFAR_STD, FMNIST_MEAN, FMNIST_STD, IMAGENET_MEAN, IMAGENET_STD, EncoderSpec
from encoder_guard.errors import CheckpointError
from encoder_guard.registry import Registry

SOLO_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
SOLO_CIFAR_STD = (0.2470, 0.2435, 0.2616)


# What the weights cannot tell: each loaded encoder records where these came from (``encoder-guard info``)
ASSUMED = ("input_size", "mean", "std", "stem_stride", "stem_padding", "stem_pool")


@dataclass
class Converted:
    """A checkpoint in our terms: torchvision-named backbone weights, what the format says of the stem and
    input, and where each of those settings came from (``sources``)."""

    state: dict[str, Tensor]
    spec_hints: dict[str, Any]
    sources: dict[str, str] = field(default_factory=dict)

    def hint(self, source: str, **values: Any) -> None:
        """Set settings that ``source`` (a format's convention, a file beside the checkpoint) gives."""
        self.spec_hints.update(values)
        self.sources.update({k: source for k in values if k in ASSUMED})


@dataclass
class Format:
    name: str
    detect: Callable[[dict[str, Tensor], dict[str, Any], Path], bool]
    convert: Callable[[dict[str, Tensor], dict[str, Any], Path], Converted]


FORMATS: Registry[Format] = Registry("checkpoint format")


def register_format(name: str) -> Callable[[Any], Any]:
    def add(cls: Any) -> Any:
        FORMATS.register(name)(Format(name, cls.detect, cls.convert))
        return cls

    return add


# ----------------------------------------------------------------------------------------------- helpers


def unwrap(payload: Any, path: Path) -> dict[str, Tensor]:
    """The tensor dict inside a checkpoint (``state_dict``/``model``/``encoder`` wrappers, DDP ``module.``)."""
    obj = payload
    for key in ("state_dict", "model", "encoder", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path} holds no state dict (found {type(obj).__name__}); save model.state_dict()")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
    if not tensors:
        raise CheckpointError(f"{path} holds no tensors under its keys {list(obj)[:5]}; it is not an encoder checkpoint")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def strip_prefix(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def sequential_to_named(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], bool]:
    """Map ``nn.Sequential(*resnet.children()...)`` index keys to torchvision names.

    The roles are read from the tensors: the first 4-D weight without sub-modules is ``conv1``, the
    first norm ``bn1``, and modules holding ``<j>.conv1`` blocks are ``layer1``…``layer4`` in order.
    Returns the renamed state and whether a max-pool sits between ``bn1`` and ``layer1`` (two
    parameter-free children, ReLU and MaxPool, as in torchvision; BadEncoder drops the max-pool).
    """
    groups: dict[int, dict[str, Tensor]] = {}
    for k, v in state.items():
        head, _, rest = k.partition(".")
        if not head.isdigit():
            raise CheckpointError(f"expected nn.Sequential index keys, found {k!r}")
        groups.setdefault(int(head), {})[rest] = v
    names: dict[int, str] = {}
    layer_ids = [i for i, g in sorted(groups.items()) if any(re.match(r"\d+\.conv1\.weight$", r) for r in g)]
    for n, i in enumerate(layer_ids, start=1):
        names[i] = f"layer{n}"
    rest_ids = [i for i in sorted(groups) if i not in names]
    conv = [i for i in rest_ids if "weight" in groups[i] and groups[i]["weight"].ndim == 4]
    norm = [i for i in rest_ids if "running_mean" in groups[i]]
    if not conv or not norm or not layer_ids:
        raise CheckpointError("the sequential backbone has no conv1/bn1/layer structure; it is not a ResNet")
    names[conv[0]], names[norm[0]] = "conv1", "bn1"
    leftovers = [i for i in rest_ids if i not in (conv[0], norm[0])]
    if leftovers:
        raise CheckpointError(f"sequential backbone has parameters at indices {leftovers} that are not part of a ResNet")
    if layer_ids[0] - norm[0] < 2:  # e.g. lightly's ResNetGenerator, whose stem ReLU is functional
        raise CheckpointError(
            "the sequential backbone has no ReLU between bn1 and layer1 (as lightly's ResNetGenerator children); "
            "it was trained without it and our ResNet always applies it, so the features would differ: not supported yet"
        )
    has_pool = layer_ids[0] - norm[0] >= 3
    out = {f"{names[i]}.{rest}": v for i, g in groups.items() for rest, v in g.items()}
    return out, has_pool


def torchvision_names(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop classifier heads and rename lightly's ``shortcut`` to torchvision's ``downsample``."""
    out = {}
    for k, v in state.items():
        if k.startswith(("fc.", "linear.", "classifier.", "head.")):
            continue
        out[k.replace(".shortcut.", ".downsample.")] = v
    return out


def infer_architecture(state: dict[str, Tensor], source: str) -> dict[str, Any]:
    """Block type, stages, widths, channels and stem kernel, read from torchvision-named weights."""
    if "conv1.weight" not in state or state["conv1.weight"].ndim != 4:
        raise CheckpointError(f"{source}: no ResNet stem (conv1.weight) among keys such as {', '.join(list(state)[:4])}")
    stem = state["conv1.weight"]
    layers, widths = [], []
    for n in range(1, 5):
        blocks = {int(m.group(1)) for k in state if (m := re.match(rf"layer{n}\.(\d+)\.conv1\.weight$", k))}
        if not blocks:
            raise CheckpointError(f"{source}: no layer{n} blocks; only 4-stage ResNets are supported")
        layers.append(max(blocks) + 1)
        widths.append(int(state[f"layer{n}.0.conv1.weight"].shape[0]))
    return {
        "block": "bottleneck" if "layer1.0.conv3.weight" in state else "basic",
        "layers": tuple(layers),
        "widths": tuple(widths),
        "stem_width": int(stem.shape[0]),
        "in_chans": int(stem.shape[1]),
        "stem_kernel": int(stem.shape[-1]),
    }


def default_hints(arch: dict[str, Any]) -> dict[str, Any]:
    """Conventions when nothing else is known: 3×3 stems are CIFAR style (32 px), 7×7 ImageNet style (224 px);
    one channel takes Fashion-MNIST's mean/std, three CIFAR's or ImageNet's by the stem."""
    k = arch["stem_kernel"]
    small = k <= 3
    hints: dict[str, Any] = {
        "stem_stride": 1 if small else 2,
        "stem_padding": k // 2,
        "stem_pool": not small,
        "input_size": 32 if small else 224,
    }
    c = arch["in_chans"]
    if c == 1:
        hints.update(mean=FMNIST_MEAN, std=FMNIST_STD)
    elif c == 3:
        hints.update(mean=CIFAR_MEAN if small else IMAGENET_MEAN, std=CIFAR_STD if small else IMAGENET_STD)
    else:
        hints.update(mean=(0.5,) * c, std=(0.5,) * c)
    return hints


def _defaults(named: dict[str, Tensor], path: Path) -> Converted:
    """The architecture read from the weights, and :func:`default_hints` for the rest (noted as such)."""
    arch = infer_architecture(named, str(path))
    k = arch["stem_kernel"]
    conv = Converted(named, dict(arch))
    conv.hint(f"the default for a {k}×{k} stem with {arch['in_chans']} channel(s)", **default_hints(arch))
    return conv


# ----------------------------------------------------------------------------------------------- formats


@register_format("badencoder")
class BadEncoderFormat:
    """BadEncoder / MIMIC / DECREE SimCLR checkpoints: backbone as ``f.f.<index>``, head as ``g``.

    - [0] BadEncoder: Backdoor Attacks to Pre-trained Encoders in Self-Supervised Learning, Jia et al., IEEE S&P
      2022, arXiv 2108.00352
    """

    @staticmethod
    def detect(state: dict[str, Tensor], payload: dict[str, Any], path: Path) -> bool:
        return any(k.startswith(("f.f.", "visual.")) for k in state)

    @staticmethod
    def convert(state: dict[str, Tensor], payload: dict[str, Any], path: Path) -> Converted:
        if any(k.startswith("visual.") for k in state):
            raise CheckpointError(
                f"{path} is a CLIP image encoder (visual.* keys); CLIP's ModifiedResNet is not supported yet, "
                "only ResNet SimCLR encoders"
            )
        backbone = strip_prefix(state, "f.f.")
        if not backbone:
            raise CheckpointError(f"{path}: no BadEncoder backbone keys (f.f.*) among keys such as {', '.join(list(state)[:4])}")
        named, has_pool = sequential_to_named(backbone)
        named = torchvision_names(named)
        conv = _defaults(named, path)
        conv.hint("the layout of the file (max-pool or not)", stem_pool=has_pool)
        conv.hint("BadEncoder's convention", ssl_method="simclr")
        return conv


def _solo_args(path: Path) -> dict[str, Any] | None:
    for candidate in (path.with_name("args.json"), path.parent / "args.json"):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise CheckpointError(f"{candidate} beside the checkpoint is not valid JSON ({exc})") from exc
    return None


@register_format("solo-learn")
class SoloLearnFormat:
    """solo-learn Lightning checkpoints: ``backbone.`` (older ``encoder.``) keys, ``projector.``, ``classifier.``.

    Its CIFAR ResNet stem is 3×3, stride 1, **padding 2**, max-pool removed (``solo/methods/base.py``);
    the dataset and normalisation are read from ``args.json`` beside the file when present.

    - [0] solo-learn: A Library of Self-supervised Methods for Visual Representation Learning, Victor G. Turrisi
      da Costa et al., JMLR 23(56) 2022, https://jmlr.org/papers/v23/21-1155.html
    """

    @staticmethod
    def _prefix(state: dict[str, Tensor]) -> str | None:
        for p in ("backbone.", "encoder."):
            if f"{p}conv1.weight" in state:
                return p
        return None

    @staticmethod
    def detect(state: dict[str, Tensor], payload: dict[str, Any], path: Path) -> bool:
        if SoloLearnFormat._prefix(state) is None:
            return False
        solo_keys = any(k.startswith(("projector.", "classifier.", "momentum_backbone.")) for k in state)
        return solo_keys or _solo_args(path) is not None

    @staticmethod
    def convert(state: dict[str, Tensor], payload: dict[str, Any], path: Path) -> Converted:
        prefix = SoloLearnFormat._prefix(state)
        assert prefix is not None
        named = torchvision_names(strip_prefix(state, prefix))
        conv = _defaults(named, path)
        args = _solo_args(path) or {}
        dataset = str((args.get("data") or {}).get("dataset", args.get("dataset", ""))).lower()
        if conv.spec_hints["stem_kernel"] == 3:
            conv.hint("solo-learn's CIFAR stem", stem_stride=1, stem_padding=2, stem_pool=False, input_size=32)
        if dataset.startswith("cifar"):
            conv.hint("args.json's dataset (solo-learn's CIFAR statistics)", mean=SOLO_CIFAR_MEAN, std=SOLO_CIFAR_STD)
        augs = args.get("augmentations")
        crop = ((augs or [{}])[0] or {}).get("crop_size") if isinstance(augs, list) else None
        if crop:
            conv.hint("args.json's crop size", input_size=int(crop))
        conv.hint("args.json", ssl_method=args.get("method"))
        conv.spec_hints["provenance_extra"] = {"dataset": dataset or None, "args_json": bool(args)}
        return conv


@register_format("lightly")
class LightlyFormat:
    """lightly checkpoints: ``backbone.`` keys, named or ``nn.Sequential`` indices, ``projection_head.``.

    lightly's transforms normalise with ImageNet statistics by default, so that is the default here.

    - [0] LightlySSL, a Python library for self-supervised learning on images, https://github.com/lightly-ai/lightly
    """

    @staticmethod
    def detect(state: dict[str, Tensor], payload: dict[str, Any], path: Path) -> bool:
        return any(re.match(r"backbone\.\d+\.", k) for k in state) or (
            "backbone.conv1.weight" in state and any(k.startswith("projection_head.") for k in state)
        )

    @staticmethod
    def convert(state: dict[str, Tensor], payload: dict[str, Any], path: Path) -> Converted:
        backbone = strip_prefix(state, "backbone.")
        has_pool = None
        if any(re.match(r"\d+\.", k) for k in backbone):
            backbone, has_pool = sequential_to_named(backbone)
        named = torchvision_names(backbone)
        conv = _defaults(named, path)
        if has_pool is not None:
            conv.hint("the layout of the file (max-pool or not)", stem_pool=has_pool)
        if conv.spec_hints["in_chans"] == 3:
            conv.hint("lightly's convention (ImageNet statistics)", mean=IMAGENET_MEAN, std=IMAGENET_STD)
        return conv


@register_format("torchvision")
class TorchvisionFormat:
    """Plain torchvision or timm ResNet state dicts (``conv1.weight``, ``layer1.0.conv1.weight``, ``fc``)."""

    @staticmethod
    def detect(state: dict[str, Tensor], payload: dict[str, Any], path: Path) -> bool:
        return "conv1.weight" in state and "layer1.0.conv1.weight" in state

    @staticmethod
    def convert(state: dict[str, Tensor], payload: dict[str, Any], path: Path) -> Converted:
        return _defaults(torchvision_names(state), path)


# ----------------------------------------------------------------------------------------------- entry point


def load_encoder(path: str | Path, format: str = "auto", **overrides: Any) -> Encoder:
    """Load any supported checkpoint as an :class:`Encoder`, safely.

    Args:
        path: our ``.safetensors``, a run directory, or another project's checkpoint.
        format: ``auto`` or one of :data:`FORMATS` (``badencoder``, ``solo-learn``, ``lightly``, ``torchvision``).
        overrides: spec fields that replace what the file or its format says (``input_size=96``,
            ``stem_padding=2``, ``mean=(...)``...); ``None`` values are ignored.

    What the weights cannot tell (:data:`ASSUMED`: input size, normalisation, stem stride, padding and pooling)
    is recorded with its source in ``spec.provenance["assumed"]``, which ``encoder-guard info`` prints.

    Raises:
        CheckpointError: with the reason and the fix.
    """
    path = Path(path).expanduser()
    payload, meta = read_weights(path)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if SPEC_KEY in meta and format in ("auto", "encoder-guard"):
        enc = load_own(payload, meta, str(path))
        known = enc.spec.provenance.get("assumed") or {}  # an imported encoder saved in our format keeps its sources
        sources = {k: (known.get(k) or {}).get("from", "the checkpoint's spec") for k in ASSUMED}
        if overrides:
            spec = replace(enc.spec, **overrides)
            plugin_state = enc.plugins.state_dict()
            enc = load_state_into(Encoder(spec), enc.backbone.state_dict(), str(path))
            enc.plugins.load_state_dict(plugin_state)
            sources.update({k: "given when loading" for k in overrides if k in ASSUMED})
        enc.spec.provenance = dict(enc.spec.provenance, assumed=_assumed(enc.spec, sources))
        return enc
    if isinstance(payload, dict) and not any(isinstance(v, (Tensor, dict)) for v in payload.values()):
        raise CheckpointError(f"{path} holds no weights; it is not an encoder checkpoint")
    state = unwrap(payload, path)
    if format == "auto":
        fmt = next((FORMATS.get(n) for n in FORMATS.names() if FORMATS.get(n).detect(state, payload, path)), None)
        if fmt is None:
            raise CheckpointError(
                f"{path}: unrecognised checkpoint layout (keys such as {', '.join(list(state)[:4])}); "
                f"pass --format with one of {', '.join(FORMATS.names())}"
            )
    else:
        fmt = FORMATS.get(format)
    conv = fmt.convert(state, payload, path)
    hints = dict(conv.spec_hints)
    extra = hints.pop("provenance_extra", {})
    ssl_method = hints.pop("ssl_method", None)
    fields = {**hints, **overrides}
    fields.setdefault("ssl_method", ssl_method)
    sources = {**conv.sources, **{k: "given when loading" for k in overrides if k in ASSUMED}}
    fields["provenance"] = {"format": fmt.name, "source": str(path), **{k: v for k, v in extra.items() if v is not None}}
    spec = EncoderSpec(**fields)
    spec.provenance["assumed"] = _assumed(spec, sources)
    return load_state_into(Encoder(spec), conv.state, f"{path} ({fmt.name} format)")


def _assumed(spec: EncoderSpec, sources: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Each of :data:`ASSUMED`'s values (as JSON stores it) and where it came from."""
    value = {k: getattr(spec, k) for k in ASSUMED}
    return {k: {"value": list(v) if isinstance(v, tuple) else v, "from": sources.get(k, "the encoder's defaults")}
            for k, v in value.items()}
