"""The :class:`Encoder`: images in ``[0, 1]`` → ``(B, D)`` features, with named stage taps.

Every defense talks to this one interface (``forward``, ``forward_features``, ``forward_intermediates``,
``feature_info``), so none of them branches on the architecture or slices ``children()``.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from encoder_guard.encoders.backbones import build_backbone
from encoder_guard.encoders.plugins import PlugIn, SampleFlags, build_plugin
from encoder_guard.encoders.spec import EncoderSpec

TAP_NAMES = ("stem", "layer1", "layer2", "layer3", "layer4")
TAP_MODULES = ("act1", "layer1", "layer2", "layer3", "layer4")  # the timm ResNet module whose output each tap is


class _ApplyPlugin:
    """A forward hook that replaces a stage's output by ``plugin(output, inplace=True)`` (the output is the
    hook's to overwrite; an object, not a lambda, so that ``copy.deepcopy`` of the encoder points the copy's
    hook at the copy's plug-in)."""

    def __init__(self, plugin: nn.Module) -> None:
        self.plugin = plugin

    def __call__(self, _module: nn.Module, _inputs: tuple, output: Tensor) -> Tensor:
        return self.plugin(output, inplace=True)


class Encoder(nn.Module):
    """A backbone with its normalisation inside and global average pooling on top.

    Args:
        spec: what to build (see :class:`EncoderSpec`).

    Inputs are float images ``(B, C, H, W)`` in ``[0, 1]`` (triggers are applied there, before
    normalisation); outputs are pooled features ``(B, spec.feature_dim)``.

    >>> from encoder_guard.encoders import make_spec
    >>> enc = Encoder(make_spec("resnet10-tiny"))
    >>> enc(torch.rand(2, 1, 28, 28)).shape
    torch.Size([2, 128])
    """

    mean: Tensor
    std: Tensor

    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__()
        self.spec = spec
        self.backbone = build_backbone(spec)
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, -1, 1, 1), persistent=False)
        self._feature_info: list[dict] | None = None
        self.plugins = nn.ModuleDict()
        self._flags = SampleFlags()  # gated plug-ins' per-pass sample flags (reset by every entry point)
        # rows a gated plug-in catches late are run again aligned from the first tap; off only where a caller
        # needs the returned maps to be the ones the features were computed from (gradients through a tap)
        self.second_pass = True
        for tap, description in list(spec.plugins.items()):
            self.attach(tap, build_plugin(description))

    def attach(self, tap: str, plugin: PlugIn) -> None:
        """Apply ``plugin`` to the output of stage ``tap`` from now on (recorded in the spec and checkpoint)."""
        if tap not in TAP_NAMES:
            raise ValueError(f"unknown tap {tap!r}; taps are {', '.join(TAP_NAMES)}")
        if tap in self.plugins:
            raise ValueError(f"tap {tap} already has a plug-in")
        self.plugins[tap] = plugin
        if plugin.gated:
            plugin.shared = self._flags
        self.spec.plugins[tap] = plugin.describe()
        module = self.backbone.get_submodule(TAP_MODULES[TAP_NAMES.index(tap)])
        module.register_forward_hook(_ApplyPlugin(plugin))

    @property
    def feature_dim(self) -> int:
        return self.spec.feature_dim

    def normalize(self, x: Tensor) -> Tensor:
        if x.shape[1] != self.spec.in_chans:
            raise ValueError(f"encoder takes {self.spec.in_chans}-channel images, got {x.shape[1]} channels")
        return (x - self.mean) / self.std

    def _pass(self, run: Callable[[Tensor], Any], z: Tensor) -> Any:
        """``run(z)`` with the gated plug-ins' flags reset; rows first flagged after the first gated tap are
        run again with every tap aligning them, and their outputs (a tensor or a list of tensors) replaced."""
        self._flags.reset()
        out = run(z)
        late = self._flags.late
        if late is None or not bool(late.any()) or not self.second_pass:
            return out
        rows = late.nonzero().squeeze(1)
        self._flags.reset(force=True)
        try:
            again = run(z.index_select(0, rows))
        finally:
            self._flags.reset()
        if isinstance(out, Tensor):
            return out.index_copy(0, rows, again)
        return [o.index_copy(0, rows, a) for o, a in zip(out, again)]

    def forward_features(self, x: Tensor) -> Tensor:
        """The last stage's map ``(B, C, h, w)``."""
        return self._pass(self.backbone.forward_features, self.normalize(x))

    def forward(self, x: Tensor) -> Tensor:
        """Pooled features ``(B, D)``."""
        return self.forward_features(x).mean(dim=(2, 3))

    def forward_intermediates(
        self, x: Tensor, indices: Sequence[int | str] | None = None
    ) -> tuple[Tensor, list[Tensor]]:
        """Pooled features and the chosen stage maps.

        Args:
            x: ``(B, C, H, W)`` images in ``[0, 1]``.
            indices: taps by index into :data:`TAP_NAMES` (0 = stem … 4 = layer4) or by name; all if ``None``.

        Returns:
            ``(features (B, D), [maps (B, C_i, H_i, W_i)])`` in the order of ``indices``.
        """
        idx = self.tap_indices(indices)
        order = sorted(set(idx))
        def run(z: Tensor) -> list[Tensor]:  # one flat list, so that a second pass can replace rows in each
            final, maps = self.backbone.forward_intermediates(z, indices=order)
            return [final, *maps]

        final, *maps = self._pass(run, self.normalize(x))
        by_index = dict(zip(order, maps))
        return final.mean(dim=(2, 3)), [by_index[i] for i in idx]

    def forward_from(self, tap: str, h: Tensor) -> Tensor:
        """Pooled features from the output ``h`` of stage ``tap`` (the stages after it, plug-ins included).

        Lets a defense that changes only the last stages train on cached activations at ``tap``.
        """
        i = self.tap_indices([tap])[0]
        self._flags.reset()  # the taps before ``tap`` are behind it: no second pass from here
        names = ("maxpool",) + TAP_MODULES[1:] if i == 0 else TAP_MODULES[i + 1 :]
        for name in names:
            h = self.backbone.get_submodule(name)(h)
        return h.mean(dim=(2, 3))

    @staticmethod
    def tap_indices(indices: Sequence[int | str] | None) -> list[int]:
        if indices is None:
            return list(range(len(TAP_NAMES)))
        out = []
        for i in indices:
            if isinstance(i, str):
                if i not in TAP_NAMES:
                    raise ValueError(f"unknown tap {i!r}; taps are {', '.join(TAP_NAMES)}")
                out.append(TAP_NAMES.index(i))
            else:
                if not -len(TAP_NAMES) <= i < len(TAP_NAMES):
                    raise ValueError(f"tap index {i} out of range 0..{len(TAP_NAMES) - 1}")
                out.append(i % len(TAP_NAMES))
        return out

    @property
    def feature_info(self) -> list[dict]:
        """Per tap: ``name``, ``module``, ``num_chs`` and ``reduction`` (measured on a dummy input)."""
        if self._feature_info is None:
            s = self.spec.input_size
            was_training = self.training
            self.eval()
            with torch.no_grad():
                _, maps = self.forward_intermediates(torch.zeros(1, self.spec.in_chans, s, s))
            self.train(was_training)
            self._feature_info = [
                {"name": n, "module": m, "num_chs": int(f.shape[1]), "reduction": s / f.shape[-1]}
                for n, m, f in zip(TAP_NAMES, TAP_MODULES, maps)
            ]
        return self._feature_info

    def digest(self) -> str:
        """A short content hash of weights and spec, less its provenance (keys feature caches: equal weights and
        architecture → equal digest, wherever the encoder came from)."""
        h = hashlib.sha256(replace(self.spec, provenance={}).to_json().encode())
        for name, t in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def extra_repr(self) -> str:
        s = self.spec
        return f"layers={s.layers}, widths={s.widths}, in_chans={s.in_chans}, input_size={s.input_size}, dim={s.feature_dim}"
