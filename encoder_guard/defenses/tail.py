"""The trainable end of a downstream classifier, run from cached activations.

Downstream defenses change the head, or the last stage and the head, of a classifier whose earlier
layers stay fixed. Their inputs at the cut (pooled features, or the map of the stage before) are
computed once; every optimisation step then costs only the tail, which is what keeps D3, TAC and
PAD-FT at seconds on a CPU. Stages in the tail run in eval mode: BatchNorm keeps its statistics, as
the defenses' small clean sets are no basis for new ones.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import Tensor, nn
from tqdm import trange

from downstream.classifier import Classifier, Head
from encoder_guard.encoders.encoder import TAP_MODULES, TAP_NAMES
from encoder_guard.errors import TrainingDivergedError
from encoder_guard.training import cosine_lr


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


class HeadTuner:
    """Fine-tune a classifier's linear head on standardised (clamped) features, then write it back.

    PAD-FT, TAC and fine-pruning all re-fit the head on cached features. The head acts on raw features,
    whose scale differs by encoder; training a copy on ``(clamp(f) − mean) / std`` lets one learning
    rate and weight decay serve every encoder (``Head.standardised``), and :meth:`commit` folds it back.

    Args:
        head: the head to tune (changed only by :meth:`commit`).
        feats: ``(N, D)`` raw features of the samples it is tuned on.
        seed: the generator used for batch order (and offered to loss terms as :attr:`generator`).
    """

    def __init__(self, head: Head, feats: Tensor, seed: int = 0) -> None:
        self.head = head
        self.clamped = head.clamp(feats)
        self.mean, self.std = head.feature_stats(self.clamped)
        self.x = (self.clamped - self.mean) / self.std
        self.layer = head.standardised(self.mean, self.std)
        self.generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def raw_weights(self) -> tuple[Tensor, Tensor]:
        """The layer as it would act on raw features: ``(W, b)``."""
        w = self.layer.weight / self.std
        return w, self.layer.bias - w @ self.mean

    def fit(self, batch_loss: Callable[[Tensor], Tensor], epochs: int, lr: float, weight_decay: float,
            batch_size: int, desc: str, before_epoch: Callable[[int], None] | None = None,
            cosine: bool = False) -> None:
        """Adam over shuffled minibatches; ``batch_loss(idx)`` is the loss of samples ``idx`` (use :attr:`layer`
        on :attr:`x`); ``before_epoch(epoch)`` runs at the start of every epoch; ``cosine`` anneals the rate."""
        fit_minibatches(list(self.layer.parameters()), len(self.x), batch_loss, epochs, lr, batch_size, desc,
                        self.generator, weight_decay=weight_decay, before_epoch=before_epoch, cosine=cosine)

    def commit(self) -> None:
        self.head.load_standardised(self.layer, self.mean, self.std)


def fit_minibatches(params: list[nn.Parameter], n: int, batch_loss: Callable[[Tensor], Tensor], epochs: int, lr: float,
                    batch_size: int, desc: str, generator: torch.Generator, weight_decay: float = 0.0,
                    before_epoch: Callable[[int], None] | None = None, after_step: Callable[[], None] | None = None,
                    cosine: bool = False) -> None:
    """Adam on ``params`` over ``epochs`` of shuffled minibatches of ``n`` cached samples, with a progress bar.

    ``batch_loss(idx)`` is the loss of samples ``idx``; ``before_epoch(epoch)`` runs at the start of every
    epoch, ``after_step()`` after every optimiser step (e.g. a projection). ``cosine`` anneals the rate to 0
    over the run (:func:`encoder_guard.training.cosine_lr`): at a constant rate the last steps decide where a
    head puts the boundary between look-alike classes, and PAD-FT's CA moved by 1.2 points with the batch
    order alone. A NaN/inf loss stops with :class:`TrainingDivergedError`.
    """
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    total, step = epochs * -(-n // batch_size), 0
    bar = trange(epochs, desc=desc, unit="epoch", leave=False, mininterval=1.0)
    for epoch in bar:
        if before_epoch is not None:
            before_epoch(epoch)
        seen = 0.0
        for idx in torch.randperm(n, generator=generator).split(batch_size):
            if cosine:
                for group in opt.param_groups:
                    group["lr"] = cosine_lr(step, total, lr)
            loss = batch_loss(idx)
            if not torch.isfinite(loss):
                raise TrainingDivergedError(f"{desc}'s loss became NaN/inf; lower defense.lr")
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if after_step is not None:
                after_step()
            seen += loss.item() * len(idx)
        bar.set_postfix(loss=f"{seen / n:.4f}", refresh=False)
