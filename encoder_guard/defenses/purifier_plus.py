"""Purifier+: align trigger-driven activations back to the range of normal ones, unit by unit as rated.

- [0] Purifier+: Plug-and-Play Backdoor Mitigation for Pre-Trained Models via Activation Alignment, Xiaoyu
  Zhang et al., IEEE Transactions on Multimedia 2025, DOI 10.1109/TMM.2025.3535277

Needs: the encoder and clean unlabelled images (at most 5% of its pretraining set); no labels, nothing about the
trigger. The presets are the paper's idea with the additions described below (``docs/methods.md`` lists the
departures and the measurement behind each).

A trigger works by driving some units of the network far outside what clean inputs ever make them do.
Both defenses here are label-free, encoder-level and plug-and-play: statistics of clean activations are
collected on a small clean set, and ``ActivationAlignment`` plug-ins (``encoders.plugins``) are attached to
the chosen stage outputs without touching the backbone.

**Purifier+** (``purifier-plus``, :class:`PurifierPlus`) is the activation alignment below with importance
rating. **Purifier+ without its importance rating** (``purifier-plus-no-rating``,
:class:`PurifierPlusNoRating`) is its ablation: every unit gets the same quantile and no gain.

*The alignment.* Per unit (channel, cube or feature element, the ``granularity``), the
range ``[lo, hi]`` between the ``1 − q`` and ``q`` quantiles of its clean values; an aligned activation
is clamped into its unit's range. On the BadEncoder ``fmnist-tiny`` encoder the trigger does not push units
beyond the *extremes* of clean data (``q = 0.999`` leaves ASR near 90%), but it does push many of them beyond
their *typical* range.

Clamping every input also trims every clean input's upper tail, which cost 2.6 points of clean accuracy
on a clean ``fmnist-tiny`` encoder. The presets therefore
*gate* the alignment (``gate = 0.99``): per input and tap, the excess of its units over ``hi`` (in
clean standard deviations, floored at a tenth of the layer's median so that no unit clean data leaves
constant decides alone), averaged over the channels at each position and taken where it is largest (an
average over the whole map let half of a weak corner-patch backdoor's inputs through), is compared with the
0.99 quantile of clean inputs' score,
calibrated out of sample, and only inputs above it are aligned, at every tap: an input caught at a later
tap is run again aligned from the first (``encoders.plugins``). Clean inputs pass untouched, bar the ~1% the gate takes
at each tap. Because only caught inputs are aligned, their range can be tight at little cost to clean
accuracy: ``q = 0.75`` in the preset (0.85 left 18% of a blended-noise trigger's ASR).

The preset scores inputs at ``layer3`` and ``layer4`` alone (``gate_taps``); the stem, layer1 and layer2
align only what those flag, on the second pass. Every trigger measured (a corner square, a blended noise
pattern, a random patch) shows at one of the two deep taps, whose maps are small; scoring the stem and
layer1 as well cost more than the rest of the plug-ins together, and with their false alarms 3.5% of
every batch of clean inputs ran a second pass.

A caught input is clamped into the tight ranges at the deep taps only. At the early taps (``local_taps``:
the stem, layer1 and layer2 in the presets) only its anomalous positions are replaced, by the middle of
their units' range; the rest of the map keeps its activations. Clamping the whole map at every tap
left little of a caught image: on a BadEncoder with a 9×9 random patch, its triggered inputs came out
as the target class (14% / 19% ASR), because the clamped representation of *any* image fell into that
class on that encoder. A patch raises the positions it covers in the early, large maps, and replacing those
alone keeps the image around it. A global trigger (a blend, CTRL) raises every position a little, and
the deep taps' clamp is what removes it.

*The importance rating.* The paper's operator is not public beyond "rate activation patterns by
importance, boost the important, suppress the unimportant"; ours:

1. *Importance rating*: a first-order Taylor estimate of how much the clean representation depends on
   each unit, ``r_u = E_x |Σ_{e∈u} a_e · ∂‖f(x)‖/∂a_e|`` — the change of the feature along its own
   direction if the unit were removed (one backward pass rates all units).
2. *Importance-dependent ranges*: a unit's quantile rises linearly with its importance rank from
   ``quantile_low`` (least important: tight range, strong suppression of excursions) to ``quantile``
   (most important: loose range, its clean variation kept).
3. Optionally (``suppress`` > 0) the least important share is scaled by ``suppress_gain`` and the rest
   boosted by one factor that restores the layer's mean clean activation mass, so the next layer sees
   inputs at the scale its BatchNorm statistics expect.

The class-conditional design of the Purifier paper (ACM MM 2022) is ``defenses.purifier``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor

from encoder_guard.defenses.base import DEFENSES, Defense
from encoder_guard.encoders import Encoder
from encoder_guard.encoders.encoder import TAP_NAMES
from encoder_guard.encoders.plugins import ActivationAlignment, position_excess, unit_shape
from encoder_guard.threats import DefenseData


def _stage_outputs(encoder: Encoder, images: Tensor, tap: str, batch_size: int, grad: bool = False):
    """Yield ``(tap output map, pooled final features)`` over ``images`` (float [0, 1]); the map is what
    follows the tap's plug-in, and keeps its gradient when ``grad``."""
    for batch in images.split(batch_size):
        with torch.set_grad_enabled(grad):
            final, (fmap,) = encoder.forward_intermediates(batch, [tap])
        if grad:
            fmap.retain_grad()
        yield fmap, final


def _ranges(values: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """Per column of ``values`` (samples × units), its ``1 − q`` and ``q`` quantiles (nearest rank)."""
    s = values.sort(dim=0).values
    n = len(s) - 1
    hi = s.gather(0, (q * n).round().long().unsqueeze(0)).squeeze(0)
    lo = s.gather(0, ((1 - q) * n).round().long().unsqueeze(0)).squeeze(0)
    return lo, hi


def _quantile(values: Tensor, q: float) -> float:
    """The ``q`` quantile (nearest rank) of a 1-D tensor of any length (``torch.quantile`` stops at 2^24)."""
    k = min(len(values), max(1, int(round(q * (len(values) - 1))) + 1))
    return float(values.kthvalue(k).values)


def _scale(values: Tensor, floor: float = 0.1) -> Tensor:
    """Per-unit clean standard deviation, floored at ``floor`` times the median unit's: units that clean
    data leaves constant (12% of the fmnist-tiny stem's, over the black border) were scaled by 1e-6, so
    any activity there outweighed the rest of the map and decided the gate alone."""
    std = values.std(0)
    return std.clamp_min(max(floor * float(std.median()), 1e-6))


def _units(plugin: ActivationAlignment, x: Tensor) -> Tensor:
    """Per-sample unit values ``(N, units)`` for range statistics."""
    return plugin.unit_values(x).flatten(1)


@DEFENSES.register("purifier-plus-no-rating")
class PurifierPlusNoRating(Defense):
    """Purifier+ without its importance rating (an ablation): every unit's range is its clean ``[1 − q, q]``
    quantiles, and no unit is boosted or suppressed.

    Args:
        granularity: ``channel``, ``cube`` or ``feature``.
        taps: stage outputs to align (names from ``TAP_NAMES``), fitted in network order.
        quantile: the range of a unit is its clean ``[1 − q, q]`` quantiles.
        gate: align only the inputs whose peak excess over ``hi`` (per unit, in clean standard deviations) is
            above this quantile of the clean inputs' (``ActivationAlignment``'s gate); ``None`` aligns every
            input. A plain clamp trims every clean input's upper tail too, which is what costs clean accuracy.
        gate_taps: with a gate, the taps whose gate scores inputs (``None``: every tap; names not among
            ``taps`` are ignored, but one must be). The other taps align only what these flag, on a second
            pass from the first tap (``ActivationAlignment(detect=False)``).
        local_taps: taps whose plug-in aligns only the anomalous positions of an input it aligns (those whose
            channels' mean scaled excess over ``hi`` tops the ``local_quantile`` of clean positions'), setting
            them to the middle of the range and leaving the rest of the map as it is; names not among ``taps``
            are ignored.
        local_quantile: the quantile of clean positions' excess above which a local tap replaces a position.
        samples: clean images used (at most all the defender holds).
        batch_size: images per forward pass.
    """

    needs = "5% clean unlabelled images"
    rated: ClassVar[bool] = False  # rate units by importance (PurifierPlus)

    def __init__(
        self,
        granularity: str = "feature",
        taps: Sequence[str] = TAP_NAMES,
        quantile: float = 0.75,
        gate: float | None = 0.99,
        gate_taps: Sequence[str] | None = ("layer3", "layer4"),
        local_taps: Sequence[str] = ("stem", "layer1", "layer2"),
        local_quantile: float = 0.95,
        samples: int | None = None,
        batch_size: int = 500,
        seed: int = 0,
        device: str = "cpu",
    ) -> None:
        super().__init__(seed, device)
        unit_shape(granularity, 1, 1)  # validates
        if gate is not None and not 0 < gate < 1:
            raise ValueError(f"gate must be a quantile in (0, 1) or null, got {gate}")
        if not 0.5 < quantile <= 1:
            raise ValueError(f"quantile must be in (0.5, 1], got {quantile}")
        bad = [t for t in taps if t not in TAP_NAMES]
        if bad or not taps:
            raise ValueError(f"taps must be a non-empty list from {', '.join(TAP_NAMES)}; got {list(taps)}")
        self.granularity, self.taps, self.quantile = granularity, sorted(taps, key=TAP_NAMES.index), quantile
        self.gate, self.gate_taps = gate, None
        if gate_taps is not None:  # those of the taps; the preset's stay valid when a user picks other taps
            unknown = [t for t in gate_taps if t not in TAP_NAMES]
            self.gate_taps = [t for t in self.taps if t in gate_taps]
            if unknown or not self.gate_taps:
                raise ValueError(f"gate_taps {list(gate_taps)} must name some of the taps {list(taps)} (or be null: every "
                                 f"tap scores)" + (f"; unknown taps: {', '.join(unknown)}" if unknown else ""))
        unknown = [t for t in local_taps or () if t not in TAP_NAMES]
        if unknown:
            raise ValueError(f"local_taps: unknown taps {', '.join(unknown)}; taps are {', '.join(TAP_NAMES)}")
        if not 0 < local_quantile < 1:
            raise ValueError(f"local_quantile must be in (0, 1), got {local_quantile}")
        self.local_taps = [t for t in self.taps if t in (local_taps or ())]
        self.local_quantile, self.samples, self.batch_size = local_quantile, samples, batch_size
        # Purifier+'s rating settings (PurifierPlus.__init__ sets them): a quantile rising with importance, and suppression
        self.quantile_low, self.suppress, self.suppress_gain = quantile, 0.0, 0.0

    @torch.no_grad()
    def _fit_ranges(self, encoder: Encoder, images: Tensor, tap: str, plugin: ActivationAlignment,
                    rank: Tensor | None = None) -> dict[str, Any]:
        """Clean ranges per unit: the ``[1 − q, q]`` quantiles, with ``q`` from ``quantile_low`` (rank 0, least
        important) to ``quantile`` (rank 1) when an importance ``rank`` is given, else ``quantile`` for all.

        A gated plug-in's threshold, and a local one's ``spot``, are calibrated out of sample: each half of the
        images is scored against ranges fitted on the other half. Scored against ranges they helped fit, the
        clean images' own excess is too low, and the gate took 2-4x its nominal share of new clean inputs at
        the stem and layer1.
        """
        values = torch.cat([_units(plugin, m) for m, _ in _stage_outputs(encoder, images, tap, self.batch_size)])
        q = (torch.full((values.shape[1],), self.quantile) if rank is None
             else self.quantile_low + (self.quantile - self.quantile_low) * rank)
        lo, hi = _ranges(values, q)
        plugin.lo.copy_(lo.view_as(plugin.lo))
        plugin.hi.copy_(hi.view_as(plugin.hi))
        clipped = ((values < lo) | (values > hi)).float().mean().item()
        stats: dict[str, Any] = {"units": values.shape[1], "clean_values_clipped": clipped, "mean_abs": values.abs().mean(0)}
        scores = plugin.gated and plugin.detect
        if plugin.gated and not scores:
            stats.update(gate=None, detects=False)
        if not (scores or plugin.local):
            return stats
        per_image = values.view(len(images), -1, values.shape[1])  # channel-wise: one row per position
        halves = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.seed)).chunk(2)
        excess, spots = torch.empty(len(images)), list[Tensor]()
        for fit, scored in (halves, halves[::-1]):
            part = per_image[fit].flatten(0, 1)
            plugin.hi.copy_(_ranges(part, q)[1].view_as(plugin.hi))
            plugin.scale.copy_(_scale(part).view_as(plugin.scale))
            rows = per_image[scored].flatten(0, 1).view(-1, *plugin.hi.shape[1:])
            if scores:
                per_row = plugin.excess(rows).view(len(scored), -1)  # channel-wise: a row per position
                excess[scored] = per_row.amax(1)
            if plugin.local:
                spots.append(position_excess(rows, plugin.hi, plugin.scale).flatten())
        plugin.hi.copy_(hi.view_as(plugin.hi))
        plugin.scale.copy_(_scale(values).view_as(plugin.scale))
        if scores:
            assert self.gate is not None
            plugin.gate.fill_(torch.quantile(excess, self.gate).item())
            stats.update(gate=plugin.gate.item(), clean_inputs_aligned=(excess > plugin.gate).float().mean().item())
        if plugin.local:
            spot = torch.cat(spots)
            plugin.spot.fill_(_quantile(spot, self.local_quantile))
            stats.update(spot=plugin.spot.item(), clean_positions_replaced=(spot > plugin.spot).float().mean().item())
        return stats

    def _importance(self, encoder: Encoder, images: Tensor, tap: str, plugin: ActivationAlignment) -> Tensor:
        """Taylor rating per unit: ``E |Σ_{e∈u} a_e ∂‖f‖/∂a_e|`` on clean images."""
        for p in encoder.parameters():
            p.requires_grad_(True)
        encoder.second_pass = False  # the gradient reaches the tap's map only if the features came from it
        try:
            total = torch.zeros(plugin.lo.numel())
            for fmap, final in _stage_outputs(encoder, images, tap, self.batch_size, grad=True):
                final.norm(dim=1).sum().backward()
                contrib = (fmap * fmap.grad).detach()
                if self.granularity == "channel":
                    per_unit = contrib.sum(dim=(2, 3))
                elif self.granularity == "cube":
                    per_unit = contrib.sum(dim=1).flatten(1)
                else:
                    per_unit = contrib.flatten(1)
                total += per_unit.abs().sum(0)
                encoder.zero_grad(set_to_none=True)
        finally:
            for p in encoder.parameters():
                p.requires_grad_(False)
            encoder.second_pass = True
        return total / len(images)

    def defend(self, enc: Encoder, data: DefenseData, out: Path | None,
               resume: bool) -> tuple[Encoder, dict[str, Any]]:
        if data.clean is None:
            raise ValueError("Purifier+ needs clean images")
        images = data.clean.images
        if self.samples is not None and self.samples < len(images):
            g = torch.Generator().manual_seed(self.seed)
            images = images[torch.randperm(len(images), generator=g)[: self.samples]]
        images = images.float().div(255)
        info = {t["name"]: t for t in enc.feature_info}
        layers = {}
        for tap in self.taps:
            if tap in enc.plugins:
                raise ValueError(f"the encoder already has a plug-in at {tap}; purify the original encoder")
            side = int(round(enc.spec.input_size / info[tap]["reduction"]))
            gated = self.gate is not None
            detect = not gated or self.gate_taps is None or tap in self.gate_taps
            plugin = ActivationAlignment(self.granularity, info[tap]["num_chs"], side, gated=gated, detect=detect,
                                         local=tap in self.local_taps)
            enc.attach(tap, plugin)  # identity until fitted; later taps are fitted behind it
            t_tap = time.perf_counter()
            rating = self._importance(enc, images, tap, plugin) if self.rated else None
            rank = None if rating is None else rating.argsort().argsort().float() / max(1, len(rating) - 1)
            stats = self._fit_ranges(enc, images, tap, plugin, rank)
            mean_abs = stats.pop("mean_abs")
            if rating is not None and self.suppress > 0:
                stats.update(self._gains(rating, plugin, mean_abs))
            stats["seconds"] = time.perf_counter() - t_tap
            layers[tap] = stats
        return enc, {"images_used": len(images), "layers": layers}

    def _gains(self, rating: Tensor, plugin: ActivationAlignment, mean_abs: Tensor) -> dict[str, Any]:
        k = int(self.suppress * len(rating))
        low = rating.argsort()[:k]
        keep = torch.ones(len(rating), dtype=torch.bool)
        keep[low] = False
        gain = torch.where(keep, 1.0, self.suppress_gain)
        mass = mean_abs if len(mean_abs) == len(rating) else torch.ones_like(rating)
        kept = (mass * gain).sum()
        boost = float((mass.sum() - (mass * gain)[~keep].sum()) / mass[keep].sum()) if kept > 0 else 1.0
        gain[keep] = boost
        plugin.gain.copy_(gain.view_as(plugin.gain))
        return {"suppressed": k, "boosted": len(rating) - k, "boost": boost,
                "rating_share_suppressed": float(rating[low].sum() / rating.sum().clamp_min(1e-12))}


@DEFENSES.register("purifier-plus")
class PurifierPlus(PurifierPlusNoRating):
    """Purifier+: the activation alignment with ranges that widen with each unit's importance.

    Args (besides those of :class:`PurifierPlusNoRating`):
        quantile_low: the quantile of the least important unit; it rises linearly with the importance rank up
            to ``quantile`` for the most important.
        suppress: share of units (lowest importance) scaled by ``suppress_gain``, the rest boosted to keep the
            layer's clean activation mass.
        suppress_gain: their gain (0 = silenced).
    """

    rated = True

    def __init__(self, quantile_low: float = 0.65, suppress: float = 0.0, suppress_gain: float = 0.0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0.5 < quantile_low <= self.quantile:
            raise ValueError(f"Purifier+ needs 0.5 < quantile_low <= quantile, got {quantile_low} and {self.quantile}")
        if not 0 <= suppress < 1 or suppress_gain < 0:
            raise ValueError("suppress must be in [0, 1) and suppress_gain >= 0")
        self.quantile_low, self.suppress, self.suppress_gain = quantile_low, suppress, suppress_gain
