"""Plug-in modules on an encoder's stage outputs: the mechanism behind Purifier and Purifier+.

A plug-in is a small module applied to a tap's output map by a forward hook on that stage, so it works on
any backbone the :class:`~encoder_guard.encoders.Encoder` wraps (timm, torchvision or imported weights)
without touching the backbone's code or its state-dict keys. Its description lives in
``EncoderSpec.plugins`` and its tensors in the checkpoint under ``plugins.<tap>.*``, so a purified encoder
saves and loads like any other.

Two plug-ins, both called as ``plugin(x, inplace=False)``; the encoder's hook passes ``inplace=True``
because the stage's output is its own, so a plug-in may then overwrite ``x`` rather than copy it:

- ``ClassMask`` (``class-mask``): Purifier's class-conditional mask (see its docstring);
- ``ActivationAlignment`` (``align``): Purifier+'s alignment; per unit, clamp the activation into its normal
  range ``[lo, hi]`` and multiply by a gain. A *unit* depends on the granularity:

- ``channel``: one range per channel, shared by all positions;
- ``cube``: one range per spatial position for the L2 norm of the channel vector there (the whole
  ``C × 1 × 1`` cube is rescaled when its norm leaves the range, so its direction is kept);
- ``feature``: one range per element ``(c, h, w)``.

A *gated* alignment (``gated=True``) aligns only the inputs found anomalous: per sample, a score of the
units' excess over their ``hi`` (in units of each unit's clean spread ``scale``) is compared with a
threshold ``gate`` fitted on clean data. The score is the excess averaged over the channels at each
position and taken at the position where it is largest: a patch trigger raises a few positions of a map,
and an average over the whole map dilutes it into the clean inputs' spread (on a weakly backdoored encoder
the whole-map average caught 52% of triggered inputs at layer4, the peak 99%, at about 1% of clean ones).
A sample flagged at one tap stays flagged at every later tap of the same forward pass (the encoder shares
one ``SampleFlags`` among its gated plug-ins): a patch trigger stands out at the stem and at the last
stage, not in between, yet it has to be aligned in between too.
A sample first flagged at a later tap is run again with every tap aligned (``Encoder``): where a trigger
is caught depends on the trigger and the fit (a blended noise pattern at layer1 or layer2, a patch at the
stem, layer1 or layer4), and the taps it passed unaligned had already carried it on.
Unflagged inputs pass unchanged, so clean inputs keep their activations (a plain clamp trims every
input's upper tail).

A *local* plug-in (``local=True``) aligns only the anomalous positions of a row it aligns: those whose
channels' mean excess over ``hi`` (the score's per-position value) tops ``spot``, a quantile of the
clean positions' own, are set to the middle of their units' range, ``(lo + hi) / 2``; every other
position keeps its activation. Clamping the whole map of a caught input into tight ranges leaves little
of the image: on a BadEncoder with a 9×9 random patch, clean images forced through every tap's clamp fell
to 30% kNN accuracy, and 16% (kNN) to 41% (linear probe) of the non-target ones went to the target class
A patch trigger raises the positions it covers at
the early, large maps; replacing them alone keeps the image around it.

A gated plug-in with ``detect=False`` scores nothing: it aligns only the rows that a detecting plug-in of
the same pass flagged before it, or, on the second pass, every row. A network may then keep its gates on
its deep, small maps and still align a caught input at every tap. The score over a map costs a pass over
it, and at the stem of the ``fmnist-tiny`` encoder (16×28×28 per image) that is six times layer4's map.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from encoder_guard.errors import CheckpointError, EncoderGuardError
from encoder_guard.registry import Registry

PLUGINS: Registry[type[PlugIn]] = Registry("plug-in")
GRANULARITIES = ("channel", "cube", "feature")


def unit_shape(granularity: str, channels: int, size: int) -> tuple[int, ...]:
    """Shape of the per-unit parameters, broadcastable against ``(B, C, H, W)``."""
    shapes = {"channel": (1, channels, 1, 1), "cube": (1, 1, size, size), "feature": (1, channels, size, size)}
    if granularity not in shapes:
        raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, not {granularity!r}")
    return shapes[granularity]


def cube_norms(x: Tensor) -> Tensor:
    """The L2 norm of the channel vector at every position, ``(B, 1, H, W)``.

    Summing squares is ~20x faster on CPU than ``Tensor.norm(dim=1)``, which strides across channels; under
    autograd ``norm`` is kept, because the square root's gradient at an all-zero position would be NaN.
    """
    if x.requires_grad and torch.is_grad_enabled():
        return x.norm(dim=1, keepdim=True)
    return (x * x).sum(dim=1, keepdim=True).sqrt_()


def position_excess(values: Tensor, hi: Tensor, scale: Tensor) -> Tensor:
    """Per sample and position, the mean over channels of the units' excess over ``hi`` in units of their clean
    ``scale``: ``(B, H, W)`` from unit values ``(B, C, H, W)``. The peak gate takes its maximum over positions."""
    return ((values - hi).relu_() / scale).mean(1)


def _dense(x: Tensor) -> bool:
    """Whether a gated plug-in works on whole maps rather than on the flagged rows: on an accelerator.

    Picking rows (``nonzero``) or branching on a tensor makes the host wait for the device at every tap;
    on an H100 at batch 512 that left the purified encoder at 0.26x the original's throughput (0.36x dense).
    Aligning every row and keeping the
    flagged ones costs two more passes over the map and no wait; on CPU, picking rows is the cheaper.
    """
    return x.device.type != "cpu"


class SampleFlags:
    """The samples flagged anomalous so far in the current forward pass, shared by gated plug-ins.

    The encoder resets it at the start of every pass; a plug-in ORs its own flags into it. Rows first
    flagged *after* the first gated tap (``late``) went through the earlier taps unaligned; the encoder
    runs them once more with ``force`` set, which makes every gated plug-in align every row.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self, force: bool = False) -> None:
        self.flags: Tensor | None = None
        self.late: Tensor | None = None
        self.force = force
        self.behind = False  # a gated tap has passed (a follower with nothing to align keeps no flags)

    def merge(self, own: Tensor) -> Tensor:
        if self.force:
            own = torch.ones_like(own)
        elif self.flags is not None and self.flags.shape == own.shape:
            new = own & ~self.flags
            self.late = new if self.late is None else self.late | new
            own = own | self.flags
        elif self.flags is None and self.behind:  # only followers came before: all that is flagged here is late
            self.late = own if self.late is None else self.late | own
        self.flags = own
        self.behind = True
        return own


class PlugIn(nn.Module):
    """The contract of a plug-in: ``forward(x, inplace)`` on a stage's output map, ``describe()`` for the spec.

    ``gated`` plug-ins share the encoder's :class:`SampleFlags` (``shared``, set by ``Encoder.attach``).
    """

    gated: bool = False
    shared: SampleFlags | None = None

    def forward(self, x: Tensor, inplace: bool = False) -> Tensor:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError


@PLUGINS.register("align")
class ActivationAlignment(PlugIn):
    """Clamp each unit into ``[lo, hi]`` (fitted on clean activations), then scale it by ``gain``.

    Before fitting it is the identity (``lo = -inf``, ``hi = +inf``, ``gain = 1``).
    """

    lo: Tensor
    hi: Tensor
    gain: Tensor
    scale: Tensor  # gated or local plug-ins only
    gate: Tensor  # gated only
    spot: Tensor  # local only

    def __init__(self, granularity: str, channels: int, size: int, gated: bool = False, detect: bool = True,
                 local: bool = False) -> None:
        super().__init__()
        if not (detect or gated):
            raise ValueError("detect=False is for gated plug-ins: an ungated one aligns every input anyway")
        self.granularity, self.channels, self.size, self.gated, self.detect = granularity, channels, size, gated, detect
        self.local = local
        shape = unit_shape(granularity, channels, size)
        self.register_buffer("lo", torch.full(shape, -torch.inf))
        self.register_buffer("hi", torch.full(shape, torch.inf))
        self.register_buffer("gain", torch.ones(shape))
        if gated or local:  # only plug-ins that score carry it, so checkpoints of plain ones keep their keys
            self.register_buffer("scale", torch.ones(shape))
        if gated:
            self.register_buffer("gate", torch.tensor(torch.inf))  # flags nothing until fitted
        if local:
            self.register_buffer("spot", torch.tensor(torch.inf))  # replaces no position until fitted

    def forward(self, x: Tensor, inplace: bool = False) -> Tensor:
        """Align ``x``; with ``inplace`` (the encoder's hook, which owns the stage's output) the flagged rows
        are overwritten in ``x`` instead of a copy of the whole map, which would cost more than the gate."""
        if x.shape[-1] != self.size and self.granularity != "channel":
            raise ValueError(f"{self.granularity}-wise alignment was fitted on {self.size}×{self.size} maps, got "
                             f"{x.shape[-2]}×{x.shape[-1]}: feed images of the encoder's input size")
        if not self.gated:
            return self._align(x) * self.gain
        flagged = self._flagged(x)
        if flagged is None:
            return self._scaled(x)
        if _dense(x):
            return torch.where(flagged.view(-1, 1, 1, 1), self._align(x), x) * self.gain
        rows = flagged.nonzero().squeeze(1)
        if len(rows) == len(x):
            x = self._align(x)
        elif len(rows):  # align only the flagged rows
            aligned = self._align(x.index_select(0, rows))
            if inplace and not (x.requires_grad and torch.is_grad_enabled()):  # autograd needs x intact
                x.index_copy_(0, rows, aligned)
            else:
                x = x.index_copy(0, rows, aligned)
        return self._scaled(x)

    def _flagged(self, x: Tensor) -> Tensor | None:
        """The rows to align here (this tap's own flags ORed into the pass's shared ones), or ``None`` where
        a follower (``detect=False``) comes before any flag: then the map is left as it is, with no pass over
        it and, on an accelerator, no kernel."""
        shared = self.shared
        if shared is not None and shared.force:  # a second pass aligns every row: no score needed
            own = torch.ones(len(x), dtype=torch.bool, device=x.device)
        elif self.detect:
            own = self.excess(x) > self.gate
        elif shared is None or shared.flags is None:
            if shared is not None:
                shared.behind = True
            return None
        else:
            own = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        return own if shared is None else shared.merge(own)

    def _scaled(self, x: Tensor) -> Tensor:
        """``x · gain``, skipped on CPU when every gain is 1 (on an accelerator the check would wait for it)."""
        return x * self.gain if _dense(x) or not bool((self.gain == 1).all()) else x

    def _align(self, x: Tensor) -> Tensor:
        if self.local:
            values = cube_norms(x) if self.granularity == "cube" else x  # the norms once, for the score and the rescale
            spots = (position_excess(values, self.hi, self.scale) > self.spot).unsqueeze(1)  # (B, 1, H, W)
            middle = (self.lo + self.hi) / 2
            if self.granularity == "cube":
                return torch.where(spots, x * (middle / values.clamp_min(1e-12)), x)
            return torch.where(spots, middle, x)
        if self.granularity == "cube":
            norm = cube_norms(x).clamp_min(1e-12)
            return x * (norm.clamp(self.lo, self.hi) / norm)
        return torch.clamp(x, self.lo, self.hi)  # ~10x faster on CPU than torch.minimum + torch.maximum

    def position_excess(self, x: Tensor) -> Tensor:
        """Per sample and position of the map ``x``, what ``spot`` thresholds: ``(B, H, W)``."""
        return position_excess(cube_norms(x) if self.granularity == "cube" else x, self.hi, self.scale)

    def excess(self, x: Tensor) -> Tensor:
        """Per sample, the largest over positions of the channels' mean excess over ``hi``, in units of their
        clean ``scale`` (gated only).

        The gate runs on every input, so it must cost less than the stage it guards: ``relu(v − hi)`` is
        taken as ``max(v, hi) − hi``, one clamp pass over the map, weighted by ``1 / scale`` and less the
        constant ``hi · (1 / scale)`` (30% cheaper than a subtraction and a ReLU). On CPU, units not fitted
        yet (``hi = +inf``) take the subtraction; an accelerator skips that check (a host wait) and scores an
        unfitted plug-in NaN, which flags nothing.
        """
        values = cube_norms(x) if self.granularity == "cube" else x
        inverse = self.scale.reciprocal()
        fitted = _dense(values) or bool(torch.isfinite(self.hi.flatten() @ inverse.flatten()))
        if fitted:
            mass = (torch.clamp(values, min=self.hi) * inverse).sum(1) - (self.hi * inverse).sum(1)
        else:
            mass = ((values - self.hi).relu_() * inverse).sum(1)
        return mass.flatten(1).amax(1) / values.shape[1]

    def unit_values(self, x: Tensor) -> Tensor:
        """What the ranges are about, per sample: ``(B, *unit_shape[1:])``."""
        if self.granularity == "cube":
            return cube_norms(x)
        if self.granularity == "channel":
            return x.transpose(0, 1).flatten(1).T.reshape(-1, self.channels, 1, 1)  # positions become samples
        return x

    def describe(self) -> dict[str, Any]:
        return {"kind": "align", "granularity": self.granularity, "channels": self.channels, "size": self.size,
                **({"gated": True} if self.gated else {}), **({} if self.detect else {"detect": False}),
                **({"local": True} if self.local else {})}

    def extra_repr(self) -> str:
        return (f"{self.granularity}, channels={self.channels}, size={self.size}" + (", gated" if self.gated else "")
                + ("" if self.detect else ", detect=False") + (", local" if self.local else ""))


@PLUGINS.register("class-mask")
class ClassMask(PlugIn):
    """Class-conditional channel mask (Purifier, ACM MM 2022): ``x · (softmax(aux(GAP(x))) @ mask)``.

    An auxiliary linear head reads the pooled map and says which class the input looks like; the mask
    of that class (one value in ``[0, 1]`` per channel, a soft mixture over classes weighted by the head's
    probabilities) scales the map. Trained with sparse masks on clean labelled data, a class keeps the
    channels its clean inputs need; a trigger's channels, needed by no clean class, are switched off
    whatever class the input is taken for. Identity until trained (masks all 1).

    :attr:`aux_logits` holds the auxiliary head's logits of the last forward pass (for its training loss).
    """

    def __init__(self, channels: int, classes: int) -> None:
        super().__init__()
        self.channels, self.classes = channels, classes
        self.aux = nn.Linear(channels, classes)
        self.mask = nn.Parameter(torch.ones(classes, channels))
        self.aux_logits: Tensor | None = None

    def forward(self, x: Tensor, inplace: bool = False) -> Tensor:
        """Mask ``x`` (out of place always: the mask is trained, and the map is small)."""
        if x.shape[1] != self.channels:
            raise ValueError(f"class mask for {self.channels} channels got a map with {x.shape[1]}")
        self.aux_logits = self.aux(x.mean(dim=(2, 3)))
        m = self.aux_logits.softmax(1) @ self.mask
        return x * m[:, :, None, None]

    def describe(self) -> dict[str, Any]:
        return {"kind": "class-mask", "channels": self.channels, "classes": self.classes}

    def extra_repr(self) -> str:
        return f"channels={self.channels}, classes={self.classes}"


def build_plugin(description: dict[str, Any]) -> PlugIn:
    """The plug-in a checkpoint's spec describes (``kind`` and its constructor's arguments)."""
    d = dict(description)
    kind = d.pop("kind", None)
    try:
        return PLUGINS.get(str(kind))(**d)
    except (TypeError, EncoderGuardError) as exc:
        raise CheckpointError(f"the checkpoint describes a plug-in this version cannot build ({description}: {exc}); "
                              "purify the original encoder again") from exc
