"""The trainable end of a downstream classifier, run from cached activations.

Downstream defenses change the head, or the last stage and the head, of a classifier whose earlier
layers stay fixed. Their inputs at the cut (pooled features, or the map of the stage before) are
computed once; every optimisation step then costs only the tail, which is what keeps D3, TAC and
PAD-FT at seconds on a CPU. Stages in the tail run in eval mode: BatchNorm keeps its statistics, as
the defenses' small clean sets are no basis for new ones.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor, nn

from downstream.classifier import Classifier
from encoder_guard.encoders.encoder import TAP_MODULES, TAP_NAMES


class Tail:
    """Args:
        clf: the classifier (modified in place by whoever optimises :meth:`parameters`).
        cut: ``None`` or ``"head"`` (only the head is trainable; inputs are pooled features) or a tap name
            (the stages after it are trainable too; inputs are that tap's maps).
    """

    def __init__(self, clf: Classifier, cut: str | None = None, batch_size: int = 500) -> None:
        if cut not in (None, "head") and cut not in TAP_NAMES[:-1]:
            raise ValueError(f"cut must be 'head' or one of {', '.join(TAP_NAMES[:-1])}; got {cut!r}")
        self.clf, self.cut, self.batch_size = clf, None if cut == "head" else cut, batch_size

    def stages(self) -> list[nn.Module]:
        if self.cut is None:
            return []
        i = TAP_NAMES.index(self.cut)
        return [self.clf.encoder.backbone.get_submodule(m) for m in TAP_MODULES[i + 1 :]]

    def parameters(self, weights_only: bool = False) -> Iterator[nn.Parameter]:
        """The tail's parameters (``weights_only``: conv/linear weights, no biases or norm scales)."""
        modules: list[nn.Module] = [self.clf.head.linear, *self.stages()]
        for module in modules:
            for m in module.modules():
                if weights_only and not isinstance(m, (nn.Linear, nn.Conv2d)):
                    continue
                for name, p in m.named_parameters(recurse=False):
                    if not weights_only or name == "weight":
                        yield p

    @torch.no_grad()
    def inputs(self, images: Tensor) -> Tensor:
        """Activations at the cut for uint8 or ``[0, 1]`` float images."""
        enc = self.clf.encoder.eval()
        out = []
        for batch in images.split(self.batch_size):
            x = batch.float().div(255) if batch.dtype == torch.uint8 else batch
            out.append(enc(x) if self.cut is None else enc.forward_intermediates(x, [self.cut])[1][0])
        return torch.cat(out)

    def features(self, h: Tensor) -> Tensor:
        return h if self.cut is None else self.clf.encoder.forward_from(self.cut, h)

    def logits(self, h: Tensor) -> Tensor:
        return self.clf.head(self.features(h))

    def freeze_rest(self) -> None:
        """Gradients only for the tail."""
        self.clf.eval()
        for p in self.clf.parameters():
            p.requires_grad_(False)
        for p in self.parameters():
            p.requires_grad_(True)
